"""requests: ``LBAdapter``, an ``HTTPAdapter`` that load-balances, and :func:`mount`.

``mount(session, LBAdapter([...], hosts=["users"]))`` sends every request for ``users``, however
its URL is spelled (``http://users/``, ``http://users:80/``, ``https://user:pw@users/``), to a
backend chosen by a :class:`~lbclient.LoadBalancer`, with the same rules as the httpx transports
(the same attempt loop decides which backend next, what is retried and what is reported).
``session.mount("http://users/", LBAdapter([...]))`` works too, for the URLs under that prefix.
A request for a host the adapter does not serve is sent as a plain ``HTTPAdapter`` would send
it, never to the backends.

What lives here: translating requests and urllib3 (the prepared request's URL, the logical
``Host`` and TLS name through per-request pool keys, never by changing shared pool settings; the
exceptions, sorted into never-sent and maybe-sent failures; the response's body). Backends are
contacted directly: proxies resolved for the logical URL are not used. What may not: a retry,
timeout or health rule of its own, or recording an outcome; those live once, in the plan
(:mod:`lbclient._plan`) and the loop (:mod:`lbclient._loop`), shared with the httpx transports."""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import BaseAdapter, HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import HTTPError as URLLib3HTTPError
from urllib3.util.retry import Retry

from lbclient._config import DEFAULT, AdapterConfig, Default, Zone, policy_from
from lbclient._loop import run_sync
from lbclient._plan import Timeouts
from lbclient._probes import urllib3_tls
from lbclient._requests_bodies import ReportingRaw, buffered
from lbclient._requests_faults import classify, requests_error
from lbclient._requests_timeouts import LBTimeout, bound_pools, timeouts, total_of, urllib3_timeout
from lbclient._wire import BOUND, Limits, final_text, merge_headers
from lbclient.backend import Backend
from lbclient.balancer import LoadBalancer
from lbclient.errors import NoBackendAvailable
from lbclient.retry import RetryBudget, RetryPolicy, RetryStats
from lbclient.selection.base import AlgorithmLike
from lbclient.subsets import Subset

__all__ = ["LBAdapter", "LBTimeout", "NoBackendAvailableError", "RequestsKeyFunction", "mount"]

#: Derives the selection key from a prepared request: bytes or str, or None for the empty key.
RequestsKeyFunction = Callable[[requests.PreparedRequest], "bytes | str | None"]

# The logical TLS name of the request being sent on this thread (or task), read when urllib3
# picks the connection pool. A context variable: concurrent requests never see each other's.
_SERVER_HOSTNAME: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lbclient_server_hostname", default=None
)

_DEFAULT_PORTS = {"http": 80, "https": 443}


class NoBackendAvailableError(NoBackendAvailable, requests.ConnectionError):
    """What :class:`LBAdapter` raises when no backend could be chosen: a
    :class:`~lbclient.NoBackendAvailable` that is also a ``requests.ConnectionError``."""

    def __init__(self, message: str, *, request: Any = None) -> None:
        requests.ConnectionError.__init__(self, message, request=request)


def _unavailable(message: str, request: Any) -> NoBackendAvailable:
    return NoBackendAvailableError(message, request=request)


@functools.lru_cache(maxsize=256)
def _logical(origin: str) -> tuple[str, str, str]:
    """(host name, Host header value, TLS name) of a logical URL's ``scheme://netloc``."""
    parts = urlsplit(origin)
    hostname = parts.hostname or ""
    host = f"[{hostname}]" if ":" in hostname else hostname
    port = parts.port
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{port}"
    return hostname, host, hostname


