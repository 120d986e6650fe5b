"""A keep-alive HTTP/1.1 load generator for benchmarks, run in its own process.

``python lbclient/cli/bench/drive.py`` (by path, as the companion benchmark runs it: it imports
nothing but the standard library) reads one command per line on its standard input::

    PORT SECONDS CONNECTIONS ASK

and for each one opens CONNECTIONS connections to 127.0.0.1:PORT, each sending ``GET /`` one
request at a time as fast as the answers come (with ``endpoint-load-metrics-format: ASK`` unless
ASK is ``-``) for SECONDS, then prints ``ANSWERED ELAPSED``: the responses read whole and the
seconds from the first request to the last answer. It exits when its standard input closes.

A response is read by its Content-Length (the benchmark's apps always send one); a status other
than 200 stops the run with an error. One event loop, raw sockets, no HTTP library: the
generator's cost per request is a fraction of the server's, so the server is what is measured.
"""

from __future__ import annotations

import asyncio
import re
import sys

_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


class _Connection(asyncio.Protocol):
    """One connection's loop: a request, its whole answer, the next request, until the end."""

    def __init__(self, request: bytes, end: float, done: asyncio.Future[int]) -> None:
        self._request = request
        self._end = end
        self._done = done
        self._buffer = b""
        self._answered = 0
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self._buffer[:head_end]
            if not head.startswith(b"HTTP/1.1 200 "):
                self._finish(RuntimeError(f"unexpected answer: {head[:200]!r}"))
                return
            length = _LENGTH.search(head)
            if length is None:
                self._finish(RuntimeError(f"an answer without Content-Length: {head[:200]!r}"))
                return
            whole = head_end + 4 + int(length.group(1))
            if len(self._buffer) < whole:
                return
            self._buffer = self._buffer[whole:]
            self._answered += 1
            if self._loop.time() >= self._end:
                self._finish(None)
                return
            assert self._transport is not None
            self._transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionError("the server closed the connection"))

    def _finish(self, error: BaseException | None) -> None:
        if self._done.done():
            return
        if self._transport is not None:
            self._transport.close()
        if error is None:
            self._done.set_result(self._answered)
        else:
            self._done.set_exception(error)


async def run(port: int, seconds: float, connections: int, ask: str | None) -> tuple[int, float]:
    """Responses answered over ``seconds`` on ``connections`` connections, and the time taken."""
    loop = asyncio.get_running_loop()
    extra = b"" if ask is None else b"endpoint-load-metrics-format: " + ask.encode() + b"\r\n"
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n" + extra + b"\r\n"
    start = loop.time()
    end = start + seconds
    futures: list[asyncio.Future[int]] = []
    for _ in range(connections):
        done: asyncio.Future[int] = loop.create_future()
        futures.append(done)
        await loop.create_connection(
            lambda done=done: _Connection(request, end, done),  # type: ignore[misc]
            "127.0.0.1",
            port,
        )
    answered = sum(await asyncio.gather(*futures))
    return answered, loop.time() - start


def main() -> None:
    for line in sys.stdin:
        port, seconds, connections, ask = line.split()
        answered, elapsed = asyncio.run(
            run(int(port), float(seconds), int(connections), None if ask == "-" else ask)
        )
        print(answered, repr(elapsed), flush=True)


if __name__ == "__main__":
    main()
