"""Server companion benchmark, counted in instructions: what the load-reporting middleware adds
to a request served by uvicorn, as valgrind counts the machine instructions, the same however
busy the machine is (the req/s of :mod:`lbclient.cli.bench.companion` swing 15-40% a round on a
shared machine, more than the 3% asked of the middleware).

Run it alone (Linux with valgrind; about half a minute per case and protocol, valgrind runs
side by side on every CPU)::

    python -m lbclient.cli.bench.companion_count                  # h11 and httptools
    python -m lbclient.cli.bench.companion_count --http httptools

Method: each of uvicorn's own HTTP/1.1 protocols (``H11Protocol``, what ``uvicorn --http h11``
runs per connection; ``HttpToolsProtocol``, what ``--http httptools`` runs, and ``auto`` where
httptools is installed, as ``uvicorn[standard]`` installs it) is fed requests on one keep-alive
connection through an in-memory transport, one request at a time, each answered before the next
(no sockets, no kernel, no other process). Each case runs twice under ``valgrind
--tool=callgrind``, with a few requests and with many; the difference over the difference in
requests is the instructions per request, start-up and imports cancelled out. The middleware's
tracker reads a clock that moves 250 µs a request (a server at 4,000 req/s), of which the
request takes 188 µs (read through a callable made in C, as ``time.monotonic`` is), so that
what it caches for 10 ms is made as often as at that rate, not as often as valgrind's slowness
would make it; its rates count from a second before the first request and its
``cpu_utilization`` metric reads a CPU time that follows the clock: the report it writes is as
long as a busy server's (``REPORT``, what the carry case writes), the same run after run.

Cases: the plain app and the same behind ``LoadReportingASGI``, each with no report asked and
with ``endpoint-load-metrics-format: TEXT`` on every request, its tracker made as a server makes
it (requests in flight shared with the other processes of its listening socket: the harness
listens on a loopback port, as uvicorn would, and the connection says it came to that port);
the same with ``share_in_flight=False`` (what sharing the count costs) and with the tracker's
own clock (a server's: read in C where compiled, not the harness's callable); the least an ASGI
middleware that reads the status does (``StatusWatcher``); and the plain app writing a report
header of the usual length itself, which is what carrying the report costs the server's HTTP library
whoever writes it, and one of a single field, the least a report costs. Ratios are the plain app's
instructions over the case's, under the same protocol (1 is free; 0.97 is the aim). A measurement,
not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import importlib.util
import operator
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from lbclient.cli.bench.companion_apps import _BODY, asgi_plain
from lbclient.cli.bench.tables import aligned
from lbclient.server import LoadReportingASGI, LoadTracker, cpu_utilization

__all__ = ["CASES", "PROTOCOLS", "CountRow", "count", "count_protocols", "main"]

#: Requests of the short and the long run; the difference is what is counted.
FEW, MANY = 200, 1200
#: Seconds the tracker's clock moves per request: a request arrives every TICK (a server at
#: 4,000 req/s) and takes LATENCY of it (the clock moves on as its response's head is written).
TICK = 250e-6
LATENCY = 187.654e-6
#: Seconds from the tracker's making to the first request: its rates are counted over more than
#: a second, as on a server that has run a while (a rate with a fraction, not a whole count).
IDLE = 1.0
#: The process's CPU time per second of the clock, as the ``cpu_utilization`` metric reads it
#: (from the clock, not ``os.times``: the same run after run).
CPU = 0.412345
#: What a tracker writes, of the usual length (carried by the plain app in the "carry" case; the
#: middleware's own, with the clock and CPU time above, is as long within a character or two).
REPORT = (
    b"TEXT cpu_utilization=0.412345, rps_fractional=3891.2, eps=0, named_metrics.rif=3, "
    b"named_metrics.latency_ms=0.412345"
)
#: The shortest report worth sending (carried in the "short" case): how much of the carry's cost
#: is the header's being there at all, not its length.
SHORT_REPORT = b"TEXT named_metrics.rif=3"

#: uvicorn's HTTP/1.1 protocols (the name ``--http`` takes): the module and class serving a
#: connection, and the module the protocol needs installed.
PROTOCOLS: dict[str, tuple[str, str, str]] = {
    "h11": ("uvicorn.protocols.http.h11_impl", "H11Protocol", "h11"),
    "httptools": ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol", "httptools"),
}

_NOW = [1000.0]

#: The tracker's clock: ``_NOW[0]``, read by a callable made in C (as ``time.monotonic`` is), so
#: that reading it costs what reading the real clock costs, not a Python function's call.
_clock: Callable[[], float] = functools.partial(operator.itemgetter(0), _NOW)


class _Times(NamedTuple):
    user: float
    system: float


def _times() -> _Times:
    return _Times(CPU * _NOW[0], 0.0)


def _carrying(report: bytes) -> Any:
    """The plain app, writing the report header ``report`` itself."""
    head = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    headers = [*head, (b"endpoint-load-metrics", report)]

    async def carry(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": list(headers)})
        await send(dict(_BODY))

    return carry


def _reported() -> Any:
    # The tracker as a server makes it: requests in flight shared with the other processes of
    # its listening socket (the harness's, see _serve). The metrics read the clock above, so
    # that the report is of the usual length (REPORT's).
    metric = cpu_utilization(cpus=1, clock=_clock, times=_times)
    tracker = LoadTracker(clock=_clock, cpu_utilization=metric)
    return LoadReportingASGI(asgi_plain, tracker=tracker)


def _alone() -> Any:
    # The same, counting its process alone (share_in_flight=False): what sharing costs.
    metric = cpu_utilization(cpus=1, clock=_clock, times=_times)
    tracker = LoadTracker(clock=_clock, cpu_utilization=metric, share_in_flight=False)
    return LoadReportingASGI(asgi_plain, tracker=tracker)


def _own_clock() -> Any:
    # The tracker as a server makes it, reading its own clock (in C, where compiled): what a
    # request costs a server that is not asked for reports, whose clock the harness's stands
    # in for above only so that reports are the same run after run.
    return LoadReportingASGI(asgi_plain, cpu_utilization=cpu_utilization())


def _watched() -> Any:
    from lbclient.cli.bench.companion_apps import StatusWatcher

    return StatusWatcher(asgi_plain)


#: Each case: its name, the app (a factory), whether every request asks for the report, and
#: the case whose instructions it is divided into (its plain side).
CASES: tuple[tuple[str, str, bool, str], ...] = (
    ("plain app", "plain", False, "plain"),
    ("floor: a do-nothing ASGI middleware reading the status", "floor", False, "plain"),
    ("LoadReportingASGI", "reported", False, "plain"),
    ("LoadReportingASGI, in flight counted per process", "alone", False, "plain"),
    ("LoadReportingASGI, reading its own clock", "own clock", False, "plain"),
    ("plain app, every request asks for the report", "plain", True, "plain+ask"),
    ("carry: the plain app writing a report header itself", "carry", True, "plain+ask"),
    ("carry: the same, a report of one field (24 characters)", "short", True, "plain+ask"),
    ("LoadReportingASGI, every request asks for the report", "reported", True, "plain+ask"),
)
_APPS: dict[str, Callable[[], Any]] = {
    "plain": lambda: asgi_plain,
    "floor": _watched,
    "reported": _reported,
    "alone": _alone,
    "own clock": _own_clock,
    "carry": lambda: _carrying(REPORT),
    "short": lambda: _carrying(SHORT_REPORT),
}


def available(http: str) -> bool:
    """Whether uvicorn's protocol ``http`` can run here (its parser installed)."""
    return importlib.util.find_spec(PROTOCOLS[http][2]) is not None


