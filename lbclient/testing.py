"""Real HTTP/1.1 and HTTP/2 servers on loopback, with real failure modes, for testing
load-balanced clients.

Used by lbclient's own tests, examples and demo, and offered to users for theirs.

Built on the standard library (``socket``, ``ssl``, ``threading``, ``selectors``) and h11, which
parses the requests; responses are written as raw bytes, so every byte and every close is under
the test's control.

``TestServer(mode)`` listens on ``127.0.0.1`` (``host="::1"``: the IPv6 loopback, and its
``address`` is ``[::1]:port``; port 0 picks a free port, remembered across ``restart()``),
serves each connection on its own daemon thread and records every fully received request in
``server.requests`` *before* it answers (or fails to), so whatever the client sees, the record
is already there. A malformed request is not recorded: it is answered ``400`` (``413``
for a body over 256 MiB, ``431`` for a head over 64 KiB, ``501`` for a transfer coding other
than chunked) and the connection closes.

Modes (``server.mode`` may be reassigned while the server runs; an unknown mode raises
``ValueError`` when it is set):

* ``"ok"``: 200 with a JSON body ``{"server", "port", "method", "path", "host", "body_length",
  "body_sha256"}``, ``Content-Length`` and HTTP/1.1 keep-alive (``Connection: close`` from the
  client, or HTTP/1.0 without ``keep-alive``, closes after the response).
* ``"status:NNN"``: the same JSON body with status ``NNN``; keep-alive as for ``"ok"``.
* In ``"ok"`` and ``"status:NNN"`` modes a request whose target contains ``/__redirect/`` is
  answered ``302 Found`` with the rest of the target, percent-decoded, as its ``Location``
  (``/a/__redirect/..%2Flanding`` redirects to ``../landing``); both modes wait ``delay``
  seconds before answering.
* ``"hang"``: reads the request, then never answers; the socket is held until ``hang_seconds``
  pass or the server stops (stopping releases it at once).
* ``"reset"``: reads the request, sends the status line and headers announcing
  ``Content-Length: 100000`` and 10 body bytes, then closes with ``SO_LINGER(1, 0)``: the client
  sees a TCP RST in the middle of the body.
* ``"close"``: reads the request and closes the connection without a response.

Modes of your own: a behaviour is a function that takes an ``Exchange`` and returns whether the
connection stays open for another request. Give them names with ``TestServer(behaviours=...)``
(a built-in's name replaces the built-in); the mode ``"name:text"`` runs behaviour ``name`` with
``exchange.arg == "text"`` (``None`` when the mode has no colon)::

    def teapot(exchange: Exchange) -> bool:
        exchange.sleep(float(exchange.arg or 0))  # "teapot:0.5": answer after half a second
        return exchange.respond(418, b"short and stout", {"Content-Type": "text/plain"})

    def garbage(exchange: Exchange) -> bool:
        exchange.send(b"HTTP/1.1 two hundred\\r\\n\\r\\n")  # a status line no client accepts
        return exchange.close()

    server = TestServer("teapot", behaviours={"teapot": teapot, "garbage": garbage})
    server.mode = "garbage"

An ``Exchange`` has the recorded ``request``, the mode's ``arg``, the ``server``, and
``keep_alive`` (the client allows another request on this connection and the server is not
stopping). ``respond(status=200, body=None, headers=None)`` sends a whole response (without a
body: the JSON document of ``"ok"``) and returns whether the connection stays open; ``send(data)``
sends raw bytes; ``sleep(seconds)`` waits (``kill()`` lets it finish, within its grace period);
``hang()`` holds the socket as ``"hang"`` does, ``reset()`` closes with a TCP RST after whatever
was sent, ``close()`` closes; those three return ``False``. An exception in a behaviour closes the
connection and is kept in ``server.errors``.

``kill()`` is "the backend dies": the listener closes first (new connects are refused), requests
being handled finish and are answered with ``Connection: close``, idle keep-alive connections are
shut down, hanging ones are released; it returns once every socket is closed and every thread
joined (a handler still stuck after a few seconds has its socket shut down under it).
``restart()`` listens again on the same port. ``close()`` is ``kill()``; both are idempotent.

``H2TestServer`` speaks HTTP/2 (with the ``h2`` package, ``lbclient[http2]``), for the paths
HTTP/2 clients take: many streams on one connection, a connection dropped under them. Its modes
are ``"ok"``, ``"status:NNN"`` and ``"hold"``; see its docstring.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import selectors
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from importlib.util import find_spec
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import unquote

import h11

if TYPE_CHECKING:
    from h2.connection import H2Connection

    from lbclient._testing_kube import KubernetesAPI

__all__ = [
    "Behaviour",
    "Exchange",
    "H2TestServer",
    "KubernetesAPI",
    "RecordedRequest",
    "TLSCerts",
    "TestServer",
    "closed_port",
    "record_sni",
    "serve",
]

_READ_TIMEOUT = 0.5  # a recv on a readable socket (a TLS record may come in pieces)
_CHECK_EVERY = 1.0  # safety net: waiting handlers re-check the stop flags this often
_SEND_TIMEOUT = 5.0  # a client that will not read our response for this long is dropped
_HANDSHAKE_TIMEOUT = 5.0
_KILL_GRACE = 5.0  # kill() waits this long for in-flight requests before forcing sockets shut
_RST_AFTER = 0.05  # between the last bytes sent and an RST, so the client can take them first
_MAX_HEAD = 64 * 1024
_MAX_BODY = 256 * 1024 * 1024
_RESET_LENGTH = 100_000
_RESET_BODY = b"0123456789"
_REDIRECT = "/__redirect/"  # /__redirect/LOCATION (percent-encoded) gets 302 to LOCATION


@dataclass
class RecordedRequest:
    """One fully received request, as the server saw it."""

    method: str
    target: str  # raw request target, query included
    headers: dict[str, str]  # lower-case names; the last value of a repeated header wins
    body: bytes  # decoded from chunked transfer coding if it was chunked
    peer: tuple[object, ...]  # the client's socket address: (host, port) for IPv4
    tls_server_name: str | None = None  # SNI the client sent (TLS only)
    connection: int = 0  # server-side connection number: equal for requests on one connection
    stream: int | None = None  # HTTP/2 stream id (None for HTTP/1.1)


# -- SNI -----------------------------------------------------------------------------------------

_sni_lock = threading.Lock()
_sni_names: weakref.WeakKeyDictionary[object, str | None] = weakref.WeakKeyDictionary()


def record_sni(
    ssl_socket: ssl.SSLSocket | ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
) -> None:
    """``SSLContext.sni_callback`` that remembers the client's SNI for ``TestServer``."""
    with _sni_lock:
        _sni_names[ssl_socket] = server_name


