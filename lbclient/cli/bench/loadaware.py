"""Load-aware benchmark: RoundRobin, LeastRequest and PeakEWMA side by side when one backend of
four misbehaves, through ``AsyncLBTransport`` and through ``LBAdapter``.

Run it alone::

    python -m lbclient.cli.bench.loadaware           # 2 rounds of 2 s per case (about 100 s)
    python -m lbclient.cli.bench.loadaware --quick   # 1 round of 0.2 s per case (about 20 s)

or as part of ``python -m lbclient bench`` (extra rows of the summary, and this table under it).

Method: four backend servers run in their own processes (``lbclient/cli/bench/server.py``);
three answer every request after the base delay (50 ms: long enough that the backends set the
pace, not the client process's CPU), the fourth (the odd one) misbehaves, one way per run:

* **1 of 4 slow**: the odd backend answers ten times slower than the others;
* **1 of 4 stalling**: it answers like the others, but stops answering for 200 ms every second
  (what it owes then leaves when the stall ends);
* **1 of 4 failing half**: it answers every other request at once with a 503, the rest like the
  others.

Each case is one client and one algorithm: a fresh ``AsyncLBTransport`` driven by 32 asyncio tasks,
or a fresh ``LBAdapter`` on one ``requests.Session`` driven by 16 threads, each task or thread
sending one GET at a time as fast as the answers come. The balancer is ``LoadBalancer(backends,
algorithm, health=HealthPolicy(consecutive_5xx=None))``: 503s never eject a backend, so what the
figures show is the algorithm's doing alone; the transports have no retry budget (``budget=None``)
and retry no status, so a caller sees every 503. Each round of a case warms up for a quarter of a
second, no longer than the round (connections opened, latencies learnt; the requests it sent are
waited for), then runs for its time (whole stall periods in the stalling run); requests still out
when it is up are waited for and counted. The rounds of a run take turns between the algorithms.
Every latency is one GET from the call to the body read; p50 and p99 are nearest-rank percentiles
over all rounds; requests per second are the requests over the wall time; the odd backend's share
is counted by the servers themselves (the requests each answered while measured), the 503 share by
the callers; the client's CPU is this process's CPU time over the wall time (near 100%, the client
itself would be the bottleneck). Each load-aware row is set against RoundRobin's, in the same run
and client, as a ratio (the algorithm's figure / RoundRobin's). A measurement, not a test: the aims
are reported, never asserted.
"""

from __future__ import annotations

import asyncio
import platform
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import NamedTuple

import httpx
import requests

from lbclient import (
    AsyncLBTransport,
    HealthPolicy,
    LBAdapter,
    LeastRequest,
    LoadBalancer,
    PeakEWMA,
    RoundRobin,
)
from lbclient.cli.bench.hedging import percentile
from lbclient.cli.bench.rounds import round_parser, round_settings
from lbclient.cli.bench.server import served
from lbclient.cli.bench.tables import aligned
from lbclient.cli.bench.transport import launch_servers
from lbclient.selection.base import AlgorithmLike

__all__ = [
    "ALGORITHMS",
    "CLIENTS",
    "FAST",
    "NOTES",
    "RUNS",
    "SLOW",
    "TASKS",
    "THREADS",
    "Aim",
    "LoadRow",
    "aims",
    "case_seconds",
    "format_aims",
    "format_table",
    "main",
    "ratios",
    "reference",
    "run",
    "settings",
    "setup",
    "warm_up",
]

#: Seconds the well-behaved backends take to answer each request.
FAST = 0.05
#: Seconds the slow backend takes: ten times as long.
SLOW = 10 * FAST
#: The stalling backend stops answering for STALL_FOR seconds every STALL_EVERY seconds.
STALL_EVERY, STALL_FOR = 1.0, 0.2
#: The failing backend answers every FAIL_EVERY-th request with a fast 503.
FAIL_EVERY = 2
#: Concurrent asyncio tasks through AsyncLBTransport; threads through LBAdapter.
TASKS, THREADS = 32, 16
#: Seconds each round of a case runs for (after its warm-up), and the rounds of each case.
FULL_SECONDS, QUICK_SECONDS = 2.0, 0.2
FULL_ROUNDS, QUICK_ROUNDS = 2, 1
#: Seconds of warm-up before each case is measured.
WARMUP = 0.25


def warm_up(seconds: float) -> float:
    """The warm-up before rounds of ``seconds``: :data:`WARMUP`, or as long as a shorter round
    (the test suite's smallest runs)."""
    return min(WARMUP, seconds)


class Run(NamedTuple):
    """One way for the odd backend to misbehave."""

    name: str
    odd: str  # what the odd backend does, in words
    delay: float
    stall_every: float | None = None
    stall_for: float = 0.0
    fail_every: int | None = None


