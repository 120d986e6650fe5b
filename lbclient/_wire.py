"""The wire, and one attempt through it.

What lives here: what an adapter gives the loop for one request (:class:`Wire`,
:class:`AsyncWire`: the request's facts, the I/O of one attempt, its client's words), what every
adapter's wire builds on, once for both clients (:class:`ReportingBody`, the body wrappers'
reporting rule; :func:`merge_headers`, the trace-header merge; :func:`final_text`, the final
error's message; :func:`closed_after_failure`, the final error when the adapter's close kept an
attempt back; :class:`Limits`, an attempt's limits as its I/O applies them, and :data:`BOUND`,
the limits of the I/O running now), and how the loop sends one attempt and records what it saw
on the plan (:func:`send_sync`, :func:`send_async`): the wire sends and returns what it saw, the
loop records, never the wire.

What may not: an HTTP client (the adapters translate), a retry or health rule (the plan's), or
deciding what happens next (the loop's).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

from lbclient._plan import Fault, RequestPlan, Timeouts
from lbclient.backend import Backend
from lbclient.errors import TransportClosed
from lbclient.reports import PREQUAL_LATENCY_HEADER, PREQUAL_RIF_HEADER, REPORT_HEADER

__all__ = [
    "BOUND",
    "AsyncWire",
    "Facts",
    "Limits",
    "ReportingBody",
    "Wire",
    "closed_after_failure",
    "final",
    "final_text",
    "merge_headers",
    "name_backend",
    "recorded",
    "send_async",
    "send_sync",
    "within",
]

_R = TypeVar("_R")
_R_co = TypeVar("_R_co", covariant=True)
_H = TypeVar("_H", str, bytes)
_C = TypeVar("_C")


class Limits:
    """One attempt's limits, as its wire applies them. Up to the response head: the client's
    per-operation timeouts capped by ``attempt_timeout`` and the deadline (:attr:`timeouts`),
    and a time (:attr:`until`, on ``time.monotonic``'s clock) by which every connect, write and
    read must end, however slowly the bytes come. From the head on (:meth:`body`), however the
    body is read (by lbclient inside the attempt, by the client, or streamed by the caller): the
    client's own per-operation timeouts, and the deadline's end, if there is a deadline."""

    __slots__ = ("deadline", "ends", "given", "read", "timeouts", "until")

    def __init__(
        self,
        given: Timeouts,
        timeouts: Timeouts,
        cap: float | None,
        left: float | None,
        deadline: float | None,
    ) -> None:
        now = time.monotonic()
        #: The client's own per-operation timeouts.
        self.given = given
        #: The per-operation timeouts that apply now, and the read timeout among them.
        self.timeouts = timeouts
        self.read = timeouts.get("read")
        #: When the I/O that runs now must end (None: no end but the per-operation timeouts).
        self.until = None if cap is None else now + cap
        #: When the deadline runs out (None: no deadline), and its seconds.
        self.ends = None if left is None else now + left
        self.deadline = deadline

    def body(self) -> Timeouts:
        """The response head came: from now on, the client's own per-operation timeouts (which
        are returned) and the deadline's end."""
        self.timeouts = given = self.given
        self.read = given.get("read")
        self.until = self.ends
        return given

    def expired(self) -> bool:
        """Whether the deadline has run out: a timeout now was its doing."""
        ends = self.ends
        return ends is not None and time.monotonic() >= ends - 0.001


#: The limits of the attempt whose I/O runs now in this thread or task (None: none). Set by
#: the wires around their I/O; read by each client's bounded I/O (:mod:`lbclient._pools`,
#: :mod:`lbclient._requests_timeouts`).
BOUND: ContextVar[Limits | None] = ContextVar("lbclient_bound", default=None)


def within(until: float, timeout: float | None, error: Callable[[str], BaseException]) -> float:
    """``timeout``, the seconds one operation may take (None: no limit), shortened to what is
    left before ``until``; when nothing is, ``error("timed out")`` is raised instead."""
    left = until - time.monotonic()
    if left <= 0:
        raise error("timed out")
    return left if timeout is None or left < timeout else timeout


def bounded(chunks: Iterable[_C], limits: Limits) -> Iterator[_C]:
    """``chunks`` (a body's), each read with :data:`BOUND` set to ``limits``, and unset
    again before the chunk goes to the caller."""
    iterator = iter(chunks)
    while True:
        token = BOUND.set(limits)
        try:
            chunk = next(iterator, None)
        finally:
            BOUND.reset(token)
        if chunk is None:
            return
        yield chunk


