"""requests: ``LBAdapter``, an ``HTTPAdapter`` for ``Session.mount`` that load-balances.

``session.mount("http://users/", LBAdapter([...]))`` sends every request under that prefix to a
backend chosen by a :class:`LoadBalancer`, with the same rules as the httpx transports (the same
:class:`RequestPlan` decides which backend next, what is retried and what is reported). This
module only translates: it rewrites the prepared request's URL, keeps the logical ``Host`` and
TLS name (through per-request pool keys, never by changing shared pool settings), and sorts
requests' and urllib3's exceptions into never-sent and maybe-sent failures.

Backends are contacted directly: proxies resolved for the logical URL are not used.

What may not: a retry or health rule of its own; those live once, in the attempt loop
(:mod:`lbclient._attempt`), shared with the httpx transports.
"""

from __future__ import annotations

import contextvars
import functools
import traceback
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.exceptions import SSLError as URLLib3SSLError
from urllib3.util.retry import Retry

from lbclient._attempt import Adapter, RequestPlan, budget_of, policy_from, run_sync
from lbclient.backend import Backend
from lbclient.balancer import LoadBalancer
from lbclient.errors import NoBackendAvailable
from lbclient.retry import Failure, RetryPolicy
from lbclient.selection.base import AlgorithmLike

__all__ = ["LBAdapter", "NoBackendAvailableError", "RequestsKeyFunction"]

#: Derives the selection key from a prepared request: bytes or str, or None for the empty key.
RequestsKeyFunction = Callable[[requests.PreparedRequest], "bytes | str | None"]

# The logical TLS name of the request being sent on this thread (or task), read when urllib3
# picks the connection pool. A context variable: concurrent requests never see each other's.
_SERVER_HOSTNAME: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lbclient_server_hostname", default=None
)

_DEFAULT_PORTS = {"http": 80, "https": 443}
_HANDSHAKE_FRAMES = frozenset(
    {"_ssl_wrap_socket_and_match_hostname", "ssl_wrap_socket", "do_handshake", "_new_conn"}
)


class NoBackendAvailableError(NoBackendAvailable, requests.ConnectionError):
    """What :class:`LBAdapter` raises when no backend could be chosen: a
    :class:`~lbclient.NoBackendAvailable` that is also a ``requests.ConnectionError``."""

    def __init__(self, message: str, *, request: Any = None) -> None:
        requests.ConnectionError.__init__(self, message, request=request)


def _unavailable(message: str, request: Any) -> NoBackendAvailable:
    return NoBackendAvailableError(message, request=request)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        if current.args and isinstance(current.args[0], BaseException):
            yield from _chain(current.args[0])
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            yield from _chain(reason)
        current = current.__cause__ or current.__context__


def _during_handshake(exc: BaseException) -> bool:
    """Whether a timeout was raised while connecting (urllib3 reports a TLS handshake timeout
    as a read timeout, although no request byte was sent)."""
    for error in _chain(exc):
        frames = traceback.extract_tb(error.__traceback__)
        if any(frame.name in _HANDSHAKE_FRAMES for frame in frames):
            return True
    return False


def classify(exc: BaseException) -> Failure:
    """How far a request got when requests or urllib3 raised ``exc``."""
    errors = list(_chain(exc))
    if any(
        isinstance(e, (NewConnectionError, ConnectTimeoutError, ClosedPoolError)) for e in errors
    ):
        return Failure.NEVER_SENT
    if isinstance(exc, requests.exceptions.SSLError) or any(
        isinstance(e, URLLib3SSLError) for e in errors
    ):
        return Failure.NEVER_SENT
    if isinstance(exc, requests.exceptions.ReadTimeout) or any(
        isinstance(e, ReadTimeoutError) for e in errors
    ):
        return Failure.NEVER_SENT if _during_handshake(exc) else Failure.MAYBE_SENT
    if isinstance(
        exc,
        (
            requests.exceptions.InvalidURL,
            requests.exceptions.InvalidHeader,
            requests.exceptions.InvalidSchema,
        ),
    ):
        return Failure.LOCAL
    return Failure.MAYBE_SENT


@functools.lru_cache(maxsize=256)
def _logical_netloc(origin: str) -> tuple[str, str]:
    """(Host header value, TLS name) of a logical URL's ``scheme://netloc``."""
    parts = urlsplit(origin)
    hostname = parts.hostname or ""
    host = f"[{hostname}]" if ":" in hostname else hostname
    port = parts.port
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{port}"
    return host, hostname


