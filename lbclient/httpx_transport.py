"""httpx transports: ``LBTransport`` (sync) and ``AsyncLBTransport`` (asyncio or trio).

Each request for a host the transport serves is sent to a backend chosen by a
:class:`~lbclient.LoadBalancer`: the URL's host and port become the backend's, everything else
(method, path, query, headers with the logical ``Host``, body) is sent unchanged, and for https
the certificate is checked against the logical host name. A request for any other host (a
redirect to a login page, say) goes through an ordinary httpx transport with the same TLS
settings, never to the backends. Connections are pooled per backend, in one pool per logical
TLS name, so a connection opened for one name is never reused for another; ``limits`` apply to
each backend's connections as httpx applies them to its pool (the async transport's queue:
:class:`~lbclient._pools.AsyncPools`). Once closed, a transport sends nothing more: a request
that begins after, or waits for a connection, gets :class:`TransportClosedError`.

The transports talk to httpcore directly (as httpx's own transport does): the request for the
backend is made without parsing a URL, which keeps the per-request cost to a few microseconds.

What lives here: translating httpx requests, responses and exceptions for the attempt loop: the
wire that sends one attempt and returns what it saw, the pools (made in :mod:`lbclient._pools`;
the body wrappers are :mod:`lbclient._httpx_bodies`'). What may not: a retry, timeout or health
rule of its own, or recording an outcome; those live once, in the plan (:mod:`lbclient._plan`)
and the loop (:mod:`lbclient._loop`), shared with the requests adapter."""

from __future__ import annotations

import functools
import ssl
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Final, Generic, TypeVar

import httpcore
import httpx

from lbclient._config import DEFAULT, AdapterConfig, Default, Zone, policy_from
from lbclient._gate import GateClosed
from lbclient._httpx_bodies import AsyncBody, SyncBody
from lbclient._httpx_faults import HTTPCORE_ERRORS, fault, httpx_error
from lbclient._loop import run_async, run_sync
from lbclient._plan import Fault, Timeouts
from lbclient._pools import AsyncPools, pool_key, pool_options, shut, stale_pools, sync_pool
from lbclient._probes import use as use_options
from lbclient._wire import BOUND, Limits, final_text, merge_headers
from lbclient.backend import Backend
from lbclient.balancer import LoadBalancer
from lbclient.errors import NoBackendAvailable, TransportClosed
from lbclient.retry import RetryBudget, RetryPolicy, RetryStats
from lbclient.selection.base import AlgorithmLike
from lbclient.subsets import Subset

__all__ = [
    "AsyncLBTransport",
    "KeyFunction",
    "LBTransport",
    "NoBackendAvailableError",
    "TransportClosedError",
]

#: Derives the selection key from a request: bytes or str, or None for the empty key.
KeyFunction = Callable[[httpx.Request], "bytes | str | None"]

_P = TypeVar("_P", httpcore.ConnectionPool, "AsyncPools")
_T = TypeVar("_T", httpx.HTTPTransport, httpx.AsyncHTTPTransport)

DEFAULT_LIMITS: Final = httpx.Limits(max_connections=100, max_keepalive_connections=20)


class NoBackendAvailableError(NoBackendAvailable, httpx.ConnectError):
    """What the transports raise when no backend could be chosen: a
    :class:`~lbclient.NoBackendAvailable` that is also an ``httpx.ConnectError``."""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        httpx.ConnectError.__init__(self, message, request=request)


class TransportClosedError(TransportClosed, httpx.TransportError, RuntimeError):
    """What the transports raise for a request they can no longer send, being closed: a
    :class:`~lbclient.errors.TransportClosed` that is also an ``httpx.TransportError``."""

    def __init__(self, transport: object, *, request: httpx.Request | None = None) -> None:
        # The transport closed, or (a copy, an unpickled one) the message already made.
        message = (
            transport if isinstance(transport, str) else f"{type(transport).__name__} is closed"
        )
        httpx.TransportError.__init__(self, message, request=request)


def _unavailable(message: str, request: Any) -> NoBackendAvailable:
    return NoBackendAvailableError(message, request=request)


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


def _latin1(text: str) -> bytes:
    return text.encode("latin-1")


