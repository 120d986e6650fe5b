"""httpx transports: ``LBTransport`` (sync) and ``AsyncLBTransport`` (asyncio).

Each request is sent to a backend chosen by a :class:`LoadBalancer`: the URL's host and port
become the backend's, everything else (method, path, query, headers with the logical ``Host``,
body) is sent unchanged, and for https the certificate is checked against the logical host name.
Connections are pooled per backend, in one pool per logical TLS name, so a connection opened for
one name is never reused for another.

The transports talk to httpcore directly (as httpx's own transport does): the request for the
backend is made without parsing a URL, which keeps the per-request cost to a few microseconds.

What may not: a retry or health rule of its own; those live once, in the attempt loop
(:mod:`lbclient._attempt`), shared with the requests adapter.
"""

from __future__ import annotations

import importlib.util
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator
from typing import Any, Final, Generic, TypeVar

import httpcore
import httpx

from lbclient._attempt import (
    Adapter,
    RequestPlan,
    budget_of,
    policy_from,
    run_async,
    run_sync,
)
from lbclient.backend import Backend
from lbclient.balancer import LoadBalancer
from lbclient.errors import NoBackendAvailable
from lbclient.retry import Failure, RetryPolicy
from lbclient.selection.base import AlgorithmLike

__all__ = ["AsyncLBTransport", "KeyFunction", "LBTransport", "NoBackendAvailableError"]

#: Derives the selection key from a request: bytes or str, or None for the empty key.
KeyFunction = Callable[[httpx.Request], "bytes | str | None"]

_P = TypeVar("_P", httpcore.ConnectionPool, httpcore.AsyncConnectionPool)

DEFAULT_LIMITS: Final = httpx.Limits(max_connections=100, max_keepalive_connections=20)

# httpcore's exceptions, and how far a request got when each was raised.
_FAILURE_OF: Final[dict[type[Exception], Failure]] = {
    httpcore.ConnectError: Failure.NEVER_SENT,
    httpcore.ConnectTimeout: Failure.NEVER_SENT,
    httpcore.PoolTimeout: Failure.LOCAL,
    httpcore.LocalProtocolError: Failure.LOCAL,
    httpcore.UnsupportedProtocol: Failure.LOCAL,
}
_HTTPCORE_ERRORS: Final = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.ProxyError,
    httpcore.UnsupportedProtocol,
)


class NoBackendAvailableError(NoBackendAvailable, httpx.ConnectError):
    """What the transports raise when no backend could be chosen: a
    :class:`~lbclient.NoBackendAvailable` that is also an ``httpx.ConnectError``."""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        httpx.ConnectError.__init__(self, message, request=request)


def _unavailable(message: str, request: Any) -> NoBackendAvailable:
    return NoBackendAvailableError(message, request=request)


def _httpx_error(exc: Exception) -> httpx.TransportError:
    """The httpx exception for an httpcore one (same class name, as httpx itself maps them)."""
    for cls in type(exc).__mro__:
        mapped = getattr(httpx, cls.__name__, None)
        if isinstance(mapped, type) and issubclass(mapped, httpx.TransportError):
            return mapped(str(exc))
    return httpx.TransportError(str(exc))


def _failure_of(exc: Exception) -> Failure:
    for cls in type(exc).__mro__:
        failure = _FAILURE_OF.get(cls)
        if failure is not None:
            return failure
    return Failure.MAYBE_SENT


