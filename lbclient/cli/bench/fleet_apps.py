"""The backends of the fleet benchmark (``lbclient/cli/bench/fleet.py``): ASGI apps, each served
by uvicorn in a process of its own (``python -m uvicorn lbclient.cli.bench.fleet_apps:queued``).

* ``queued``: a fixed concurrency, :data:`WORKERS` requests served at once for
  :data:`SERVICE` seconds each (``asyncio.sleep``; 20 ms unless :data:`SERVICE_VARIABLE` says
  otherwise), the rest waiting their turn, so latency grows with the queue; behind
  :class:`~lbclient.server.LoadReportingASGI`.
* ``stalling``: ``queued`` that stops answering for :data:`STALL_FOR` seconds at the end of every
  :data:`STALL_EVERY` seconds since it started: every request in it, served or waiting, waits for
  the stall's end.
* ``failing``: answers every request at once with a 503, and reports no load (no middleware:
  a probe gets a 503 too).
* ``cpu_bound``: each request burns :data:`CPU_BURN` seconds of CPU in a busy loop (one at a
  time: the event loop is the only worker), behind the middleware.

Every answer carries the port that served it as its body, so the client counts which backend
answered without asking the servers. The middleware's rates run over 2 s (the default is 10 s),
and ``application_utilization`` is the mean number of requests in the app (waiting or served)
over the last second, divided by its concurrency (:data:`WORKERS`, or 1 for ``cpu_bound``): above
1 when requests queue, so that ``qps / utilization`` falls as the queue grows.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from lbclient.server import LoadReportingASGI, LoadTracker
from lbclient.server._asgi import Receive, Scope, Send

__all__ = [
    "CPU_BURN",
    "DEFAULT_SERVICE",
    "SERVICE",
    "SERVICE_VARIABLE",
    "STALL_EVERY",
    "STALL_FOR",
    "WORKERS",
    "Occupancy",
    "cpu_bound",
    "failing",
    "queued",
    "service_time",
    "stalling",
]

#: The environment variable that sets a ``queued`` backend's service time (milliseconds).
SERVICE_VARIABLE = "LBCLIENT_FLEET_SERVICE_MS"
#: Requests a ``queued`` backend serves at once, and the seconds each takes by default.
WORKERS, DEFAULT_SERVICE = 4, 0.020


def service_time(environ: Mapping[str, str]) -> float:
    """The seconds a ``queued`` request is served for: :data:`SERVICE_VARIABLE`'s milliseconds
    in ``environ``, else :data:`DEFAULT_SERVICE`."""
    text = environ.get(SERVICE_VARIABLE)
    if text is None:
        return DEFAULT_SERVICE
    try:
        millis = float(text)
    except ValueError:
        raise ValueError(f"{SERVICE_VARIABLE} must be milliseconds, got {text!r}") from None
    if not 0.0 < millis <= 10_000.0:
        raise ValueError(f"{SERVICE_VARIABLE} must be in (0, 10000] ms, got {text!r}")
    return millis / 1000.0


#: The seconds each ``queued`` request is served for, in this process.
SERVICE = service_time(os.environ)
#: The stalling backend stops for STALL_FOR seconds at the end of every STALL_EVERY seconds.
STALL_EVERY, STALL_FOR = 1.0, 0.2
#: Seconds of CPU a ``cpu_bound`` request burns.
CPU_BURN = 0.002
#: Seconds the utilization is averaged over.
WINDOW = 1.0


class Occupancy:
    """Requests in the app now, and their time average over the last :data:`WINDOW` seconds
    divided by ``capacity`` (the utilization reported)."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = capacity
        self._clock = clock
        self._inside = 0
        self._area = 0.0  # requests x seconds, since the start
        self._changed = clock()
        self._marks: deque[tuple[float, float]] = deque([(self._changed, 0.0)])

    def _advance(self) -> float:
        now = self._clock()
        self._area += self._inside * (now - self._changed)
        self._changed = now
        return now

    def enter(self) -> None:
        self._advance()
        self._inside += 1

    def leave(self) -> None:
        self._advance()
        self._inside -= 1

    def utilization(self) -> float:
        """Mean requests in the app over the last second (or since the start) / capacity."""
        now = self._advance()
        marks = self._marks
        marks.append((now, self._area))
        while len(marks) > 2 and marks[1][0] <= now - WINDOW:
            marks.popleft()
        then, area = marks[0]
        span = now - then
        return (self._area - area) / span / self._capacity if span > 0 else 0.0


def _answer(status: int, body: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    return (
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body},
    )


def _port(scope: Scope) -> bytes:
    server = scope.get("server")
    return str(server[1] if server else 0).encode()


_START = time.monotonic()


def _stall_left(now: float) -> float:
    """Seconds until the stall ``now`` falls in ends (0: not in a stall)."""
    phase = (now - _START) % STALL_EVERY
    return STALL_EVERY - phase if phase >= STALL_EVERY - STALL_FOR else 0.0


ASGI = Callable[[Scope, Receive, Send], Awaitable[None]]


def _queued(stall: bool) -> tuple[ASGI, Occupancy]:
    occupancy = Occupancy(WORKERS)
    slots: list[asyncio.Semaphore] = []  # made on the server's loop, at the first request

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if not slots:
            slots.append(asyncio.Semaphore(WORKERS))
        occupancy.enter()
        try:
            async with slots[0]:
                await asyncio.sleep(SERVICE)
            if stall:
                left = _stall_left(time.monotonic())
                if left > 0:
                    await asyncio.sleep(left)
        finally:
            occupancy.leave()
        start, body = _answer(200, _port(scope))
        await send(start)
        await send(body)

    return app, occupancy


def _reported(app: ASGI, occupancy: Occupancy) -> LoadReportingASGI:
    tracker = LoadTracker(application_utilization=occupancy.utilization, rate_window=2)
    return LoadReportingASGI(app, tracker=tracker)


queued = _reported(*_queued(stall=False))
stalling = _reported(*_queued(stall=True))


async def failing(scope: Scope, receive: Receive, send: Send) -> None:
    """A 503 at once, whatever the path; no load reported."""
    if scope["type"] != "http":
        return
    start, body = _answer(503, _port(scope))
    await send(start)
    await send(body)


def _cpu_bound() -> tuple[ASGI, Occupancy]:
    occupancy = Occupancy(1)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        occupancy.enter()
        end = time.thread_time() + CPU_BURN
        while time.thread_time() < end:
            pass
        occupancy.leave()
        start, body = _answer(200, _port(scope))
        await send(start)
        await send(body)

    return app, occupancy


cpu_bound = _reported(*_cpu_bound())