class _ReportingRaw:
    """Wraps a response's urllib3 body: reading it to the end, or closing it unread, reports a
    success; a failure while reading reports a failure; a read cut short by the caller, nothing."""

    def __init__(self, raw: Any, report: Callable[[bool], None]) -> None:
        self._raw = raw
        self._report = report
        self._started = False

    def stream(
        self, amt: int | None = 2**16, decode_content: bool | None = None
    ) -> Iterator[bytes]:
        self._started = True
        try:
            yield from self._raw.stream(amt, decode_content=decode_content)
        except Exception:
            self._report(False)
            raise
        self._report(True)

    def read(self, amt: int | None = None, *args: Any, **kwargs: Any) -> Any:
        self._started = True
        try:
            data = self._raw.read(amt, *args, **kwargs)
        except Exception:
            self._report(False)
            raise
        if amt is None or not data:
            self._report(True)
        return data

    def close(self) -> None:
        if not self._started:
            self._report(True)
        self._raw.close()

    def release_conn(self) -> None:
        if not self._started:
            self._report(True)
        self._raw.release_conn()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class LBAdapter(HTTPAdapter):
    """A requests adapter that load-balances every request over a set of backends:
    ``session.mount("http://users/", LBAdapter(...))``. urllib3's own retries are off: retries
    follow lbclient's rules.

    * ``balancer``, ``algorithm``, ``max_attempts``, ``retry_maybe_sent``, ``retry_statuses``,
      ``failure_statuses``, ``policy``: as for :class:`~lbclient.LBTransport`.
    * ``key``: ``key(prepared_request)`` returns the selection key, bytes or str, or None
      (None: every request has the empty key).
    * ``pool_connections``: connection pools kept; at least one per backend and TLS name is
      best (10).
    * ``pool_maxsize``: connections kept per pool (10).
    * ``pool_block``: wait for a free connection instead of opening one more (False).
    """

    def __init__(
        self,
        balancer: LoadBalancer | Iterable[Backend | str],
        *,
        key: RequestsKeyFunction | None = None,
        algorithm: AlgorithmLike | None = None,
        max_attempts: int = 3,
        retry_maybe_sent: bool = True,
        retry_statuses: Collection[int] = (),
        failure_statuses: Collection[int] = range(500, 600),
        policy: RetryPolicy | None = None,
        pool_connections: int = 10,
        pool_maxsize: int = 10,
        pool_block: bool = False,
    ) -> None:
        self._common = Adapter(
            balancer,
            key=key,
            algorithm=algorithm,
            policy=policy_from(
                policy, max_attempts, retry_maybe_sent, retry_statuses, failure_statuses
            ),
            unavailable=_unavailable,
        )
        super().__init__(pool_connections, pool_maxsize, 0, pool_block)
        self.max_retries = Retry(0, read=False, redirect=False, status=False)

    @property
    def balancer(self) -> LoadBalancer:
        """The load balancer choosing the backends."""
        return self._common.balancer

    @property
    def policy(self) -> RetryPolicy:
        """The retry policy."""
        return self._common.policy

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: bool | str, cert: Any = None
    ) -> tuple[Any, Any]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        name = _SERVER_HOSTNAME.get()
        if name and host_params.get("scheme") == "https":
            # Per request, in the pool key: SNI and the certificate check use the logical name,
            # and pools for two names never share a connection.
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
        common = self._common
        if common.checks_pending:
            common.start_checks()
        policy = common.policy
        url = request.url or ""
        method = (request.method or "GET").upper()
        plan, first = common.start(
            request, method, url, _replayable(request.body), _budget(timeout)
        )
        scheme, _, rest = url.partition("://")
        host_header, tls_name = _logical_netloc(f"{scheme}://{rest.partition('/')[0]}")
        path = request.path_url

        headers = request.headers.copy()
        if "Host" not in headers:
            headers["Host"] = host_header

        def attempt(backend: Backend) -> requests.Response:
            # A shallow twin of the caller's request (which stays logical): new URL and
            # headers, the same body, hooks and cookies. Cheaper than PreparedRequest.copy().
            sent = requests.PreparedRequest()
            sent.method = request.method
            sent.url = f"{scheme}://{backend.address}{path}"
            sent.headers = headers
            sent.body = request.body
            sent.hooks = request.hooks
            sent._cookies = request._cookies  # type: ignore[attr-defined]
            sent._body_position = request._body_position  # type: ignore[attr-defined]
            token = _SERVER_HOSTNAME.set(tls_name if scheme == "https" else None)
            try:
                response = super(LBAdapter, self).send(
                    sent,
                    stream=True,
                    timeout=_clip(timeout, plan),
                    verify=verify,
                    cert=cert,
                    proxies={},
                )
                if _buffers(plan, response, policy.buffer_limit):
                    _ = response.content  # read here, so a failure mid-body can be retried
            except requests.RequestException as exc:
                plan.failed(
                    backend, classify(exc), exc, timed_out=isinstance(exc, requests.Timeout)
                )
                raise
            finally:
                _SERVER_HOSTNAME.reset(token)
            plan.responded(backend, response.status_code)
            failing = response.status_code in policy.failure_statuses
            if response._content_consumed:  # type: ignore[attr-defined]
                if not failing:
                    common.balancer.report(backend, True)
            else:
                done = [failing]

                def report(ok: bool) -> None:
                    if not done[0]:
                        done[0] = True
                        common.balancer.report(backend, ok)

                response.raw = _ReportingRaw(response.raw, report)
            response.url = url
            response.request = request
            return response

        try:
            return run_sync(plan, first, attempt, requests.Response.close)
        except requests.RequestException as exc:
            raise common.final_error(exc, plan, request) from exc

    def close(self) -> None:
        """Close the connection pools, and stop the health checks this adapter started."""
        self._common.stop_checks()
        super().close()

def _replayable(body: object) -> bool:
    return body is None or isinstance(body, (bytes, str))


def _budget(timeout: Any) -> float | None:
    if isinstance(timeout, tuple):
        return budget_of(timeout)
    if isinstance(timeout, (int, float)):
        return float(timeout)
    return None


def _clip(timeout: Any, plan: RequestPlan) -> Any:
    if not plan.attempts or plan.budget is None:
        return timeout
    if isinstance(timeout, tuple):
        return tuple(plan.clip(v) for v in timeout)
    return plan.clip(float(timeout))


def _buffers(plan: RequestPlan, response: requests.Response, limit: int) -> bool:
    if plan.method == "HEAD" or not plan.retries_maybe_sent():
        return False
    length = response.headers.get("Content-Length", "")
    return length.isdigit() and int(length) <= limit