def _serve(app_name: str, requests: int, ask: bool, http: str = "h11") -> bytes:
    """Feed ``requests`` requests to uvicorn's protocol ``http`` (a name of :data:`PROTOCOLS`)
    for ``app_name`` (in this process); returns the last response's head."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    module, name, _ = PROTOCOLS[http]
    protocol_class = getattr(importlib.import_module(module), name)

    # A socket listening as the server's would: the address the connection came to, where the
    # middleware's tracker finds the server's processes to share requests in flight with.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    address = listener.getsockname()
    head = b"GET / HTTP/1.1\r\nhost: bench\r\n"
    request = head + (b"endpoint-load-metrics-format: TEXT\r\n" if ask else b"") + b"\r\n"

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.answers = 0
            self.head = b""

        def write(self, data: Any) -> None:
            if bytes(data[:9]) == b"HTTP/1.1 ":  # a response starts: the request took LATENCY
                self.answers += 1
                self.head = data
                _NOW[0] += LATENCY

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return {"sockname": address, "peername": ("127.0.0.1", 50000)}.get(name, default)

        def is_closing(self) -> bool:
            return False

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    async def drive() -> bytes:
        config = Config(
            _APPS[app_name](), http=http, access_log=False, lifespan="off", log_level="warning"
        )
        config.load()
        protocol = protocol_class(config, ServerState(), {}, asyncio.get_running_loop())
        transport = Transport()
        protocol.connection_made(transport)
        first = _NOW[0] + IDLE
        for number in range(requests):
            _NOW[0] = first + number * TICK
            protocol.data_received(request)
            while protocol.cycle is not None and not protocol.cycle.response_complete:
                await asyncio.sleep(0)
            await asyncio.sleep(0)
        if transport.answers != requests:
            raise RuntimeError(f"{transport.answers} answers to {requests} requests")
        return bytes(transport.head)

    try:
        return asyncio.run(drive())
    finally:
        listener.close()


def _instructions(app_name: str, requests: int, ask: bool, http: str, cwd: str) -> int:
    """What valgrind counts of one run, started in directory ``cwd``: an empty one, the same for
    the runs set against each other (``python -m`` searches it for every import, and reads its
    listing again whenever it changes: a busy directory such as /tmp moves the count by
    millions of instructions from run to run)."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "lbclient.cli.bench.companion_count",  # this module, run as __main__ or imported
        "--serve",
        app_name,
        str(requests),
        "ask" if ask else "-",
        http,
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dicts, run after run
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=cwd)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind failed ({done.returncode}): {done.stderr[-400:]}")
    return int(found.group(1))