class LBAdapter(HTTPAdapter):
    """A requests adapter that load-balances every request over a set of backends:
    ``mount(session, LBAdapter(..., hosts=["users"]))``, or
    ``session.mount("http://users/", LBAdapter(...))``. urllib3's own retries are off: retries
    follow lbclient's rules.

    * ``balancer``, ``algorithm``, ``max_attempts``, ``retry_maybe_sent``, ``retry_statuses``,
      ``failure_statuses``, ``attempt_timeout``, ``deadline``, ``budget``, ``policy``,
      ``load_reports``, ``subset``, ``zone``: as for :class:`~lbclient.LBTransport`.
    * ``hedge_after``: a ValueError unless None: hedging needs the async httpx transport.
    * ``hosts``: the logical host names served; requests for other hosts are sent as a plain
      ``HTTPAdapter`` sends them (None: the host of the first request).
    * ``key``: ``key(prepared_request)`` returns the selection key, bytes or str, or None
      (None: every request has the empty key).
    * ``pool_connections``: connection pools kept; one per backend and TLS name is best (10).
    * ``pool_maxsize``: connections kept per pool (10).
    * ``pool_block``: wait for a free connection instead of opening one more (False).

    One request may override ``max_attempts``, ``attempt_timeout`` and ``deadline`` with
    ``timeout=LBTimeout(...)``. The adapter survives pickling with its session (health starts
    afresh)."""

    __attrs__ = [*HTTPAdapter.__attrs__, "_config"]  # noqa: RUF012 (as HTTPAdapter declares it)

    def __init__(
        self,
        balancer: LoadBalancer | Iterable[Backend | str],
        *,
        hosts: Iterable[str] | None = None,
        key: RequestsKeyFunction | None = None,
        algorithm: AlgorithmLike | None = None,
        max_attempts: int | None = None,
        retry_maybe_sent: bool | None = None,
        retry_statuses: Collection[int] | None = None,
        failure_statuses: Collection[int] | None = None,
        attempt_timeout: float | None = None,
        deadline: float | None = None,
        budget: RetryBudget | Default | None = DEFAULT,
        policy: RetryPolicy | None = None,
        load_reports: bool | str | None = None,
        hedge_after: float | None = None,
        pool_connections: int = 10,
        pool_maxsize: int = 10,
        pool_block: bool = False,
        subset: Subset | None = None,
        zone: str | Zone | None = None,
    ) -> None:
        self._config: AdapterConfig[requests.Response] = AdapterConfig(
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
                budget=budget,
                hedge_after=hedge_after,
            ),
            hosts=hosts,
            load_reports=load_reports,
            unavailable=_unavailable,
            name="LBAdapter",
            hedges=False,
            subset=subset,
            zone=zone,
        )
        super().__init__(pool_connections, pool_maxsize, 0, pool_block)
        self.max_retries = Retry(0, read=False, redirect=False, status=False)

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
        """Requests, retries and the retry budget's state, as of now."""
        return self._config.stats()

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        # Called by HTTPAdapter.__init__ and again on unpickling: the remembered pools go with
        # the pool manager they came from.
        self._pools: dict[tuple[Any, ...], Any] = {}
        self._pools_for: object = None
        self._remembered = max(1, connections)
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        bound_pools(self.poolmanager)  # their I/O ends when an attempt's limits say

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        proxies: Mapping[str, str] | None = None,
        cert: Any = None,
    ) -> Any:
        """The connection pool for ``request``: remembered per origin, TLS name and TLS
        settings while it stays open and the backend set stays the same, so requests' pool
        lookup (parsing the URL, building the pool key) runs once per backend, not once per
        request. Forgotten when the set changes (nothing is held for a backend that left), on
        :meth:`close`, and all at once when ``pool_connections`` are remembered."""
        if proxies:
            return super().get_connection_with_tls_context(request, verify, proxies, cert)
        pools = self._pools
        current = self._config.balancer.backends
        if self._pools_for is not current:
            pools = self._pools = {}
            self._pools_for = current
        url = request.url or ""
        origin = url[: url.find("/", url.find("://") + 3) % (len(url) + 1)]
        try:
            key = (origin, _SERVER_HOSTNAME.get(), verify, cert)
            pool = pools.get(key)
        except TypeError:  # an unhashable cert: nothing to remember it by
            return super().get_connection_with_tls_context(request, verify, proxies, cert)
        if pool is not None and pool.pool is not None:  # not closed (evicted, or close())
            return pool
        pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
        if len(pools) >= self._remembered:  # no more than the pool manager keeps
            pools.clear()
        pools[key] = pool
        return pool

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: bool | str, cert: Any = None
    ) -> tuple[Any, Any]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        if host_params.get("scheme") == "https":
            name = _SERVER_HOSTNAME.get()
            if name:
                # Per request, in the pool key: SNI and the certificate check use the logical
                # name, and pools for two names never share a connection.
                extended: dict[str, Any] = dict(pool_kwargs)
                extended["server_hostname"] = name
                return host_params, extended
        return host_params, pool_kwargs

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        url = request.url or ""
        scheme, _, rest = url.partition("://")
        netloc = rest.partition("/")[0].partition("?")[0].partition("#")[0]
        hostname, host_header, tls_name = _logical(f"{scheme}://{netloc}")
        config = self._config
        if not config.serves(hostname):
            plain = timeout if not isinstance(timeout, LBTimeout) else tuple(timeout)
            return super().send(request, stream, plain, verify, cert, proxies)
        wire = _Wire(self, request, url, timeout, verify, cert, stream)
        wire.tls_name = tls_name if scheme == "https" else None
        # What every attempt sends: the target as requests' ``path_url`` gives it (the path,
        # "/" if empty, and the query; no fragment), and the caller's headers with the logical
        # Host, in a copy (the caller's request stays as it was).
        target = rest[len(netloc) :].partition("#")[0]
        wire.prefix = f"{scheme}://"
        wire.target = target if target.startswith("/") else f"/{target}"
        headers = _copy_headers(request.headers)
        # For a proxy (requests adds it on redirects where one is configured); none is used.
        headers.pop("Proxy-Authorization", None)
        if "host" not in headers:
            headers["Host"] = host_header
        wire.headers = headers
        return run_sync(config, wire)

    def _send(self, *args: Any, **kwargs: Any) -> requests.Response:
        return super().send(*args, **kwargs)

    def close(self) -> None:
        """Close the connection pools, and stop the health checks this adapter started."""
        self._config.stop_services()
        self._pools = {}
        super().close()


