"""A minimal HTTP/1.1 keep-alive server for benchmarks, run in its own process.

``python -m lbclient.cli.bench.server`` (or this file run by path, as the benchmarks do: it
imports nothing but the standard library) listens on a free 127.0.0.1 port, prints the port on
its first line, and answers every request with ``200 OK`` and a two-byte body in one send (so no
delayed ACK stalls the client). It reads request bodies by Content-Length. It exits when its
standard input closes, so it never outlives the benchmark that started it.

``--delay SECONDS`` makes it a slow backend: every answer leaves that long after its request
was read (each connection has its own thread, so concurrent requests wait side by side). A
client that closes its connection before the answer, as a hedged request's loser does, ends
that connection quietly.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _serve_connection(conn: socket.socket, delay: float) -> None:
    buffer = b""
    with conn:
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                need = _content_length(head)
                while len(buffer) < need:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                buffer = buffer[need:]
                if delay > 0:
                    time.sleep(delay)
                conn.sendall(RESPONSE)
        except OSError:  # the client reset or closed the connection: nothing left to answer
            return


def _accept(listener: socket.socket, delay: float) -> None:
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve_connection, args=(conn, delay), daemon=True).start()


def _delay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    """Serve until standard input closes; the port goes to standard output first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--delay", type=_delay, default=0.0, metavar="SECONDS",
                        help="seconds to wait before each answer (default 0)")
    delay: float = parser.parse_args(argv).delay
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    print(listener.getsockname()[1], flush=True)
    threading.Thread(target=_accept, args=(listener, delay), daemon=True).start()
    sys.stdin.read()  # until the parent closes our stdin (or dies)


if __name__ == "__main__":
    main()
