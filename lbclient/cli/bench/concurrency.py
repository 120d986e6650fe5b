"""Concurrency benchmark: throughput and latency through lbclient's clients as concurrent callers
grow from a few to a thousand, against the plain clients with pools of the same size.

Run it alone::

    python -m lbclient.cli.bench.concurrency           # 2 rounds of 2 s per side and level
    python -m lbclient.cli.bench.concurrency --quick   # 1 round of 0.1 s

or as part of ``python -m lbclient bench`` (extra rows of the summary, and this table under it).

Method: three backend servers run in their own processes (``lbclient/cli/bench/server.py``,
one event loop each, so a server's throughput does not fall as its connections grow) and
answer at once. Each case is one client at one level of concurrency, callers sending one GET
at a time as fast as the answers come:

* asyncio tasks (10, 100, 1,000): ``AsyncLBTransport`` over the three (RoundRobin,
  ``httpx.Limits(max_connections=20, max_keepalive_connections=20)`` per backend: at most 20
  attempts admitted to each backend, each over a connection of its own, the rest queued) against
  a plain ``httpx.AsyncClient`` with a pool of the same total,
  ``httpx.Limits(max_connections=60, max_keepalive_connections=60)``, its requests spread over
  the three backends' URLs in turn;
* threads (4, 64, 256): ``LBTransport`` with ``httpx.Limits(max_connections=20,
  max_keepalive_connections=20)`` per backend against a plain ``httpx.Client`` with
  ``httpx.Limits(max_connections=60, max_keepalive_connections=60)``, and ``LBAdapter`` against a
  plain ``requests.Session`` with an ``HTTPAdapter``, both with ``pool_maxsize=20`` per backend
  and ``pool_block=True`` (a thread waits for a connection rather than opening one more).

Every client has a 60 s timeout, the retry budget its default. A case warms up for a quarter of
a second (no longer than its round), then runs for its time; requests still out when it is up
are waited for and counted.
The rounds alternate lbclient's client and the plain one. Every latency is one GET from the
call to the body read; p50 and p99 are nearest-rank percentiles over all rounds; requests per
second are the requests over the wall time. The ratio is lbclient's requests per second over
the plain client's (above 1: lbclient is faster). By Little's law the mean latency of a closed
loop is its callers over its throughput; "p99 / (n / req/s)" says how far the tail is from
that mean (within 2: the callers are served about in turn, none starved). A measurement, not a
test: the aims are reported, never asserted.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import platform
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import NamedTuple

import httpx
import requests
from requests.adapters import HTTPAdapter

from lbclient import AsyncLBTransport, LBAdapter, LBTransport, RoundRobin
from lbclient.cli.bench.hedging import percentile
from lbclient.cli.bench.rounds import round_parser, round_settings
from lbclient.cli.bench.tables import aligned
from lbclient.cli.bench.transport import start_servers

__all__ = [
    "BACKENDS",
    "NOTES",
    "PER_BACKEND",
    "TASK_LEVELS",
    "THREAD_LEVELS",
    "ConcurrencyRow",
    "Side",
    "aims",
    "format_table",
    "main",
    "run",
    "settings",
    "setup",
    "warm_up",
]

#: Backends, and the connections each client may hold to each of them.
BACKENDS, PER_BACKEND = 3, 20
#: Concurrent asyncio tasks, and concurrent threads, per level.
TASK_LEVELS = (10, 100, 1_000)
THREAD_LEVELS = (4, 64, 256)
#: Seconds per round of a case (after its warm-up), and rounds per case.
FULL_SECONDS, QUICK_SECONDS = 2.0, 0.1
FULL_ROUNDS, QUICK_ROUNDS = 2, 1
#: Seconds of warm-up before each round is measured.
WARMUP = 0.25


def warm_up(seconds: float) -> float:
    """The warm-up before rounds of ``seconds``: :data:`WARMUP`, or as long as a shorter round
    (the test suite's smallest runs)."""
    return min(WARMUP, seconds)


#: Seconds any one request may take (connect, pool wait, read), on every client.
TIMEOUT = 60.0
#: The aims: the 1,000-task throughput at least this share of the 10-task one, and the p99 at
#: most this many times the mean latency that Little's law gives.
KEEP, TAIL = 0.7, 2.0

#: The client pairs, as the table names them: (lbclient's, the plain one, what runs them).
PAIRS = (
    ("AsyncLBTransport", "httpx.AsyncClient", "tasks"),
    ("LBTransport", "httpx.Client", "threads"),
    ("LBAdapter", "requests.Session", "threads"),
)


class Side(NamedTuple):
    """One client's figures at one level: over all its rounds."""

    requests: int  # GETs answered
    errors: int  # GETs that raised
    seconds: float  # wall time
    p50: float
    p99: float
    cpu: float  # this process's CPU time over the wall time (1.0: one core busy)

    @property
    def per_second(self) -> float:
        """Answered requests per second of wall time."""
        return self.requests / self.seconds


class ConcurrencyRow(NamedTuple):
    """One client pair at one level of concurrency."""

    client: str  # lbclient's client
    plain: str  # the plain client it is set against
    unit: str  # "tasks" or "threads"
    level: int  # concurrent callers
    ours: Side
    theirs: Side

    @property
    def ratio(self) -> float:
        """lbclient's requests per second over the plain client's: above 1, lbclient is faster
        (infinite if the plain client answered nothing)."""
        theirs = self.theirs.per_second
        return self.ours.per_second / theirs if theirs else math.inf

    @property
    def little(self) -> float:
        """Seconds: the mean latency Little's law gives for lbclient's side (callers over
        throughput)."""
        return self.level / self.ours.per_second

    @property
    def tail(self) -> float:
        """lbclient's p99 over :attr:`little`."""
        return self.ours.p99 / self.little


def _times(value: float) -> str:
    """A ratio to two decimals, or to two significant digits below 0.01 (a round under load
    may have far fewer requests than callers), so that it never reads as 0."""
    return f"{value:.2f}" if value >= 0.01 or value == 0 else f"{value:.1e}"


def _rate(per_second: float) -> str:
    """Requests per second, whole, or to two significant digits below 10 (never as 0)."""
    return f"{per_second:,.0f}" if per_second >= 10 or per_second == 0 else f"{per_second:.2g}"


class _Tally:
    """What the measured rounds of one side saw, added up."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.seconds = 0.0
        self.cpu = 0.0

    def side(self) -> Side:
        latencies = self.latencies or [0.0]
        return Side(
            len(self.latencies),
            self.errors,
            self.seconds,
            percentile(latencies, 50),
            percentile(latencies, 99),
            self.cpu / self.seconds,
        )


def _urls(addresses: Sequence[str]) -> Iterator[str]:
    """The backends' URLs in turn, for the plain clients."""
    while True:
        for address in addresses:
            yield f"http://{address}/item"


# -- asyncio tasks ------------------------------------------------------------------------------


async def _drive_async(
    client: httpx.AsyncClient, urls: Iterator[str], tasks: int, seconds: float, tally: _Tally
) -> None:
    """``tasks`` tasks sending GETs for ``seconds``; what they saw goes to ``tally``."""
    clock = time.perf_counter
    cpu = time.process_time()
    start = clock()
    end = start + seconds
    sent = [0]

    async def task() -> None:
        # past the end, a task sends only if no task of the round has sent yet
        while clock() < end or not sent[0]:
            sent[0] += 1
            began = clock()
            try:
                response = await client.get(next(urls))
            except httpx.HTTPError:
                tally.errors += 1
                continue
            tally.latencies.append(clock() - began)
            if response.status_code != 200:
                raise RuntimeError(f"a backend answered {response.status_code}")

    await asyncio.gather(*(task() for _ in range(tasks)))
    tally.seconds += clock() - start
    tally.cpu += time.process_time() - cpu


def _async_clients(addresses: Sequence[str]) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
    per = httpx.Limits(max_connections=PER_BACKEND, max_keepalive_connections=PER_BACKEND)
    lb = httpx.AsyncClient(
        transport=AsyncLBTransport(addresses, algorithm=RoundRobin, limits=per), timeout=TIMEOUT
    )
    total = BACKENDS * PER_BACKEND
    plain = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=total, max_keepalive_connections=total),
        timeout=TIMEOUT,
    )
    return lb, plain