class _Common(Adapter):
    """Everything the sync and async transports share: no I/O here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hosts: dict[Backend, bytes] = {}

    def plan(self, request: httpx.Request) -> tuple[RequestPlan, Backend]:
        timeouts = request.extensions.get("timeout")
        budget = None
        if isinstance(timeouts, dict):
            budget = budget_of(
                [timeouts.get("connect"), timeouts.get("read"), timeouts.get("write")],
                timeouts.get("pool"),
            )
        return self.start(
            request,
            request.method,
            str(request.url),
            isinstance(request.stream, httpx.ByteStream),
            budget,
        )

    def backend_request(
        self, request: httpx.Request, backend: Backend, plan: RequestPlan
    ) -> httpcore.Request:
        host = self._hosts.get(backend)
        if host is None:
            host = self._hosts[backend] = backend.host.strip("[]").encode("ascii")
        extensions = request.extensions
        url = request.url
        if url.scheme == "https":
            extensions = {**extensions, "sni_hostname": url.host}
        if plan.attempts and plan.budget is not None:
            timeouts = extensions.get("timeout", {})
            extensions = {**extensions, "timeout": {k: plan.clip(v) for k, v in timeouts.items()}}
        headers = request.headers.raw
        if "host" not in request.headers:
            headers = [(b"Host", url.netloc), *headers]
        return httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=url.raw_scheme, host=host, port=backend.port, target=url.raw_path
            ),
            headers=headers,
            content=request.stream,
            extensions=extensions,
        )

    def failed(self, plan: RequestPlan, backend: Backend, exc: Exception) -> httpx.TransportError:
        error = _httpx_error(exc)
        plan.failed(
            backend, _failure_of(exc), error, timed_out=isinstance(exc, httpcore.TimeoutException)
        )
        return error

    def buffers(self, plan: RequestPlan, response: httpcore.Response) -> bool:
        """Whether to read this response's body inside the attempt: only for requests that
        would be retried after a maybe-sent failure, and bodies of known, small size."""
        if plan.method == "HEAD" or not plan.retries_maybe_sent():
            return False
        for name, value in response.headers:
            if name.lower() == b"content-length":
                return value.isdigit() and int(value) <= self.policy.buffer_limit
        return False

    def response(
        self,
        request: httpx.Request,
        plan: RequestPlan,
        backend: Backend,
        response: httpcore.Response,
        stream: httpx.SyncByteStream | httpx.AsyncByteStream | None,
    ) -> httpx.Response:
        """Record the response on the plan and wrap it for the caller.

        ``stream`` is the body to hand on (wrapped so its end reports health), or None when the
        body was already read into ``response.content``.
        """
        status = response.status
        plan.responded(backend, status)
        failing = status in self.policy.failure_statuses
        if stream is None:
            if not failing:
                self.balancer.report(backend, True)
            body: httpx.SyncByteStream | httpx.AsyncByteStream = httpx.ByteStream(response.content)
        else:
            body = stream
        result = httpx.Response(
            status, headers=response.headers, stream=body, extensions=response.extensions
        )
        result.request = request
        return result

    def reporter(self, backend: Backend, status: int) -> _Report:
        return _Report(self.balancer, backend, status in self.policy.failure_statuses)

    def stale(self, pools: dict[tuple[str | None, Backend], _P]) -> list[_P]:
        """Remove and return the idle pools of backends no longer in the balancer's set."""
        current = set(self.balancer.backends)
        gone = [
            key
            for key, pool in pools.items()
            if key[1] not in current and all(c.is_idle() for c in pool.connections)
        ]
        return [pools.pop(key) for key in gone]

    def pool_key(self, url: httpx.URL, backend: Backend) -> tuple[str | None, Backend]:
        """One pool per (logical TLS name, backend): a TLS connection is never shared between
        two names, and a backend that is slow or black-holed holds only its own connections."""
        return (url.host if url.scheme == "https" else None, backend)


def _pool_options(
    verify: ssl.SSLContext | str | bool,
    cert: Any,
    trust_env: bool,
    http1: bool,
    http2: bool,
    limits: httpx.Limits,
    local_address: str | None,
    socket_options: Iterable[Any] | None,
) -> dict[str, Any]:
    if not isinstance(limits, httpx.Limits):
        raise TypeError(f"limits must be an httpx.Limits, got {limits!r}")
    if http2 and importlib.util.find_spec("h2") is None:
        raise ImportError("http2=True needs the h2 package: pip install 'lbclient[http2]'")
    return {
        "ssl_context": httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env),
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
        "http1": http1,
        "http2": http2,
        "local_address": local_address,
        "socket_options": socket_options,
        "retries": 0,
    }


