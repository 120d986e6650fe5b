"""``python -m lbclient simulate``: how an algorithm spreads keys, and how many keys move; for
the algorithms that ignore the key, how it spreads live load around one slow backend.

Keys go through the real code path, ``LoadBalancer(...).select(key)``, over backends
``10.0.0.1:8080``, ``10.0.0.2:8080``... with the given weights. Printed:

* each backend's share of the keys against its weighted fair share (weight / total weight), and
  the max/mean load ratio: for each backend, its keys over the keys its weight entitles it to;
  the largest of these (the mean, weighted, is 1);
* the share of keys whose backend changes when one backend is removed (the last one) and when
  one is added (a new last one, with the mean weight), after ``LoadBalancer.update``, beside the
  ideal minimum: the keys that must move, i.e. those of the removed backend, and those the new
  backend takes. For RoundRobin, SmoothRoundRobin, Random, LeastRequest, PeakEWMA and
  WeightedRoundRobin a key's backend is not a function of the key, so no such figure is printed
  for them, only why.

For those six, a simulated run follows, on a simulated clock (no sleeping, no threads):
``--clients`` clients each send requests back to back until ``--requests`` have completed. The
first backend answers in 10 ms, the others in 1 ms, each within +/-25%. Every request goes
through the balancer as a transport's would: ``select()``, ``begin()``, then at its completion
``observe()`` and ``load.end()``. Printed per backend: its share of the requests against its fair
share; overall: the mean and p99 latency and the requests per simulated second, beside
RoundRobin's as the baseline. A second run has every backend answer in 1 ms but the first one
answer every other request with a 503 in 0.1 ms: the share of failures callers see (nothing
retries, and passive health checks are not fed, so this is the algorithm's own doing).

For WeightedRoundRobin (``wrr``) the backends also report their load as an ORCA server would,
every 50 ms of simulated time: requests per second, errors per second, and the share of the
window spent serving (``cpu_utilization``) over the window, through ``report_load``. A run
lasts about a second, so it runs with no blackout and the shortest update period (0.1 s).

Keys are byte strings ``b"key-<n>"`` with ``n`` drawn from ``random.Random(seed)`` (distinct);
the routing hashes are lbclient's own (never Python's salted built-in hash), and every random
draw (service times, LeastRequest's and PeakEWMA's samples) comes from a generator seeded with
``--seed``, so a run is the same on every machine. ``--plot FILE.png`` draws the key spread and
the movement with matplotlib (``pip install 'lbclient[plot]'``); for the five algorithms that
ignore the key, the movement chart gives way to the shares of the slow-backend run.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from lbclient import (
    Backend,
    Consistent,
    FNVHash,
    Hash,
    LeastRequest,
    LoadBalancer,
    PeakEWMA,
    Prequal,
    Random,
    RoundRobin,
    SmoothRoundRobin,
    WeightedRoundRobin,
)
from lbclient.backend import MAX_WEIGHT
from lbclient.cli import COMMANDS
from lbclient.selection import AlgorithmLike, LibKetama, Maglev, Rendezvous

__all__ = [
    "ALGORITHMS",
    "BASELINE",
    "KEYED",
    "SCENARIOS",
    "LoadComparison",
    "LoadRun",
    "LoadShare",
    "Movement",
    "Share",
    "Simulation",
    "add_parser",
    "backends_for",
    "command",
    "compare_load",
    "format_load_report",
    "format_report",
    "make_keys",
    "plot",
    "simulate",
    "simulate_load",
]

#: The algorithms by their command-line name.
ALGORITHMS: dict[str, Callable[[int], AlgorithmLike]] = {
    "roundrobin": lambda _seed: RoundRobin,
    "smooth": lambda _seed: SmoothRoundRobin,
    "random": lambda seed: Random(seed),
    "leastrequest": lambda seed: LeastRequest(random=random.Random(seed).random),
    "peakewma": lambda seed: PeakEWMA(random=random.Random(seed).random),
    "wrr": lambda seed: _wrr(seed),
    "weightedroundrobin": lambda seed: _wrr(seed),
    # No probes in the simulator: Prequal picks by its peak EWMA fallback.
    "prequal": lambda seed: Prequal(random=random.Random(seed).random),
    "hash": lambda _seed: Hash,
    "fnv": lambda _seed: FNVHash,
    "consistent": lambda _seed: Consistent,
    "maglev": lambda _seed: Maglev,
    "rendezvous": lambda _seed: Rendezvous,
    "libketama": lambda _seed: LibKetama,
}


def _wrr(seed: int) -> WeightedRoundRobin:
    """WeightedRoundRobin for runs of about a second: weights count at once, and are
    recomputed every 0.1 s; its sequence counter starts where ``seed`` says."""
    return WeightedRoundRobin(
        blackout_period=0.0, weight_update_period=0.1, random=random.Random(seed).random
    )


#: The algorithms whose choice is a function of the key (the others ignore it).
KEYED = frozenset({"hash", "fnv", "consistent", "maglev", "rendezvous", "libketama"})
#: Why "the keys that move" means nothing for the others.
UNKEYED_REASON = {
    "roundrobin": "roundrobin does not map keys to backends: each select takes the next backend "
    "in turn, whatever the key",
    "smooth": "smooth does not map keys to backends: each select takes the next backend in "
    "nginx's smooth weighted order, whatever the key",
    "random": "random does not map keys to backends: each select picks a backend at random, "
    "whatever the key",
    "leastrequest": "leastrequest does not map keys to backends: each select takes the one with "
    "fewer requests in flight of two backends sampled at random, whatever the key (with none in "
    "flight, as for the keys above, either one)",
    "peakewma": "peakewma does not map keys to backends: each select takes the one of lower "
    "latency x (requests in flight + 1) of two backends sampled at random, whatever the key "
    "(with none measured and none in flight, as for the keys above, either one)",
    "wrr": "wrr does not map keys to backends: each select takes the next backend in a weighted "
    "round robin whose weights come from the load the backends report, whatever the key (with "
    "no reports, as for the keys above, plain round robin)",
    "prequal": "prequal does not map keys to backends: each select takes the coldest, fastest "
    "backend its probes reported, whatever the key (here, with no probes, peak EWMA's pick)",
}
UNKEYED_REASON["weightedroundrobin"] = UNKEYED_REASON["wrr"].replace("wrr", "weightedroundrobin", 1)
#: The algorithm every load run is compared with.
BASELINE = "roundrobin"

#: The defaults of the options whose default differs with --fleet (see fleet_sim's).
DEFAULTS = {"algorithm": "consistent", "backends": 10, "clients": 32, "requests": 20_000}
MAX_BACKENDS = 10_000
MAX_KEYS = 10_000_000
MAX_CLIENTS = 10_000
MAX_REQUESTS = 10_000_000
KEY_SPACE = 10**12  # keys are b"key-<n>" with n in 0..KEY_SPACE-1
PLOT_EXTRA = "pip install 'lbclient[plot]'"


@dataclass(frozen=True)
class Share:
    """One backend's keys in a layout, against its weighted fair share."""

    backend: Backend
    keys: int
    share: float  # keys / all keys
    fair: float  # weight / total weight

    @property
    def load(self) -> float:
        """Keys received over keys its weight entitles it to (1.0 is exactly fair)."""
        return self.share / self.fair