def _async_round(
    addresses: Sequence[str], tasks: int, seconds: float, ours: _Tally, theirs: _Tally
) -> None:
    async def both() -> None:
        lb, plain = _async_clients(addresses)
        logical = itertools.repeat("http://users/item")
        async with lb, plain:
            for client, urls, tally in ((lb, logical, ours), (plain, _urls(addresses), theirs)):
                await _drive_async(client, urls, tasks, warm_up(seconds), _Tally())
                await _drive_async(client, urls, tasks, seconds, tally)

    asyncio.run(both())


# -- threads ------------------------------------------------------------------------------------


def _drive_threads(
    get: Callable[[str], object],
    urls: Callable[[int], Iterator[str]],
    threads: int,
    seconds: float,
    tally: _Tally,
    errors: tuple[type[Exception], ...],
) -> None:
    """``threads`` threads calling ``get`` for ``seconds``; what they saw goes to ``tally``.
    Thread ``i`` takes its URLs from ``urls(i)``."""
    clock = time.perf_counter
    lock = threading.Lock()
    go = threading.Event()
    end = [0.0]
    sent = [0]
    raised: list[BaseException] = []

    def thread(number: int) -> None:
        mine: list[float] = []
        failed = 0
        own = urls(number)
        go.wait()
        try:
            # past the end, a thread sends only if no thread of the round has sent yet
            while clock() < end[0] or not sent[0]:
                sent[0] += 1  # a lost increment under a race is harmless: it only counts past 0
                began = clock()
                try:
                    get(next(own))
                except errors:
                    failed += 1
                    continue
                mine.append(clock() - began)
        except BaseException as exc:  # reported by the caller
            raised.append(exc)
        with lock:
            tally.latencies += mine
            tally.errors += failed

    workers = [threading.Thread(target=thread, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    cpu = time.process_time()
    start = clock()
    end[0] = start + seconds
    go.set()
    for worker in workers:
        worker.join()
    tally.seconds += clock() - start
    tally.cpu += time.process_time() - cpu
    if raised:
        raise raised[0]


def _checked(response: httpx.Response | requests.Response) -> None:
    if response.status_code != 200:
        raise RuntimeError(f"a backend answered {response.status_code}")


class _Client(NamedTuple):
    """A thread-safe client for one side: its GET, its URLs per thread, what it raises."""

    opened: AbstractContextManager[object]
    get: Callable[[str], object]
    urls: Callable[[int], Iterator[str]]
    errors: tuple[type[Exception], ...]


def _httpx_sides(addresses: Sequence[str]) -> tuple[_Client, _Client]:
    per = httpx.Limits(max_connections=PER_BACKEND, max_keepalive_connections=PER_BACKEND)
    lb = httpx.Client(
        transport=LBTransport(addresses, algorithm=RoundRobin, limits=per), timeout=TIMEOUT
    )
    total = BACKENDS * PER_BACKEND
    plain = httpx.Client(
        limits=httpx.Limits(max_connections=total, max_keepalive_connections=total),
        timeout=TIMEOUT,
    )

    def get(client: httpx.Client) -> Callable[[str], object]:
        return lambda url: _checked(client.get(url))

    logical = lambda _: itertools.repeat("http://users/item")  # noqa: E731
    spread = lambda n: _urls([*addresses[n % BACKENDS :], *addresses[: n % BACKENDS]])  # noqa: E731
    return (
        _Client(lb, get(lb), logical, (httpx.HTTPError,)),
        _Client(plain, get(plain), spread, (httpx.HTTPError,)),
    )


def _requests_sides(addresses: Sequence[str]) -> tuple[_Client, _Client]:
    lb, plain = requests.Session(), requests.Session()
    lb.mount(
        "http://users/",
        LBAdapter(
            addresses,
            algorithm=RoundRobin,
            pool_connections=BACKENDS,
            pool_maxsize=PER_BACKEND,
            pool_block=True,
        ),
    )
    plain.mount(
        "http://", HTTPAdapter(pool_connections=BACKENDS, pool_maxsize=PER_BACKEND, pool_block=True)
    )

    def get(session: requests.Session) -> Callable[[str], object]:
        return lambda url: _checked(session.get(url, timeout=TIMEOUT))

    logical = lambda _: itertools.repeat("http://users/item")  # noqa: E731
    spread = lambda n: _urls([*addresses[n % BACKENDS :], *addresses[: n % BACKENDS]])  # noqa: E731
    errors = (requests.RequestException,)
    return _Client(lb, get(lb), logical, errors), _Client(plain, get(plain), spread, errors)


def _threads_round(
    make: Callable[[Sequence[str]], tuple[_Client, _Client]],
    addresses: Sequence[str],
    threads: int,
    seconds: float,
    ours: _Tally,
    theirs: _Tally,
) -> None:
    lb, plain = make(addresses)
    with lb.opened, plain.opened:
        for side, tally in ((lb, ours), (plain, theirs)):
            _drive_threads(side.get, side.urls, threads, warm_up(seconds), _Tally(), side.errors)
            _drive_threads(side.get, side.urls, threads, seconds, tally, side.errors)


# -- the run ------------------------------------------------------------------------------------


def settings(
    quick: bool, seconds: float | None = None, rounds: int | None = None
) -> tuple[float, int]:
    """(seconds per round, rounds per case): the given ones, or the mode's."""
    return round_settings(
        quick, seconds, rounds, (QUICK_SECONDS, QUICK_ROUNDS), (FULL_SECONDS, FULL_ROUNDS)
    )


def run(
    quick: bool = False, *, seconds: float | None = None, rounds: int | None = None
) -> list[ConcurrencyRow]:
    """Every pair at every level, in :data:`PAIRS` order, levels rising; ``seconds`` (per round
    and side) and ``rounds`` override the mode's."""
    seconds, rounds = settings(quick, seconds, rounds)
    makers = {"LBTransport": _httpx_sides, "LBAdapter": _requests_sides}
    rows = []
    with ExitStack() as stack:
        addresses = start_servers(stack, BACKENDS)
        for client, plain, unit in PAIRS:
            for level in TASK_LEVELS if unit == "tasks" else THREAD_LEVELS:
                ours, theirs = _Tally(), _Tally()
                for _ in range(rounds):
                    if unit == "tasks":
                        _async_round(addresses, level, seconds, ours, theirs)
                    else:
                        _threads_round(makers[client], addresses, level, seconds, ours, theirs)
                rows.append(ConcurrencyRow(client, plain, unit, level, ours.side(), theirs.side()))
    return rows


#: The table's columns, and whether each is right-aligned.
COLUMNS = (
    ("client", False),
    ("callers", True),
    ("req/s", True),
    ("p50", True),
    ("p99", True),
    ("p99 / (n / req/s)", True),
    ("plain client", False),
    ("plain req/s", True),
    ("plain p50", True),
    ("plain p99", True),
    ("ratio", True),
    ("errors", True),
    ("client CPU", True),
)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def _cells(row: ConcurrencyRow) -> tuple[str, ...]:
    ours, theirs = row.ours, row.theirs
    return (
        row.client,
        f"{row.level:,} {row.unit}",
        _rate(ours.per_second),
        _ms(ours.p50),
        _ms(ours.p99),
        _times(row.tail),
        row.plain,
        _rate(theirs.per_second),
        _ms(theirs.p50),
        _ms(theirs.p99),
        _times(row.ratio),
        f"{ours.errors:,} / {theirs.errors:,}",
        f"{ours.cpu:.0%} / {theirs.cpu:.0%}",
    )


def format_table(rows: Sequence[ConcurrencyRow]) -> str:
    """Every pair at every level, lbclient's figures then the plain client's: one table."""
    return aligned(COLUMNS, [_cells(row) for row in rows])


def aims(rows: Sequence[ConcurrencyRow]) -> list[tuple[str, bool | None]]:
    """The aims, as lines with whether each was met: AsyncLBTransport's 1,000-task throughput
    against its 10-task one, and its p99 against Little's mean at every level. The threaded
    rows' p99 is shown beside the plain client's, for information (None): threads take turns
    on the GIL, which sets their tail whatever the client."""
    out: list[tuple[str, bool | None]] = []
    tasks = {row.level: row for row in rows if row.client == "AsyncLBTransport"}
    low, high = min(TASK_LEVELS), max(TASK_LEVELS)
    if low in tasks and high in tasks:
        kept = tasks[high].ours.per_second / tasks[low].ours.per_second
        out.append(
            (
                f"AsyncLBTransport, {high:,} tasks / {low:,} tasks, req/s: {kept:.2f} "
                f"(aim >= {KEEP})",
                kept >= KEEP,
            )
        )
    for row in rows:
        text = (
            f"{row.client}, {row.level:,} {row.unit}: p99 {_ms(row.ours.p99)} is "
            f"{_times(row.tail)}x {row.level:,} / {row.ours.per_second:,.0f} req/s = "
            f"{_ms(row.little)}"
        )
        if row.unit == "tasks":
            out.append((f"{text} (aim <= {TAIL:g}x)", row.tail <= TAIL))
        else:
            plain = row.theirs.p99 / (row.level / row.theirs.per_second)
            out.append((f"{text} (the plain client's: {plain:.2f}x)", None))
    return out


def format_aims(found: Sequence[tuple[str, bool | None]]) -> str:
    """One line per aim, with whether it was met (or that it is for information)."""
    verdicts = {True: "met", False: "NOT MET", None: "for information"}
    return "\n".join(f"  {text}: {verdicts[met]}" for text, met in found)


def setup(seconds: float, rounds: int) -> str:
    """One line on what every case sends, and where."""
    return (
        f"{rounds} round{'s' if rounds > 1 else ''} of {seconds:g} s per side and level, each "
        f"after {warm_up(seconds):g} s of warm-up, to {BACKENDS} loopback backends answering at "
        f"once, {PER_BACKEND} connections per backend on every client"
    )


NOTES = (
    "callers: concurrent asyncio tasks or threads, each sending one GET at a time; p99 / "
    "(n / req/s): lbclient's p99 over the mean latency Little's law gives (callers / "
    "throughput); ratio: lbclient's req/s / the plain client's (above 1: lbclient is faster); "
    "errors: GETs that raised (lbclient / plain); client CPU: this process's CPU time over the "
    "wall time (lbclient / plain; 100%: one core busy)."
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
    print("aims:")
    print(format_aims(aims(rows)))
    print(textwrap.fill(NOTES, width=100, subsequent_indent="  "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