#: The runs, in order.
RUNS = (
    Run("1 of 4 slow", f"answers after {SLOW * 1000:g} ms", SLOW),
    Run(
        "1 of 4 stalling",
        f"stops answering for {STALL_FOR * 1000:g} ms every {STALL_EVERY:g} s",
        FAST,
        stall_every=STALL_EVERY,
        stall_for=STALL_FOR,
    ),
    Run(
        "1 of 4 failing half",
        f"answers every {FAIL_EVERY}nd request with a fast 503",
        FAST,
        fail_every=FAIL_EVERY,
    ),
)

#: The clients, as the table names them.
CLIENTS = (f"AsyncLBTransport, {TASKS} tasks", f"LBAdapter, {THREADS} threads")

#: The algorithms, each with how to make it; RoundRobin first: the reference.
ALGORITHMS: tuple[tuple[str, Callable[[], AlgorithmLike]], ...] = (
    ("RoundRobin", lambda: RoundRobin),
    ("LeastRequest", lambda: LeastRequest(choices=2)),
    ("PeakEWMA", lambda: PeakEWMA(decay=10.0)),
)
REFERENCE = ALGORITHMS[0][0]


class LoadRow(NamedTuple):
    """One case: one run, one client, one algorithm."""

    run: str
    client: str
    algorithm: str
    requests: int  # GETs completed in the measured part of the case
    seconds: float  # its wall time
    p50: float
    p99: float
    odd_share: float  # of the requests the servers answered, the odd backend's fraction
    failed_share: float  # of the responses the callers got, the 503s' fraction
    cpu: float  # the client process's CPU time over the wall time (1.0: one core busy)

    @property
    def per_second(self) -> float:
        """Requests per second over the case's wall time."""
        return self.requests / self.seconds


class _Tally:
    """What the measured parts of a case saw, added up over its rounds."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.failed = 0
        self.seconds = 0.0
        self.cpu = 0.0  # the client process's CPU seconds
        self.served: list[int] = []  # requests each backend answered

    def add_served(self, before: Sequence[int], after: Sequence[int]) -> None:
        done = [b - a for a, b in zip(before, after, strict=True)]
        if self.served:
            done = [a + b for a, b in zip(self.served, done, strict=True)]
        self.served = done

    def row(self, run: str, client: str, algorithm: str) -> LoadRow:
        total = sum(self.served)
        return LoadRow(
            run=run,
            client=client,
            algorithm=algorithm,
            requests=len(self.latencies),
            seconds=self.seconds,
            p50=percentile(self.latencies, 50),
            p99=percentile(self.latencies, 99),
            odd_share=self.served[-1] / total if total else 0.0,
            failed_share=self.failed / len(self.latencies),
            cpu=self.cpu / self.seconds,
        )


def _balancer(backends: Sequence[str], algorithm: AlgorithmLike) -> LoadBalancer:
    return LoadBalancer(backends, algorithm, health=HealthPolicy(consecutive_5xx=None))


def _counts(backends: Sequence[str]) -> list[int]:
    return [served(address) for address in backends]


async def _drive_async(client: httpx.AsyncClient, seconds: float, tally: _Tally) -> None:
    """:data:`TASKS` tasks sending GETs for ``seconds``; what they saw goes to ``tally``."""
    clock = time.perf_counter
    cpu = time.process_time()
    start = clock()
    end = start + seconds

    async def task() -> None:
        while clock() < end:
            began = clock()
            response = await client.get("/item")
            tally.latencies.append(clock() - began)
            if response.status_code == 503:
                tally.failed += 1
            elif response.status_code != 200:
                raise RuntimeError(f"a backend answered {response.status_code}")

    await asyncio.gather(*(task() for _ in range(TASKS)))
    tally.seconds += clock() - start
    tally.cpu += time.process_time() - cpu


def _async_case(
    backends: Sequence[str], algorithm: AlgorithmLike, seconds: float, tally: _Tally
) -> None:
    async def case() -> None:
        transport = AsyncLBTransport(_balancer(backends, algorithm), budget=None)
        async with httpx.AsyncClient(transport=transport, base_url="http://users") as client:
            await _drive_async(client, warm_up(seconds), _Tally())
            before = _counts(backends)  # no request is out: the loop may block here
            await _drive_async(client, seconds, tally)
            tally.add_served(before, _counts(backends))

    asyncio.run(case())


def _drive_threads(session: requests.Session, seconds: float, tally: _Tally) -> None:
    """:data:`THREADS` threads sending GETs for ``seconds``; what they saw goes to ``tally``."""
    clock = time.perf_counter
    lock = threading.Lock()
    go = threading.Event()
    end = [0.0]
    errors: list[BaseException] = []

    def thread() -> None:
        mine: list[float] = []
        failed = 0
        go.wait()
        try:
            while clock() < end[0]:
                began = clock()
                response = session.get("http://users/item")
                mine.append(clock() - began)
                if response.status_code == 503:
                    failed += 1
                elif response.status_code != 200:
                    raise RuntimeError(f"a backend answered {response.status_code}")
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        with lock:
            tally.latencies += mine
            tally.failed += failed

    threads = [threading.Thread(target=thread) for _ in range(THREADS)]
    for each in threads:
        each.start()
    cpu = time.process_time()
    start = clock()
    end[0] = start + seconds
    go.set()
    for each in threads:
        each.join()
    tally.seconds += clock() - start
    tally.cpu += time.process_time() - cpu
    if errors:
        raise errors[0]


def _threads_case(
    backends: Sequence[str], algorithm: AlgorithmLike, seconds: float, tally: _Tally
) -> None:
    adapter = LBAdapter(_balancer(backends, algorithm), budget=None, pool_maxsize=THREADS)
    with requests.Session() as session:
        session.mount("http://users/", adapter)
        _drive_threads(session, warm_up(seconds), _Tally())
        before = _counts(backends)
        _drive_threads(session, seconds, tally)
        tally.add_served(before, _counts(backends))


def case_seconds(run: Run, seconds: float) -> float:
    """How long a case of ``run`` is measured: ``seconds``, or whole stall periods."""
    if run.stall_every is None:
        return seconds
    return max(1, round(seconds / run.stall_every)) * run.stall_every


def settings(
    quick: bool, seconds: float | None = None, rounds: int | None = None
) -> tuple[float, int]:
    """(seconds per round, rounds per case): the given ones, or the mode's."""
    return round_settings(
        quick, seconds, rounds, (QUICK_SECONDS, QUICK_ROUNDS), (FULL_SECONDS, FULL_ROUNDS)
    )