def _take_sni(ssl_socket: object) -> str | None:
    with _sni_lock:
        return _sni_names.pop(ssl_socket, None)


# -- helpers ---------------------------------------------------------------------------------------


class _Closed(Exception):
    """End this connection quietly (EOF, stop, timeout)."""


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Generation:
    """The events of one start()..kill() run; handler threads keep their own run's events.

    Waiting threads block in a selector on their socket plus ``wake_r``, which becomes readable
    (and stays so) when the run stops: no polling, so idle connections cost no CPU.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()  # no new requests: close idle connections, release hangs
        self.force = threading.Event()  # grace period over: abandon everything
        self.wake_r, self.wake_w = socket.socketpair()

    def set_stop(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.wake_w.send(b"x")

    def close(self) -> None:
        self.wake_r.close()
        self.wake_w.close()


class _Run:
    def __init__(self, listener: socket.socket, gen: _Generation) -> None:
        self.listener = listener
        self.gen = gen
        self.thread: threading.Thread | None = None


def _send(conn: _Conn, data: bytes) -> None:
    conn.sock.settimeout(_SEND_TIMEOUT)
    try:
        conn.sock.sendall(data)
    finally:
        conn.sock.settimeout(_READ_TIMEOUT)


# -- behaviours ----------------------------------------------------------------------------------


class Exchange:
    """One recorded request and the ways to answer it: what a behaviour gets.

    Made by the server for each request; see the module docstring.
    """

    def __init__(
        self,
        server: TestServer,
        conn: _Conn,
        request: RecordedRequest,
        arg: str | None,
        client_keep_alive: bool,
    ) -> None:
        self.server = server
        self.request = request
        self.arg = arg  # the mode's text after the colon: "503" for "status:503"; else None
        self._conn = conn
        self._client_keep_alive = client_keep_alive
        self._sent = False

    @property
    def keep_alive(self) -> bool:
        """The client allows another request on this connection and the server is not stopping."""
        return self._client_keep_alive and not self._conn.gen.stop.is_set()

    def respond(
        self, status: int = 200, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> bool:
        """Send a whole response; returns whether the connection stays open.

        Without ``body``, the JSON document of ``"ok"`` (``Content-Type: application/json``).
        ``Content-Length``, ``X-Test-Server`` and ``Connection`` are added unless ``headers``
        has them; no body is sent for HEAD requests and 1xx, 204 and 304 responses.
        """
        extra = dict(headers or {})
        given = {name.lower(): value for name, value in extra.items()}
        lines = [f"HTTP/1.1 {status} {_reason(status)}"]
        if status < 200 or status in (204, 304):
            body = b""
        else:
            if body is None:
                body = self._document()
                if "content-type" not in given:
                    lines.append("Content-Type: application/json")
            if "content-length" not in given:
                lines.append(f"Content-Length: {len(body)}")
        if self.request.method.upper() == "HEAD":
            body = b""
        if "x-test-server" not in given:
            lines.append(f"X-Test-Server: {self.server.name}")
        lines += [f"{name}: {value}" for name, value in extra.items()]
        keep_alive = self.keep_alive and "close" not in _tokens(given.get("connection", ""))
        if "connection" not in given:
            if not keep_alive:
                lines.append("Connection: close")
            elif "keep-alive" in _tokens(self.request.headers.get("connection", "")):
                lines.append("Connection: keep-alive")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return keep_alive

    def send(self, data: bytes) -> None:
        """Send ``data`` as it is."""
        self._sent = True
        _send(self._conn, data)

    def sleep(self, seconds: float) -> None:
        """Wait; ``kill()`` lets a sleeping request finish, within its grace period."""
        if self._conn.gen.force.wait(seconds):
            raise _Closed

    @property
    def stopping(self) -> bool:
        """The server is stopping (``kill()``): a behaviour that streams should end."""
        return self._conn.gen.stop.is_set()

    def hang(self) -> bool:
        """Hold the socket until ``hang_seconds`` pass or the server stops; returns False."""
        self._conn.gen.stop.wait(self.server.hang_seconds)
        return False

    def reset(self) -> bool:
        """Close with a TCP RST, once the client could take what was sent; returns False."""
        if self._sent:
            self._conn.gen.force.wait(_RST_AFTER)
        self._conn.rst = True
        return False

    def close(self) -> bool:
        """Close the connection (after what was sent); returns False."""
        return False

    def _document(self) -> bytes:
        return _json_document(self.server.name, self.server.port, self.request)


def _json_document(name: str, port: int, request: RecordedRequest) -> bytes:
    """The JSON body of ``"ok"``: what the server saw of ``request``."""
    headers = request.headers
    payload = {
        "server": name,
        "port": port,
        "method": request.method,
        "path": request.target,
        "host": headers.get(":authority", headers.get("host")),
        "body_length": len(request.body),
        "body_sha256": hashlib.sha256(request.body).hexdigest(),
    }
    return json.dumps(payload).encode()


Behaviour: TypeAlias = Callable[[Exchange], bool]
"""Answers one request (or not); returns whether the connection stays open."""


def _answer(exchange: Exchange, status: int) -> bool:
    target = exchange.request.target
    headers = {}
    if _REDIRECT in target:
        status = 302
        headers["Location"] = unquote(target.partition(_REDIRECT)[2])
    if exchange.server.delay > 0:
        exchange.sleep(exchange.server.delay)
    return exchange.respond(status, headers=headers)


def _ok(exchange: Exchange) -> bool:
    return _answer(exchange, 200)


def _status(exchange: Exchange) -> bool:
    return _answer(exchange, int(exchange.arg or 0))


def _hang(exchange: Exchange) -> bool:
    return exchange.hang()


def _reset(exchange: Exchange) -> bool:
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {_RESET_LENGTH}\r\n\r\n"
    )
    exchange.send(head.encode("latin-1") + _RESET_BODY)
    return exchange.reset()


def _close(exchange: Exchange) -> bool:
    return exchange.close()


_BUILTIN: Mapping[str, Behaviour] = MappingProxyType(
    {"ok": _ok, "status": _status, "hang": _hang, "reset": _reset, "close": _close}
)


def _check_arg(name: str, behaviour: Behaviour, arg: str | None) -> str | None:
    """Why a built-in behaviour cannot take ``arg``, or None; other behaviours take anything."""
    if behaviour is _status:
        if arg is None or not (arg.isascii() and arg.isdigit() and 100 <= int(arg) <= 599):
            return "status needs a code from 100 to 599: status:NNN"
    elif behaviour in _BUILTIN.values() and arg is not None:
        return f"{name} takes no argument"
    return None


# -- the server --------------------------------------------------------------------------------


class TestServer:
    """A real HTTP/1.1 server on loopback; see the module docstring for the modes."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        mode: str = "ok",
        *,
        name: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        hang_seconds: float = 30.0,
        delay: float = 0.0,
        behaviours: Mapping[str, Behaviour] | None = None,
    ) -> None:
        for key in behaviours or {}:
            if not key or ":" in key:
                raise ValueError(f"behaviour name {key!r}: must be non-empty, without ':'")
        self._behaviours: Mapping[str, Behaviour] = MappingProxyType(
            {**_BUILTIN, **(behaviours or {})}
        )
        self._selected = self._select(mode)
        self._name = name
        self.ssl_context = ssl_context
        if ssl_context is not None and ssl_context.sni_callback is None:
            ssl_context.sni_callback = record_sni
        self.host = host
        self.port = port
        self.hang_seconds = hang_seconds
        self.delay = delay
        self.requests: list[RecordedRequest] = []
        self.errors: list[BaseException] = []  # exceptions raised in handlers and behaviours
        self._lock = threading.Lock()  # requests, connections
        self._state = threading.RLock()  # start / kill / restart
        self._run: _Run | None = None
        self._conns: set[_Conn] = set()
        self._numbers = itertools.count(1)

    # -- attributes ----------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._selected[0]

    @mode.setter
    def mode(self, value: str) -> None:
        self._selected = self._select(value)

    def _select(self, mode: str) -> tuple[str, Behaviour, str | None]:
        name, colon, text = mode.partition(":")
        arg = text if colon else None
        behaviour = self._behaviours.get(name)
        if behaviour is None:
            known = ", ".join(
                "status:NNN" if b is _status else n for n, b in self._behaviours.items()
            )
            raise ValueError(f"unknown TestServer mode {mode!r}; the modes are {known}")
        problem = _check_arg(name, behaviour, arg)
        if problem is not None:
            raise ValueError(f"bad TestServer mode {mode!r}: {problem}")
        return mode, behaviour, arg

    @property
    def name(self) -> str:
        if self._name is not None:
            return self._name
        return _format_address(self.host, self.port)

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port``); raises before the first start() when port was 0."""
        if self.port == 0:
            raise RuntimeError("TestServer has no port yet: call start() first")
        return _format_address(self.host, self.port)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.address}"

    @property
    def running(self) -> bool:
        return self._run is not None

    def count(self, method: str | None = None) -> int:
        """Requests received so far, optionally only those with ``method``."""
        with self._lock:
            if method is None:
                return len(self.requests)
            wanted = method.upper()
            return sum(1 for r in self.requests if r.method.upper() == wanted)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        where = _format_address(self.host, self.port)
        return f"<TestServer {self.name!r} {where} mode={self.mode!r} {state}>"

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> TestServer:
        """Bind (port 0: a free port, kept for restarts), listen and serve; returns self."""
        with self._state:
            if self._run is not None:
                raise RuntimeError(f"{self!r} is already running")
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((self.host, self.port))
                listener.listen(128)
                listener.setblocking(False)
                gen = _Generation()
            except BaseException:
                listener.close()
                raise
            self.port = listener.getsockname()[1]
            run = _Run(listener, gen)
            run.thread = threading.Thread(
                target=self._accept_loop, args=(run,), name=f"TestServer-accept-{self.name}"
            )
            run.thread.daemon = True
            self._run = run
            run.thread.start()
            return self

    def kill(self) -> None:
        """Stop like a dying backend; returns once every socket is closed. Idempotent."""
        with self._state:
            run, self._run = self._run, None
            if run is None:
                return
            gen = run.gen
            gen.set_stop()
            if run.thread is not None:
                run.thread.join(_KILL_GRACE)
            run.listener.close()  # normally already closed by the accept thread

            with self._lock:
                conns = [c for c in self._conns if c.gen is gen]
            deadline = time.monotonic() + _KILL_GRACE
            for conn in conns:
                if conn.thread is not None:
                    conn.thread.join(max(0.0, deadline - time.monotonic()))
            stuck = [c for c in conns if c.thread is not None and c.thread.is_alive()]
            if stuck:
                gen.force.set()
                for conn in stuck:
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)
                for conn in stuck:
                    if conn.thread is not None:
                        conn.thread.join(2.0)
                for conn in stuck:
                    conn.sock.close()
            gen.close()
            with self._lock:
                self._conns.difference_update(conns)

    def restart(self) -> None:
        """Listen again on the same port, with the same mode and name; requests are kept."""
        with self._state:
            self.kill()
            self.start()

    def close(self) -> None:
        self.kill()

    def __enter__(self) -> TestServer:
        with self._state:
            if self._run is None:
                self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- accepting -----------------------------------------------------------------------------

    def _accept_loop(self, run: _Run) -> None:
        selector = selectors.DefaultSelector()
        try:
            selector.register(run.listener, selectors.EVENT_READ)
            selector.register(run.gen.wake_r, selectors.EVENT_READ)
            while not run.gen.stop.is_set():
                for key, _ in selector.select(timeout=_CHECK_EVERY):
                    if key.fileobj is run.gen.wake_r or run.gen.stop.is_set():
                        return
                    self._accept_ready(run)
        except Exception as exc:  # pragma: no cover - a bug; keep it for the test to see
            self.errors.append(exc)
        finally:
            selector.close()
            run.listener.close()

    def _accept_ready(self, run: _Run) -> None:
        while not run.gen.stop.is_set():
            try:
                sock, peer = run.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNABORTED, EMFILE...: do not spin
                time.sleep(0.05)
                return
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(_READ_TIMEOUT)
            conn = _Conn(self, sock, tuple(peer), run.gen, next(self._numbers))
            thread = threading.Thread(
                target=conn.serve, name=f"TestServer-conn-{self.name}-{conn.number}"
            )
            thread.daemon = True
            conn.thread = thread
            with self._lock:
                self._conns.add(conn)
            thread.start()


# -- one connection --------------------------------------------------------------------------------


class _Conn:
    """One accepted connection: TLS handshake, reading requests, running the server's behaviour."""

    def __init__(
        self,
        server: TestServer,
        sock: socket.socket,
        peer: tuple[object, ...],
        gen: _Generation,
        n: int,
    ) -> None:
        self.server = server  # mode, behaviours, TLS context; where requests and errors go
        self.sock = sock
        self.fd = sock.fileno()  # the same after the TLS wrap
        self.selector: selectors.BaseSelector | None = None
        self.watching_wake = False
        self.peer = peer
        self.gen = gen
        self.number = n
        self.buf = b""  # received, not yet parsed: the start of the next request
        self.tls_server_name: str | None = None
        self.rst = False
        self.thread: threading.Thread | None = None

    def serve(self) -> None:
        """Serve requests until the connection ends; runs on the connection's own thread."""
        try:
            self.selector = selectors.DefaultSelector()
            self.selector.register(self.fd, selectors.EVENT_READ)
            self.selector.register(self.gen.wake_r, selectors.EVENT_READ)
            self.watching_wake = True
            if self.server.ssl_context is not None:
                self._handshake(self.server.ssl_context)
            while True:
                try:
                    request, keep_alive = self._read_request()
                except _BadRequest as exc:
                    self._send_error(exc.status)
                    return
                with self.server._lock:
                    self.server.requests.append(request)
                _, behaviour, arg = self.server._selected
                if not behaviour(Exchange(self.server, self, request, arg, keep_alive)):
                    return
        except (_Closed, OSError):  # EOF, stop, timeouts, resets, TLS failures (SSLError)
            pass
        except Exception as exc:  # a failing behaviour, or a bug: kept for the test to see
            self.server.errors.append(exc)
        finally:
            self._close_socket()
            if self.selector is not None:
                self.selector.close()
            with self.server._lock:
                self.server._conns.discard(self)

    def _handshake(self, context: ssl.SSLContext) -> None:
        tls = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock = tls
        deadline = time.monotonic() + _HANDSHAKE_TIMEOUT
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Closed
                self._wait_readable(idle=True, timeout=remaining)
                try:
                    tls.do_handshake()
                    break
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
        finally:
            self.tls_server_name = _take_sni(tls)

    def _close_socket(self) -> None:
        sock = self.sock
        if self.rst:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    # -- reading -------------------------------------------------------------------------------

    def _wait_readable(self, *, idle: bool, timeout: float | None = None) -> None:
        """Block until the socket is readable; an idle connection gives up when stopping."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return
        assert self.selector is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            gen = self.gen
            if gen.force.is_set() or (idle and gen.stop.is_set()):
                raise _Closed
            wait = _CHECK_EVERY
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise _Closed
            events = self.selector.select(timeout=wait)
            if any(key.fd == self.fd for key, _ in events):
                return
            if gen.stop.is_set() and not idle and self.watching_wake:
                # a request is half read: finish it; the wake socket stays readable from now on
                self.selector.unregister(gen.wake_r)
                self.watching_wake = False

    def _recv(self, *, idle: bool) -> bytes:
        """The next bytes from the client; an idle connection gives up when stopping."""
        while True:
            self._wait_readable(idle=idle)
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            if not data:
                raise _Closed
            return data

    def _read_request(self) -> tuple[RecordedRequest, bool]:
        """The next whole request, and whether the client allows another after it."""
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        data, self.buf = self.buf, b""
        started = False  # a byte of this request has arrived: no longer idle
        head: h11.Request | None = None
        body = bytearray()
        while True:
            if data:
                if not started:
                    data = data.lstrip(b"\r\n")  # RFC 9112 2.2: empty lines before a request
                    started = bool(data)
                if data:
                    parser.receive_data(data)
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                raise _BadRequest(exc.error_status_hint if head is None else 400) from None
            data = b""
            if event is h11.NEED_DATA:
                data = self._recv(idle=not started)
            elif isinstance(event, h11.Request):
                head = event
                length = dict(event.headers).get(b"content-length")
                if length is not None and int(length) > _MAX_BODY:
                    raise _BadRequest(413)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_BODY:
                    raise _BadRequest(413)
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                self.buf = parser.trailing_data[0]
                break
            else:  # pragma: no cover - h11 gives nothing else before the end of a request
                raise _BadRequest(400)

        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in head.headers}
        connection = _tokens(headers.get("connection", ""))
        if head.http_version == b"1.0":
            keep_alive = "keep-alive" in connection
        else:
            keep_alive = "close" not in connection
        request = RecordedRequest(
            method=head.method.decode("latin-1"),
            target=head.target.decode("latin-1"),
            headers=headers,
            body=bytes(body),
            peer=self.peer,
            tls_server_name=self.tls_server_name,
            connection=self.number,
        )
        return request, keep_alive

    def _send_error(self, status: int) -> None:
        body = f"{status} {_reason(status)}\n".encode()
        head = (
            f"HTTP/1.1 {status} {_reason(status)}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            _send(self, head.encode("latin-1") + body)


# -- HTTP/2 ----------------------------------------------------------------------------------------


def _h2_mode(mode: str) -> str:
    name, colon, code = mode.partition(":")
    if mode in ("ok", "hold"):
        return mode
    if name == "status" and colon and code.isascii() and code.isdigit() and 200 <= int(code) <= 599:
        return mode
    raise ValueError(f"unknown H2TestServer mode {mode!r}; the modes are ok, status:NNN, hold")


class _H2Run:
    """One start()..kill() run: the listener, its accept thread and every connection thread."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.gen = _Generation()
        self.thread: threading.Thread | None = None
        self.conns: list[_H2Conn] = []


