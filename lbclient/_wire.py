"""The wire, and one attempt through it.

What lives here: what an adapter gives the loop for one request (:class:`Wire`,
:class:`AsyncWire`: the request's facts, the I/O of one attempt, its client's words), what every
adapter's wire builds on, once for both clients (:class:`ReportingBody`, the body wrappers'
reporting rule; :func:`merge_headers`, the trace-header merge; :func:`final_text`, the final
error's message), and how the loop sends one attempt and records what it saw on the plan
(:func:`send_sync`, :func:`send_async`): the wire sends and returns what it saw, the loop
records, never the wire.

What may not: an HTTP client (the adapters translate), a retry or health rule (the plan's), or
deciding what happens next (the loop's).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from lbclient._plan import Fault, RequestPlan, Timeouts
from lbclient.backend import Backend
from lbclient.reports import PREQUAL_LATENCY_HEADER, PREQUAL_RIF_HEADER, REPORT_HEADER

__all__ = [
    "AsyncWire",
    "Facts",
    "ReportingBody",
    "Wire",
    "final",
    "final_text",
    "merge_headers",
    "name_backend",
    "recorded",
    "send_async",
    "send_sync",
]

_R = TypeVar("_R")
_R_co = TypeVar("_R_co", covariant=True)
_H = TypeVar("_H", str, bytes)


class ReportingBody:
    """A response body as the caller reads it, for an adapter's body wrapper to build on: read
    to the end, or closed unread, it reports a success; a failure while reading reports a
    failure (and the error names the backend); closed part-read, neither. The loop sets
    :attr:`report` before the response reaches the caller; ``after`` (the adapter's: free a
    place in a connection pool) runs once when the body is done, whatever happened."""

    __slots__ = ("_after", "_started", "report")

    def __init__(self, after: Callable[[], object] | None = None) -> None:
        #: Set by the loop: reports the body's end through the request's plan.
        self.report: Callable[[bool | None], None] | None = None
        self._after = after
        self._started = False

    def _begin(self) -> None:
        """The caller started reading."""
        self._started = True

    def _end(self, ok: bool | None) -> None:
        report, self.report = self.report, None
        if report is not None:
            report(ok)
        after, self._after = self._after, None
        if after is not None:
            after()

    def _close(self) -> None:
        """The caller closed the body: unread, a success; part-read, neither."""
        self._end(None if self._started else True)

    def _fail(self, error: BaseException) -> BaseException:
        """Reading failed with ``error``: report it, and return it naming the backend."""
        backend = getattr(self.report, "backend", None)
        self._end(False)
        return error if backend is None else name_backend(error, backend)


class Facts(Protocol):
    """What the loop and the adapter's configuration read of one request."""

    @property
    def request(self) -> object:
        """The caller's request (for the key function, observers and errors)."""

    @property
    def method(self) -> str:
        """The request's method, upper case."""

    @property
    def url(self) -> object:
        """The request's URL, or an object whose ``str()`` is (made only when needed)."""

    @property
    def replayable(self) -> bool:
        """Whether its body can be sent again."""

    @property
    def timeouts(self) -> Timeouts | None:
        """The client's own per-operation timeouts, or None when it gives none to cap."""

    @property
    def options(self) -> object:
        """This request's :class:`~lbclient.RequestOptions` (or a mapping of them), or None."""


class Wire(Facts, Protocol[_R_co]):
    """An adapter's part of one request: its facts, the I/O of one attempt, and its client's
    words. Every outcome is recorded by the loop, never by the wire."""

    def send(
        self,
        backend: Backend,
        timeouts: Timeouts | None,
        headers: Mapping[str, str] | None,
        buffer: int,
    ) -> tuple[int, _R_co, ReportingBody | None]:
        """Send the request to ``backend`` with these ``timeouts`` (None: the client's own)
        and ``headers`` added (replacing the caller's of the same name; see
        :func:`merge_headers`), reading the body inside the attempt when its
        ``Content-Length`` is at most ``buffer``. Return the status, the response, and the
        body wrapper that reports a streamed body's end (None when the body was read); raise
        the client's own error for a failure."""
        ...

    def header(self, response: Any, name: str) -> str | None:
        """The value of the response's header ``name`` (lower case), if it has one."""
        ...

    def fault(self, error: Exception) -> Fault | None:
        """How ``error`` failed, or None if it is not a failure of the attempt (a bug, a
        cancellation): then it propagates as it is."""
        ...

    def discard(self, response: Any) -> None:
        """Close a response that is retried."""
        ...

    def final(self, error: Exception, summary: str) -> Exception:
        """The error for the caller when the last attempt failed with ``error``: of its class,
        its message the client's own followed by ``summary`` (see :func:`final_text`)."""
        ...