def _backend_request(
    request: httpx.Request,
    backend: Backend,
    limits: Limits | None,
    headers: Mapping[str, str] | None,
) -> httpcore.Request:
    """The request for ``backend``: its host and port, the caller's logical ``Host`` and TLS
    name, the timeouts of these ``limits`` (None: the caller's; else in extensions of its own,
    changed when the head came) and ``headers`` added."""
    host = backend.host
    if host[0] == "[":
        host = host[1:-1]
    extensions = request.extensions
    url = request.url
    if limits is not None:
        extensions = {**extensions, "timeout": limits.timeouts}
    if url.scheme == "https":
        extensions = {**extensions, "sni_hostname": url.host}
    raw = request.headers.raw
    if not _has_host(raw):  # httpx's Client always sets it; a bare Request may not
        raw = [(b"Host", url.netloc), *raw]
    if headers:
        raw = merge_headers(raw, headers, _latin1)
    return httpcore.Request(
        method=request.method,
        url=httpcore.URL(
            scheme=url.raw_scheme,
            host=host.encode("ascii"),
            port=backend.port,
            target=url.raw_path,
        ),
        headers=raw,
        content=request.stream,
        extensions=extensions,
    )


def _response(
    request: httpx.Request,
    response: httpcore.Response,
    body: httpx.SyncByteStream | httpx.AsyncByteStream | None,
) -> httpx.Response:
    """The caller's response: ``body`` wraps the stream, or None when the body was read."""
    result = httpx.Response(
        response.status,
        headers=response.headers,
        stream=httpx.ByteStream(response.content) if body is None else body,
        extensions=response.extensions,
    )
    result.request = request
    return result


