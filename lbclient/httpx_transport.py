"""httpx transports: ``LBTransport`` (sync) and ``AsyncLBTransport`` (asyncio or trio).

Each request for a host the transport serves is sent to a backend chosen by a
:class:`~lbclient.LoadBalancer`: the URL's host and port become the backend's, everything else
(method, path, query, headers with the logical ``Host``, body) is sent unchanged, and for https
the certificate is checked against the logical host name. A request for any other host (a
redirect to a login page, say) goes through an ordinary httpx transport with the same TLS
settings, never to the backends. Connections are pooled per backend, in one pool per logical
TLS name, so a connection opened for one name is never reused for another. The async
transport admits at most ``max_keepalive_connections`` attempts to a backend at once, each over
a connection of its own, and queues the rest (see :class:`_AsyncPools`).

The transports talk to httpcore directly (as httpx's own transport does): the request for the
backend is made without parsing a URL, which keeps the per-request cost to a few microseconds.

What lives here: translating httpx requests, responses and exceptions for the attempt loop.
What may not: a retry, timeout or health rule of its own; those live once, in
:mod:`lbclient._attempt`, shared with the requests adapter.
"""

from __future__ import annotations

import functools
import importlib.util
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator
from typing import Any, Final, Generic, TypeVar

import httpcore
import httpx

from lbclient._attempt import (
    DEFAULT,
    BodyReport,
    Client,
    Default,
    Fault,
    RequestPlan,
    name_backend,
    policy_from,
)
from lbclient._attempt import run_async as _run_async
from lbclient._attempt import run_sync as _run_sync
from lbclient._gate import AsyncGate
from lbclient.backend import Backend
from lbclient.balancer import LoadBalancer
from lbclient.errors import NoBackendAvailable
from lbclient.retry import Failure, RequestOptions, RetryBudget, RetryPolicy, RetryStats
from lbclient.selection.base import AlgorithmLike

__all__ = ["AsyncLBTransport", "KeyFunction", "LBTransport", "NoBackendAvailableError"]

#: Derives the selection key from a request: bytes or str, or None for the empty key.
KeyFunction = Callable[[httpx.Request], "bytes | str | None"]

_P = TypeVar("_P", httpcore.ConnectionPool, "_AsyncPools")
_T = TypeVar("_T", httpx.HTTPTransport, httpx.AsyncHTTPTransport)

DEFAULT_LIMITS: Final = httpx.Limits(max_connections=100, max_keepalive_connections=20)

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


