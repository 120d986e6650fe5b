"""Server companion benchmark: what the load-reporting middleware costs a Python server's
throughput, side by side with the same app without it.

Run it alone::

    python -m lbclient.cli.bench.companion           # 12 rounds of 1 s per side and case
    python -m lbclient.cli.bench.companion --quick   # 3 rounds of 0.25 s (a few seconds)
    python -m lbclient.cli.bench.companion --http h11  # uvicorn's protocol (default: auto,
                                                       # httptools where it is installed)

Method: a trivial endpoint (200, a two-byte body; ``lbclient/cli/bench/companion_apps.py``) is
served four ways, each in processes of its own on loopback ports: under uvicorn (one process) as
a plain ASGI app and behind ``LoadReportingASGI``, and under gunicorn (one ``gthread`` worker, 4
threads) as a plain WSGI app and behind ``LoadReportingWSGI``; the middlewares measure
``cpu_utilization()`` too. Each way runs in three processes (``PYTHONHASHSEED=0``) that take
turns round by round, since one process may run a few percent off its twin for its whole life. A
load generator in a process of its own (``drive.py``: one event loop, raw sockets, 16 keep-alive
connections each sending one GET at a time) drives one server at a time: in each round and case
the plain server and the middleware's, the two taking turns going first, for the same time each.
A case either sends no ``endpoint-load-metrics-format`` header or asks for the TEXT report on
every request (the plain server ignores it). A control case drives one plain uvicorn process
against another (of the next pair) the same way, so that the table shows the noise a ratio
carries on the machine it ran on; a floor case sets the plain app against the same behind the
least an ASGI middleware that sees each status does (``StatusWatcher``: a ``send`` of its own
that reads the status), what any such middleware costs before it counts anything.

Figures: each side's median requests per second and server CPU time per request over the
rounds, and the median of the rounds' ratios (the middleware's req/s over the plain server's,
and the plain server's CPU time per request over the middleware's: 1 is free, the aim is 0.97
or more).
Then, in process (:mod:`lbclient.cli.bench.sharing`): what a request costs the tracker when its
count is shared with other worker processes, against one counting its process alone.
A measurement, not a test: nothing here fails on a figure.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from contextlib import ExitStack
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

from lbclient.cli.bench import drive, sharing
from lbclient.cli.bench.processes import reap
from lbclient.cli.bench.pyservers import Server, start_gunicorn, start_uvicorn, uvicorn_flavour
from lbclient.cli.bench.rounds import round_parser, round_settings
from lbclient.cli.bench.tables import aligned

__all__ = ["AIM", "CASES", "CompanionRow", "format_table", "main", "run", "settings"]

#: The generator script, run by path (standard library only).
DRIVER = Path(drive.__file__)
#: Keep-alive connections the generator keeps busy.
CONNECTIONS = 16
#: The middleware's req/s over the plain server's that the middleware aims at, at least.
AIM = 0.97
#: Server processes per side and kind, taking turns round by round: a process may run a few
#: percent faster or slower than its twin for the whole of its life.
PAIRS = 3
FULL_SECONDS, FULL_ROUNDS = 1.0, 12
QUICK_SECONDS, QUICK_ROUNDS = 0.25, 3
APPS = "lbclient.cli.bench.companion_apps"

#: Each case: its name, the server (``asgi``: uvicorn, ``wsgi``: gunicorn), the format asked.
#: The control (``control``) drives a plain uvicorn process against another plain one, as the
#: other cases drive the plain app against the middleware's: its ratio is the bench's own noise.
CASES: tuple[tuple[str, str, str | None], ...] = (
    ("control: plain uvicorn against another plain one", "control", None),
    ("floor: a do-nothing ASGI middleware reading the status", "floor", None),
    ("LoadReportingASGI under uvicorn", "asgi", None),
    ("the same, every request asks for the report", "asgi", "TEXT"),
    ("LoadReportingWSGI under gunicorn gthread", "wsgi", None),
    ("the same, every request asks for the report", "wsgi", "TEXT"),
)


class CompanionRow(NamedTuple):
    """One case: each side's median req/s and server CPU time per request, and the median
    per-round ratios."""

    case: str
    plain: float  # req/s of the plain app
    reported: float  # req/s of the app behind the middleware
    ratio: float  # median over rounds of reported / plain req/s: 1 is free
    spread: tuple[float, float]  # the lowest and highest of the rounds' ratios
    plain_cpu: float | None  # the plain server's CPU seconds per request (None: no /proc)
    reported_cpu: float | None  # the middleware server's
    cpu_ratio: float | None  # median over rounds of plain / middleware CPU per request


class _Side(NamedTuple):
    per_second: float
    cpu: float | None  # CPU seconds per request


class _Driver:
    """The load generator's process: one run per command, its answer read back."""

    def __init__(self, stack: ExitStack) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, str(DRIVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        stack.callback(self._stop)

    def run(self, address: str, seconds: float, ask: str | None) -> tuple[int, float]:
        """Responses answered, and the seconds they took."""
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        port = address.rpartition(":")[2]
        self._proc.stdin.write(f"{port} {seconds!r} {CONNECTIONS} {ask or '-'}\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the load generator exited")
        answered, elapsed = line.split()
        return int(answered), float(elapsed)

    def _stop(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        reap(self._proc, 10)


def settings(quick: bool, seconds: float | None, rounds: int | None) -> tuple[float, int]:
    """Seconds per side and rounds: the mode's, or those given (ValueError when not > 0)."""
    return round_settings(
        quick, seconds, rounds, (QUICK_SECONDS, QUICK_ROUNDS), (FULL_SECONDS, FULL_ROUNDS)
    )


def _measure(driver: _Driver, server: Server, seconds: float, ask: str | None) -> _Side:
    before = server.cpu_seconds()
    answered, elapsed = driver.run(server.address, seconds, ask)
    after = server.cpu_seconds()
    cpu = None if before is None or after is None or not answered else (after - before) / answered
    return _Side(answered / elapsed, cpu)


def _median_ratio(tops: Sequence[float | None], bottoms: Sequence[float | None]) -> float | None:
    pairs = [(t, b) for t, b in zip(tops, bottoms, strict=True) if t is not None and b]
    return statistics.median(t / b for t, b in pairs) if pairs else None


def _median(values: Sequence[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def _server(
    servers: dict[str, list[tuple[Server, Server]]], kind: str, number: int, side: int
) -> Server:
    """The server of round ``number`` for ``side`` (0: plain, 1: the middleware's); the
    control's second side is the plain server of the next pair, a process of its own."""
    if kind == "control":
        return servers["asgi"][(number + side) % PAIRS][0]
    return servers[kind][number % PAIRS][side]


def _ratios(plain: Sequence[_Side], reported: Sequence[_Side]) -> list[float]:
    return [r.per_second / p.per_second for r, p in zip(reported, plain, strict=True)]


def run(seconds: float, rounds: int, http: str = "auto") -> list[CompanionRow]:
    """Every case of :data:`CASES`, ``rounds`` rounds of ``seconds`` per side; uvicorn serves
    with its HTTP protocol ``http`` (``auto``, ``h11`` or ``httptools``)."""
    with ExitStack() as stack:
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        servers = {
            kind: [
                (
                    start(stack, f"{APPS}:{kind}_plain", env=env),
                    start(stack, f"{APPS}:{kind}_reported", env=env),
                )
                for _ in range(PAIRS)
            ]
            for kind, start in (
                ("asgi", partial(start_uvicorn, http=http)),
                ("floor", partial(start_uvicorn, http=http)),
                ("wsgi", start_gunicorn),
            )
        }
        driver = _Driver(stack)
        for pairs in servers.values():  # warm up: connections, imports, caches
            for pair in pairs:
                for server in pair:
                    driver.run(server.address, min(seconds, 0.2), "TEXT")
        sides: list[tuple[list[_Side], list[_Side]]] = [([], []) for _ in CASES]
        for number in range(rounds):
            for index, (_, kind, ask) in enumerate(CASES):
                order = (0, 1) if (number + index) % 2 == 0 else (1, 0)
                for side in order:
                    server = _server(servers, kind, number, side)
                    sides[index][side].append(_measure(driver, server, seconds, ask))
    rows = []
    for (name, _, _), (plain, reported) in zip(CASES, sides, strict=True):
        rows.append(
            CompanionRow(
                case=name,
                plain=statistics.median(side.per_second for side in plain),
                reported=statistics.median(side.per_second for side in reported),
                ratio=statistics.median(ratios := _ratios(plain, reported)),
                spread=(min(ratios), max(ratios)),
                plain_cpu=_median([side.cpu for side in plain]),
                reported_cpu=_median([side.cpu for side in reported]),
                cpu_ratio=_median_ratio([p.cpu for p in plain], [r.cpu for r in reported]),
            )
        )
    return rows


COLUMNS = (
    ("case", False),
    ("plain", True),
    ("middleware", True),
    ("ratio", True),
    ("rounds' ratios", True),
    ("CPU/request plain", True),
    ("middleware", True),
    ("CPU ratio", True),
)


def _micro(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.0f} us"


def format_table(rows: Sequence[CompanionRow]) -> str:
    """Each case's req/s and CPU time per request both ways, and the ratios: one table."""
    return aligned(
        COLUMNS,
        [
            (
                row.case,
                f"{row.plain:,.0f} req/s",
                f"{row.reported:,.0f} req/s",
                f"{row.ratio:.3f}",
                f"{row.spread[0]:.3f}-{row.spread[1]:.3f}",
                _micro(row.plain_cpu),
                _micro(row.reported_cpu),
                "-" if row.cpu_ratio is None else f"{row.cpu_ratio:.3f}",
            )
            for row in rows
        ],
    )


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


NOTES = (
    "req/s: each side's median over the rounds; ratio: the median of the rounds' middleware "
    f"req/s over plain req/s (1 is free; the aim is {AIM} or more). CPU/request: the server "
    "process's CPU time (user + system, its worker's for gunicorn) per request answered, the "
    "median over the rounds; CPU ratio: the median of the rounds' plain CPU/request over the "
    "middleware's, the throughput ratio a server with a CPU of its own would see (the req/s "
    "ratio moves with whatever else the machine runs). One server is driven at a time, from a "
    "load generator process of its own. The control row drives two plain uvicorn processes the "
    "same way: how far its ratio is from 1, and the rounds' spread (lowest-highest), is the "
    "measurement's own noise."
)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; 0 whatever the figures (a measurement, not a test)."""
    parser = round_parser(__doc__)
    parser.add_argument(
        "--http",
        choices=["auto", "h11", "httptools"],
        default="auto",
        help="uvicorn's HTTP protocol (default: auto, httptools where installed, else h11)",
    )
    args = parser.parse_args(argv)
    try:
        seconds, rounds = settings(args.quick, args.seconds, args.rounds)
    except ValueError as error:
        parser.error(str(error))
    print(
        f"Python {platform.python_version()} on {platform.platform()}, "
        f"uvicorn {_version('uvicorn')} ({uvicorn_flavour(args.http)}), "
        f"gunicorn {_version('gunicorn')}"
    )
    print(
        f"{rounds} rounds of {seconds:g} s per side and case, {CONNECTIONS} keep-alive "
        "connections, GET of a trivial endpoint",
        flush=True,
    )
    print(format_table(run(seconds, rounds, args.http)))
    print(textwrap.fill(NOTES, width=100, subsequent_indent="  "))
    cost = sharing.measure(max(rounds, 3))
    print(
        f"In process, LoadTracker.begin + rendered('TEXT') + end a request (median of "
        f"{max(rounds, 3)} rounds of {sharing.BATCH:,}):"
    )
    print(f"  counted per process (share_in_flight=False)   {cost.alone:6.2f} us")
    if cost.sharing:
        print(f"  shared with {sharing.OTHERS} other worker processes        {cost.shared:6.2f} us")
    else:
        print("  shared with other worker processes          not available here (Linux only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