class _Wire:
    """What both transports' wires share: one request's facts and its client's words."""

    __slots__ = ("method", "options", "replayable", "request", "timeouts", "url")

    def __init__(self, request: httpx.Request) -> None:
        self.request = request
        self.method = request.method
        self.url = request.url
        self.replayable = isinstance(request.stream, httpx.ByteStream)
        extensions = request.extensions
        timeouts = extensions.get("timeout")
        self.timeouts: Timeouts | None = timeouts if isinstance(timeouts, dict) else None
        self.options: object = extensions.get("lbclient")

    @staticmethod
    def header(response: httpx.Response, name: str) -> str | None:
        value: str | None = response.headers.get(name)
        return value

    def fault(self, error: Exception) -> Fault | None:
        """How ``error`` failed (see :func:`~lbclient._httpx_faults.fault`); once the transport
        is closed, a failure is its own close's doing (a connection it shut under the
        attempt), not the backend's: not reported to health."""
        found = fault(error)
        if found is not None and self._closing():
            return found._replace(ours=True)
        return found

    def _closing(self) -> bool:
        return False

    def final(self, error: Exception, summary: str) -> Exception:
        """Of the last failure's class, its message followed by the summary."""
        return type(error)(final_text(str(error), summary), request=self.request)  # type: ignore[call-arg]


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
        hedge_budget: RetryBudget | Default | None = DEFAULT,
        policy: RetryPolicy | None = None,
        load_reports: bool | str | None = None,
        verify: ssl.SSLContext | str | bool = True,
        cert: Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = DEFAULT_LIMITS,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
        subset: Subset | None = None,
        zone: str | Zone | None = None,
    ) -> None:
        self._config: AdapterConfig[httpx.Response] = AdapterConfig(
            balancer,
            key=key,
            algorithm=algorithm,
            failure_statuses=failure_statuses,
            policy=policy_from(
                policy,
                max_attempts=max_attempts,
                retry_maybe_sent=retry_maybe_sent,
                retry_statuses=retry_statuses,
                attempt_timeout=attempt_timeout,
                deadline=deadline,
                hedge_after=hedge_after,
                budget=budget,
                hedge_budget=hedge_budget,
            ),
            hosts=hosts,
            load_reports=load_reports,
            unavailable=_unavailable,
            name=type(self).__name__,
            hedges=self._hedges,
            subset=subset,
            zone=zone,
        )
        self._options = pool_options(
            verify, cert, trust_env, http1, http2, limits, local_address, socket_options
        )
        use_options(self._config.probes, self._options)
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
        self._lock = threading.Lock()
        self._closed = False

    @property
    def balancer(self) -> LoadBalancer:
        """The load balancer choosing the backends."""
        return self._config.balancer

    @property
    def policy(self) -> RetryPolicy:
        """The retry policy."""
        return self._config.policy

    @property
    def hosts(self) -> frozenset[str] | None:
        """The logical hosts served (None until the first request names it)."""
        return self._config.hosts

    def stats(self) -> RetryStats:
        """Requests, retries, hedges and the retry budget's state, as of now."""
        return self._config.stats()

    def _plain_transport(self, request: httpx.Request) -> _T:
        """An ordinary transport, with the same TLS and connection settings, for requests to
        hosts this transport does not serve."""
        with self._lock:
            if self._closed:
                raise TransportClosedError(self, request=request)
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
    * ``failure_statuses``: response statuses that count as server errors for passive health,
      when backends are given (None: 500..599); a balancer's own are its
      ``HealthPolicy(failure_statuses=...)``, shared by every adapter using it.
    * ``attempt_timeout``: seconds one attempt may take up to its response head, however
      slowly it comes; the body then gets the client's own timeouts (None: only the client's
      own timeouts, per operation).
    * ``deadline``: seconds for the whole request: attempts, waits and the response body
      together, whoever reads it (None: none).
    * ``hedge_after``: seconds without a response head before an idempotent request is also
      sent to the next backend; the first head wins (None: no hedging; AsyncLBTransport
      only, the sync transport refuses it).
    * ``budget``: the :class:`~lbclient.RetryBudget` every retry through this transport
      spends from, but a retry of an attempt that never reached a server (``RetryBudget()``:
      20% of requests plus 10 per second over 10 s; None: no budget).
    * ``hedge_budget``: the :class:`~lbclient.RetryBudget` every hedge spends from, apart from
      the retries' (``RetryBudget()``; None: no budget).
    * ``policy``: a :class:`~lbclient.RetryPolicy` instead of the nine retry options above
      (giving both is a TypeError); it may carry tenacity strategies of its own.
    * ``load_reports``: ask every backend for its load report (``endpoint-load-metrics-format``)
      and read each response's into the backend's load (see :mod:`lbclient.reports`): True or
      ``"TEXT"``, ``"JSON"``, False never; None (the default): in TEXT when the algorithm
      balances on them (``WeightedRoundRobin``, ``Prequal``).
    * ``verify``, ``cert``, ``trust_env``: TLS verification, client certificate and whether to
      read ``SSL_CERT_FILE``-style settings, as for ``httpx.HTTPTransport`` (True, None, True).
    * ``http1``, ``http2``: the HTTP versions offered (True, False; HTTP/2: ``lbclient[http2]``).
    * ``limits``: an ``httpx.Limits`` for each backend's pool (100 connections, 20 kept alive).
    * ``local_address``, ``socket_options``: as for ``httpx.HTTPTransport`` (None, None).
    * ``subset``, ``zone``: when backends are given, a :class:`~lbclient.Subset` (connections
      to its members and replacements only) and this client's zone (see :class:`LoadBalancer`).

    One request may override ``max_attempts``, ``attempt_timeout`` and ``deadline`` with
    ``extensions={"lbclient": RequestOptions(...)}`` (or a dict of them)."""

    _plain_class = httpx.HTTPTransport
    _hedges = False

    def _pool(self, request: httpx.Request, backend: Backend) -> httpcore.ConnectionPool:
        name = pool_key(request.url, backend)
        pool = self._pools.get(name)
        if pool is None:
            stale: list[httpcore.ConnectionPool] = []
            with self._lock:
                if self._closed:
                    raise TransportClosedError(self, request=request)
                pool = self._pools.get(name)
                if pool is None:
                    stale = stale_pools(self._pools, self._config.balancer)
                    pool = self._pools[name] = sync_pool(self._options)
            for old in stale:
                old.close()
        return pool

    def __enter__(self) -> LBTransport:
        self._config.start_services()
        return self

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise TransportClosedError(self, request=request)
        config = self._config
        if not config.serves(request.url.host):
            return self._plain_transport(request).handle_request(request)
        return run_sync(config, _SyncWire(self, request))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools = list(self._pools.values())
            self._pools.clear()
            plain, self._plain = self._plain, None
        self._config.stop_services()
        for pool in pools:
            pool.close()
        if plain is not None:
            plain.close()


class _SyncWire(_Wire):
    """One request's attempts through :class:`LBTransport`."""

    __slots__ = ("transport",)

    def __init__(self, transport: LBTransport, request: httpx.Request) -> None:
        _Wire.__init__(self, request)
        self.transport = transport

    def _closing(self) -> bool:
        return self.transport._closed

    def send(
        self,
        backend: Backend,
        limits: Limits | None,
        headers: Mapping[str, str] | None,
        buffer: int,
    ) -> tuple[int, httpx.Response, SyncBody | None]:
        request = self.request
        pool = self.transport._pool(request, backend)
        sent = _backend_request(request, backend, limits, headers)
        token = None if limits is None else BOUND.set(limits)
        try:
            response = pool.handle_request(sent)
            if limits is not None:  # httpcore reads the body's timeouts when it starts on it
                sent.extensions["timeout"] = limits.body()
            if buffer >= 0:
                length = _content_length(response)
                if length is not None and length <= buffer:
                    try:
                        response.read()
                    finally:
                        response.close()
                    return response.status, _response(request, response, None), None
        except HTTPCORE_ERRORS as exc:
            raise httpx_error(exc) from exc
        finally:
            if token is not None:
                BOUND.reset(token)
        body = SyncBody(response.stream)
        body.limits = limits
        return response.status, _response(request, response, body), body

    @staticmethod
    def discard(response: httpx.Response) -> None:
        response.close()


