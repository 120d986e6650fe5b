"""A fleet on one machine: RoundRobin, LeastRequest, PeakEWMA, WeightedRoundRobin and Prequal
side by side, over backends of a fixed concurrency in their own processes, with load the
measured client cannot see.

Run it alone::

    python -m lbclient.cli.bench.fleet           # 3 rounds of 2 s per case (about 5 minutes)
    python -m lbclient.cli.bench.fleet --quick   # 1 round of 0.5 s per case (under a minute)
    python -m lbclient.cli.bench.fleet --tasks 32 --setups calm,stall   # the stall, busier
    python -m lbclient.cli.bench.fleet --service 5    # 5 ms per request: the client's CPU binds

Method: four backends, each a uvicorn process (one worker) serving an app of
``lbclient/cli/bench/fleet_apps.py``: a fixed concurrency of 4 requests served at once for 20 ms
each (``asyncio.sleep``; ``--service`` sets it), the others queued, so latency grows with the
queue. At 20 ms the measured client has CPU to spare (70-85% of a core), so the tails are the
backends' queues; at 5 ms it alone keeps a core busy (a Python client spends about a millisecond
of CPU per request on a small machine), so its own event loop sets much of every latency and the
tails move from run to run with whatever else runs. Behind ``LoadReportingASGI``, which
reports requests in flight, a latency estimate (per RIF), rps and eps when asked, an
``application_utilization`` (the mean requests in the app over the last second / 4) and answers
Prequal's probe path. The setups:

* **calm**: the four, nothing else: the reference for the others' tails;
* **hidden load**: another client process (``drive.py``, raw sockets) keeps 12 requests in
  flight on one backend only, started before the rounds: the measured client's own in-flight
  counts cannot see it;
* **stall**: one backend stops answering for 200 ms every second (every request in it waits);
* **fail-fast**: two backends answer every request at once with a 503 and report no load;
* **CPU-bound** (the negative case): four backends each burning 2 ms of CPU per request, at low
  load (4 tasks): nothing for a load-aware algorithm to exploit, and probes cost.

The measured client is one ``AsyncLBTransport`` over ``LoadBalancer(backends, algorithm)`` with
the default health policy (outlier detection on: five 5xx in a row eject a backend for 30 s, at
most one of four) and the default retry policy (no status retried): a caller sees every 503. It
is driven by 12 asyncio tasks (4 in the CPU-bound setup; ``--tasks`` sets both), each sending
one GET at a time as fast as the answers come. Each case (one setup, one algorithm) gets a fresh
transport and balancer, a warm-up (1.2 s: connections opened, latencies learnt, and
WeightedRoundRobin's blackout of 1 s over), then runs for its time (whole stall periods in the
stall setup); the requests still out are waited for and counted. Within a setup, the rounds
take turns between the algorithms, so that the machine's slow and fast phases hit each alike.
Every latency is one GET from the call to the body read; p50 and p99 are nearest-rank over all
rounds; req/s is requests over wall time; the odd share is the odd backend's share of the
measured client's responses, counted by the port each answer names (hidden load: the loaded
backend; stall: the stalling one; fail-fast: the two failing ones); failures are 503s and
transport errors the callers saw; probes per request come from the transport's ``stats()``
(``probes_sent``) where it has them. Prequal is measured when ``lbclient`` exports it. A
measurement, not a test: the aims are reported, never asserted.
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import httpx

import lbclient
from lbclient import (
    AsyncLBTransport,
    LeastRequest,
    LoadBalancer,
    PeakEWMA,
    RoundRobin,
    WeightedRoundRobin,
)
from lbclient.cli.bench.fleet_apps import (
    CPU_BURN,
    DEFAULT_SERVICE,
    SERVICE_VARIABLE,
    STALL_EVERY,
    STALL_FOR,
    WORKERS,
)
from lbclient.cli.bench.hedging import percentile
from lbclient.cli.bench.processes import reap
from lbclient.cli.bench.pyservers import start_uvicorns, uvicorn_flavour
from lbclient.cli.bench.rounds import round_parser, round_settings
from lbclient.cli.bench.tables import aligned
from lbclient.selection.base import AlgorithmLike

__all__ = [
    "ALGORITHMS",
    "NOTES",
    "QUICK_SUMMARY_SETUPS",
    "SETUPS",
    "Aim",
    "FleetRow",
    "Setup",
    "aims",
    "describe",
    "format_aims",
    "format_table",
    "main",
    "run",
    "settings",
    "summary_cells",
    "summary_setups",
]

#: Tasks of the measured client, and of the CPU-bound (low load) setup.
TASKS, LOW_TASKS = 12, 4
#: Requests the hidden load keeps in flight on its backend.
HIDDEN = 12
#: Seconds each round of a case runs for (after its warm-up), and the rounds of each case.
FULL_SECONDS, QUICK_SECONDS = 2.0, 0.5
FULL_ROUNDS, QUICK_ROUNDS = 3, 1
#: Seconds of warm-up before each case is measured (WeightedRoundRobin's blackout is 1 s).
WARMUP = 1.2
#: WeightedRoundRobin's settings here (gRPC's defaults: 10 s and 1 s).
WRR_BLACKOUT, WRR_UPDATE = 1.0, 0.2
_APPS = "lbclient.cli.bench.fleet_apps:"
_DRIVE = Path(__file__).with_name("drive.py")


def warm_up(seconds: float) -> float:
    """The warm-up before rounds of ``seconds``: :data:`WARMUP`, shorter for the test suite's
    tiny rounds (2.5x the round)."""
    return min(WARMUP, 2.5 * seconds)


class Setup(NamedTuple):
    """One fleet: its four backends' apps, and what is odd about it."""

    name: str
    apps: tuple[str, str, str, str]
    odd: tuple[int, ...]  # the backends whose share the table gives
    hidden: int | None = None  # the backend another client process loads
    low_load: bool = False  # LOW_TASKS instead of TASKS
    whole_stalls: bool = False  # rounds of whole stall periods


