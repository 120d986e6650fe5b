"""The fleet benchmark's setups on a simulated clock: the algorithms without the client's CPU.

Run it::

    python -m lbclient.cli.bench.fleet_model            # 20,000 requests per case, ~15 s
    python -m lbclient.cli.bench.fleet_model --requests 4000 --seed 3

``python -m lbclient.cli.bench.fleet`` measures real processes on one machine, where the measured
client, the backends and the hidden load share two cores and the client's CPU often sets the
pace. This model runs the same shape with no CPU at all, so that what remains is the algorithm's
own doing: four backends, each serving ``slots`` requests at once for ``service`` seconds (x0.9
to x1.3, uniform) and queueing the rest in arrival order; each answers with the load report the
server companion sends, made by the companion's own ``LoadTracker`` on the simulated clock
(``named_metrics.rif``: its requests in flight besides this one; ``named_metrics.latency_ms``:
the median latency, queueing included, of its recent requests that found as many in flight). The
measured client sends ``tasks`` requests back to back through a real
:class:`~lbclient.LoadBalancer` on the simulated clock (``select``, ``begin``, then at the answer
``observe``, ``read_report`` and ``end``; probes, where the algorithm asks for them, are answered
with the same report after the round trip, as :mod:`lbclient.server` answers its probe path).
In the **hidden load** setup another client keeps ``hidden`` requests in flight on the first
backend, which the measured client's own counts cannot see. Printed per algorithm and setup: p50
and p99 of the measured requests, the share the loaded backend took, probes per request, and
requests per simulated second; then each p99 against peak EWMA's.

Every draw comes from ``random.Random(seed)``: a run is the same on every machine.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

from lbclient import LeastRequest, LoadBalancer, PeakEWMA, Prequal, RoundRobin
from lbclient.backend import Backend
from lbclient.selection.base import AlgorithmLike
from lbclient.server import Arrival, LoadTracker

__all__ = ["ALGORITHMS", "Result", "main", "run"]

#: Round trip between client and backend, seconds.
RTT = 0.0002
#: Requests sent before the measured ones (connections of the model are free; this lets the
#: latencies and the pool settle).
WARM = 2000

Make = Callable[[random.Random], AlgorithmLike]

ALGORITHMS: dict[str, Make] = {
    "RoundRobin": lambda _r: RoundRobin,
    "LeastRequest": lambda r: LeastRequest(random=r.random),
    "PeakEWMA": lambda r: PeakEWMA(random=r.random),
    "Prequal": lambda r: Prequal(random=r.random),
    "Prequal r_probe=0": lambda r: Prequal(0, random=r.random),
}


class Result(NamedTuple):
    p50: float  # seconds
    p99: float
    odd_share: float  # the loaded backend's share of the measured requests
    probes: float  # probes per request
    rate: float  # measured requests per simulated second


class _Server:
    """A backend: ``slots`` served at once, the rest queued in arrival order, counted by the
    server companion's own :class:`~lbclient.server.LoadTracker` on the simulated clock."""

    def __init__(self, slots: int, service: float, clock: Callable[[], float]) -> None:
        self.slots, self.service = slots, service
        self.busy = 0
        self.waiting: deque[tuple[Callable[[str], None], Arrival]] = deque()
        self.tracker = LoadTracker(clock=clock)

    def report(self) -> str:
        """The report a response carries (its request still counted in the tracker)."""
        return self.tracker.rendered("TEXT")

    def probe_report(self) -> str:
        """The report a probe gets (a probe counts nowhere), as the companion answers it."""
        return self.tracker.report().render("TEXT")