class H2TestServer:
    """A real HTTP/2 server on loopback: over TLS when given an ``ssl_context`` whose ALPN
    offers ``h2`` (``TLSCerts.server_context(alpn=["h2"])``), else cleartext with prior
    knowledge. Needs the ``h2`` package (``pip install 'lbclient[http2]'``).

    Each connection is served on its own daemon thread. Every request is recorded in
    ``server.requests`` (with its ``connection`` number and HTTP/2 ``stream`` id, the pseudo
    headers among its ``headers``) before it is answered. Modes (``server.mode`` may be
    reassigned while the server runs):

    * ``"ok"``: 200 with ``TestServer``'s JSON document (``host`` is the ``:authority``).
    * ``"status:NNN"``: the same document with status ``NNN`` (200 to 599).
    * ``"hold"``: requests are recorded and left unanswered until the mode changes (then they
      are answered in the new mode) or the server stops.

    Responses are the small JSON document, sent within the client's initial flow-control
    window. ``kill()`` is "the backend dies": the listener closes and every connection is
    dropped at once, without GOAWAY, so streams in flight see their connection end; it returns
    once every socket is closed and every thread joined. ``close()`` is ``kill()``; both are
    idempotent, and ``start()`` listens again on the same port.
    """

    __test__ = False  # not a pytest class

    def __init__(
        self,
        mode: str = "ok",
        *,
        name: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._mode = _h2_mode(mode)
        self._name = name
        self.ssl_context = ssl_context
        if ssl_context is not None and ssl_context.sni_callback is None:
            ssl_context.sni_callback = record_sni
        self.host = host
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.errors: list[BaseException] = []  # exceptions raised in connection threads
        self._lock = threading.Lock()  # requests, the run's connections
        self._state = threading.RLock()  # start / kill
        self._run: _H2Run | None = None
        self._numbers = itertools.count(1)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = _h2_mode(value)
        with self._lock:
            conns = list(self._run.conns) if self._run is not None else []
        for conn in conns:  # held requests are answered in the new mode
            conn.wake()

    @property
    def name(self) -> str:
        return self._name if self._name is not None else _format_address(self.host, self.port)

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port``); raises before the first start() when port was 0."""
        if self.port == 0:
            raise RuntimeError("H2TestServer has no port yet: call start() first")
        return _format_address(self.host, self.port)

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.address}"

    @property
    def running(self) -> bool:
        return self._run is not None

    def count(self, method: str | None = None) -> int:
        """Requests received so far, optionally only those with ``method``."""
        with self._lock:
            return sum(1 for r in self.requests if method is None or r.method == method.upper())

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        where = _format_address(self.host, self.port)
        return f"<H2TestServer {self.name!r} {where} mode={self.mode!r} {state}>"

    def start(self) -> H2TestServer:
        """Bind (port 0: a free port, kept for the next start), listen and serve; returns self."""
        if find_spec("h2") is None:
            raise ImportError("H2TestServer needs the h2 package: pip install 'lbclient[http2]'")
        with self._state:
            if self._run is not None:
                raise RuntimeError(f"{self!r} is already running")
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((self.host, self.port))
                listener.listen(128)
                listener.setblocking(False)
            except BaseException:
                listener.close()
                raise
            self.port = listener.getsockname()[1]
            run = self._run = _H2Run(listener)
            run.thread = threading.Thread(
                target=self._accept_loop, args=(run,), name=f"TestServer-h2-accept-{self.name}"
            )
            run.thread.daemon = True
            run.thread.start()
            return self

    def kill(self) -> None:
        """Stop like a dying backend: every connection dropped at once. Idempotent."""
        with self._state:
            run, self._run = self._run, None
            if run is None:
                return
            run.gen.set_stop()
            if run.thread is not None:
                run.thread.join(_KILL_GRACE)
            run.listener.close()
            with self._lock:
                conns = list(run.conns)
            for conn in conns:
                conn.wake()
            for conn in conns:
                if conn.thread is not None:
                    conn.thread.join(_KILL_GRACE)
            run.gen.close()

    def close(self) -> None:
        self.kill()

    def __enter__(self) -> H2TestServer:
        with self._state:
            if self._run is None:
                self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept_loop(self, run: _H2Run) -> None:
        selector = selectors.DefaultSelector()
        try:
            selector.register(run.listener, selectors.EVENT_READ)
            selector.register(run.gen.wake_r, selectors.EVENT_READ)
            while not run.gen.stop.is_set():
                selector.select(timeout=_CHECK_EVERY)
                while not run.gen.stop.is_set():
                    try:
                        sock, peer = run.listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # ECONNABORTED, EMFILE...: do not spin
                        time.sleep(0.05)
                        break
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.settimeout(_READ_TIMEOUT)
                    conn = _H2Conn(self, sock, tuple(peer), run.gen, next(self._numbers))
                    conn.thread = threading.Thread(
                        target=conn.serve, name=f"TestServer-h2-conn-{self.name}-{conn.number}"
                    )
                    conn.thread.daemon = True
                    with self._lock:
                        run.conns.append(conn)
                    conn.thread.start()
        except Exception as exc:  # pragma: no cover - a bug; keep it for the test to see
            self.errors.append(exc)
        finally:
            selector.close()
            run.listener.close()


class _H2Conn:
    """One HTTP/2 connection: TLS handshake, the h2 state machine, held and answered streams."""

    def __init__(
        self,
        server: H2TestServer,
        sock: socket.socket,
        peer: tuple[object, ...],
        gen: _Generation,
        number: int,
    ) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()  # the same after the TLS wrap
        self.peer = peer
        self.gen = gen
        self.number = number
        self.wake_r, self.wake_w = socket.socketpair()  # the mode changed, or the run stops
        self.wake_lock = threading.Lock()  # a wake-up never meets the pair being closed
        self.tls_server_name: str | None = None
        self.thread: threading.Thread | None = None

    def wake(self) -> None:
        with self.wake_lock, contextlib.suppress(OSError):
            self.wake_w.send(b"x")

    def serve(self) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection
        from h2.events import (
            ConnectionTerminated,
            DataReceived,
            RequestReceived,
            StreamEnded,
            StreamReset,
        )

        selector = selectors.DefaultSelector()
        try:
            selector.register(self.fd, selectors.EVENT_READ)
            selector.register(self.wake_r, selectors.EVENT_READ)
            if self.server.ssl_context is not None:
                self._handshake(selector, self.server.ssl_context)
            h2 = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
            h2.initiate_connection()
            receiving: dict[int, tuple[dict[str, str], bytearray]] = {}
            held: list[RecordedRequest] = []
            while True:
                if held and self.server.mode != "hold":
                    for request in held:
                        self._respond(h2, request)
                    held.clear()
                self._send(h2.data_to_send())
                if not self._wait(selector):
                    continue
                try:
                    data = self.sock.recv(65536)
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                if not data:
                    return
                for event in h2.receive_data(data):
                    if isinstance(event, RequestReceived):
                        headers = {_text(k): _text(v) for k, v in event.headers}
                        receiving[event.stream_id] = (headers, bytearray())
                    elif isinstance(event, DataReceived):
                        receiving[event.stream_id][1].extend(event.data)
                        h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, StreamEnded):
                        held.append(self._record(event.stream_id, *receiving.pop(event.stream_id)))
                    elif isinstance(event, StreamReset):
                        receiving.pop(event.stream_id, None)
                        held = [r for r in held if r.stream != event.stream_id]
                    elif isinstance(event, ConnectionTerminated):
                        self._send(h2.data_to_send())
                        return
        except (_Closed, OSError):  # EOF, stop, timeouts, resets, TLS failures (SSLError)
            pass
        except Exception as exc:  # a protocol error, or a bug: kept for the test to see
            self.server.errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            selector.close()
            with self.wake_lock:
                self.wake_r.close()
                self.wake_w.close()

    def _wait(self, selector: selectors.BaseSelector) -> bool:
        """Block until the socket is readable (True) or a wake-up came (False); a stopping
        run drops the connection."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        events = selector.select(timeout=_CHECK_EVERY)
        if self.gen.stop.is_set():
            raise _Closed
        if any(key.fileobj is self.wake_r for key, _ in events):
            self.wake_r.recv(4096)
        return any(key.fd == self.fd for key, _ in events)

    def _handshake(self, selector: selectors.BaseSelector, context: ssl.SSLContext) -> None:
        tls = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock = tls
        deadline = time.monotonic() + _HANDSHAKE_TIMEOUT
        try:
            while True:
                if time.monotonic() > deadline:
                    raise _Closed
                try:
                    tls.do_handshake()
                    break
                except (TimeoutError, ssl.SSLWantReadError):
                    self._wait(selector)
        finally:
            self.tls_server_name = _take_sni(tls)
        if tls.selected_alpn_protocol() != "h2":
            raise _Closed  # the client did not agree to HTTP/2

    def _record(self, stream: int, headers: dict[str, str], body: bytearray) -> RecordedRequest:
        request = RecordedRequest(
            method=headers.get(":method", ""),
            target=headers.get(":path", ""),
            headers=headers,
            body=bytes(body),
            peer=self.peer,
            tls_server_name=self.tls_server_name,
            connection=self.number,
            stream=stream,
        )
        with self.server._lock:
            self.server.requests.append(request)
        return request

    def _respond(self, h2: H2Connection, request: RecordedRequest) -> None:
        server = self.server
        mode = server.mode
        status = int(mode.partition(":")[2]) if mode.startswith("status:") else 200
        body = _json_document(server.name, server.port, request)
        headers = [
            (":status", str(status)),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("x-test-server", server.name),
        ]
        head_only = request.method == "HEAD"
        assert request.stream is not None
        h2.send_headers(request.stream, headers, end_stream=head_only)
        if not head_only:
            size = h2.max_outbound_frame_size
            for start in range(0, len(body), size):
                last = start + size >= len(body)
                h2.send_data(request.stream, body[start : start + size], end_stream=last)

    def _send(self, data: bytes) -> None:
        if data:
            self.sock.settimeout(_SEND_TIMEOUT)
            try:
                self.sock.sendall(data)
            finally:
                self.sock.settimeout(_READ_TIMEOUT)


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