def run(
    quick: bool = False, *, seconds: float | None = None, rounds: int | None = None
) -> list[LoadRow]:
    """Every run, client and algorithm, in that order; ``seconds`` (per round) and ``rounds``
    (per case) override the mode's. The rounds of a run's cases take turns, so that the
    machine's slow and fast phases hit every algorithm alike."""
    seconds, rounds = settings(quick, seconds, rounds)
    cases = (_async_case, _threads_case)
    rows = []
    with ExitStack() as stack:
        # Every run's backends start at once, side by side, and all listen before the first
        # run; each run sends to its own.
        launched = [
            (
                launch_servers(stack, 3, delay=FAST),
                launch_servers(
                    stack,
                    1,
                    delay=each.delay,
                    stall_every=each.stall_every,
                    stall_for=each.stall_for,
                    fail_every=each.fail_every,
                ),
            )
            for each in RUNS
        ]
        listening = [fast() + odd() for fast, odd in launched]
        for each, backends in zip(RUNS, listening, strict=True):
            tallies = {(client, name): _Tally() for client in CLIENTS for name, _ in ALGORITHMS}
            for client, case in zip(CLIENTS, cases, strict=True):
                for _ in range(rounds):
                    for name, make in ALGORITHMS:
                        case(backends, make(), case_seconds(each, seconds), tallies[client, name])
            rows += [tally.row(each.name, *key) for key, tally in tallies.items()]
    return rows


def reference(rows: Sequence[LoadRow], row: LoadRow) -> LoadRow:
    """RoundRobin's row of the same run and client as ``row``."""
    return next(
        r for r in rows if r.run == row.run and r.client == row.client and r.algorithm == REFERENCE
    )


def _ratio(ours: float, theirs: float) -> float | None:
    return ours / theirs if theirs > 0 else None


def ratios(rows: Sequence[LoadRow], row: LoadRow) -> dict[str, float | None]:
    """``row``'s figures over RoundRobin's, by figure: "req/s", "p99", "odd share", "503s"
    (None where RoundRobin's is zero)."""
    base = reference(rows, row)
    return {
        "req/s": _ratio(row.per_second, base.per_second),
        "p99": _ratio(row.p99, base.p99),
        "odd share": _ratio(row.odd_share, base.odd_share),
        "503s": _ratio(row.failed_share, base.failed_share),
    }


#: The table's columns, and whether each is right-aligned.
COLUMNS = (
    ("run", False),
    ("client", False),
    ("algorithm", False),
    ("req/s", True),
    ("req/s x RR", True),
    ("p50", True),
    ("p99", True),
    ("p99 x RR", True),
    ("odd share", True),
    ("odd x RR", True),
    ("503 share", True),
    ("503 x RR", True),
    ("client CPU", True),
)


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cells(rows: Sequence[LoadRow], row: LoadRow) -> tuple[str, ...]:
    first = row.algorithm == REFERENCE
    got = ratios(rows, row)

    def ratio(name: str) -> str:
        return "-" if first else _times(got[name])

    return (
        row.run,
        row.client,
        row.algorithm,
        f"{row.per_second:,.0f}",
        ratio("req/s"),
        f"{row.p50 * 1000:,.1f} ms",
        f"{row.p99 * 1000:,.1f} ms",
        ratio("p99"),
        f"{row.odd_share:.1%}",
        ratio("odd share"),
        f"{row.failed_share:.1%}",
        ratio("503s"),
        f"{row.cpu:.0%}",
    )


