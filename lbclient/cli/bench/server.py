"""A minimal HTTP/1.1 keep-alive server for benchmarks, run in its own process.

``python -m lbclient.cli.bench.server`` (or this file run by path, as the transport benchmark
does: it imports nothing but the standard library) listens on a free 127.0.0.1 port, prints the
port on its first line, and answers every request with ``200 OK`` and a two-byte body in one
send (so no delayed ACK stalls the client). It reads request bodies by Content-Length. It exits
when its standard input closes, so it never outlives the benchmark that started it.
"""

from __future__ import annotations

import socket
import sys
import threading

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _serve_connection(conn: socket.socket) -> None:
    buffer = b""
    with conn:
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
            conn.sendall(RESPONSE)


def _accept(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve_connection, args=(conn,), daemon=True).start()


def main() -> None:
    """Serve until standard input closes; the port goes to standard output first."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    print(listener.getsockname()[1], flush=True)
    threading.Thread(target=_accept, args=(listener,), daemon=True).start()
    sys.stdin.read()  # until the parent closes our stdin (or dies)


if __name__ == "__main__":
    main()
