"""OpenTelemetry tracing: ``instrument(transport)``, with the ``otel`` extra
(``pip install 'lbclient[otel]'``).

One call per transport or adapter, nothing global: each attempt of its requests becomes a
client span, a child of the span current when the request was sent (the application's, or the
httpx or requests instrumentation's), named and attributed as the OpenTelemetry semantic
conventions for HTTP clients say:

* ``http.request.method`` (``_OTHER`` and ``http.request.method_original`` for a method the
  conventions do not know), ``server.address`` and ``server.port`` of the backend, ``url.full``
  (the backend's URL: never user information, and the values of signature parameters in the
  query read ``REDACTED``), ``http.response.status_code``, ``http.request.resend_count`` on
  every attempt after the first, ``error.type`` on failure (the exception's class name, or the
  status code from 400 up, with the span's status set to error);
* lbclient's own: ``lbclient.host`` (the logical host), ``lbclient.algorithm``,
  ``lbclient.attempt.kind`` (``first``, ``retry`` or ``hedge``), ``lbclient.probe`` on a probe
  request, ``lbclient.attempt.cancelled`` on a hedge that lost its race.

A span ends when its attempt does: its response body read or closed, or its failure. An
ejection or a restoration that an attempt's outcome caused is an event on its span
(``lbclient.backend.ejected``, ``lbclient.backend.restored``, with ``lbclient.backend`` and
``lbclient.reason``); a retry kept back by the retry budget is an event on the parent span
(``lbclient.retry_budget.exhausted``). No header value is ever recorded.

With ``propagate=True`` each attempt's request carries its own span's context, injected by the
globally configured propagator (W3C ``traceparent`` by default) in place of any the caller
set; without it, lbclient adds no header.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate as otel_propagate
    from opentelemetry import trace
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
except ImportError as exc:  # the extra is not installed
    raise ImportError(
        "lbclient.otel needs opentelemetry-api: pip install 'lbclient[otel]'"
    ) from exc

from lbclient import __version__
from lbclient._config import AdapterConfig, config_of
from lbclient._observe import attach, detach
from lbclient._plan import Fault, RequestPlan
from lbclient._redact import redact
from lbclient.backend import Backend
from lbclient.retry import Attempt

__all__ = ["Instrumentation", "instrument"]

#: Methods the HTTP semantic conventions know; others are ``_OTHER``.
KNOWN_METHODS: Final = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"}
)
#: Query parameters whose values ``url.full`` never shows (the conventions' list).
SECRET_PARAMETERS: Final = frozenset({"AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature"})


def _target(url: str) -> tuple[str, str, str]:
    """(scheme, logical host, path and query with secret values redacted) of ``url``."""
    parts = urlsplit(url)
    path = parts.path or "/"
    query = parts.query
    if query:
        pairs = []
        for pair in query.split("&"):
            name, equals, _value = pair.partition("=")
            pairs.append(f"{name}=REDACTED" if equals and name in SECRET_PARAMETERS else pair)
        path = f"{path}?{'&'.join(pairs)}"
    return parts.scheme or "http", parts.hostname or "", path


def _error_type(error: BaseException) -> str:
    """The class name of ``error``, as its package exports it where it does
    (``httpx.ConnectError``, not ``httpx._exceptions.ConnectError``)."""
    cls = type(error)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    top = module.partition(".")[0]
    if getattr(sys.modules.get(top), cls.__name__, None) is cls:
        module = top
    return f"{module}.{cls.__qualname__}"


class _Tracing:
    """The observer :func:`instrument` attaches: a :class:`_Trace` per request."""

    #: Its watches are told of every step.
    steps = True

    def __init__(self, tracer: Tracer, propagate: bool, algorithm: str) -> None:
        self.tracer = tracer
        self.propagate = propagate
        self.algorithm = algorithm

    def watch(self, plan: RequestPlan, request: object, url: object) -> _Trace:
        return _Trace(self, otel_context.get_current(), url, plan.method)


class _Trace:
    """One request's attempt spans, by backend (one attempt per backend at a time)."""

    __slots__ = (
        "_method",
        "_name",
        "_original",
        "_owner",
        "_parent",
        "_spans",
        "_url",
        "_where",
        "propagates",
    )

    #: Told of every step: each attempt is a span from its start to its body's end.
    steps = True

    def __init__(
        self, owner: _Tracing, parent: otel_context.Context, url: object, method: str
    ) -> None:
        self._owner = owner
        self.propagates = owner.propagate
        self._parent = parent
        self._spans: dict[Backend, Span] = {}
        self._url = url
        self._where: tuple[str, str, str] | None = None
        if method in KNOWN_METHODS:
            self._method, self._original, self._name = method, None, method
        else:
            self._method, self._original, self._name = "_OTHER", method, "HTTP"

    def attempt(
        self, plan: RequestPlan, backend: Backend, kind: str, resend: int, probe: bool
    ) -> None:
        stale = self._spans.pop(backend, None)
        if stale is not None:  # a response held back while its backend is tried again
            stale.end()
        owner = self._owner
        if self._where is None:
            self._where = _target(str(self._url))
        scheme, host, target = self._where
        address = backend.host[1:-1] if backend.host.startswith("[") else backend.host
        attributes: dict[str, Any] = {
            "http.request.method": self._method,
            "server.address": address,
            "server.port": backend.port,
            "url.full": f"{scheme}://{backend.address}{target}",
            "lbclient.host": host,
            "lbclient.algorithm": owner.algorithm,
            "lbclient.attempt.kind": kind,
        }
        if self._original is not None:
            attributes["http.request.method_original"] = self._original
        if resend:
            attributes["http.request.resend_count"] = resend
        if probe:
            attributes["lbclient.probe"] = True
        start = None
        if kind != "first" and plan.pause > 0:  # it starts after its backoff
            start = time.time_ns() + int(plan.pause * 1e9)
        self._spans[backend] = owner.tracer.start_span(
            self._name,
            context=self._parent,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=start,
        )

    def headers(self, plan: RequestPlan, backend: Backend) -> Mapping[str, str] | None:
        span = self._spans.get(backend)
        if span is None:
            return None
        carrier: dict[str, str] = {}
        otel_propagate.inject(carrier, context=trace.set_span_in_context(span, self._parent))
        return carrier

    def responded(self, plan: RequestPlan, backend: Backend, status: int, seconds: float) -> None:
        span = self._spans.get(backend)
        if span is None:
            return
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))

    def failed(self, plan: RequestPlan, backend: Backend, attempt: Attempt, fault: Fault) -> None:
        span = self._spans.pop(backend, None)
        if span is None:
            return
        error = attempt.error
        kind = _error_type(error) if error is not None else "_OTHER"
        span.set_attribute("error.type", kind)
        message = redact(str(error)) if error is not None else attempt.describe()
        span.add_event("exception", {"exception.type": kind, "exception.message": message})
        span.set_status(Status(StatusCode.ERROR, message))
        span.end()

    def finished(self, plan: RequestPlan, backend: Backend, ok: bool) -> None:
        span = self._spans.pop(backend, None)
        if span is None:
            return
        if not ok:
            span.set_attribute("error.type", "_OTHER")
            span.set_status(Status(StatusCode.ERROR, "the response body failed"))
        span.end()

    def abandoned(self, plan: RequestPlan, backend: Backend) -> None:
        span = self._spans.pop(backend, None)
        if span is not None:
            span.set_attribute("lbclient.attempt.cancelled", True)
            span.end()

    def health(self, plan: RequestPlan, backend: Backend, change: str, reason: str) -> None:
        span = self._spans.get(backend)
        if span is None or not span.is_recording():
            span = trace.get_current_span(self._parent)
        span.add_event(
            f"lbclient.backend.{change}",
            {"lbclient.backend": backend.address, "lbclient.reason": reason},
        )

    def refused(self, plan: RequestPlan, backend: Backend | None) -> None:
        attributes = {} if backend is None else {"lbclient.backend": backend.address}
        trace.get_current_span(self._parent).add_event(
            "lbclient.retry_budget.exhausted", attributes
        )

    def ended(self, plan: RequestPlan, result: object, error: BaseException | None) -> None:
        pass


