"""Apps the server companion's live tests run under uvicorn (``asgi``) and gunicorn (``wsgi``),
each wrapped in its middleware. Imported by the servers from this folder (``PYTHONPATH``).

Paths (the same for both):

* ``/``: 200 ``hello``;
* ``/hold?gate=NAME``: waits until ``/release?gate=NAME`` has been asked (a gate, once open,
  stays open: a request that comes late passes at once), then 200 ``held``;
* ``/stream?gate=NAME``: a body in two chunks, ``first`` at once and ``second`` once the gate
  opens (no Content-Length: chunked);
* ``/wait?file=PATH``: a body in two chunks, the answering process's id at once, ``done`` once
  the file ``PATH`` exists (a gate the processes of a server of several workers share);

Every report names the answering process: ``named_metrics.pid``.
* ``/fail``: 503; ``/boom``: the app raises.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

from lbclient.server import LoadReportingASGI, LoadReportingWSGI, cpu_utilization

#: How long a held request waits at most, so that a failed test never leaves a server stuck.
MOST = 60.0


def _gate(query: str) -> str:
    return parse_qs(query).get("gate", ["default"])[0]


def _file(query: str) -> str:
    return parse_qs(query)["file"][0]


#: How often a request waiting for a file looks for it (seconds).
LOOK_EVERY = 0.01


# -- ASGI ----------------------------------------------------------------------------------------

_async_gates: dict[str, asyncio.Event] = {}


async def _plain_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    path, query = scope["path"], scope["query_string"].decode()

    async def answer(status: int, body: bytes) -> None:
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    gate = _async_gates.setdefault(_gate(query), asyncio.Event())
    if path == "/":
        await answer(200, b"hello")
    elif path == "/hold":
        await asyncio.wait_for(gate.wait(), MOST)
        await answer(200, b"held")
    elif path == "/release":
        gate.set()
        await answer(200, b"released")
    elif path == "/wait":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"%d\n" % os.getpid(), "more_body": True})
        deadline = time.monotonic() + MOST
        while not os.path.exists(_file(query)) and time.monotonic() < deadline:
            await asyncio.sleep(LOOK_EVERY)
        await send({"type": "http.response.body", "body": b"done"})
    elif path == "/stream":
        start = {"type": "http.response.start", "status": 200, "headers": []}
        await send(start)
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await asyncio.wait_for(gate.wait(), MOST)
        await send({"type": "http.response.body", "body": b"second"})
    elif path == "/fail":
        await answer(503, b"failing")
    elif path == "/boom":
        raise RuntimeError("boom")
    else:
        await answer(404, b"not found")


def _pid() -> float:
    return float(os.getpid())


_METRICS = {"queue": lambda: 2.0, "pid": _pid}
asgi = LoadReportingASGI(_plain_asgi, cpu_utilization=cpu_utilization(), named_metrics=_METRICS)


# -- WSGI ----------------------------------------------------------------------------------------

_gates: dict[str, threading.Event] = {}
_gates_lock = threading.Lock()


def _thread_gate(query: str) -> threading.Event:
    with _gates_lock:
        return _gates.setdefault(_gate(query), threading.Event())


def _stream(gate: threading.Event) -> Iterator[bytes]:
    yield b"first"
    gate.wait(MOST)
    yield b"second"


def _wait(file: str) -> Iterator[bytes]:
    yield b"%d\n" % os.getpid()
    deadline = time.monotonic() + MOST
    while not os.path.exists(file) and time.monotonic() < deadline:
        time.sleep(LOOK_EVERY)
    yield b"done"


def _plain_wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    path, query = environ["PATH_INFO"], environ.get("QUERY_STRING", "")

    def answer(status: str, body: bytes) -> list[bytes]:
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    gate = _thread_gate(query)
    if path == "/":
        return answer("200 OK", b"hello")
    if path == "/hold":
        gate.wait(MOST)
        return answer("200 OK", b"held")
    if path == "/release":
        gate.set()
        return answer("200 OK", b"released")
    if path == "/wait":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _wait(_file(query))
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _stream(gate)
    if path == "/fail":
        return answer("503 Service Unavailable", b"failing")
    if path == "/boom":
        raise RuntimeError("boom")
    return answer("404 Not Found", b"not found")


wsgi = LoadReportingWSGI(_plain_wsgi, cpu_utilization=cpu_utilization(), named_metrics=_METRICS)