@dataclass(frozen=True)
class Movement:
    """What happens to the keys when ``backend`` is removed or added."""

    change: str  # "remove" or "add"
    backend: Backend
    moved: int  # keys whose backend changed
    ideal: int  # keys that had to move: the removed backend's keys, or the new backend's
    fair: float  # the backend's weighted fair share (in the layout that has it)
    total: int  # all keys

    @property
    def moved_share(self) -> float:
        """The share of all keys that moved."""
        return self.moved / self.total

    @property
    def ideal_share(self) -> float:
        """The share of all keys that had to move at least."""
        return self.ideal / self.total


@dataclass(frozen=True)
class Simulation:
    """The result of :func:`simulate`."""

    algorithm: str
    keys: int
    seed: int
    shares: tuple[Share, ...]
    #: None when the algorithm does not map keys to backends, or (removal) with one backend.
    removal: Movement | None
    addition: Movement | None

    @property
    def max_load(self) -> Share:
        """The backend with the largest load ratio (ties: the first in sorted order)."""
        return max(self.shares, key=lambda s: s.load)

    @property
    def min_load(self) -> Share:
        """The backend with the smallest load ratio (ties: the first in sorted order)."""
        return min(self.shares, key=lambda s: s.load)


def _address(i: int) -> str:
    """The address of backend ``i`` (0-based): 10.0.0.1:8080, 10.0.0.2:8080, ..."""
    n = i + 1
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}:8080"