class Instrumentation:
    """What :func:`instrument` did to one transport or adapter; :meth:`uninstrument` undoes
    it."""

    def __init__(self, client: AdapterConfig[Any], tracing: _Tracing) -> None:
        self._client: AdapterConfig[Any] | None = client
        self._tracing = tracing

    @property
    def propagate(self) -> bool:
        """Whether attempts carry their span's context to the backend."""
        return self._tracing.propagate

    def uninstrument(self) -> None:
        """Stop tracing (requests under way finish their spans). Idempotent."""
        client, self._client = self._client, None
        if client is not None:
            detach(client, self._tracing)

    def __repr__(self) -> str:
        state = "off" if self._client is None else f"propagate={self.propagate}"
        return f"<lbclient.otel.Instrumentation {state}>"


def instrument(
    target: object,
    *,
    propagate: bool = False,
    tracer_provider: TracerProvider | None = None,
) -> Instrumentation:
    """Trace every attempt of ``target`` (an :class:`~lbclient.LBTransport`, an
    :class:`~lbclient.AsyncLBTransport` or an :class:`~lbclient.LBAdapter`) as a client span.

    * ``propagate``: send each attempt's trace context to the backend in its request headers,
      with the globally configured propagator (False: no header is added).
    * ``tracer_provider``: where the spans go (None: the global tracer provider).

    Returns an :class:`Instrumentation`; ``uninstrument()`` undoes it. Instrumenting the same
    transport twice is a ValueError.
    """
    client = config_of(target)
    if client is None:
        raise TypeError(
            f"target must be an LBTransport, an AsyncLBTransport or an LBAdapter, got {target!r}"
        )
    if not isinstance(propagate, bool):
        raise TypeError(f"propagate must be a bool, got {propagate!r}")
    if any(isinstance(observer, _Tracing) for observer in client.observers):
        raise ValueError(f"{target!r} is already instrumented")
    tracer = trace.get_tracer("lbclient", __version__, tracer_provider=tracer_provider)
    tracing = _Tracing(tracer, propagate, type(client.balancer.algorithm).__name__)
    attach(client, tracing)
    return Instrumentation(client, tracing)