# -- other helpers -----------------------------------------------------------------------------

_closed_ports: set[int] = set()
_closed_ports_lock = threading.Lock()


def closed_port(host: str = "127.0.0.1") -> int:
    """A loopback port with nothing listening: connecting gets ECONNREFUSED.

    Bound to port 0 and closed again; ports already handed out are not repeated.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        with _closed_ports_lock:
            if port not in _closed_ports:
                _closed_ports.add(port)
                return port
    raise RuntimeError("no fresh closed port found")


class TLSCerts:
    """One throwaway CA and a server certificate valid only for ``names``."""

    def __init__(self, *names: str) -> None:
        if not names:
            raise ValueError("TLSCerts needs at least one name for the server certificate")
        try:
            import trustme
        except ImportError:
            raise ImportError("TLSCerts needs trustme: pip install 'lbclient[testing]'") from None
        self.names = names
        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert(*names)

    def server_context(self, alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
        """For ``TestServer(ssl_context=...)``, or with ``alpn=["h2"]`` for ``H2TestServer``;
        records the client's SNI."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(context)
        context.set_alpn_protocols(list(alpn))
        context.sni_callback = record_sni
        return context

    def client_context(self) -> ssl.SSLContext:
        """Trusts the CA; default hostname checking stays on."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def write_ca(self, path: str | Path) -> Path:
        """Write the CA certificate as PEM (for ``requests``' ``verify=path``); returns the path."""
        target = Path(path)
        self.ca.cert_pem.write_to_path(str(target))
        return target


def serve(*servers: TestServer | H2TestServer) -> contextlib.ExitStack:
    """Start ``servers``; closing the returned stack (``with serve(a, b):``) closes them all."""
    stack = contextlib.ExitStack()
    try:
        for server in servers:
            stack.enter_context(server)
    except BaseException:
        stack.close()
        raise
    return stack


def __getattr__(name: str) -> object:
    """``KubernetesAPI``, the test Kubernetes API server, lives in a module of its own that
    builds on :class:`TestServer`: loaded on first use (PEP 562)."""
    if name == "KubernetesAPI":
        from lbclient._testing_kube import KubernetesAPI

        return KubernetesAPI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