def backends_for(weights: Sequence[int]) -> list[Backend]:
    """One backend per weight, in address order; ``Backend`` validates each weight."""
    return [Backend(_address(i), weight=w) for i, w in enumerate(weights)]


def make_keys(count: int, seed: int) -> list[bytes]:
    """``count`` distinct keys ``b"key-<n>"``, ``n`` drawn by ``random.Random(seed)``."""
    numbers = random.Random(seed).sample(range(KEY_SPACE), count)
    return [b"key-%d" % n for n in numbers]


def _owners(lb: LoadBalancer, keys: Sequence[bytes]) -> list[Backend | None]:
    return list(map(lb.select, keys))


def _moved(before: Sequence[Backend | None], after: Sequence[Backend | None]) -> int:
    return sum(1 for a, b in zip(before, after, strict=True) if a != b)


def simulate(
    algorithm: str, backends: Sequence[Backend], keys: Sequence[bytes], seed: int = 0
) -> Simulation:
    """Route ``keys`` through ``LoadBalancer(backends, algorithm).select`` and measure.

    The removed backend is the last in sorted order; the added one comes after it, with the
    mean weight (rounded). ``seed`` also seeds the ``random`` algorithm.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {sorted(ALGORITHMS)}")
    if not backends:
        raise ValueError("simulate needs at least one backend")
    if not keys:
        raise ValueError("simulate needs at least one key")
    lb = LoadBalancer(backends, ALGORITHMS[algorithm](seed))
    layout = lb.backends
    base = _owners(lb, keys)
    counts = Counter(base)
    total_weight = sum(b.weight for b in layout)
    total = len(keys)
    shares = tuple(
        Share(b, counts.get(b, 0), counts.get(b, 0) / total, b.weight / total_weight)
        for b in layout
    )
    if algorithm not in KEYED:
        return Simulation(algorithm, total, seed, shares, None, None)

    removal = None
    if len(layout) > 1:
        gone = layout[-1]
        lb.update(layout[:-1])
        removal = Movement(
            "remove",
            gone,
            _moved(base, _owners(lb, keys)),
            counts.get(gone, 0),
            gone.weight / total_weight,
            total,
        )
    weight = max(1, round(statistics.mean(b.weight for b in layout)))
    taken = {b.address for b in layout}
    index = len(layout)
    while _address(index) in taken:
        index += 1
    new = Backend(_address(index), weight=weight)
    lb.update([*layout, new])
    added = _owners(lb, keys)
    addition = Movement(
        "add",
        new,
        _moved(base, added),
        sum(1 for b in added if b == new),
        weight / (total_weight + weight),
        total,
    )
    return Simulation(algorithm, total, seed, shares, removal, addition)


# -- load runs -----------------------------------------------------------------------------------

#: The load runs: one backend 10x slower than the others, or one failing fast.
SCENARIOS = ("slow", "failing")
FAST = 0.001  # seconds: the service time of a healthy backend
SLOW = 0.010  # seconds: the slow backend's
FAIL = 0.0001  # seconds: the failing backend's 503
JITTER = 0.25  # every service time is within +/- this share of its nominal value
REPORT_WINDOW = 0.05  # seconds: how often backends report load, for algorithms that read it


class _Clock:
    """The simulated clock, in seconds; the event loop moves it on."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class LoadShare:
    """One backend's requests in a load run, against its weighted fair share."""

    backend: Backend
    requests: int
    failures: int  # requests it answered with a 503
    share: float  # requests / all requests
    fair: float  # weight / total weight