#: The setups, in order.
SETUPS = (
    Setup("calm", ("queued",) * 4, ()),
    Setup("hidden load", ("queued",) * 4, (0,), hidden=0),
    Setup("stall", ("queued", "queued", "queued", "stalling"), (3,), whole_stalls=True),
    Setup("fail-fast", ("queued", "queued", "failing", "failing"), (2, 3)),
    Setup("CPU-bound", ("cpu_bound",) * 4, (), low_load=True),
)


def _prequal() -> Callable[[], AlgorithmLike] | None:
    """How to make Prequal, if this lbclient has it."""
    prequal: Callable[[], AlgorithmLike] | None = getattr(lbclient, "Prequal", None)
    return prequal


#: The algorithms, each with how to make it (None: this lbclient does not have it).
ALGORITHMS: tuple[tuple[str, Callable[[], AlgorithmLike] | None], ...] = (
    ("RoundRobin", lambda: RoundRobin),
    ("LeastRequest", lambda: LeastRequest(choices=2)),
    ("PeakEWMA", lambda: PeakEWMA(decay=10.0)),
    (
        "WeightedRoundRobin",
        lambda: WeightedRoundRobin(blackout_period=WRR_BLACKOUT, weight_update_period=WRR_UPDATE),
    ),
    ("Prequal", _prequal()),
)