class _Report:
    """Reports one attempt's success once its body was read or closed (failures go first)."""

    __slots__ = ("_backend", "_balancer", "_done")

    def __init__(self, balancer: LoadBalancer, backend: Backend, done: bool) -> None:
        self._balancer = balancer
        self._backend = backend
        self._done = done

    def __call__(self, ok: bool) -> None:
        if not self._done:
            self._done = True
            self._balancer.report(self._backend, ok)


class _SyncStream(httpx.SyncByteStream):
    """The body as the caller reads it: a failure while reading is the backend's; reading it
    to the end, or closing it unread, is a success; a read cut short by the caller is neither."""

    def __init__(self, inner: Iterable[bytes], report: _Report) -> None:
        self._inner = inner
        self._report = report
        self._started = False

    def __iter__(self) -> Iterator[bytes]:
        self._started = True
        try:
            yield from self._inner
        except _HTTPCORE_ERRORS as exc:
            self._report(False)
            raise _httpx_error(exc) from exc
        self._report(True)

    def close(self) -> None:
        if not self._started:
            self._report(True)
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


class _AsyncStream(httpx.AsyncByteStream):
    def __init__(self, inner: Any, report: _Report) -> None:
        self._inner = inner
        self._report = report
        self._started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self._started = True
        try:
            async for chunk in self._inner:
                yield chunk
        except _HTTPCORE_ERRORS as exc:
            self._report(False)
            raise _httpx_error(exc) from exc
        self._report(True)

    async def aclose(self) -> None:
        if not self._started:
            self._report(True)
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()