def abounded(chunks: AsyncIterable[_C], limits: Limits) -> AsyncIterator[_C]:
    """The async twin of :func:`bounded` (an iterator, not an async generator: nothing to
    finalize when the caller stops early)."""
    return _ABounded(aiter(chunks), limits)


class _ABounded(AsyncIterator[_C]):
    __slots__ = ("_iterator", "_limits")

    def __init__(self, iterator: AsyncIterator[_C], limits: Limits) -> None:
        self._iterator = iterator
        self._limits = limits

    async def __anext__(self) -> _C:
        token = BOUND.set(self._limits)
        try:
            return await anext(self._iterator)
        finally:
            BOUND.reset(token)


class ReportingBody:
    """A response body as the caller reads it, for an adapter's body wrapper to build on: read
    to the end, or closed unread, it reports a success; a failure while reading reports a
    failure (and the error names the backend), but a timeout once the deadline ran out, which
    is the deadline's (and says so); closed part-read, neither. The loop sets :attr:`report`
    before the response reaches the caller, the wire :attr:`limits` when the attempt had any;
    ``after`` (the adapter's: free a place in a connection pool) runs once when the body is
    done, whatever happened."""

    __slots__ = ("_after", "_started", "limits", "report")

    def __init__(self, after: Callable[[], object] | None = None) -> None:
        #: Set by the loop: reports the body's end through the request's plan.
        self.report: Callable[[bool | None], None] | None = None
        #: Set by the wire: the attempt's limits, if it had any.
        self.limits: Limits | None = None
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

    def _fail(self, error: BaseException, timed_out: bool = False) -> BaseException:
        """Reading failed with ``error`` (``timed_out``: a timeout): report it, and return it
        naming the backend."""
        backend = getattr(self.report, "backend", None)
        limits = self.limits
        why = ""
        if timed_out and limits is not None and limits.expired():
            why = f"the deadline of {limits.deadline:g} s ran out "
            self._end(None)  # not the backend's failure
        else:
            self._end(False)
        return error if backend is None else name_backend(error, backend, why)


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
        limits: Limits | None,
        headers: Mapping[str, str] | None,
        buffer: int,
    ) -> tuple[int, _R_co, ReportingBody | None]:
        """Send the request to ``backend`` within these ``limits`` (None: the client's own
        timeouts; else its I/O runs with :data:`BOUND` set to them, and from the response head
        on, as :meth:`Limits.body` says, the body wrapper's ``limits`` included) and
        ``headers`` added (replacing the caller's of the same name; see
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
        limits: Limits | None,
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


def name_backend(error: BaseException, backend: Backend, why: str = "") -> BaseException:
    """``error`` (raised while reading a response body) with the backend named in its message
    (after ``why``, if given), keeping its class and its other arguments."""
    where = f"({why}while reading the response body from backend {backend.address})"
    if error.args and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]} {where}", *error.args[1:])
    else:
        error.args = (*error.args, where)
    return error


def final(plan: RequestPlan, wire: Wire[Any] | AsyncWire[Any], error: Exception) -> Exception:
    final = wire.final(error, plan.describe())
    final.attempts = tuple(plan.attempts)  # type: ignore[attr-defined]
    return final


def closed_after_failure(
    plan: RequestPlan, wire: Wire[Any] | AsyncWire[Any], error: Exception
) -> None:
    """An attempt could not start, raising ``error``: if that is because the adapter was
    closed (:class:`~lbclient.errors.TransportClosed`) and an earlier attempt failed, raise
    the final error of the last failure (the client's own class, as if no retry had been
    allowed), the close noted as why there was no other attempt."""
    if not isinstance(error, TransportClosed):
        return
    last = next((a.error for a in reversed(plan.attempts) if a.error is not None), None)
    if isinstance(last, Exception):
        plan.stopped = str(error)
        raise final(plan, wire, last) from last


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
    """The limits of the attempt about to start on ``backend``, or None without any."""
    policy = plan.policy
    if policy.attempt_timeout is None and policy.deadline is None:
        return None
    given = wire.timeouts or {}
    cap, _ = plan.limit()
    return Limits(given, plan.timeouts(given, backend), cap, plan.remaining(), policy.deadline)


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