def run(
    make: Make,
    *,
    hidden: int = 0,
    tasks: int = 12,
    slots: int = 4,
    service: float = 0.005,
    requests: int = 20_000,
    seed: int = 1,
) -> Result:
    """One case: ``requests`` measured requests after :data:`WARM` unmeasured ones."""
    draw = random.Random(seed)
    now = 0.0
    events: list[tuple[float, int, Callable[[], None]]] = []
    order = itertools.count()

    def at(delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(events, (now + delay, next(order), fn))

    addresses = [f"10.0.0.{i}:80" for i in range(1, 5)]
    servers = {address: _Server(slots, service, lambda: now) for address in addresses}
    balancer = LoadBalancer(addresses, make(draw), clock=lambda: now, random=draw.random)
    latencies: list[float] = []
    taken = dict.fromkeys(addresses, 0)
    probes = 0
    sent = 0

    def start(server: _Server, done: Callable[[str], None], arrival: Arrival) -> None:
        at(server.service * draw.uniform(0.9, 1.3), lambda: finish(server, done, arrival))

    def arrive(server: _Server, done: Callable[[str], None]) -> None:
        arrival = server.tracker.begin()
        if server.busy < server.slots:
            server.busy += 1
            start(server, done, arrival)
        else:
            server.waiting.append((done, arrival))

    def finish(server: _Server, done: Callable[[str], None], arrival: Arrival) -> None:
        report = server.report()  # as the companion: made as the response starts
        server.tracker.end(arrival)
        if server.waiting:
            start(server, *server.waiting.popleft())
        else:
            server.busy -= 1
        done(report)

    def hidden_request(server: _Server) -> None:
        at(RTT / 2, lambda: arrive(server, lambda _report: hidden_request(server)))

    def probe(backend: Backend) -> None:
        server = servers[str(backend.address)]

        def answered() -> None:
            report = server.probe_report()
            at(RTT / 2, lambda: balancer.report_load(backend, report, probe=True) and None)

        at(RTT / 2, answered)

    def request() -> None:
        nonlocal probes, sent
        sent += 1
        measured = sent > WARM
        backend = balancer.select()
        assert backend is not None
        load = balancer.begin(backend)
        assert load is not None
        began = now
        for target in balancer.probe_targets():
            probes += 1
            probe(target)
        address = str(backend.address)

        def back(report: str) -> None:
            latency = now - began
            balancer.observe(load, latency, False)
            balancer.read_report(load, report, backend=backend)
            load.end()
            if measured:
                latencies.append(latency)
                taken[address] += 1
            if sent < WARM + requests:
                request()

        at(
            RTT / 2,
            lambda: arrive(servers[address], lambda report: at(RTT / 2, lambda: back(report))),
        )

    for _ in range(hidden):
        hidden_request(servers[addresses[0]])
    for _ in range(tasks):
        at(draw.random() * 1e-3, request)
    first = None
    while events and len(latencies) < requests:
        now, _, fn = heapq.heappop(events)
        if first is None and sent > WARM:
            first = now
        fn()
    latencies.sort()

    def rank(q: float) -> float:
        return latencies[min(len(latencies) - 1, max(0, int(q * len(latencies) + 0.5) - 1))]

    span = now - (first or 0.0)
    return Result(
        rank(0.5),
        rank(0.99),
        taken[addresses[0]] / len(latencies),
        probes / sent,
        len(latencies) / span if span > 0 else 0.0,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbclient.cli.bench.fleet_model")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=12)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.tasks < 1 or args.hidden < 0:
        parser.error("--requests and --tasks must be at least 1, --hidden at least 0")
    print(
        f"Four backends of 4 slots x 5 ms, {args.tasks} measured tasks, simulated clock, "
        f"seed {args.seed}, {args.requests:,} requests per case"
    )
    header = (
        "setup       | algorithm          |     p50 |     p99 | odd share | probes/req |  req/s"
    )
    print(header)
    print("-" * len(header))
    p99s: dict[tuple[str, str], float] = {}
    for setup, hidden in (("calm", 0), ("hidden load", args.hidden)):
        for name, make in ALGORITHMS.items():
            r = run(make, hidden=hidden, tasks=args.tasks, requests=args.requests, seed=args.seed)
            p99s[setup, name] = r.p99
            print(
                f"{setup:<11} | {name:<18} | {r.p50 * 1e3:5.2f} ms | {r.p99 * 1e3:5.2f} ms | "
                f"{r.odd_share:9.1%} | {r.probes:10.2f} | {r.rate:6,.0f}"
            )
    print()
    for setup in ("calm", "hidden load"):
        base = p99s[setup, "PeakEWMA"]
        ratios = ", ".join(
            f"{name} {p99s[setup, name] / base:.2f}x" for name in ALGORITHMS if name != "PeakEWMA"
        )
        print(f"p99 against PeakEWMA's, {setup}: {ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
