"""A minimal HTTP/1.1 keep-alive server for benchmarks, run in its own process.

``python -m lbclient.cli.bench.server`` (or this file run by path, as the benchmarks do: it
imports nothing but the standard library) listens on a free 127.0.0.1 port, prints the port on
its first line, and answers every request with ``200 OK`` and a two-byte body in one send (so no
delayed ACK stalls the client). It reads request bodies by Content-Length. It exits when its
standard input closes, so it never outlives the benchmark that started it.

All its connections are served by one asyncio event loop in one thread, so a hundred
connections cost no more than ten: no thread switches, no contention for the GIL.

Options, for backends that misbehave on purpose:

* ``--delay SECONDS``: a slow backend; every answer leaves that long after its request was read,
  and concurrent requests wait side by side.
* ``--stall-every SECONDS --stall-for SECONDS``: a backend that stops answering for
  ``stall-for`` seconds at the end of every ``stall-every`` seconds since it started; answers due
  in a stall leave when it ends.
* ``--fail-every N``: every N-th request (counted over all connections) is answered at once with
  ``503 Service Unavailable``.

A client that closes its connection before its answer, as a hedged request's loser does, ends
that connection quietly. ``GET /_served`` is answered at once, outside the count, with the
number of requests answered or due so far (for the benchmarks' share of requests per backend).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import math
import os
import select
import selectors
import sys
from collections import deque

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
FAILURE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nno"
)
#: The request target that reports the count instead of being counted.
SERVED = b"/_served"
#: The longest request head read before the connection is dropped.
MAX_HEAD = 65536


def _counted(count: int) -> bytes:
    body = str(count).encode("ascii")
    return (
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n" % len(body)
    ) + body


def served(address: str, timeout: float = 10.0) -> int:
    """How many requests the server at ``address`` ("host:port") has answered or has due."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", SERVED.decode("ascii"))
        return int(conn.getresponse().read())
    finally:
        conn.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


class Behaviour:
    """What the server answers and when: the options, the request count, the stall clock."""

    def __init__(
        self,
        start: float,
        delay: float = 0.0,
        stall_every: float | None = None,
        stall_for: float = 0.0,
        fail_every: int | None = None,
    ) -> None:
        self.start = start
        self.delay = delay
        self.stall_every = stall_every
        self.stall_for = stall_for
        self.fail_every = fail_every
        #: Requests answered or due, ``/_served`` aside.
        self.count = 0
        #: The connections open now.
        self.open: set[Connection] = set()

    def unstalled(self, when: float) -> float:
        """``when``, or the end of the stall it falls in."""
        every = self.stall_every
        if every is None or self.stall_for <= 0:
            return when
        phase = (when - self.start) % every
        if phase >= every - self.stall_for:
            return when + (every - phase)
        return when

    def answer(self, target: bytes, now: float) -> tuple[bytes, float | None]:
        """The answer to a request read at ``now`` and when it leaves (None: at once)."""
        if target == SERVED:
            return _counted(self.count), None
        self.count += 1
        payload, delay = RESPONSE, self.delay
        if self.fail_every is not None and self.count % self.fail_every == 0:
            payload, delay = FAILURE, 0.0
        due = self.unstalled(now + delay)
        return payload, (due if due > now else None)


class _Answer:
    """An answer waiting for its time, or for the answers before it on its connection."""

    __slots__ = ("payload", "ready", "timer")

    def __init__(self, payload: bytes, ready: bool) -> None:
        self.payload = payload
        self.ready = ready
        self.timer: asyncio.TimerHandle | None = None