@dataclass(frozen=True)
class LoadRun:
    """The result of :func:`simulate_load`."""

    algorithm: str
    scenario: str  # "slow" or "failing"
    clients: int
    requests: int
    seed: int
    odd: Backend  # the slow backend, or the failing one
    shares: tuple[LoadShare, ...]
    mean: float  # seconds, over every request
    p99: float  # seconds, nearest rank
    duration: float  # simulated seconds until the last request completed
    failures: int

    @property
    def throughput(self) -> float:
        """Requests completed per simulated second."""
        return self.requests / self.duration if self.duration > 0 else math.inf

    @property
    def failure_share(self) -> float:
        """The share of all requests that failed."""
        return self.failures / self.requests

    @property
    def odd_share(self) -> LoadShare:
        """The slow (or failing) backend's share."""
        return next(s for s in self.shares if s.backend == self.odd)


@dataclass(frozen=True)
class LoadComparison:
    """An algorithm's load runs beside the baseline's: one (algorithm, baseline) pair per
    scenario, the same run twice when the algorithm is the baseline."""

    algorithm: str
    pairs: tuple[tuple[LoadRun, LoadRun], ...]


def simulate_load(
    algorithm: str,
    backends: Sequence[Backend],
    scenario: str = "slow",
    clients: int = 32,
    requests: int = 20_000,
    seed: int = 0,
) -> LoadRun:
    """Run ``requests`` requests from ``clients`` closed-loop clients through
    ``LoadBalancer(backends, algorithm)`` on a simulated clock, and measure.

    Each client sends its next request the moment the last one completes. A request takes
    ``select()`` and ``begin()``; at its completion, ``observe()`` and ``load.end()``. Backends
    answer in their own service time whatever their load (no queueing). The first backend in
    sorted order is the odd one: 10x slower (``"slow"``), or answering every other request
    with a 503 in 0.1 ms (``"failing"``). Every draw derives from ``random.Random(seed)``: the
    service times, and the algorithm's own samples; the shared ``random`` generator is left as
    it was.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {sorted(ALGORITHMS)}")
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {list(SCENARIOS)}")
    if not backends:
        raise ValueError("simulate_load needs at least one backend")
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ValueError(f"simulate_load needs at least one client, got {clients!r}")
    if isinstance(requests, bool) or not isinstance(requests, int) or requests < 1:
        raise ValueError(f"simulate_load needs at least one request, got {requests!r}")
    rng = random.Random(seed)
    samples = rng.getrandbits(64)  # the algorithm's own draws, apart from the service times
    clock = _Clock()
    lb = LoadBalancer(backends, ALGORITHMS[algorithm](samples), clock=clock)
    layout = lb.backends
    odd = layout[0]
    served: Counter[Backend] = Counter()
    failed: Counter[Backend] = Counter()
    latencies: list[float] = []
    # In flight: (completion time, order sent, start time, backend, failed).
    events: list[tuple[float, int, float, Backend, bool]] = []
    sent = odd_sent = 0

    def send(now: float) -> None:
        nonlocal sent, odd_sent
        backend = lb.select()
        if backend is None:  # every backend is healthy and enabled: never
            raise RuntimeError("the balancer selected no backend")
        lb.begin(backend)
        fails = False
        nominal = FAST
        if backend == odd:
            odd_sent += 1
            if scenario == "slow":
                nominal = SLOW
            elif odd_sent % 2 == 1:
                nominal, fails = FAIL, True
        service = nominal * (1.0 - JITTER + 2.0 * JITTER * rng.random())
        heapq.heappush(events, (now + service, sent, now, backend, fails))
        sent += 1

    reporting = bool(getattr(lb.algorithm, "load_reports", False))
    window = 0.0  # when the current report window began
    busy: dict[Backend, float] = {}  # seconds spent serving in the window
    answered: Counter[Backend] = Counter()
    errors: Counter[Backend] = Counter()

    for _ in range(min(clients, requests)):
        send(0.0)
    while events:
        done, _, start, backend, fails = heapq.heappop(events)
        clock.now = done
        latency = done - start
        load = lb.load(backend)  # the one begin() counted it on: the set never changes
        lb.observe(load, latency, fails)
        load.end()
        served[backend] += 1
        failed[backend] += fails
        latencies.append(latency)
        if reporting:
            busy[backend] = busy.get(backend, 0.0) + latency
            answered[backend] += 1
            errors[backend] += fails
            if done - window >= REPORT_WINDOW:
                _report(lb, done - window, busy, answered, errors)
                window = done
        if sent < requests:
            send(done)
    latencies.sort()
    total_weight = sum(b.weight for b in layout)
    shares = tuple(
        LoadShare(b, served[b], failed[b], served[b] / requests, b.weight / total_weight)
        for b in layout
    )
    return LoadRun(
        algorithm,
        scenario,
        clients,
        requests,
        seed,
        odd,
        shares,
        mean=math.fsum(latencies) / requests,
        p99=latencies[max(0, math.ceil(0.99 * requests) - 1)],
        duration=clock.now,
        failures=sum(failed.values()),
    )


def _report(
    lb: LoadBalancer,
    span: float,
    busy: dict[Backend, float],
    answered: Counter[Backend],
    errors: Counter[Backend],
) -> None:
    """Each backend that answered reports its load over the last ``span`` seconds, as an ORCA
    server would; the window's counts start over."""
    for backend, count in answered.items():
        lb.report_load(
            backend,
            f"TEXT rps_fractional={count / span:.6g}, eps={errors[backend] / span:.6g}, "
            f"cpu_utilization={busy[backend] / span:.6g}",
        )
    busy.clear()
    answered.clear()
    errors.clear()