def format_table(rows: Sequence[LoadRow]) -> str:
    """Every case with its figures and its ratios to RoundRobin's: one plain-text table."""
    return aligned(COLUMNS, [_cells(rows, row) for row in rows])


class Aim(NamedTuple):
    """One aim, and how the run went against it."""

    text: str  # what is aimed at, e.g. "PeakEWMA p99 <= 0.30x RoundRobin's"
    run: str
    client: str
    value: float | None  # the ratio measured (None: RoundRobin's figure was zero)
    met: bool


#: The aims: (run, algorithm, figure, "<=" or ">=", ratio to RoundRobin's).
AIMS: tuple[tuple[str, str, str, str, float], ...] = (
    ("1 of 4 slow", "PeakEWMA", "p99", "<=", 0.3),
    ("1 of 4 slow", "LeastRequest", "req/s", ">=", 1.5),
    ("1 of 4 slow", "PeakEWMA", "req/s", ">=", 1.5),
    ("1 of 4 slow", "LeastRequest", "odd share", "<=", 1 / 3),
    ("1 of 4 slow", "PeakEWMA", "odd share", "<=", 1 / 3),
    ("1 of 4 failing half", "LeastRequest", "503s", "<=", 1 / 3),
    ("1 of 4 failing half", "PeakEWMA", "503s", "<=", 1 / 3),
)


def aims(rows: Sequence[LoadRow]) -> list[Aim]:
    """Every aim of :data:`AIMS` for every client in ``rows``."""
    out = []
    for client in dict.fromkeys(row.client for row in rows):
        for run_name, algorithm, figure, sense, bound in AIMS:
            row = next(
                (
                    r
                    for r in rows
                    if r.run == run_name and r.client == client and r.algorithm == algorithm
                ),
                None,
            )
            if row is None:
                continue
            value = ratios(rows, row)[figure]
            if value is None:  # RoundRobin's figure was zero: nothing to beat
                met = figure != "req/s"
            else:
                met = value <= bound if sense == "<=" else value >= bound
            text = f"{algorithm} {figure} {sense} {bound:.2f}x RoundRobin's"
            out.append(Aim(text, run_name, client, value, met))
    return out


def format_aims(found: Sequence[Aim]) -> str:
    """One line per aim: the run, the client, the aim, the ratio and whether it was met."""
    return "\n".join(
        f"  {aim.run}, {aim.client}: {aim.text}: {_times(aim.value)}x, "
        f"{'met' if aim.met else 'NOT MET'}"
        for aim in found
    )


def setup(seconds: float, rounds: int) -> str:
    """One line on what every case sends, and where."""
    return (
        f"{rounds} round{'s' if rounds > 1 else ''} of {seconds:g} s per case, each after "
        f"{warm_up(seconds):g} s of warm-up, from {TASKS} asyncio tasks "
        f"through AsyncLBTransport or {THREADS} threads through LBAdapter, to 4 loopback "
        f"backends answering after {FAST * 1000:g} ms, one of them the odd one: "
        + "; ".join(f"{each.name}: it {each.odd}" for each in RUNS)
    )


NOTES = (
    "x RR: the algorithm's figure / RoundRobin's, same run and client (below 1: fewer slow "
    "answers, fewer 503s, a shorter tail; above 1 for req/s: more throughput); odd share: the "
    "odd backend's share of the requests the servers answered; 503 share: the callers' share "
    "of 503 responses; health: HealthPolicy(consecutive_5xx=None), so no backend is ever "
    "ejected and only the algorithm steers; no retry budget, no status retried. The aims are "
    "a measurement's, reported and never asserted."
)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table and the aims; 0 whatever the figures (a measurement, not a test)."""
    parser = round_parser(__doc__)
    args = parser.parse_args(argv)
    try:
        seconds, rounds = settings(args.quick, args.seconds, args.rounds)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"Python {platform.python_version()} on {platform.platform()}, httpx {httpx.__version__}")
    print(textwrap.fill(setup(seconds, rounds), width=100, subsequent_indent="  "), flush=True)
    rows = run(seconds=seconds, rounds=rounds)
    print(format_table(rows))
    print("aims (ratios to RoundRobin's):")
    print(format_aims(aims(rows)))
    print(textwrap.fill(NOTES, width=100, subsequent_indent="  "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
