"""The apps the server companion's benchmark serves: one trivial endpoint, plain and behind
each middleware (``python -m uvicorn lbclient.cli.bench.companion_apps:asgi_reported``, ...).

Every answer is ``200 OK`` with a two-byte body and its Content-Length, whatever the path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lbclient.server import LoadReportingASGI, LoadReportingWSGI, cpu_utilization
from lbclient.server._asgi import Receive, Scope, Send
from lbclient.server._wsgi import StartResponse

__all__ = [
    "StatusWatcher",
    "asgi_plain",
    "asgi_reported",
    "floor_plain",
    "floor_reported",
    "wsgi_plain",
    "wsgi_reported",
]

_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
_START = {"type": "http.response.start", "status": 200, "headers": _HEADERS}
_BODY = {"type": "http.response.body", "body": b"ok"}


async def asgi_plain(scope: Scope, receive: Receive, send: Send) -> None:
    """The trivial endpoint, for ASGI."""
    await send(dict(_START))
    await send(dict(_BODY))


def wsgi_plain(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The trivial endpoint, for WSGI."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


asgi_reported = LoadReportingASGI(asgi_plain, cpu_utilization=cpu_utilization())
wsgi_reported = LoadReportingWSGI(wsgi_plain, cpu_utilization=cpu_utilization())


class StatusWatcher:
    """The least an ASGI middleware that sees each response's status does: it passes every
    message through a ``send`` of its own, reading the status, and nothing else. Its cost is the
    floor under any such middleware (the load-reporting one needs the status to count errors)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.status = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        def watch(message: Any) -> Any:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            return send(message)

        await self.app(scope, receive, watch)


#: The floor case: the plain app, and the same behind :class:`StatusWatcher`.
floor_plain = asgi_plain
floor_reported = StatusWatcher(asgi_plain)