def compare_load(
    algorithm: str,
    backends: Sequence[Backend],
    clients: int = 32,
    requests: int = 20_000,
    seed: int = 0,
    scenarios: Sequence[str] = SCENARIOS,
) -> LoadComparison:
    """:func:`simulate_load` for ``algorithm`` and for :data:`BASELINE`, per scenario."""
    pairs = []
    for scenario in scenarios:
        run = simulate_load(algorithm, backends, scenario, clients, requests, seed)
        baseline = (
            run
            if algorithm == BASELINE
            else simulate_load(BASELINE, backends, scenario, clients, requests, seed)
        )
        pairs.append((run, baseline))
    return LoadComparison(algorithm, tuple(pairs))


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.2f} ms"


def _nominal(seconds: float) -> str:
    return f"{1000 * seconds:g} ms"


def _format_pair(run: LoadRun, baseline: LoadRun) -> list[str]:
    """One scenario's table: per backend, then overall, a block of columns per run."""
    runs = [run] if baseline is run else [run, baseline]
    failing = run.scenario == "failing"
    odd = run.odd.address
    if failing:
        intro = (
            f"Simulated run, one backend failing fast: as above, but every backend answers in "
            f"{_nominal(FAST)}, and {odd} answers every other request with a 503 in "
            f"{_nominal(FAIL)} (observed as a failure; nothing retries, no health check ejects "
            "it)"
        )
    else:
        intro = (
            f"Simulated run, one slow backend: {run.clients:,} clients send requests back to "
            f"back until {run.requests:,} have completed; {odd} answers in {_nominal(SLOW)}, "
            f"the others in {_nominal(FAST)} (each within +/-{JITTER:.0%}, drawn by "
            f"random.Random({run.seed})); each request takes select and begin, then observe "
            "and load.end at its completion, on a simulated clock"
        )
    lines = textwrap.wrap(intro, width=100)
    heads = [f"{r.algorithm}{' (baseline)' if r.algorithm == BASELINE else ''}" for r in runs]
    columns = f"  {'requests':>9}  {'share':>8}" + (f"  {'failed':>8}" if failing else "")
    block = max(len(columns), *(len(h) + 2 for h in heads))
    width = max(len(s.backend.address) for s in run.shares)
    answers = 9 if failing else 7
    lead = 2 + width + 2 + 6 + 2 + answers
    lines.append(" " * lead + "".join(f"{h:>{block}}" for h in heads))
    lines.append(
        f"  {'backend':<{width}}  {'weight':>6}  {'answers':>{answers}}"
        + "".join(f"{columns:>{block}}" for _ in runs)
        + f"  {'fair':>8}"
    )
    for position, share in enumerate(run.shares):
        backend = share.backend
        if backend != run.odd:
            note, mark = _nominal(FAST), ""
        elif failing:
            note, mark = f"{_nominal(FAST)}, 503", "  <- failing fast"
        else:
            note, mark = _nominal(SLOW), "  <- slow"
        cells = ""
        for r in runs:
            other = r.shares[position]
            cell = f"  {other.requests:>9,}  {100 * other.share:>7.2f}%"
            if failing:
                cell += f"  {other.failures:>8,}"
            cells += f"{cell:>{block}}"
        lines.append(
            f"  {backend.address:<{width}}  {backend.weight:>6}  {note:>{answers}}"
            f"{cells}  {100 * share.fair:>7.2f}%{mark}"
        )

    def overall(label: str, value: Callable[[LoadRun], str]) -> str:
        return f"  {label:<{lead - 2}}" + "".join(f"{value(r):>{block}}" for r in runs)

    if failing:
        lines.append(
            overall(
                "failures callers see", lambda r: f"{100 * r.failure_share:.2f}% ({r.failures:,})"
            )
        )
    lines.append(overall("mean latency", lambda r: _ms(r.mean)))
    lines.append(overall("p99 latency", lambda r: _ms(r.p99)))
    lines.append(overall("throughput", lambda r: f"{r.throughput:,.0f} req/s"))
    return lines


