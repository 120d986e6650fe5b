"""Server companion benchmark, counted in instructions: what the load-reporting middleware adds
to a request served by uvicorn, as valgrind counts the machine instructions, the same however
busy the machine is (the req/s of :mod:`lbclient.cli.bench.companion` swing 15-40% a round on a
shared machine, more than the 3% asked of the middleware).

Run it alone (Linux with valgrind; about half a minute per case)::

    python -m lbclient.cli.bench.companion_count

Method: uvicorn's own HTTP/1.1 protocol (``H11Protocol``, what ``uvicorn --http h11`` runs per
connection) is fed requests on one keep-alive connection through an in-memory transport, one
request at a time, each answered before the next (no sockets, no kernel, no other process). Each
case runs twice under ``valgrind --tool=callgrind``, with a few requests and with many; the
difference over the difference in requests is the instructions per request, start-up and
imports cancelled out. The middleware's tracker reads a clock that moves 250 µs a request (a
server at 4,000 req/s), so that what it caches for 10 ms is made as often as at that rate, not
as often as valgrind's slowness would make it.

Cases: the plain app and the same behind ``LoadReportingASGI``, each with no report asked and
with ``endpoint-load-metrics-format: TEXT`` on every request; the least an ASGI middleware that
reads the status does (``StatusWatcher``); and the plain app writing a report header of the
usual length itself, which is what carrying the report costs the server's HTTP library whoever
writes it. Ratios are the plain app's instructions over the case's (1 is free; 0.97 is the aim).
A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from lbclient.cli.bench.companion_apps import _BODY, asgi_plain
from lbclient.cli.bench.tables import aligned
from lbclient.server import LoadReportingASGI, LoadTracker, cpu_utilization

__all__ = ["CASES", "CountRow", "count", "main"]

#: Requests of the short and the long run; the difference is what is counted.
FEW, MANY = 200, 1200
#: Seconds the tracker's clock moves per request.
TICK = 250e-6
#: What a tracker writes, of the usual length (carried by the plain app in the "carry" case).
REPORT = (
    b"TEXT cpu_utilization=0.412345, rps_fractional=3891.2, eps=0, named_metrics.rif=3, "
    b"named_metrics.latency_ms=0.412345"
)

_NOW = [1000.0]


def _clock() -> float:
    return _NOW[0]


async def _carry(scope: Any, receive: Any, send: Any) -> None:
    """The plain app, writing a report header itself."""
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*headers, (b"endpoint-load-metrics", REPORT)],
        }
    )
    await send(dict(_BODY))


def _reported() -> Any:
    # Counted per process: looking for a listening socket to share the count with reads the
    # machine's socket tables, as long as other processes make them (here there is none).
    tracker = LoadTracker(
        clock=_clock, cpu_utilization=cpu_utilization(clock=_clock), share_in_flight=False
    )
    return LoadReportingASGI(asgi_plain, tracker=tracker)


def _watched() -> Any:
    from lbclient.cli.bench.companion_apps import StatusWatcher

    return StatusWatcher(asgi_plain)


#: Each case: its name, the app (a factory), whether every request asks for the report, and
#: the case whose instructions it is divided into (its plain side).
CASES: tuple[tuple[str, str, bool, str], ...] = (
    ("plain app", "plain", False, "plain"),
    ("floor: a do-nothing ASGI middleware reading the status", "floor", False, "plain"),
    ("LoadReportingASGI", "reported", False, "plain"),
    ("plain app, every request asks for the report", "plain", True, "plain+ask"),
    ("carry: the plain app writing a report header itself", "carry", True, "plain+ask"),
    ("LoadReportingASGI, every request asks for the report", "reported", True, "plain+ask"),
)
_APPS: dict[str, Callable[[], Any]] = {
    "plain": lambda: asgi_plain,
    "floor": _watched,
    "reported": _reported,
    "carry": lambda: _carry,
}


def _serve(app_name: str, requests: int, ask: bool) -> None:
    """Feed ``requests`` requests to uvicorn's h11 protocol for ``app_name`` (in this process)."""
    from uvicorn.config import Config
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.server import ServerState

    head = b"GET / HTTP/1.1\r\nhost: bench\r\n"
    request = head + (b"endpoint-load-metrics-format: TEXT\r\n" if ask else b"") + b"\r\n"

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.answers = 0

        def write(self, data: Any) -> None:
            self.answers += bytes(data[:9]) == b"HTTP/1.1 "

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
                name, default
            )

        def is_closing(self) -> bool:
            return False

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    async def drive() -> None:
        config = Config(
            _APPS[app_name](), http="h11", access_log=False, lifespan="off", log_level="warning"
        )
        config.load()
        protocol = H11Protocol(config, ServerState(), {}, asyncio.get_running_loop())
        transport = Transport()
        protocol.connection_made(transport)
        for _ in range(requests):
            _NOW[0] += TICK
            protocol.data_received(request)
            while protocol.cycle is not None and not protocol.cycle.response_complete:
                await asyncio.sleep(0)
            await asyncio.sleep(0)
        if transport.answers != requests:
            raise RuntimeError(f"{transport.answers} answers to {requests} requests")

    asyncio.run(drive())


def _instructions(app_name: str, requests: int, ask: bool) -> int:
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
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dicts, run after run
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind failed ({done.returncode}): {done.stderr[-400:]}")
    return int(found.group(1))


class CountRow(NamedTuple):
    case: str
    per_request: int  # instructions
    ratio: float  # the plain side's instructions over this case's


def count(few: int = FEW, many: int = MANY) -> list[CountRow]:
    """Instructions per request of every case of :data:`CASES`."""
    measured: dict[tuple[str, bool], int] = {}
    for _, app_name, ask, _ in CASES:
        if (app_name, ask) not in measured:
            low, high = _instructions(app_name, few, ask), _instructions(app_name, many, ask)
            measured[app_name, ask] = round((high - low) / (many - few))
    rows = []
    for name, app_name, ask, plain in CASES:
        base = measured["plain", plain == "plain+ask"]
        own = measured[app_name, ask]
        rows.append(CountRow(name, own, base / own))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--serve", nargs=3, metavar=("APP", "REQUESTS", "ASK"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.serve:
        app_name, requests, ask = args.serve
        _serve(app_name, int(requests), ask == "ask")
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing counted (apt-get install valgrind)")
        return 0
    importlib.import_module("uvicorn")
    print(f"Instructions per request under uvicorn's h11 protocol, {many_text()} (valgrind)")
    rows = count()
    print(
        aligned(
            (("case", False), ("instructions/request", True), ("ratio", True)),
            [(row.case, f"{row.per_request:,}", f"{row.ratio:.3f}") for row in rows],
        )
    )
    print(
        "ratio: the plain app's instructions per request (with the same request) over the "
        "case's; 1 is free, the aim 0.97."
    )
    return 0


def many_text() -> str:
    return f"{MANY:,} requests less {FEW:,}"


if __name__ == "__main__":
    sys.exit(main())