def _tls_failure(error: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _fault(error: Exception) -> Fault | None:
    """How far a request got when the transport raised ``error`` (an httpx error)."""
    if not isinstance(error, httpx.TransportError):
        return None
    if isinstance(error, (httpx.ConnectTimeout, httpx.PoolTimeout)):
        # A full pool is this backend's own: nothing was sent, another backend may do.
        return Fault(Failure.NEVER_SENT, timed_out=True, barred=True)
    if isinstance(error, httpx.ConnectError):
        return Fault(Failure.NEVER_SENT, barred=_tls_failure(error))
    if isinstance(error, httpx.TimeoutException):
        return Fault(Failure.MAYBE_SENT, timed_out=True, barred=True)
    if isinstance(error, (httpx.LocalProtocolError, httpx.UnsupportedProtocol)):
        return Fault(Failure.LOCAL)
    return Fault(Failure.MAYBE_SENT)


def _refuse_hedging(policy: RetryPolicy) -> None:
    if policy.hedge_after is not None:
        raise ValueError(
            f"hedge_after={policy.hedge_after:g}: only AsyncLBTransport hedges requests; the "
            "sync transport would need a thread per hedge"
        )


def _has_host(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, _ in headers:  # noqa: SIM110 (a plain loop: no generator made per request)
        if name.lower() == b"host":
            return True
    return False


def _content_length(response: httpcore.Response) -> int | None:
    for name, value in response.headers:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class _Common:
    """Everything the sync and async transports share: no I/O here."""

    def __init__(self, client: Client[httpx.Response], hedges: bool) -> None:
        self.client = client
        #: Whether this transport can hedge (the async one).
        self.hedges = hedges
        if not hedges:
            _refuse_hedging(client.policy)

    def plan(self, request: httpx.Request) -> tuple[RequestPlan, Backend]:
        client = self.client
        policy = client.policy
        options = request.extensions.get("lbclient")
        if options is not None:
            policy = RequestOptions.coerce(options).apply(policy)
            if not self.hedges:
                _refuse_hedging(policy)
        return client.start(
            request,
            request.method,
            request.url,
            isinstance(request.stream, httpx.ByteStream),
            policy,
        )

    @staticmethod
    def backend_request(
        request: httpx.Request, backend: Backend, plan: RequestPlan
    ) -> httpcore.Request:
        host = backend.host
        if host[0] == "[":
            host = host[1:-1]
        extensions = request.extensions
        url = request.url
        timeouts = extensions.get("timeout")
        if isinstance(timeouts, dict):
            capped = plan.timeouts(timeouts, backend)
            if capped is not timeouts:
                extensions = {**extensions, "timeout": capped}
        if url.scheme == "https":
            extensions = {**extensions, "sni_hostname": url.host}
        headers = request.headers.raw
        if not _has_host(headers):  # httpx's Client always sets it; a bare Request may not
            headers = [(b"Host", url.netloc), *headers]
        if plan.propagates:
            extra = plan.headers(backend)
            if extra:  # this attempt's trace context, in place of the caller's
                names = {name.lower().encode("latin-1") for name in extra}
                headers = [
                    *((n, v) for n, v in headers if n.lower() not in names),
                    *((n.encode("latin-1"), v.encode("latin-1")) for n, v in extra.items()),
                ]
        return httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=url.raw_scheme, host=host.encode("ascii"), port=backend.port,
                target=url.raw_path,
            ),
            headers=headers,
            content=request.stream,
            extensions=extensions,
        )

    def response(
        self,
        request: httpx.Request,
        plan: RequestPlan,
        backend: Backend,
        response: httpcore.Response,
        wrapper: type[_SyncStream] | type[_AsyncStream] | None,
        after: Callable[[], object] | None = None,
    ) -> httpx.Response:
        """Record the response on the plan and wrap it for the caller.

        ``wrapper`` wraps the body so that its end reports health and load, or is None when the
        body was already read into ``response.content``.
        """
        status = response.status
        retry_after = None
        if status in plan.policy.retry_statuses:
            for name, value in response.headers:
                if name.lower() == b"retry-after":
                    retry_after = value.decode("latin-1")
        plan.responded(backend, status, retry_after)
        report = plan.reporter(backend)
        report.after = after
        body: httpx.SyncByteStream | httpx.AsyncByteStream
        if wrapper is None:
            report(True)
            body = httpx.ByteStream(response.content)
        else:
            body = wrapper(response.stream, report)
        result = httpx.Response(
            status, headers=response.headers, stream=body, extensions=response.extensions
        )
        result.request = request
        return result

    def final(self, plan: RequestPlan, request: httpx.Request, error: Exception) -> Exception:
        """The final error: of the last failure's class, naming every attempt, with them as
        ``.attempts``."""
        final = type(error)(plan.describe(), request=request)  # type: ignore[call-arg]
        final.attempts = tuple(plan.attempts)  # type: ignore[attr-defined]
        return final

    def stale(self, pools: dict[tuple[str | None, str], _P]) -> list[_P]:
        """Remove and return the idle pools of backends no longer in the balancer's set."""
        current = {b.address for b in self.client.balancer.backends}
        gone = [
            key
            for key, pool in pools.items()
            if key[1] not in current and all(c.is_idle() for c in pool.connections)
        ]
        return [pools.pop(key) for key in gone]

    @staticmethod
    def pool_key(url: httpx.URL, backend: Backend) -> tuple[str | None, str]:
        """One pool per (logical TLS name, backend address): a TLS connection is never shared
        between two names, and a backend that is slow or black-holed holds only its own
        connections. Keyed by address: nothing holds on to a Backend that left the set."""
        return (url.host if url.scheme == "https" else None, backend.address)


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