def format_load_report(comparison: LoadComparison) -> str:
    """The load runs of :func:`compare_load`, as plain text."""
    lines: list[str] = []
    for run, baseline in comparison.pairs:
        if lines:
            lines.append("")
        lines += _format_pair(run, baseline)
    return "\n".join(lines)


def _bar(share: float, scale: float) -> str:
    return "#" * round(40 * share / scale) if scale > 0 else ""


def format_report(result: Simulation) -> str:
    """The distribution and the movement, as plain text."""
    shares = result.shares
    lines = [
        f"lbclient simulate: algorithm={result.algorithm}, {len(shares):,} backends, "
        f"{result.keys:,} keys (b'key-<n>', n drawn by random.Random({result.seed})), "
        "routed by LoadBalancer.select",
        "",
        "Distribution: each backend's share of the keys against its weighted fair share",
    ]
    width = max(len(s.backend.address) for s in shares)
    lines.append(
        f"  {'backend':<{width}}  {'weight':>6}  {'keys':>11}  {'share':>8}  "
        f"{'fair':>8}  {'load':>5}"
    )
    scale = max(s.share for s in shares)
    for s in shares:
        lines.append(
            f"  {s.backend.address:<{width}}  {s.backend.weight:>6}  {s.keys:>11,}  "
            f"{100 * s.share:>7.2f}%  {100 * s.fair:>7.2f}%  {s.load:>5.3f}  {_bar(s.share, scale)}"
        )
    high, low = result.max_load, result.min_load
    lines.append(
        f"  max/mean load ratio: {high.load:.3f} ({high.backend.address}: "
        f"{high.load - 1:.1%} above its fair share); lowest {low.load:.3f} "
        f"({low.backend.address})"
    )
    lines += ["", "Keys that move when the backend set changes (ideal: only the keys that must)"]
    if result.algorithm not in KEYED:
        lines.append(f"  n/a: {UNKEYED_REASON[result.algorithm]}; which keys move is not defined.")
        return "\n".join(lines)
    if result.removal is None:
        lines.append("  remove: n/a: removing the only backend leaves no backend to move to")
    for move in (result.removal, result.addition):
        if move is None:
            continue
        what = "its keys" if move.change == "remove" else "the keys it takes"
        lines.append(
            f"  {move.change} {move.backend.address} (weight {move.backend.weight}): "
            f"{100 * move.moved_share:.2f}% of keys move ({move.moved:,}); "
            f"ideal minimum {100 * move.ideal_share:.2f}% ({move.ideal:,}, {what}); "
            f"its fair share {100 * move.fair:.2f}%; "
            f"{move.moved / move.ideal if move.ideal else float('inf'):.2f}x the ideal"
        )
    return "\n".join(lines)


def load_matplotlib() -> ModuleType:
    """Import matplotlib with the Agg backend (no display); ImportError if it is missing."""
    import matplotlib

    matplotlib.use("Agg")
    return matplotlib


