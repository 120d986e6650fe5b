"""Active health checks: TCP (optionally TLS) and HTTP, run on the balancer's runner.

A check object says how to check one backend (:meth:`HealthCheck.check` with sockets,
:meth:`HealthCheck.acheck` with asyncio streams), how often (``interval``) and how many results
in a row flip its verdict (``consecutive_successes`` / ``consecutive_failures``). Give one to
:class:`~lbclient.LoadBalancer` as ``health_check``; the services layer binds it
(:meth:`HealthCheck.bind`) and runs it on every backend, in parallel, once the balancer is
started (``with balancer:``, ``async with balancer:``, or a transport using the balancer), and
stops it on close.

What lives here: the checks, and the job that runs one over a balancer's backends (its async
path, on the runner's event loop) and reports each verdict, with the check's thresholds,
through the balancer's public :meth:`~lbclient.LoadBalancer.report_check`. What may not: the
balancer's internals (the balancer imports nothing from here), threads or tasks of its own
(the runner's, :mod:`lbclient._background`), starting or stopping (the services layer's,
:mod:`lbclient._services`, imported here so that a balancer given a check always finds it).
Only the standard library is used: the request is written and the status line read by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Final

import anyio

import lbclient._services  # noqa: F401  (installs the services layer: see the module's text)
from lbclient._background import Every
from lbclient.backend import Backend
from lbclient.errors import CheckFailed

if TYPE_CHECKING:
    from lbclient.balancer import LoadBalancer

__all__ = ["CheckFailed", "HealthCheck", "HttpCheck", "TcpCheck"]

#: The most bytes read of a check response's head (status line and headers).
MAX_HEAD: Final = 64 * 1024
#: The most bytes of a check response's body read (to see it arrive whole); the rest is left.
MAX_BODY: Final = 64 * 1024
#: How many backends one round of checks checks at once.
PARALLEL: Final = 32

Validator = Callable[[int, Mapping[str, str]], bool]


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class HealthCheck:
    """What every active check has: timing, thresholds and the TLS settings of its connection.

    * ``interval``: seconds between the end of one round of checks and the next (5.0).
    * ``timeout``: seconds one check may take, connecting included (1.0).
    * ``consecutive_successes``: passes in a row that mark a failing backend up again (1).
    * ``consecutive_failures``: failures in a row that mark a backend down (1).
    * ``tls``: complete a TLS handshake, verifying the certificate (False).
    * ``server_name``: the name the certificate is checked for (None: the backend's host).
    * ``ssl_context``: the context of that handshake (None: the system's trust store).
    """

    def __init__(
        self,
        *,
        interval: float = 5.0,
        timeout: float = 1.0,
        consecutive_successes: int = 1,
        consecutive_failures: int = 1,
        tls: bool = False,
        server_name: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.interval = _positive("interval", interval)
        self.timeout = _positive("timeout", timeout)
        self.consecutive_successes = _count("consecutive_successes", consecutive_successes)
        self.consecutive_failures = _count("consecutive_failures", consecutive_failures)
        if not isinstance(tls, bool):
            raise TypeError(f"tls must be a bool, got {tls!r}")
        if server_name is not None and (not isinstance(server_name, str) or not server_name):
            raise TypeError(f"server_name must be a non-empty str or None, got {server_name!r}")
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError(f"ssl_context must be an ssl.SSLContext or None, got {ssl_context!r}")
        if ssl_context is not None and not tls:
            raise ValueError("ssl_context is given but tls=False; pass tls=True")
        self.tls = tls
        self.server_name = server_name
        self._context = ssl_context

    def _tls(self, backend: Backend) -> tuple[ssl.SSLContext | None, str | None]:
        if not self.tls:
            return None, None
        if self._context is None:
            self._context = ssl.create_default_context()
        return self._context, self.server_name or backend.host.strip("[]")

    def _connect(self, backend: Backend, deadline: float) -> socket.socket:
        sock = _dial(backend.host.strip("[]"), backend.port, deadline)
        try:
            context, name = self._tls(backend)
            if context is not None:
                sock.settimeout(_left(deadline))
                sock = context.wrap_socket(sock, server_hostname=name)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _aconnect(
        self, backend: Backend
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        context, name = self._tls(backend)
        return await asyncio.open_connection(
            backend.host.strip("[]"),
            backend.port,
            ssl=context,
            server_hostname=name,
            limit=MAX_HEAD,
        )

    def check(self, backend: Backend) -> None:
        """Check ``backend`` with blocking sockets; raise if it fails."""
        raise NotImplementedError

    def bind(self, balancer: LoadBalancer) -> CheckJob:
        """The job that runs this check on every backend of ``balancer`` and reports each
        verdict to :meth:`~lbclient.LoadBalancer.report_check`. The services layer calls this
        once per balancer and runs the job while the balancer has users."""
        return CheckJob(self, balancer)

    async def acheck(self, backend: Backend) -> None:
        """Check ``backend`` on the running event loop; raise if it fails (by default:
        :meth:`check` on a worker thread, so a check of your own may define only that)."""
        await asyncio.to_thread(self.check, backend)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(interval={self.interval:g}, timeout={self.timeout:g}, "
            f"tls={self.tls})"
        )


class TcpCheck(HealthCheck):
    """Passes when a TCP connection (and, with ``tls=True``, a TLS handshake) succeeds within
    ``timeout``. The connection is closed at once."""

    def check(self, backend: Backend) -> None:
        self._connect(backend, time.monotonic() + self.timeout).close()

    async def acheck(self, backend: Backend) -> None:
        async def run() -> None:
            _reader, writer = await self._aconnect(backend)
            await _close(writer)

        with anyio.fail_after(self.timeout):  # in this task: a cancelled check stops at once
            await run()


class HttpCheck(HealthCheck):
    """Passes when ``method path`` gets a response with an expected status within ``timeout``.

    Each check uses a new connection, closed after the response, so a check sees what a new
    connection would.

    * ``path``: the request target, starting with ``/`` (``"/"``).
    * ``host``: the ``Host`` header and, with ``tls=True``, the name the certificate is
      checked for, so a logical service name works as it does for requests (None: the
      backend's address).
    * ``method``: the request method (``"GET"``).
    * ``expect``: the passing status or statuses (200).
    * ``validator``: ``validator(status, headers)`` returns whether the check passed, instead
      of ``expect`` (None).
    * ``headers``: extra request headers (None).
    * ``interval``, ``timeout``, ``consecutive_successes``, ``consecutive_failures``, ``tls``,
      ``ssl_context``: as for :class:`HealthCheck`.
    """

    def __init__(
        self,
        path: str = "/",
        *,
        host: str | None = None,
        method: str = "GET",
        expect: int | Collection[int] = 200,
        validator: Validator | None = None,
        headers: Mapping[str, str] | None = None,
        interval: float = 5.0,
        timeout: float = 1.0,
        consecutive_successes: int = 1,
        consecutive_failures: int = 1,
        tls: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if host is not None and (not isinstance(host, str) or not host or _unsafe(host)):
            raise ValueError(f"host must be a non-empty header value or None, got {host!r}")
        super().__init__(
            interval=interval,
            timeout=timeout,
            consecutive_successes=consecutive_successes,
            consecutive_failures=consecutive_failures,
            tls=tls,
            server_name=None if host is None else _name_of(host),
            ssl_context=ssl_context,
        )
        if not isinstance(path, str) or not path.startswith("/") or _unsafe(path) or " " in path:
            raise ValueError(f"path must start with '/' and hold no spaces, got {path!r}")
        if not isinstance(method, str) or not method.isalpha():
            raise ValueError(f"method must be an HTTP method name, got {method!r}")
        statuses = (expect,) if isinstance(expect, int) else tuple(expect)
        if not statuses or any(
            isinstance(s, bool) or not isinstance(s, int) or not 100 <= s <= 599 for s in statuses
        ):
            raise ValueError(f"expect must be HTTP statuses (100..599), got {expect!r}")
        if validator is not None and not callable(validator):
            raise TypeError(
                f"validator must be callable as validator(status, headers), got {validator!r}"
            )
        extra = dict(headers or {})
        for name, value in extra.items():
            if not isinstance(name, str) or not isinstance(value, str) or _unsafe(name + value):
                raise ValueError(f"bad header {name!r}: {value!r}")
        self.path = path
        self.host = host
        self.method = method.upper()
        self.expect = frozenset(statuses)
        self.validator = validator
        self.headers = extra

    def request(self, backend: Backend) -> bytes:
        """The bytes of the check request for ``backend``."""
        lines = [
            f"{self.method} {self.path} HTTP/1.1",
            f"Host: {self.host or backend.address}",
            "User-Agent: lbclient-health-check",
            "Connection: close",
        ]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def verdict(self, head: bytes) -> int | None:
        """Judge a response head (status line and headers); raise CheckFailed if it fails.

        Returns how many body bytes to read to see the body arrive whole (at most
        :data:`MAX_BODY`), or None to read until the server closes the connection.
        """
        status, headers = parse_head(head)
        if self.validator is not None:
            try:
                passed = self.validator(status, headers)
            except Exception as exc:
                raise CheckFailed(f"validator raised {type(exc).__name__}: {exc}") from exc
            if not passed:
                raise CheckFailed(f"validator rejected the response (HTTP {status})")
        elif status not in self.expect:
            raise CheckFailed(f"HTTP {status}, expected {sorted(self.expect)}")
        if self.method == "HEAD" or status < 200 or status in (204, 304):
            return 0
        length = headers.get("content-length", "")
        if length.isascii() and length.isdigit() and "transfer-encoding" not in headers:
            return min(int(length), MAX_BODY)
        return None

    def check(self, backend: Backend) -> None:
        deadline = time.monotonic() + self.timeout
        with self._connect(backend, deadline) as sock:
            sock.settimeout(_left(deadline))
            sock.sendall(self.request(backend))
            data = b""
            while b"\r\n\r\n" not in data:
                if len(data) > MAX_HEAD:
                    raise CheckFailed(f"response head longer than {MAX_HEAD} bytes")
                sock.settimeout(_left(deadline))
                chunk = sock.recv(16384)
                if not chunk:
                    raise CheckFailed("connection closed before a response")
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            want = self.verdict(head)
            got = len(body)
            while want is None or got < want:
                sock.settimeout(_left(deadline))
                chunk = sock.recv(16384)
                got += len(chunk)
                if not chunk or got >= MAX_BODY:
                    break
            _whole(want, got)

    async def acheck(self, backend: Backend) -> None:
        async def run() -> None:
            reader, writer = await self._aconnect(backend)
            try:
                writer.write(self.request(backend))
                await writer.drain()
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    raise CheckFailed("connection closed before a response") from exc
                except asyncio.LimitOverrunError as exc:
                    raise CheckFailed(f"response head longer than {MAX_HEAD} bytes") from exc
                want = self.verdict(head)
                got = 0
                while want is None or got < want:
                    chunk = await reader.read(16384)
                    got += len(chunk)
                    if not chunk or got >= MAX_BODY:
                        break
                _whole(want, got)
            finally:
                await _close(writer)

        with anyio.fail_after(self.timeout):  # in this task: a cancelled check stops at once
            await run()

    def __repr__(self) -> str:
        return (
            f"HttpCheck({self.method} {self.path!r}, host={self.host!r}, "
            f"expect={sorted(self.expect)}, interval={self.interval:g}, "
            f"timeout={self.timeout:g}, tls={self.tls})"
        )


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """The status and headers (names lower-cased) of an HTTP/1.x response head."""
    text = head.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    status_line, *lines = text.split("\r\n")
    parts = status_line.split(" ", 2)
    if (
        len(parts) < 2
        or not parts[0].startswith("HTTP/1.")
        or not (parts[1].isascii() and parts[1].isdigit())
    ):
        raise CheckFailed(f"not an HTTP/1 response: {status_line[:80]!r}")
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def _whole(want: int | None, got: int) -> None:
    if want is not None and got < want:
        raise CheckFailed(f"connection closed after {got} of {want} body bytes")


def _unsafe(text: str) -> bool:
    """Whether ``text`` cannot go into a request head as it is."""
    return any(c in text for c in "\r\n\0") or not text.isascii()


def _name_of(host: str) -> str:
    """The TLS name in a Host value: without the port, IPv6 brackets removed."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _dial(host: str, port: int, deadline: float) -> socket.socket:
    """A TCP connection to ``host``, trying its addresses in turn, all within ``deadline``
    (unlike ``socket.create_connection``, which gives each address the whole timeout)."""
    error: OSError | None = None
    for family, kind, proto, _name, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(address)
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error if error is not None else OSError(f"no address for {host!r}")


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("health check timed out")
    return left


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


def describe(error: BaseException) -> str:
    """A short text for a failed check."""
    if isinstance(error, (TimeoutError, asyncio.TimeoutError, socket.timeout)):
        return "timed out"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# -- running checks ----------------------------------------------------------------------------


class CheckJob:
    """Checks every backend of a balancer each ``interval``, up to :data:`PARALLEL` at once,
    and reports each verdict to it as it comes."""

    name = "lbclient-health"

    def __init__(self, check: HealthCheck, balancer: LoadBalancer) -> None:
        self.check = check
        self.balancer = balancer

    def jobs(self) -> tuple[Every]:
        check = self.check
        return (Every(self.name, self.round, lambda: check.interval, check.timeout),)

    async def prepare(self) -> None:
        """Nothing to do before the first start returns."""

    async def round(self) -> None:
        """One check of every backend. A verdict is reported as soon as it is known: once the
        runner stops, the checks still out are cancelled and report nothing."""
        limit = asyncio.Semaphore(PARALLEL)
        await asyncio.gather(*(self._one(backend, limit) for backend in self.balancer.backends))

    async def _one(self, backend: Backend, limit: asyncio.Semaphore) -> None:
        async with limit:
            try:
                await self.check.acheck(backend)
            except Exception as exc:
                ok, detail = False, describe(exc)
            else:
                ok, detail = True, ""
        check = self.check
        self.balancer.report_check(
            backend,
            ok,
            detail,
            successes=check.consecutive_successes,
            failures=check.consecutive_failures,
        )