class _Wire:
    """One request's attempts through :class:`LBAdapter`."""

    __slots__ = (
        "adapter",
        "cert",
        "headers",
        "method",
        "options",
        "prefix",
        "replayable",
        "request",
        "stream",
        "target",
        "timeouts",
        "tls_name",
        "total",
        "url",
        "verify",
    )

    def __init__(
        self,
        adapter: LBAdapter,
        request: requests.PreparedRequest,
        url: str,
        timeout: Any,
        verify: bool | str,
        cert: Any,
        stream: bool,
    ) -> None:
        self.adapter = adapter
        self.request = request
        self.method = (request.method or "GET").upper()
        self.url = url
        self.replayable = _replayable(request.body)
        self.timeouts: Timeouts | None = timeouts(timeout)
        self.total = total_of(timeout)
        self.options = timeout.options if isinstance(timeout, LBTimeout) else None
        self.stream = stream
        self.verify = verify
        self.cert = cert
        #: The logical TLS name for https (None for http).
        self.tls_name: str | None = None
        self.prefix = "http://"
        self.target = "/"
        self.headers: CaseInsensitiveDict[str] = CaseInsensitiveDict()

    @property
    def probe_tls(self) -> dict[str, Any]:
        """This request's ``verify`` and ``cert`` for the algorithm's probes (Prequal)."""
        return urllib3_tls(self.verify, self.cert)

    def send(
        self,
        backend: Backend,
        limits: Limits | None,
        headers: Mapping[str, str] | None,
        buffer: int,
    ) -> tuple[int, requests.Response, ReportingRaw | None]:
        request = self.request
        # A shallow twin of the caller's request (which stays logical): new URL and headers,
        # the same method, body, hooks and cookies. Cheaper than PreparedRequest.copy().
        sent = _TWIN.__new__(_TWIN)
        sent.__dict__.update(request.__dict__)
        sent.url = f"{self.prefix}{backend.address}{self.target}"
        sent.headers = (
            self.headers
            if not headers
            else CaseInsensitiveDict(merge_headers(list(self.headers.items()), headers, str))
        )
        given = self.timeouts if limits is None else limits.timeouts
        # For https, the logical TLS name, read by build_connection_pool_key_attributes.
        token = None if self.tls_name is None else _SERVER_HOSTNAME.set(self.tls_name)
        bound = None if limits is None else BOUND.set(limits)
        try:
            response = self.adapter._send(
                sent,
                stream=True,
                timeout=urllib3_timeout(given, self.total),
                verify=self.verify,
                cert=self.cert,
                proxies={},
            )
        finally:
            if bound is not None:
                BOUND.reset(bound)
            if token is not None:
                _SERVER_HOSTNAME.reset(token)
        if limits is not None:  # the response's reader applies them from now on
            limits.body()
        response.url = request.url or ""
        response.request = request
        raw = response.raw
        if buffer >= 0:
            length = response.headers.get("Content-Length", "")
            if length.isascii() and length.isdigit() and int(length) <= buffer:
                # Read here, so that a connection lost mid-body can still be retried.
                try:
                    if self.stream:  # the caller reads raw: keep the body as it came
                        response.raw = buffered(raw, raw.read(decode_content=False))
                    else:  # as requests itself does right after send()
                        response._content = raw.read(decode_content=True) or b""
                        response._content_consumed = True  # type: ignore[attr-defined]
                except URLLib3HTTPError as exc:
                    raise requests_error(exc) from exc
                finally:
                    raw.release_conn()
                return response.status_code, response, None
        body = response.raw = ReportingRaw(raw)
        body.limits = limits
        return response.status_code, response, body

    @staticmethod
    def header(response: requests.Response, name: str) -> str | None:
        return response.headers.get(name)

    fault = staticmethod(classify)

    @staticmethod
    def discard(response: requests.Response) -> None:
        response.close()

    def final(self, error: Exception, summary: str) -> Exception:
        """Of the class and with the ``args[0]`` plain requests would raise, its message
        followed by the summary (see :func:`~lbclient._loop.final_text`)."""
        inner = error.args[0] if error.args else None
        if isinstance(inner, BaseException):
            inner = _with_summary(inner, summary)
        else:
            inner = final_text("" if inner is None else str(inner), summary)
        return type(error)(  # type: ignore[call-arg]
            inner, request=self.request, response=getattr(error, "response", None)
        )