def plot(result: Simulation, path: Path, load: LoadComparison | None = None) -> None:
    """Draw the distribution and the movement into the PNG file ``path``; with ``load``, the
    shares of its first scenario (the slow backend) take the movement's place."""
    load_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, width_ratios=(2, 1))
    shares = result.shares
    xs = list(range(len(shares)))
    left.bar(xs, [100 * s.share for s in shares], color="tab:blue", label="share of keys")
    left.hlines(
        [100 * s.fair for s in shares],
        [x - 0.4 for x in xs],
        [x + 0.4 for x in xs],
        colors="black",
        linewidth=2,
        label="weighted fair share",
    )
    left.set_ylabel("% of keys")
    left.set_title(
        f"{result.algorithm}: {result.keys:,} keys over {len(shares):,} backends "
        f"(max/mean load {result.max_load.load:.3f})"
    )
    if len(shares) <= 30:
        left.set_xticks(
            xs,
            [f"{s.backend.address}\nw={s.backend.weight}" for s in shares],
            rotation=0 if len(shares) <= 6 else 60,
            fontsize=7,
        )
    else:
        left.set_xlabel("backends, in sorted order")
    top = max(max(s.share for s in shares), max(s.fair for s in shares))
    left.set_ylim(0, 100 * top * 1.25)  # room for the legend above the bars
    left.legend(loc="upper center", ncols=2)

    moves = [m for m in (result.removal, result.addition) if m is not None]
    right.set_title("keys that move")
    if load is not None and load.pairs:
        _plot_load(right, *load.pairs[0])
    elif result.algorithm not in KEYED:
        reason = UNKEYED_REASON[result.algorithm].replace(": ", ":\n")
        right.text(
            0.5,
            0.5,
            f"n/a:\n{reason}",
            ha="center",
            va="center",
            wrap=True,
            fontsize=9,
            transform=right.transAxes,
        )
        right.set_axis_off()
    else:
        positions = list(range(len(moves)))
        moved = right.bar(
            [p - 0.2 for p in positions],
            [100 * m.moved_share for m in moves],
            width=0.4,
            color="tab:orange",
            label="moved",
        )
        ideal = right.bar(
            [p + 0.2 for p in positions],
            [100 * m.ideal_share for m in moves],
            width=0.4,
            color="tab:green",
            label="ideal minimum",
        )
        right.bar_label(moved, fmt="%.1f%%", fontsize=8)
        right.bar_label(ideal, fmt="%.1f%%", fontsize=8)
        right.set_xticks(positions, [f"{m.change}\n{m.backend.address}" for m in moves], fontsize=8)
        right.set_ylabel("% of keys")
        right.set_ylim(0, 100)
        right.legend()
    figure.savefig(path, format="png", dpi=100)


def _plot_load(axes: Any, run: LoadRun, baseline: LoadRun) -> None:
    """The shares of one load run and of its baseline, per backend, on ``axes``."""
    runs = [run] if baseline is run else [run, baseline]
    xs = list(range(len(run.shares)))
    width = 0.8 / len(runs)
    for index, (r, color) in enumerate(zip(runs, ("tab:blue", "tab:gray"), strict=False)):
        offset = (index - (len(runs) - 1) / 2) * width
        axes.bar(
            [x + offset for x in xs],
            [100 * s.share for s in r.shares],
            width=width,
            color=color,
            label=r.algorithm,
        )
    axes.hlines(
        [100 * s.fair for s in run.shares],
        [x - 0.4 for x in xs],
        [x + 0.4 for x in xs],
        colors="black",
        linewidth=1.5,
        label="fair share",
    )
    axes.set_title(
        f"simulated run: {run.odd.address} {SLOW / FAST:g}x slower\n"
        f"{run.clients:,} clients, {run.requests:,} requests",
        fontsize=9,
    )
    axes.set_ylabel("% of requests")
    if len(xs) <= 30:
        axes.set_xticks(xs, [s.backend.address for s in run.shares], rotation=60, fontsize=7)
    else:
        axes.set_xlabel("backends, in sorted order (the slow one first)")
    top = max(max(s.share for r in runs for s in r.shares), max(s.fair for s in run.shares))
    axes.set_ylim(0, 100 * top * 1.3)  # room for the legend above the bars
    axes.legend(loc="upper center", ncols=len(runs) + 1, fontsize=7)


# -- command line --------------------------------------------------------------------------------