class AsyncWire(Facts, Protocol[_R_co]):
    """The async twin of :class:`Wire`."""

    async def send(
        self,
        backend: Backend,
        timeouts: Timeouts | None,
        headers: Mapping[str, str] | None,
        buffer: int,
    ) -> tuple[int, _R_co, ReportingBody | None]: ...

    def header(self, response: Any, name: str) -> str | None: ...

    def fault(self, error: Exception) -> Fault | None: ...

    async def discard(self, response: Any) -> None: ...

    def final(self, error: Exception, summary: str) -> Exception: ...


# -- once for both clients --------------------------------------------------------------------


def final_text(own: str, summary: str) -> str:
    """The final error's message, for every client: the client's own message for the last
    failure, then ``; `` and lbclient's summary of every attempt (the summary alone when the
    client's message is empty)."""
    return f"{own}; {summary}" if own else summary


def merge_headers(
    headers: list[tuple[_H, _H]], extra: Mapping[str, str], encode: Callable[[str], _H]
) -> list[tuple[_H, _H]]:
    """``headers`` with ``extra`` (an attempt's trace context) in place of the caller's headers
    of the same names, compared case-insensitively; ``encode`` makes a name or value of the
    client's kind (str or bytes)."""
    names = {encode(name).lower() for name in extra}
    merged = [(n, v) for n, v in headers if n.lower() not in names]
    merged.extend((encode(n), encode(v)) for n, v in extra.items())
    return merged


def name_backend(error: BaseException, backend: Backend) -> BaseException:
    """``error`` (raised while reading a response body) with the backend named in its message,
    keeping its class and its other arguments."""
    where = f"(while reading the response body from backend {backend.address})"
    if error.args and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]} {where}", *error.args[1:])
    else:
        error.args = (*error.args, where)
    return error


def final(plan: RequestPlan, wire: Wire[Any] | AsyncWire[Any], error: Exception) -> Exception:
    final = wire.final(error, plan.describe())
    final.attempts = tuple(plan.attempts)  # type: ignore[attr-defined]
    return final


def recorded(plan: RequestPlan, error: BaseException) -> bool:
    """Whether ``error`` is the failure the plan recorded last (not a bug or a cancellation)."""
    attempts = plan.attempts
    return bool(attempts) and attempts[-1].error is error


def received(
    plan: RequestPlan,
    wire: Wire[Any] | AsyncWire[Any],
    backend: Backend,
    status: int,
    response: Any,
    body: ReportingBody | None,
) -> None:
    """Record a response head on the plan (and its load report, when one was asked for), and
    hand its body's report to the body."""
    header = wire.header
    if plan.asks is not None:
        plan.loaded(
            backend,
            header(response, REPORT_HEADER),
            header(response, PREQUAL_RIF_HEADER),
            header(response, PREQUAL_LATENCY_HEADER),
        )
    after = header(response, "retry-after") if status in plan.policy.retry_statuses else None
    plan.responded(backend, status, after)
    report = plan.reporter(backend)
    if body is None:
        report(True)
    else:
        body.report = report


def limits(plan: RequestPlan, backend: Backend, wire: Wire[Any] | AsyncWire[Any]) -> Any:
    given = wire.timeouts
    policy = plan.policy
    if given is None or (policy.attempt_timeout is None and policy.deadline is None):
        return given
    return plan.timeouts(given, backend)


# -- one attempt --------------------------------------------------------------------------------


def send_sync(plan: RequestPlan, wire: Wire[_R], backend: Backend) -> tuple[int, _R]:
    """Send one attempt to ``backend`` and record what it saw. A failure is recorded and its
    error raised; anything else raised (a bug, an interruption) ends the attempt unrecorded."""
    headers = plan.headers(backend) if plan.propagates else plan.asks
    try:
        status, response, body = wire.send(
            backend, limits(plan, backend, wire), headers, plan.buffer_limit()
        )
    except Exception as error:
        fault = wire.fault(error)
        if fault is None:
            plan.abandon(backend)
        else:
            plan.failed(backend, fault, error)
        raise
    except BaseException:
        plan.abandon(backend)
        raise
    received(plan, wire, backend, status, response, body)
    return status, response


async def send_async(plan: RequestPlan, wire: AsyncWire[_R], backend: Backend) -> tuple[int, _R]:
    """The async twin of :func:`_send_sync`."""
    headers = plan.headers(backend) if plan.propagates else plan.asks
    try:
        status, response, body = await wire.send(
            backend, limits(plan, backend, wire), headers, plan.buffer_limit()
        )
    except Exception as error:
        fault = wire.fault(error)
        if fault is None:
            plan.abandon(backend)
        else:
            plan.failed(backend, fault, error)
        raise
    except BaseException:  # cancelled or interrupted: no outcome to record
        plan.abandon(backend)
        raise
    received(plan, wire, backend, status, response, body)
    return status, response
