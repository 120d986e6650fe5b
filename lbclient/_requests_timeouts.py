"""requests' timeouts: :class:`LBTimeout`, the ``timeout`` argument read, and urllib3 I/O that
ends when the attempt's limits say.

What lives here: :class:`LBTimeout` (requests' ``(connect, read)`` carrying lbclient's limits
for one request), :func:`timeouts` (requests' ``timeout`` argument as per-operation timeouts,
checked as requests checks it), and :func:`bound_pools`, which has an adapter's pool manager
make connections whose writes, TLS handshakes and reads (the response head's and the body's,
whoever reads it) end when the limits of the attempt that sent the request say
(:class:`~lbclient._wire.Limits`), however slowly a server sends or reads: a read past the end
raises the ``socket.timeout`` the socket would have raised, which urllib3 reports as it always
does (a ``ReadTimeoutError``). What may not: a retry, timeout or health rule (the plan's), or
sending anything.
"""

from __future__ import annotations

import http.client
import io
import socket
import time
from collections.abc import Mapping
from types import EllipsisType
from typing import Any

from urllib3 import PoolManager, connection, connectionpool
from urllib3.util.timeout import Timeout

from lbclient._wire import BOUND, Limits, within
from lbclient.retry import RequestOptions

__all__ = ["LBTimeout", "bound_pools", "timeouts", "total_of", "urllib3_timeout"]


class LBTimeout(tuple):  # type: ignore[type-arg]
    """requests' ``(connect, read)`` timeout, carrying lbclient's limits for one request:
    ``session.get(url, timeout=LBTimeout(1.0, deadline=0.5))``.

    It is a plain ``(connect, read)`` tuple to everything else, so an adapter that is not
    lbclient's applies the timeouts and ignores the rest.

    * ``connect``, ``read``: seconds, as requests' own ``timeout=(connect, read)``; ``read``
      defaults to ``connect`` (None, None: no timeout).
    * ``max_attempts``, ``attempt_timeout``, ``deadline``: as
      :class:`~lbclient.RequestOptions` (None: the adapter's own)."""

    options: RequestOptions

    def __new__(
        cls,
        connect: float | None = None,
        read: float | EllipsisType | None = ...,
        *,
        max_attempts: int | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
    ) -> LBTimeout:
        self = super().__new__(cls, (connect, connect if read is ... else read))
        self.options = RequestOptions(max_attempts, attempt_timeout, deadline)
        return self

    def __getnewargs_ex__(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        options = self.options
        return tuple(self), {
            "max_attempts": options.max_attempts,
            "attempt_timeout": options.attempt_timeout,
            "deadline": options.deadline,
        }


def timeouts(timeout: Any) -> dict[str, float | None]:
    """requests' ``timeout`` argument as per-operation timeouts, checked as plain requests
    checks it: urllib3's ``Timeout`` judges each value, and a tuple that is not a valid
    ``(connect, read)`` pair gets requests' own message (its tests look for it)."""
    if isinstance(timeout, Timeout):
        checked = timeout
    elif isinstance(timeout, tuple):
        try:
            connect, read = timeout
            checked = Timeout(connect=connect, read=read)
        except ValueError:
            raise ValueError(  # noqa: B904 (chained implicitly, as requests chains it)
                f"Invalid timeout {timeout}. Pass a (connect, read) timeout tuple, or a single "
                "float to set both timeouts to the same value."
            )
    else:
        checked = Timeout(connect=timeout, read=timeout)
    if checked.total is not None:  # its read timeout is what is left after connecting
        checked = checked.clone()
        checked.start_connect()
    return {"connect": _number(checked.connect_timeout), "read": _number(checked.read_timeout)}


def total_of(timeout: Any) -> float | None:
    """The ``total`` of a urllib3 ``Timeout`` given as requests' ``timeout`` (None: none)."""
    return _number(timeout.total) if isinstance(timeout, Timeout) else None


def urllib3_timeout(given: Mapping[str, float | None] | None, total: float | None) -> Any:
    """What an attempt passes to ``HTTPAdapter.send``: ``(connect, read)``, or a urllib3
    ``Timeout`` where the caller's had a ``total`` (urllib3 applies it across both)."""
    if total is not None:
        given = given or {}
        return Timeout(connect=given.get("connect"), read=given.get("read"), total=total)
    return (given.get("connect"), given.get("read")) if given else None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


# -- urllib3 I/O that ends when the attempt's limits say ---------------------------------------


class _Reader(io.RawIOBase):
    """A socket's reader for one response, each read ended by ``limits`` (as they are when it
    reads: the head's, then the body's) and given its read timeout."""

    def __init__(self, sock: socket.socket, limits: Limits) -> None:
        self._sock = sock
        self._file = sock.makefile("rb", buffering=0)  # counted among the socket's files
        self._limits = limits

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        limits = self._limits
        timeout = limits.read
        if limits.until is not None:
            timeout = within(limits.until, timeout, socket.timeout)
        sock = self._sock
        if sock.gettimeout() != timeout:
            sock.settimeout(timeout)
        return self._file.readinto(buffer)

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class _Opener:
    """What http.client's response is made with: its ``makefile`` gives a bounded reader."""

    def __init__(self, sock: socket.socket, limits: Limits) -> None:
        self._sock = sock
        self._limits = limits

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_Reader(self._sock, self._limits))


class _Response(http.client.HTTPResponse):
    """http.client's response, read through a bounded reader while an attempt has limits."""

    def __init__(
        self, sock: Any, debuglevel: int = 0, method: str | None = None, url: str | None = None
    ) -> None:
        limits = BOUND.get()
        opener = sock if limits is None else _Opener(sock, limits)
        super().__init__(opener, debuglevel, method, url)  # type: ignore[arg-type]


class HTTPConnection(connection.HTTPConnection):
    """urllib3's connection, its writes and TLS handshake ended by the attempt's limits (named
    as urllib3's: its errors name the class)."""

    response_class = _Response

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        limits = BOUND.get()
        if limits is not None and limits.until is not None:  # for the TLS handshake, if any
            left = max(limits.until - time.monotonic(), 0.0001)
            timeout = sock.gettimeout()
            sock.settimeout(left if timeout is None else min(left, timeout))
        return sock

    def send(self, data: Any) -> None:
        limits = BOUND.get()
        sock = self.sock
        if limits is None or limits.until is None or sock is None:
            super().send(data)
            return
        own = sock.gettimeout()
        sock.settimeout(within(limits.until, own, socket.timeout))
        try:
            super().send(data)
        finally:
            sock.settimeout(own)


class HTTPSConnection(HTTPConnection, connection.HTTPSConnection):
    """urllib3's TLS connection, bounded as :class:`HTTPConnection` is."""


class HTTPConnectionPool(connectionpool.HTTPConnectionPool):
    ConnectionCls = HTTPConnection


class HTTPSConnectionPool(connectionpool.HTTPSConnectionPool):
    ConnectionCls = HTTPSConnection


def bound_pools(manager: PoolManager) -> None:
    """Have ``manager`` make pools of bounded connections."""
    manager.pool_classes_by_scheme = {"http": HTTPConnectionPool, "https": HTTPSConnectionPool}