def _with_summary(error: BaseException, summary: str) -> BaseException:
    """A copy of ``error`` (same class, same attributes) whose message ends with ``summary``."""
    copy = type(error).__new__(type(error))
    copy.__dict__.update(error.__dict__)
    first = error.args[0] if error.args else ""
    copy.args = (final_text(str(first), summary), *error.args[1:])
    copy.__cause__, copy.__context__ = error.__cause__, error.__context__
    copy.__traceback__ = error.__traceback__
    return copy


#: The class of the twin requests sent to backends.
_TWIN = requests.PreparedRequest


def _copy_headers(headers: Any) -> CaseInsensitiveDict[str]:
    """A copy of a request's headers (a ``CaseInsensitiveDict``, or any mapping a hook left)."""
    copy: CaseInsensitiveDict[str] = CaseInsensitiveDict()
    store = getattr(headers, "_store", None)
    if type(headers) is CaseInsensitiveDict and isinstance(store, dict):
        copy._store = store.copy()  # type: ignore[attr-defined]  # the same entries, without re-lowering every name
    else:
        copy.update(headers or {})
    return copy


def _replayable(body: object) -> bool:
    return body is None or isinstance(body, (bytes, str))


def mount(session: requests.Session, adapter: LBAdapter) -> None:
    """Mount ``adapter`` on ``session`` for every spelling of its hosts' URLs: with and without
    the default port, with user information, for http and https.

    The adapter must name its ``hosts``. Requests for other hosts keep going wherever they
    went before (the session's previous ``http://`` and ``https://`` adapters).
    """
    if not isinstance(adapter, LBAdapter):
        raise TypeError(f"adapter must be an LBAdapter, got {adapter!r}")
    hosts = adapter.hosts
    if hosts is None:
        raise ValueError("mount() needs an LBAdapter with hosts=[...] naming what it serves")
    for scheme in ("http", "https"):
        prefix = f"{scheme}://"
        router = session.adapters.get(prefix)
        if not isinstance(router, _Router):
            router = _Router(session.get_adapter(prefix))
            session.mount(prefix, router)
        for host in hosts:
            router.routes[host] = adapter
            # The common spellings by prefix too, so that they beat shorter mounts.
            session.mount(f"{prefix}{host}/", adapter)
            session.mount(f"{prefix}{host}:{_DEFAULT_PORTS[scheme]}/", adapter)


class _Router(BaseAdapter):
    """Mounted on ``scheme://``: sends a request to the LBAdapter serving its host, or to the
    adapter that was mounted there before."""

    def __init__(self, fallback: BaseAdapter) -> None:
        super().__init__()
        self.routes: dict[str, LBAdapter] = {}
        self.fallback = fallback

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        hostname = urlsplit(request.url or "").hostname or ""
        target = self.routes.get(hostname, self.fallback)
        return target.send(request, *args, **kwargs)

    def close(self) -> None:
        for adapter in {id(a): a for a in [*self.routes.values(), self.fallback]}.values():
            adapter.close()