class _AsyncPools:
    """One backend's connections for one TLS name, for the async transport: a gate that admits
    at most ``limit`` attempts and queues the rest, and a connection pool per slot the gate
    hands out. Over HTTP/1.1 each slot's pool keeps one connection: httpcore scans every
    connection of a pool on each request and each release, so with one pool for all of them
    a backend's requests would cost more the more there are at once; here each costs the
    same at any concurrency. With HTTP/2 on, the slots share one pool, whose connection
    multiplexes them."""

    __slots__ = ("_options", "_pools", "gate")

    def __init__(self, options: dict[str, Any], limit: int) -> None:
        self.gate = AsyncGate(limit)
        if not options["http2"]:
            keepalive = options["max_keepalive_connections"]
            options = {
                **options,
                "max_connections": 1,
                "max_keepalive_connections": 1 if keepalive is None else min(1, keepalive),
            }
        self._options = options
        self._pools: dict[int, httpcore.AsyncConnectionPool] = {}

    def pool(self, slot: int) -> httpcore.AsyncConnectionPool:
        """The pool of ``slot``, made when first needed."""
        key = slot if not self._options["http2"] else 0
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = httpcore.AsyncConnectionPool(**self._options)
        return pool

    @property
    def connections(self) -> list[httpcore.AsyncConnectionInterface]:
        """Every connection, of every slot."""
        return [c for pool in self._pools.values() for c in pool.connections]

    async def aclose(self) -> None:
        pools = list(self._pools.values())
        self._pools.clear()
        for pool in pools:
            await pool.aclose()


class _SyncStream(httpx.SyncByteStream):
    """The body as the caller reads it: a failure while reading is the backend's (and its
    error names the backend); reading it to the end, or closing it unread, is a success; a
    read cut short by the caller is neither."""

    def __init__(self, inner: Any, report: BodyReport) -> None:
        self._inner: Iterable[bytes] = inner
        self._report = report
        self._started = False

    def __iter__(self) -> Iterator[bytes]:
        self._started = True
        try:
            yield from self._inner
        except _HTTPCORE_ERRORS as exc:
            self._report(False)
            raise name_backend(_httpx_error(exc), self._report.backend) from exc
        self._report(True)

    def close(self) -> None:
        if not self._started:
            self._report(True)
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


class _AsyncStream(httpx.AsyncByteStream):
    def __init__(self, inner: Any, report: BodyReport) -> None:
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
            raise name_backend(_httpx_error(exc), self._report.backend) from exc
        self._report(True)

    async def aclose(self) -> None:
        if not self._started:
            self._report(True)
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()