class CountRow(NamedTuple):
    case: str
    per_request: int  # instructions
    ratio: float  # the plain side's instructions over this case's


def count_protocols(
    protocols: Sequence[str], few: int = FEW, many: int = MANY, jobs: int = 1
) -> dict[str, list[CountRow]]:
    """Instructions per request of every case of :data:`CASES` under each of ``protocols``
    (names of :data:`PROTOCOLS`), each against the plain app under the same protocol; the
    valgrind runs ``jobs`` at a time (what one counts does not depend on the others)."""
    runs = sorted(
        {
            (http, app_name, ask, requests)
            for http in protocols
            for _, app_name, ask, _ in CASES
            for requests in (few, many)
        }
    )
    with tempfile.TemporaryDirectory() as empty, ThreadPoolExecutor(max(jobs, 1)) as pool:
        made = pool.map(lambda run: _instructions(run[1], run[3], run[2], run[0], empty), runs)
        found = dict(zip(runs, made, strict=True))

    def per_request(http: str, app_name: str, ask: bool) -> int:
        low, high = found[http, app_name, ask, few], found[http, app_name, ask, many]
        return round((high - low) / (many - few))

    counted = {}
    for http in protocols:
        rows = []
        for name, app_name, ask, plain in CASES:
            base = per_request(http, "plain", plain == "plain+ask")
            own = per_request(http, app_name, ask)
            rows.append(CountRow(name, own, base / own))
        counted[http] = rows
    return counted


def count(few: int = FEW, many: int = MANY, http: str = "h11", jobs: int = 1) -> list[CountRow]:
    """Instructions per request of every case of :data:`CASES` under uvicorn's protocol
    ``http``."""
    return count_protocols([http], few, many, jobs)[http]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--http",
        choices=[*PROTOCOLS, "both"],
        default="both",
        help="uvicorn's protocol to count under (default: both, httptools where installed)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="valgrind runs side by side (default: one per CPU; the counts are the same)",
    )
    parser.add_argument(
        "--serve", nargs=4, metavar=("APP", "REQUESTS", "ASK", "HTTP"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.serve:
        app_name, requests, ask, http = args.serve
        _serve(app_name, int(requests), ask == "ask", http)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing counted (apt-get install valgrind)")
        return 0
    importlib.import_module("uvicorn")
    protocols = list(PROTOCOLS) if args.http == "both" else [args.http]
    missing = [http for http in protocols if not available(http)]
    for http in missing:
        print(f"{http} is not installed: not counted under uvicorn's {http} protocol")
    protocols = [http for http in protocols if http not in missing]
    if not protocols:
        return 0
    print(
        f"Instructions per request under uvicorn's {' and '.join(protocols)} "
        f"protocol{'s' if len(protocols) > 1 else ''}, {many_text()} (valgrind)",
        flush=True,
    )
    counted = count_protocols(protocols, jobs=args.jobs)
    print(format_table(counted))
    print(
        "ratio: the plain app's instructions per request (with the same request, under the same "
        "protocol) over the case's; 1 is free, the aim 0.97."
    )
    return 0


def format_table(counted: dict[str, list[CountRow]]) -> str:
    """The cases' instructions per request and ratios, a column pair per protocol."""
    columns: list[tuple[str, bool]] = [("case", False)]
    for http in counted:
        columns += [(f"{http} instructions/request", True), ("ratio", True)]
    cases = [row.case for row in next(iter(counted.values()))]
    lines = []
    for index, case in enumerate(cases):
        cells = [case]
        for rows in counted.values():
            cells += [f"{rows[index].per_request:,}", f"{rows[index].ratio:.3f}"]
        lines.append(cells)
    return aligned(columns, lines)


def many_text() -> str:
    return f"{MANY:,} requests less {FEW:,}"


if __name__ == "__main__":
    sys.exit(main())