class Connection(asyncio.Protocol):
    """One client connection: requests parsed as they arrive, answers sent in request order."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.buffer = bytearray()
        self.need = -1  # body bytes still to skip, or -1 while reading a head
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        #: Answers not yet sent, in request order.
        self.queue: deque[_Answer] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.behaviour.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        for answer in self.queue:
            if answer.timer is not None:
                answer.timer.cancel()
        self.queue.clear()
        self.transport = None
        self.behaviour.open.discard(self)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            if self.need > 0:
                skipped = min(self.need, len(buffer))
                del buffer[:skipped]
                self.need -= skipped
                if self.need > 0:
                    return
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self.close()
                return
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            try:
                self.need = _content_length(head)
            except ValueError:
                self.close()
                return
            target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            self._answer(target)
            if not buffer and self.need <= 0:
                return

    def _answer(self, target: bytes) -> None:
        payload, due = self.behaviour.answer(target, self.loop.time())
        if due is None and not self.queue:
            self._write(payload)
            return
        answer = _Answer(payload, due is None)
        self.queue.append(answer)
        if due is not None:
            answer.timer = self.loop.call_at(due, self._ready, answer)

    def _ready(self, answer: _Answer) -> None:
        answer.ready = True
        queue = self.queue
        while queue and queue[0].ready:
            self._write(queue.popleft().payload)

    def _write(self, payload: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(payload)

    def close(self) -> None:
        """Close the connection, answers still due or not."""
        if self.transport is not None:
            self.transport.close()


if sys.platform == "linux":

    class _PreciseEpoll(selectors.EpollSelector):
        """epoll, with timers waited out to the microsecond (epoll alone rounds them up to the
        millisecond, which would stretch a 2 ms delay by a quarter)."""

        def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            if timeout is not None and timeout > 0:
                select.select([self.fileno()], [], [], timeout)  # until an event or the timer
                timeout = 0
            return super().select(timeout)


def _selector() -> selectors.BaseSelector:
    """The event loop's selector: the precise epoll on Linux, the platform's best elsewhere."""
    if sys.platform == "linux":
        return _PreciseEpoll()
    return selectors.DefaultSelector()


async def serve(behaviour: Behaviour, stdin: int | None) -> None:
    """Serve until ``stdin`` (a file descriptor) reaches its end; the port is printed first."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(behaviour), "127.0.0.1", 0, backlog=1024, reuse_address=True
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    done = loop.create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    blocking = True
    if stdin is None:
        finish()
    else:
        try:
            blocking = os.get_blocking(stdin)
            os.set_blocking(stdin, False)

            def readable() -> None:
                try:
                    data = os.read(stdin, 65536)
                except BlockingIOError:
                    return
                except OSError:
                    data = b""
                if not data:
                    finish()

            loop.add_reader(stdin, readable)
        except (OSError, ValueError, NotImplementedError):
            # Not a pipe, socket or terminal (a regular file, /dev/null): read it to its end
            # off the loop.
            os.set_blocking(stdin, True)
            loop.run_in_executor(None, _drain, stdin).add_done_callback(lambda _: finish())
    try:
        await done
    finally:
        if stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(stdin)
                os.set_blocking(stdin, blocking)
        server.close()
        for connection in list(behaviour.open):
            connection.close()


def _drain(fd: int) -> None:
    while os.read(fd, 65536):
        pass


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    """Serve until standard input closes; the port goes to standard output first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--delay",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="seconds to wait before each answer (default 0)",
    )
    parser.add_argument(
        "--stall-every",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="stop answering once per this many seconds (with --stall-for)",
    )
    parser.add_argument(
        "--stall-for",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="how long each stall lasts (default 0: none)",
    )
    parser.add_argument(
        "--fail-every",
        type=_count,
        default=None,
        metavar="N",
        help="answer every N-th request with a fast 503",
    )
    args = parser.parse_args(argv)
    if (args.stall_every is None) != (args.stall_for == 0):
        parser.error("--stall-every and --stall-for go together")
    if args.stall_every is not None and not 0 < args.stall_for < args.stall_every:
        parser.error("--stall-for must be above 0 and below --stall-every")
    try:
        stdin: int | None = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        stdin = None

    async def run() -> None:
        behaviour = Behaviour(
            asyncio.get_running_loop().time(),
            delay=args.delay,
            stall_every=args.stall_every,
            stall_for=args.stall_for,
            fail_every=args.fail_every,
        )
        await serve(behaviour, stdin)

    loop = asyncio.SelectorEventLoop(_selector())
    try:
        loop.run_until_complete(run())
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


if __name__ == "__main__":
    main()