class _Configured(Generic[_P, _T]):
    """The constructor and properties both transports share."""

    _plain_class: type[_T]
    _hedges: bool

    def __init__(
        self,
        balancer: LoadBalancer | Iterable[Backend | str],
        *,
        hosts: Iterable[str] | None = None,
        key: KeyFunction | None = None,
        algorithm: AlgorithmLike | None = None,
        max_attempts: int | None = None,
        retry_maybe_sent: bool | None = None,
        retry_statuses: Collection[int] | None = None,
        failure_statuses: Collection[int] | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
        hedge_after: float | None = None,
        budget: RetryBudget | Default | None = DEFAULT,
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
        client: Client[httpx.Response] = Client(
            balancer,
            key=key,
            algorithm=algorithm,
            policy=policy_from(
                policy,
                max_attempts=max_attempts,
                retry_maybe_sent=retry_maybe_sent,
                retry_statuses=retry_statuses,
                failure_statuses=failure_statuses,
                attempt_timeout=attempt_timeout,
                deadline=deadline,
                hedge_after=hedge_after,
                budget=budget,
            ),
            hosts=hosts,
            unavailable=_unavailable,
        )
        self._common = _Common(client, hedges=self._hedges)
        self._options = _pool_options(
            verify, cert, trust_env, http1, http2, limits, local_address, socket_options
        )
        self._plain_options = {
            "verify": verify,
            "cert": cert,
            "trust_env": trust_env,
            "http1": http1,
            "http2": http2,
            "limits": limits,
            "local_address": local_address,
            "socket_options": socket_options,
        }
        self._plain: _T | None = None
        self._pools: dict[tuple[str | None, str], _P] = {}
        #: Attempts admitted into one backend's pool at once; the rest wait in a FIFO queue.
        self._admit = limits.max_keepalive_connections or limits.max_connections or 1_000_000
        self._lock = threading.Lock()
        self._closed = False

    @property
    def balancer(self) -> LoadBalancer:
        """The load balancer choosing the backends."""
        return self._common.client.balancer

    @property
    def policy(self) -> RetryPolicy:
        """The retry policy."""
        return self._common.client.policy

    @property
    def hosts(self) -> frozenset[str] | None:
        """The logical hosts served (None until the first request names it)."""
        return self._common.client.hosts

    def stats(self) -> RetryStats:
        """Requests, retries, hedges and the retry budget's state, as of now."""
        return self._common.client.stats()

    def _plain_transport(self) -> _T:
        """An ordinary transport, with the same TLS and connection settings, for requests to
        hosts this transport does not serve."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{type(self).__name__} is closed")
            if self._plain is None:
                self._plain = self._plain_class(**self._plain_options)
            return self._plain


class LBTransport(_Configured[httpcore.ConnectionPool, httpx.HTTPTransport], httpx.BaseTransport):
    """An httpx transport that load-balances every request over a set of backends:
    ``httpx.Client(transport=LBTransport(...))``, or mounted for one service only.

    * ``balancer``: a :class:`~lbclient.LoadBalancer`, or backends (``"host:port"`` or
      :class:`~lbclient.Backend`) to build one with ``algorithm``.
    * ``hosts``: the logical host names served, e.g. ``["users"]``; requests for other hosts
      go through an ordinary httpx transport with the same settings (None: the host of the
      first request, as a client's ``base_url`` names it).
    * ``key``: ``key(request)`` returns the selection key, bytes or str, or None for the empty
      key (None: every request has the empty key).
    * ``algorithm``: the selection algorithm when backends are given (None: ``RoundRobin``).
    * ``max_attempts``: attempts per request, the first included (None: 3).
    * ``retry_maybe_sent``: retry failures that may have reached the server, for idempotent
      requests with replayable bodies (None: True).
    * ``retry_statuses``: response statuses retried for idempotent requests (None: none).
    * ``failure_statuses``: response statuses that count as server errors for passive health
      (None: 500..599).
    * ``attempt_timeout``: seconds one attempt may take up to its response head (None: only
      the client's own timeouts, per operation).
    * ``deadline``: seconds for the whole request, attempts and waits together (None: none).
    * ``hedge_after``: seconds without a response head before an idempotent request is also
      sent to the next backend; the first head wins (None: no hedging; AsyncLBTransport
      only, the sync transport refuses it).
    * ``budget``: the :class:`~lbclient.RetryBudget` every retry and hedge through this
      transport spends from (``RetryBudget()``: 20% of requests plus 10 per second over 10 s;
      None: no budget).
    * ``policy``: a :class:`~lbclient.RetryPolicy` instead of the nine options above (giving
      both is a TypeError).
    * ``verify``, ``cert``, ``trust_env``: TLS verification, client certificate and whether to
      read ``SSL_CERT_FILE``-style settings, as for ``httpx.HTTPTransport`` (True, None, True).
    * ``http1``, ``http2``: the HTTP versions offered (True, False; HTTP/2 needs
      ``lbclient[http2]``).
    * ``limits``: an ``httpx.Limits`` applied to each backend's pool (100 connections, 20 kept
      alive).
    * ``local_address``, ``socket_options``: as for ``httpx.HTTPTransport`` (None, None).

    One request may override ``max_attempts``, ``attempt_timeout`` and ``deadline`` with
    ``extensions={"lbclient": RequestOptions(...)}`` (or a dict of them).
    """

    _plain_class = httpx.HTTPTransport
    _hedges = False

    def _pool(self, url: httpx.URL, backend: Backend) -> httpcore.ConnectionPool:
        name = _Common.pool_key(url, backend)
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
        self._common.client.start_checks()
        return self

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("LBTransport is closed")
        common = self._common
        client = common.client
        if not client.serves(request.url.host):
            return self._plain_transport().handle_request(request)
        if client.checks_pending:
            client.start_checks()
        plan, first = common.plan(request)
        return _run_sync(plan, first, _SyncWire(self, request, plan))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools = list(self._pools.values())
            self._pools.clear()
            plain, self._plain = self._plain, None
        self._common.client.stop_checks()
        for pool in pools:
            pool.close()
        if plain is not None:
            plain.close()


class _SyncWire:
    """One request's attempts through :class:`LBTransport`."""

    __slots__ = ("plan", "request", "transport")

    def __init__(self, transport: LBTransport, request: httpx.Request, plan: RequestPlan) -> None:
        self.transport = transport
        self.request = request
        self.plan = plan

    def send(self, backend: Backend) -> httpx.Response:
        request, plan = self.request, self.plan
        common = self.transport._common
        pool = self.transport._pool(request.url, backend)
        try:
            response = pool.handle_request(common.backend_request(request, backend, plan))
            if plan.buffers(response.status, _content_length(response)):
                try:
                    response.read()
                finally:
                    response.close()
                return common.response(request, plan, backend, response, None)
        except _HTTPCORE_ERRORS as exc:
            raise _httpx_error(exc) from exc
        return common.response(request, plan, backend, response, _SyncStream)

    fault = staticmethod(_fault)

    def discard(self, response: httpx.Response) -> None:
        response.close()

    def final(self, error: Exception) -> Exception:
        return self.transport._common.final(self.plan, self.request, error)


class AsyncLBTransport(
    _Configured["_AsyncPools", httpx.AsyncHTTPTransport], httpx.AsyncBaseTransport
):
    """The async twin of :class:`LBTransport` for ``httpx.AsyncClient`` (asyncio or trio),
    with the same arguments."""

    _plain_class = httpx.AsyncHTTPTransport
    _hedges = True

    async def _pool(self, url: httpx.URL, backend: Backend) -> _AsyncPools:
        # No await between the lookup and the insert: safe among tasks of one event loop.
        name = _Common.pool_key(url, backend)
        pools = self._pools.get(name)
        if pools is None:
            if self._closed:
                raise RuntimeError("AsyncLBTransport is closed")
            stale = self._common.stale(self._pools)
            pools = self._pools[name] = _AsyncPools(self._options, self._admit)
            for old in stale:
                await old.aclose()
        return pools

    async def __aenter__(self) -> AsyncLBTransport:
        await self._common.client.astart_checks()
        return self

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("AsyncLBTransport is closed")
        common = self._common
        client = common.client
        if not client.serves(request.url.host):
            return await self._plain_transport().handle_async_request(request)
        if client.checks_pending:
            await client.astart_checks()
        plan, first = common.plan(request)
        return await _run_async(plan, first, _AsyncWire(self, request, plan))

    async def aclose(self) -> None:
        self._closed = True
        pools = list(self._pools.values())
        self._pools.clear()
        plain, self._plain = self._plain, None
        await self._common.client.astop_checks()
        for pool in pools:
            await pool.aclose()
        if plain is not None:
            await plain.aclose()


class _AsyncWire:
    """One request's attempts through :class:`AsyncLBTransport`."""

    __slots__ = ("plan", "request", "transport")

    def __init__(
        self, transport: AsyncLBTransport, request: httpx.Request, plan: RequestPlan
    ) -> None:
        self.transport = transport
        self.request = request
        self.plan = plan

    async def send(self, backend: Backend) -> httpx.Response:
        request, plan = self.request, self.plan
        common = self.transport._common
        pools = await self.transport._pool(request.url, backend)
        sent = common.backend_request(request, backend, plan)
        gate = pools.gate
        try:
            slot = await gate.enter(sent.extensions.get("timeout", {}).get("pool"))
        except TimeoutError:
            raise httpx.PoolTimeout(
                f"no connection to backend {backend.address} became free in time"
            ) from None
        try:
            response = await pools.pool(slot).handle_async_request(sent)
            if plan.buffers(response.status, _content_length(response)):
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                gate.leave(slot)
                return common.response(request, plan, backend, response, None)
        except _HTTPCORE_ERRORS as exc:
            gate.leave(slot)
            raise _httpx_error(exc) from exc
        except BaseException:
            gate.leave(slot)
            raise
        return common.response(
            request, plan, backend, response, _AsyncStream, functools.partial(gate.leave, slot)
        )

    fault = staticmethod(_fault)

    async def discard(self, response: httpx.Response) -> None:
        await response.aclose()

    def final(self, error: Exception) -> Exception:
        return self.transport._common.final(self.plan, self.request, error)