class _Configured(Generic[_P]):
    """The constructor and properties both transports share."""

    def __init__(
        self,
        balancer: LoadBalancer | Iterable[Backend | str],
        *,
        key: KeyFunction | None = None,
        algorithm: AlgorithmLike | None = None,
        max_attempts: int = 3,
        retry_maybe_sent: bool = True,
        retry_statuses: Collection[int] = (),
        failure_statuses: Collection[int] = range(500, 600),
        policy: RetryPolicy | None = None,
        verify: ssl.SSLContext | str | bool = True,
        cert: Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = DEFAULT_LIMITS,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> None:
        self._common = _Common(
            balancer,
            key=key,
            algorithm=algorithm,
            policy=policy_from(
                policy, max_attempts, retry_maybe_sent, retry_statuses, failure_statuses
            ),
            unavailable=_unavailable,
        )
        self._options = _pool_options(
            verify, cert, trust_env, http1, http2, limits, local_address, socket_options
        )
        self._pools: dict[tuple[str | None, Backend], _P] = {}
        self._lock = threading.Lock()
        self._closed = False

    @property
    def balancer(self) -> LoadBalancer:
        """The load balancer choosing the backends."""
        return self._common.balancer

    @property
    def policy(self) -> RetryPolicy:
        """The retry policy."""
        return self._common.policy


class LBTransport(_Configured[httpcore.ConnectionPool], httpx.BaseTransport):
    """An httpx transport that load-balances every request over a set of backends:
    ``httpx.Client(transport=LBTransport(...))``, or mounted for one service only.

    * ``balancer``: a :class:`~lbclient.LoadBalancer`, or backends (``"host:port"`` or
      :class:`~lbclient.Backend`) to build one with ``algorithm``.
    * ``key``: ``key(request)`` returns the selection key, bytes or str, or None for the empty
      key (None: every request has the empty key).
    * ``algorithm``: the selection algorithm when backends are given (None: ``RoundRobin``).
    * ``max_attempts``: attempts per request, the first included (3).
    * ``retry_maybe_sent``: retry failures that may have reached the server, for idempotent
      requests with replayable bodies (True).
    * ``retry_statuses``: response statuses retried for idempotent requests (none).
    * ``failure_statuses``: response statuses that count as server errors for passive health
      (500..599).
    * ``policy``: a :class:`~lbclient.RetryPolicy` giving the four retry options above and more
      at once (None: built from them).
    * ``verify``, ``cert``, ``trust_env``: TLS verification, client certificate and whether to
      read ``SSL_CERT_FILE``-style settings, as for ``httpx.HTTPTransport`` (True, None, True).
    * ``http1``, ``http2``: the HTTP versions offered (True, False; HTTP/2 needs
      ``lbclient[http2]``).
    * ``limits``: an ``httpx.Limits`` applied to each backend's pool (100 connections, 20 kept
      alive).
    * ``local_address``, ``socket_options``: as for ``httpx.HTTPTransport`` (None, None).
    """

    def _pool(self, url: httpx.URL, backend: Backend) -> httpcore.ConnectionPool:
        name = self._common.pool_key(url, backend)
        pool = self._pools.get(name)
        if pool is None:
            stale: list[httpcore.ConnectionPool] = []
            with self._lock:
                if self._closed:
                    raise RuntimeError("LBTransport is closed")
                pool = self._pools.get(name)
                if pool is None:
                    stale = self._common.stale(self._pools)
                    pool = self._pools[name] = httpcore.ConnectionPool(**self._options)
            for old in stale:
                old.close()
        return pool

    def __enter__(self) -> LBTransport:
        self._common.start_checks()
        return self

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("LBTransport is closed")
        common = self._common
        if common.checks_pending:
            common.start_checks()
        plan, first = common.plan(request)

        def attempt(backend: Backend) -> httpx.Response:
            pool = self._pool(request.url, backend)
            try:
                response = pool.handle_request(common.backend_request(request, backend, plan))
                if common.buffers(plan, response):
                    try:
                        response.read()
                    finally:
                        response.close()
                    return common.response(request, plan, backend, response, None)
            except _HTTPCORE_ERRORS as exc:
                raise common.failed(plan, backend, exc) from exc
            assert isinstance(response.stream, Iterable)
            stream = _SyncStream(response.stream, common.reporter(backend, response.status))
            return common.response(request, plan, backend, response, stream)

        try:
            return run_sync(plan, first, attempt, httpx.Response.close)
        except httpx.TransportError as exc:
            raise common.final_error(exc, plan, request) from exc

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools = list(self._pools.values())
            self._pools.clear()
        self._common.stop_checks()
        for pool in pools:
            pool.close()


class AsyncLBTransport(_Configured[httpcore.AsyncConnectionPool], httpx.AsyncBaseTransport):
    """The async twin of :class:`LBTransport` for ``httpx.AsyncClient`` (asyncio or trio),
    with the same arguments."""

    async def _pool(self, url: httpx.URL, backend: Backend) -> httpcore.AsyncConnectionPool:
        # No await between the lookup and the insert: safe among tasks of one event loop.
        name = self._common.pool_key(url, backend)
        pool = self._pools.get(name)
        if pool is None:
            if self._closed:
                raise RuntimeError("AsyncLBTransport is closed")
            stale = self._common.stale(self._pools)
            pool = self._pools[name] = httpcore.AsyncConnectionPool(**self._options)
            for old in stale:
                await old.aclose()
        return pool

    async def __aenter__(self) -> AsyncLBTransport:
        await self._common.astart_checks()
        return self

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("AsyncLBTransport is closed")
        common = self._common
        if common.checks_pending:
            await common.astart_checks()
        plan, first = common.plan(request)

        async def attempt(backend: Backend) -> httpx.Response:
            pool = await self._pool(request.url, backend)
            try:
                response = await pool.handle_async_request(
                    common.backend_request(request, backend, plan)
                )
                if common.buffers(plan, response):
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
                    return common.response(request, plan, backend, response, None)
            except _HTTPCORE_ERRORS as exc:
                raise common.failed(plan, backend, exc) from exc
            stream = _AsyncStream(response.stream, common.reporter(backend, response.status))
            return common.response(request, plan, backend, response, stream)

        try:
            return await run_async(plan, first, attempt, httpx.Response.aclose)
        except httpx.TransportError as exc:
            raise common.final_error(exc, plan, request) from exc

    async def aclose(self) -> None:
        self._closed = True
        pools = list(self._pools.values())
        self._pools.clear()
        await self._common.astop_checks()
        for pool in pools:
            await pool.aclose()