class FleetRow(NamedTuple):
    """One case: one setup, one algorithm, over all its rounds."""

    setup: str
    algorithm: str
    tasks: int
    available: bool
    requests: int = 0
    seconds: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    odd_share: float | None = None  # None: the setup has no odd backend
    failures: int = 0
    probes: float | None = None  # probes per request; None: the transport counts none
    dropped: float | None = None  # probes dropped per request, where counted
    cpu: float = 0.0  # the client process's CPU time over the wall time

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed_share(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


class _Tally:
    """What the measured parts of a case saw, added up over its rounds."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.failures = 0
        self.ports: Counter[str] = Counter()
        self.seconds = 0.0
        self.cpu = 0.0
        self.probes: int | None = None
        self.dropped: int | None = None  # probes the transport dropped (too many pending)
        self.requests = 0  # as the transport counted them, for probes per request

    def row(self, setup: Setup, algorithm: str, tasks: int, odd: Sequence[str]) -> FleetRow:
        answered = sum(self.ports.values())
        share = None
        if setup.odd:
            share = sum(self.ports[port] for port in odd) / answered if answered else 0.0
        probes = dropped = None
        if self.probes is not None and self.requests:
            probes = self.probes / self.requests
        if self.dropped is not None and self.requests:
            dropped = self.dropped / self.requests
        return FleetRow(
            setup=setup.name,
            algorithm=algorithm,
            tasks=tasks,
            available=True,
            requests=len(self.latencies),
            seconds=self.seconds,
            p50=percentile(self.latencies, 50),
            p99=percentile(self.latencies, 99),
            odd_share=share,
            failures=self.failures,
            probes=probes,
            dropped=dropped,
            cpu=self.cpu / self.seconds if self.seconds > 0 else 0.0,
        )


async def _drive(client: httpx.AsyncClient, seconds: float, tasks: int, tally: _Tally) -> None:
    """``tasks`` tasks sending GETs for ``seconds``; what they saw goes to ``tally``."""
    clock = time.perf_counter
    cpu = time.process_time()
    start = clock()
    end = start + seconds

    async def task() -> None:
        while clock() < end:
            began = clock()
            try:
                response = await client.get("/item")
            except httpx.HTTPError:
                tally.latencies.append(clock() - began)
                tally.failures += 1
                continue
            tally.latencies.append(clock() - began)
            tally.ports[response.text] += 1
            if response.status_code != 200:
                tally.failures += 1

    await asyncio.gather(*(task() for _ in range(tasks)))
    tally.seconds += clock() - start
    tally.cpu += time.process_time() - cpu


def _probes_sent(transport: AsyncLBTransport) -> tuple[int, int | None, int | None]:
    """(requests, probes sent, probes dropped) as the transport's ``stats()`` counts them
    (None: it counts no probes)."""
    stats = transport.stats()
    sent = getattr(stats, "probes_sent", None)
    dropped = getattr(stats, "probes_dropped", None)
    return (
        stats.requests,
        sent if isinstance(sent, int) else None,
        dropped if isinstance(dropped, int) else None,
    )


def _case(
    backends: Sequence[str],
    algorithm: AlgorithmLike,
    seconds: float,
    warm: float,
    tasks: int,
    tally: _Tally,
) -> None:
    async def case() -> None:
        transport = AsyncLBTransport(LoadBalancer(backends, algorithm))
        async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as client:
            await _drive(client, warm, tasks, _Tally())
            requests, probes, dropped = _probes_sent(transport)
            await _drive(client, seconds, tasks, tally)
            requests_after, probes_after, dropped_after = _probes_sent(transport)
            tally.requests += requests_after - requests
            if probes is not None and probes_after is not None:
                tally.probes = (tally.probes or 0) + probes_after - probes
            if dropped is not None and dropped_after is not None:
                tally.dropped = (tally.dropped or 0) + dropped_after - dropped

    asyncio.run(case())


@contextmanager
def _hidden_load(address: str, connections: int) -> Iterator[subprocess.Popen[bytes]]:
    """Another client process keeping ``connections`` requests in flight on ``address`` until
    the block ends (then terminated, killed if it lingers)."""
    load = subprocess.Popen(
        [sys.executable, str(_DRIVE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert load.stdin is not None
        port = address.rpartition(":")[2]
        load.stdin.write(f"{port} 86400 {connections} -\n".encode())
        load.stdin.flush()
        yield load
    finally:
        load.terminate()
        reap(load, 10)
        if load.stdin is not None:
            load.stdin.close()


def case_seconds(setup: Setup, seconds: float) -> float:
    """How long a case of ``setup`` is measured: ``seconds``, or whole stall periods."""
    if not setup.whole_stalls:
        return seconds
    return max(1, round(seconds / STALL_EVERY)) * STALL_EVERY


def settings(
    quick: bool, seconds: float | None = None, rounds: int | None = None
) -> tuple[float, int]:
    """(seconds per round, rounds per case): the given ones, or the mode's."""
    return round_settings(
        quick, seconds, rounds, (QUICK_SECONDS, QUICK_ROUNDS), (FULL_SECONDS, FULL_ROUNDS)
    )


def _tasks(setup: Setup, tasks: int | None) -> int:
    if tasks is not None:
        return tasks
    return LOW_TASKS if setup.low_load else TASKS


def run(
    seconds: float,
    rounds: int,
    *,
    setups: Sequence[Setup] = SETUPS,
    tasks: int | None = None,
    service: float = DEFAULT_SERVICE,
) -> list[FleetRow]:
    """Every setup and algorithm, in that order; ``tasks`` overrides every setup's, ``service``
    is the seconds a queued backend serves a request for."""
    rows: list[FleetRow] = []
    env = {**os.environ, SERVICE_VARIABLE: repr(service * 1000.0)}
    for setup in setups:
        count = _tasks(setup, tasks)
        made = [(name, make) for name, make in ALGORITHMS if make is not None]
        tallies = {name: _Tally() for name, _ in made}
        with ExitStack() as stack:
            servers = start_uvicorns(stack, [_APPS + app for app in setup.apps], env=env)
            backends = [server.address for server in servers]
            odd = [backends[i].rpartition(":")[2] for i in setup.odd]
            load = None
            if setup.hidden is not None:
                load = stack.enter_context(_hidden_load(backends[setup.hidden], HIDDEN))
                time.sleep(0.5)  # its connections open and its queue forms
            for _ in range(rounds):
                for name, make in made:
                    span = case_seconds(setup, seconds)
                    _case(backends, make(), span, warm_up(seconds), count, tallies[name])
            if load is not None and load.poll() is not None:
                raise RuntimeError(f"the hidden load stopped early (exit {load.returncode})")
        for name, maybe in ALGORITHMS:
            if maybe is None:
                rows.append(FleetRow(setup.name, name, count, available=False))
            else:
                rows.append(tallies[name].row(setup, name, count, odd))
    return rows


#: The table's columns, and whether each is right-aligned.
COLUMNS = (
    ("setup", False),
    ("algorithm", False),
    ("tasks", True),
    ("req/s", True),
    ("p50", True),
    ("p99", True),
    ("odd share", True),
    ("failures", True),
    ("probes/req", True),
    ("client CPU", True),
)


def _probes(row: FleetRow) -> str:
    if row.probes is None:
        return "-"
    if not row.dropped:
        return f"{row.probes:.2f}"
    return f"{row.probes:.2f} (+{row.dropped:.2f} dropped)"


def _cells(row: FleetRow) -> tuple[str, ...]:
    if not row.available:
        return (row.setup, row.algorithm, str(row.tasks), "not available", *("-",) * 6)
    return (
        row.setup,
        row.algorithm,
        str(row.tasks),
        f"{row.per_second:,.0f}",
        f"{row.p50 * 1000:,.1f} ms",
        f"{row.p99 * 1000:,.1f} ms",
        "-" if row.odd_share is None else f"{row.odd_share:.1%}",
        f"{row.failures:,} ({row.failed_share:.1%})",
        _probes(row),
        f"{row.cpu:.0%}",
    )


def format_table(rows: Sequence[FleetRow]) -> str:
    """Every case with its figures: one plain-text table."""
    return aligned(COLUMNS, [_cells(row) for row in rows])


class Aim(NamedTuple):
    """One aim, and how the run went against it."""

    setup: str
    text: str  # what is aimed at, e.g. "Prequal p99 <= 0.60x PeakEWMA's"
    value: float | None  # the ratio measured (None: not measured)
    verdict: str  # "met", "NOT MET", "for information", or why it was not measured


def _find(rows: Sequence[FleetRow], setup: str, algorithm: str) -> FleetRow | None:
    return next((r for r in rows if r.setup == setup and r.algorithm == algorithm), None)


def _figure(row: FleetRow, figure: str) -> float:
    if figure == "p99":
        return row.p99
    if figure == "req/s":
        return row.per_second
    return row.failed_share


#: The aims: (setup, algorithm, figure, "<=" or ">=", bound, against which algorithm).
AIMS: tuple[tuple[str, str, str, str, float, str], ...] = (
    ("hidden load", "Prequal", "p99", "<=", 0.6, "PeakEWMA"),
    ("fail-fast", "Prequal", "failures", "<=", 0.2, "RoundRobin"),
    ("CPU-bound", "Prequal", "req/s", ">=", 0.9, "RoundRobin"),
)
#: The algorithms whose stall and hidden load p99 are set against their calm p99.
INFORMATION = ("RoundRobin", "LeastRequest", "PeakEWMA", "WeightedRoundRobin", "Prequal")


def aims(rows: Sequence[FleetRow]) -> list[Aim]:
    """The aims of :data:`AIMS` the rows allow, then each algorithm's p99 in the hidden load and
    stall setups over its p99 in the calm one (for information)."""
    out = []
    for setup, algorithm, figure, sense, bound, against in AIMS:
        row, base = _find(rows, setup, algorithm), _find(rows, setup, against)
        if row is None or base is None:
            continue
        text = f"{algorithm} {figure} {sense} {bound:.2f}x {against}'s"
        if not row.available or not base.available:
            out.append(Aim(setup, text, None, f"not measured ({algorithm} not available)"))
            continue
        ours, theirs = _figure(row, figure), _figure(base, figure)
        if theirs <= 0:
            out.append(Aim(setup, text, None, f"not measured ({against}'s {figure} is 0)"))
            continue
        value = ours / theirs
        met = value <= bound if sense == "<=" else value >= bound
        out.append(Aim(setup, text, value, "met" if met else "NOT MET"))
    for setup in ("hidden load", "stall"):
        for algorithm in INFORMATION:
            row, calm = _find(rows, setup, algorithm), _find(rows, "calm", algorithm)
            if row is None or calm is None or not row.available or calm.p99 <= 0:
                continue
            text = f"{algorithm} p99 / its calm p99 ({calm.p99 * 1000:.1f} ms)"
            out.append(Aim(setup, text, row.p99 / calm.p99, "for information"))
    return out


def format_aims(found: Sequence[Aim]) -> str:
    """One line per aim: the setup, the aim, the ratio and the verdict."""
    return "\n".join(
        f"  {aim.setup}: {aim.text}: "
        + ("-" if aim.value is None else f"{aim.value:.2f}x")
        + f", {aim.verdict}"
        for aim in found
    )


def describe(
    seconds: float, rounds: int, tasks: int | None, service: float = DEFAULT_SERVICE
) -> str:
    """One paragraph on what every case sends, and where."""
    many, few = (tasks, tasks) if tasks is not None else (TASKS, LOW_TASKS)
    return (
        f"{rounds} round{'s' if rounds > 1 else ''} of {seconds:g} s per case, each after "
        f"{warm_up(seconds):g} s of warm-up, from {many} asyncio tasks ({few} in the CPU-bound "
        f"setup) through AsyncLBTransport to 4 uvicorn backends serving {WORKERS} requests at "
        f"once for {service * 1000:g} ms each; hidden load: another process keeps {HIDDEN} "
        f"requests in flight on one; stall: one stops for {STALL_FOR * 1000:g} ms every "
        f"{STALL_EVERY:g} s; fail-fast: two answer 503 at once and report no load; CPU-bound: "
        f"each request burns {CPU_BURN * 1000:g} ms of CPU. Load average "
        + " ".join(f"{value:.2f}" for value in os.getloadavg())
        + f" on {os.cpu_count()} CPUs."
    )


NOTES = (
    "odd share: of the measured client's responses, the loaded backend's (hidden load), the "
    "stalling one's (stall), the two failing ones' (fail-fast); failures: 503s and transport "
    "errors the callers saw; probes/req: probes sent per request, from the transport's stats() "
    "('-': it counts none), and those it dropped (too many pending) where there were any. "
    "LeastRequest(choices=2), PeakEWMA(decay=10.0), "
    f"WeightedRoundRobin(blackout_period={WRR_BLACKOUT:g}, weight_update_period={WRR_UPDATE:g}) "
    "(gRPC's defaults, 10 s and 1 s, would need a longer warm-up), Prequal() with its defaults; "
    "the default health policy (outlier detection on) and retry policy. The aims are a "
    "measurement's, reported and never asserted."
)


#: The setups ``python -m lbclient bench --quick`` runs (a full run: every one).
QUICK_SUMMARY_SETUPS = ("hidden load",)


def summary_setups(quick: bool) -> list[Setup]:
    """The setups of ``python -m lbclient bench``: every one, or in a quick run the hidden-load
    one (the main aim's)."""
    return [s for s in SETUPS if not quick or s.name in QUICK_SUMMARY_SETUPS]


#: The summary's rows: (setup, figure, Prequal's rival, what the row says).
SUMMARY_FIGURES = (
    ("hidden load", "p99", "PeakEWMA", "Prequal vs PeakEWMA p99, fleet, 1 of 4 loaded unseen"),
    (
        "fail-fast",
        "failures",
        "RoundRobin",
        "Prequal vs RoundRobin failures, fleet, 2 of 4 failing",
    ),
    ("CPU-bound", "req/s", "RoundRobin", "Prequal vs RoundRobin req/s, fleet, CPU-bound backends"),
)


def _summary_cell(row: FleetRow, figure: str) -> str:
    if figure == "p99":
        return f"{row.p99 * 1000:,.1f} ms"
    if figure == "req/s":
        return f"{row.per_second:,.0f} req/s"
    return f"{row.failed_share:.1%}"


def summary_cells(rows: Sequence[FleetRow]) -> list[tuple[str, str, str, str, str]]:
    """``python -m lbclient bench``'s rows for the fleet: Prequal against its rival in each
    setup measured (benchmark, Prequal's figure, the rival's, the gain, no floor). The gain is
    above 1 when Prequal does better: req/s over the rival's, the rival's p99 or failures over
    Prequal's ('-' where Prequal's is 0 or either is not measured)."""
    cells = []
    for setup, figure, rival, label in SUMMARY_FIGURES:
        ours, theirs = _find(rows, setup, "Prequal"), _find(rows, setup, rival)
        if ours is None or theirs is None or not ours.available or not theirs.available:
            continue
        mine, base = _figure(ours, figure), _figure(theirs, figure)
        if figure == "req/s":
            gain = mine / base if base > 0 else None
        else:
            gain = base / mine if mine > 0 else None
        shown = "-" if gain is None else f"{gain:.2f}"
        cells.append(
            (label, _summary_cell(ours, figure), _summary_cell(theirs, figure), shown, "-")
        )
    return cells


def _selected(names: str | None) -> list[Setup]:
    if names is None:
        return list(SETUPS)
    known = {setup.name: setup for setup in SETUPS}
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        raise ValueError(f"unknown setups {unknown}; choose among {', '.join(known)}")
    return [known[name] for name in wanted]


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds, so that every process started is stopped


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table and the aims; 0 whatever the figures (a measurement, not a test)."""
    parser = round_parser(__doc__)
    parser.add_argument("--tasks", type=int, default=None, help="the measured client's tasks")
    parser.add_argument(
        "--setups", default=None, help="comma-separated, of: " + ", ".join(s.name for s in SETUPS)
    )
    parser.add_argument(
        "--service",
        type=float,
        default=DEFAULT_SERVICE * 1000.0,
        help=f"milliseconds a queued backend serves a request for ({DEFAULT_SERVICE * 1000:g})",
    )
    args = parser.parse_args(argv)
    try:
        seconds, rounds = settings(args.quick, args.seconds, args.rounds)
        setups = _selected(args.setups)
        if args.tasks is not None and args.tasks < 1:
            raise ValueError(f"need tasks >= 1, got {args.tasks}")
        if not 0.0 < args.service <= 10_000.0:
            raise ValueError(f"need a service time in (0, 10000] ms, got {args.service:g}")
        service = args.service / 1000.0
    except ValueError as exc:
        parser.error(str(exc))
    signal.signal(signal.SIGTERM, _stop)
    print(
        f"Python {platform.python_version()} on {platform.platform()}, httpx {httpx.__version__},"
        f" uvicorn backends ({uvicorn_flavour()})"
    )
    text = describe(seconds, rounds, args.tasks, service)
    print(textwrap.fill(text, width=100, subsequent_indent="  "), flush=True)
    rows = run(seconds, rounds, setups=setups, tasks=args.tasks, service=service)
    print(format_table(rows))
    print("aims:")
    print(format_aims(aims(rows)))
    print(textwrap.fill(NOTES, width=100, subsequent_indent="  "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