def _count(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in low..high, the error naming the bad value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low:,} to {high:,}, got {value}")
        return value

    return parse


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def parse_weights(text: str, backends: int) -> list[Backend]:
    """The backends for ``--weights W1,W2,...``; ValueError naming the bad value.

    Each weight is checked by ``Backend`` itself, as any weight given to lbclient is.
    """
    items = text.split(",")
    if len(items) != backends:
        raise ValueError(
            f"{len(items)} weight{'s' if len(items) != 1 else ''} given ({text!r}) for "
            f"--backends {backends}; give exactly {backends}, one per backend"
        )
    weights: list[int] = []
    for position, item in enumerate(items, 1):
        try:
            weights.append(int(item))
        except ValueError:
            raise ValueError(
                f"weight {position} of {text!r}, {item!r}, is not a whole number"
            ) from None
    result = []
    for position, weight in enumerate(weights, 1):
        try:
            result.append(Backend(_address(position - 1), weight=weight))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"weight {position} of {text!r}, {weight!r}: {exc}") from None
    return result


def command(args: argparse.Namespace) -> int:
    """Run ``python -m lbclient simulate``; 0, or 2 (after an error message) for bad input."""
    parser: argparse.ArgumentParser = args.simulate_parser
    from lbclient.cli import fleet_sim

    if not args.fleet:
        fleet_sim.check_not_fleet(args, parser)
        for name, default in DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
    backends: list[Backend] = []
    if args.fleet:
        pass  # the fleet makes its own backends
    elif args.weights is None:
        backends = backends_for([1] * args.backends)
    else:
        try:
            backends = parse_weights(args.weights, args.backends)
        except ValueError as exc:
            parser.error(f"argument --weights: {exc}")
    path: Path | None = None
    if args.plot is not None:
        path = Path(args.plot)
        if path.suffix.lower() != ".png":
            parser.error(f"argument --plot: {args.plot!r} must be a .png file")
        if not path.parent.is_dir():
            parser.error(f"argument --plot: the folder of {args.plot!r} does not exist")
        try:
            load_matplotlib()
        except ImportError:
            parser.error(f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA}")
    if args.fleet:
        return fleet_sim.command(args, parser, path)
    start = time.perf_counter()
    result = simulate(args.algorithm, backends, make_keys(args.keys, args.seed), args.seed)
    print(format_report(result))
    load: LoadComparison | None = None
    if args.algorithm not in KEYED:
        load = compare_load(args.algorithm, backends, args.clients, args.requests, args.seed)
        print()
        print(format_load_report(load))
    if path is not None:
        plot(result, path, load)
        print(f"\nplot written to {path}")
    print(f"\ntook {time.perf_counter() - start:.2f} s")
    return 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``simulate`` subcommand on ``python -m lbclient``'s subparsers."""
    sub = commands.add_parser(
        "simulate",
        help=COMMANDS["simulate"],
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument(
        "--algorithm",
        choices=list(ALGORITHMS),
        help="the selection algorithm (default: consistent; --fleet: roundrobin)",
    )
    sub.add_argument(
        "--backends",
        type=_count(1, MAX_BACKENDS),
        help="number of backends (default: 10; --fleet: 300)",
    )
    sub.add_argument(
        "--weights",
        metavar="W1,W2,...",
        help=f"one weight per backend, 1..{MAX_WEIGHT:,} each (default: all 1)",
    )
    sub.add_argument(
        "--keys",
        type=_count(1, MAX_KEYS),
        default=100_000,
        help="number of keys (default: 100,000)",
    )
    sub.add_argument(
        "--clients",
        type=_count(1, MAX_CLIENTS),
        help="load runs (the algorithms that ignore the key): clients sending "
        "requests back to back (default: 32; --fleet: the fleet's clients, 300)",
    )
    sub.add_argument(
        "--requests",
        type=_count(1, MAX_REQUESTS),
        help="load runs: requests completed per run (default: 20,000; --fleet: 100,000)",
    )
    sub.add_argument(
        "--seed",
        type=_integer,
        default=0,
        help="seed of the key generator, of the algorithms' random draws and of "
        "the load runs' service times (default: 0)",
    )
    sub.add_argument(
        "--plot",
        metavar="FILE.png",
        help=f"also draw both charts into FILE.png (needs {PLOT_EXTRA}); for the "
        "algorithms that ignore the key, the second is the slow-backend run's "
        "shares",
    )
    from lbclient.cli import fleet_sim

    fleet_sim.add_arguments(sub)
    sub.set_defaults(simulate_parser=sub)