class AsyncLBTransport(
    _Configured["AsyncPools", httpx.AsyncHTTPTransport], httpx.AsyncBaseTransport
):
    """The async twin of :class:`LBTransport` for ``httpx.AsyncClient`` (asyncio or trio),
    with the same arguments."""

    _plain_class = httpx.AsyncHTTPTransport
    _hedges = True

    async def _pool(self, request: httpx.Request, backend: Backend) -> AsyncPools:
        # No await between the lookup and the insert: safe among tasks of one event loop.
        name = pool_key(request.url, backend)
        pools = self._pools.get(name)
        if pools is None:
            if self._closed:
                raise TransportClosedError(self, request=request)
            stale = stale_pools(self._pools, self._config.balancer)
            pools = self._pools[name] = AsyncPools(self._options)
            for old in stale:
                await old.aclose()
        return pools

    async def __aenter__(self) -> AsyncLBTransport:
        await self._config.astart_services()
        return self

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise TransportClosedError(self, request=request)
        config = self._config
        if not config.serves(request.url.host):
            return await self._plain_transport(request).handle_async_request(request)
        return await run_async(config, _AsyncWire(self, request))

    async def aclose(self) -> None:
        self._closed = True
        pools = list(self._pools.values())
        self._pools.clear()
        for waiting in pools:  # before any await: nothing queued is sent from here on
            waiting.gate.close()
        plain, self._plain = self._plain, None
        await self._config.astop_services()
        for pool in pools:
            await pool.aclose()
        if plain is not None:
            await plain.aclose()


class _AsyncWire(_Wire):
    """One request's attempts through :class:`AsyncLBTransport`."""

    __slots__ = ("transport",)

    def __init__(self, transport: AsyncLBTransport, request: httpx.Request) -> None:
        _Wire.__init__(self, request)
        self.transport = transport

    def _closing(self) -> bool:
        return self.transport._closed

    async def send(
        self,
        backend: Backend,
        limits: Limits | None,
        headers: Mapping[str, str] | None,
        buffer: int,
    ) -> tuple[int, httpx.Response, AsyncBody | None]:
        request = self.request
        pools = await self.transport._pool(request, backend)
        sent = _backend_request(request, backend, limits, headers)
        try:
            slot = await pools.enter(sent.extensions.get("timeout", {}).get("pool"))
        except TimeoutError:  # as httpx's own pool times out, and classified as it is
            raise httpx.PoolTimeout(
                f"no connection to backend {backend.address} became free in time"
            ) from None
        except GateClosed:  # aclose() while it waited: nothing more is sent
            raise TransportClosedError(self.transport, request=request) from None
        token = None if limits is None else BOUND.set(limits)
        read = False
        try:
            response = await pools.pool(slot).handle_async_request(sent)
            if limits is not None:  # httpcore reads the body's timeouts when it starts on it
                sent.extensions["timeout"] = limits.body()
            if buffer >= 0:
                length = _content_length(response)
                if length is not None and length <= buffer:
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
                    read = True
        except HTTPCORE_ERRORS as exc:
            await pools.leave(slot)
            raise httpx_error(exc) from exc
        except GateClosed:
            await pools.leave(slot)
            raise TransportClosedError(self.transport, request=request) from None
        except BaseException:
            await pools.leave(slot)
            raise
        finally:
            if token is not None:
                BOUND.reset(token)
        if read:  # the slot is given back once, out of the handlers above
            closing = pools.give_back(slot)
            if closing is not None:
                await shut(closing)
            return response.status, _response(request, response, None), None
        body = AsyncBody(response.stream, functools.partial(pools.give_back, slot))
        body.limits = limits
        return response.status, _response(request, response, body), body

    @staticmethod
    async def discard(response: httpx.Response) -> None:
        await response.aclose()
