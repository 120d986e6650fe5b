"""The attempt loop: the first attempt, failover through tenacity, and the hedged loop.

What lives here: :func:`run_sync` and :func:`run_async`, which every adapter calls once per
request. They start the request's plan (through its adapter's configuration), send the first
attempt through the adapter's :class:`Wire`, record what it saw on the plan (the loop owns every
outcome: an adapter's wire sends one attempt and returns what it saw), and, when that attempt
failed and the plan may retry, run the remaining attempts in a tenacity ``Retrying``
(``AsyncRetrying`` for the async transport, sleeping through anyio so trio works) made of the
plan's answers: ``retry`` (is this outcome retried, for this method?), ``stop`` (attempts,
candidates, the deadline; the retry budget is spent by the plan's ``take``), ``wait`` (none
before a new backend, full-jitter backoff before a revisit, ``Retry-After``) and ``before``
(take the next backend from the fallback order). A request whose first attempt succeeds
touches no tenacity object. A policy's own tenacity strategies join lbclient's (``stop`` with
``|``, ``retry`` with ``&``, ``wait`` the longer of the two) and can never make the loop retry
what the plan refuses. Hedged requests (``hedge_after``) run their own loop of racing attempts.
Also here, once for both clients: the body wrapper's reporting rule (:class:`ReportingBody`),
the trace-header merge (:func:`merge_headers`) and the final error's message
(:func:`final_text`).

What may not: an HTTP client (the wire translates), a health or retry rule (the plan's), or
the balancer (the plan talks to it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import anyio
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from lbclient._plan import Fault, RequestPlan, Timeouts
from lbclient.backend import Backend

if TYPE_CHECKING:
    from lbclient._config import AdapterConfig

__all__ = [
    "AsyncWire",
    "ReportingBody",
    "Wire",
    "drive_async",
    "drive_sync",
    "final_text",
    "merge_headers",
    "name_backend",
    "run_async",
    "run_sync",
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


class Wire(Protocol[_R_co]):
    """An adapter's part of one request: its facts, the I/O of one attempt, and its client's
    words. Every outcome is recorded by the loop, never by the wire."""

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

    def retry_after(self, response: Any) -> str | None:
        """The response's ``Retry-After`` header, if it has one."""
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


class AsyncWire(Protocol[_R_co]):
    """The async twin of :class:`Wire`."""

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

    async def send(
        self,
        backend: Backend,
        timeouts: Timeouts | None,
        headers: Mapping[str, str] | None,
        buffer: int,
    ) -> tuple[int, _R_co, ReportingBody | None]: ...

    def retry_after(self, response: Any) -> str | None: ...

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


def _final(plan: RequestPlan, wire: Wire[Any] | AsyncWire[Any], error: Exception) -> Exception:
    final = wire.final(error, plan.describe())
    final.attempts = tuple(plan.attempts)  # type: ignore[attr-defined]
    return final


def _recorded(plan: RequestPlan, error: BaseException) -> bool:
    """Whether ``error`` is the failure the plan recorded last (not a bug or a cancellation)."""
    attempts = plan.attempts
    return bool(attempts) and attempts[-1].error is error


def _received(
    plan: RequestPlan,
    wire: Wire[Any] | AsyncWire[Any],
    backend: Backend,
    status: int,
    response: Any,
    body: ReportingBody | None,
) -> None:
    """Record a response head on the plan, and hand its body's report to the body."""
    after = wire.retry_after(response) if status in plan.policy.retry_statuses else None
    plan.responded(backend, status, after)
    report = plan.reporter(backend)
    if body is None:
        report(True)
    else:
        body.report = report


def _limits(plan: RequestPlan, backend: Backend, wire: Wire[Any] | AsyncWire[Any]) -> Any:
    given = wire.timeouts
    policy = plan.policy
    if given is None or (policy.attempt_timeout is None and policy.deadline is None):
        return given
    return plan.timeouts(given, backend)


# -- one attempt --------------------------------------------------------------------------------


def _send_sync(plan: RequestPlan, wire: Wire[_R], backend: Backend) -> tuple[int, _R]:
    """Send one attempt to ``backend`` and record what it saw. A failure is recorded and its
    error raised; anything else raised (a bug, an interruption) ends the attempt unrecorded."""
    headers = plan.headers(backend) if plan.propagates else None
    try:
        status, response, body = wire.send(
            backend, _limits(plan, backend, wire), headers, plan.buffer_limit()
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
    _received(plan, wire, backend, status, response, body)
    return status, response


async def _send_async(
    plan: RequestPlan, wire: AsyncWire[_R], backend: Backend
) -> tuple[int, _R]:
    """The async twin of :func:`_send_sync`."""
    headers = plan.headers(backend) if plan.propagates else None
    try:
        status, response, body = await wire.send(
            backend, _limits(plan, backend, wire), headers, plan.buffer_limit()
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
    _received(plan, wire, backend, status, response, body)
    return status, response


# -- the request ----------------------------------------------------------------------------------


def run_sync(config: AdapterConfig[Any], wire: Wire[_R]) -> _R:
    """One request through ``config``'s balancer: its plan, the first attempt, and failover.

    Returns the last response (a retried status included, when no retry is left), or raises
    the wire's final error for the last failure.
    """
    if config.services_pending:
        config.start_services()
    plan, first = config.start(wire)
    watch = plan.watch
    if watch is None:
        return drive_sync(plan, first, wire)
    try:
        result = drive_sync(plan, first, wire)
    except BaseException as error:
        watch.ended(plan, None, error)  # type: ignore[arg-type]
        raise
    watch.ended(plan, result, None)  # type: ignore[arg-type]
    return result


async def run_async(config: AdapterConfig[Any], wire: AsyncWire[_R]) -> _R:
    """The async twin of :func:`run_sync` (asyncio or trio); hedges when the plan says so."""
    if config.services_pending:
        await config.astart_services()
    plan, first = config.start(wire)
    watch = plan.watch
    if watch is None:
        return await drive_async(plan, first, wire)
    try:
        result = await drive_async(plan, first, wire)
    except BaseException as error:
        watch.ended(plan, None, error)  # type: ignore[arg-type]
        raise
    watch.ended(plan, result, None)  # type: ignore[arg-type]
    return result


def drive_sync(plan: RequestPlan, first: Backend, wire: Wire[_R]) -> _R:
    """Send the request to ``first``; if that fails and the plan may retry, fail over through
    a tenacity ``Retrying``."""
    try:
        status, response = _send_sync(plan, wire, first)
    except Exception as error:
        if not _recorded(plan, error):
            raise
        if not plan.may_retry():
            raise _final(plan, wire, error) from error
        failover = _Failover(plan, wire, None, error)
    else:
        if not plan.retries_status(status) or not plan.may_retry():
            return response
        failover = _Failover(plan, wire, response, None)
    retrying = Retrying(sleep=_sleep, **failover.strategies())
    try:
        return retrying(failover.attempt)
    except Exception as error:
        if _recorded(plan, error):
            raise _final(plan, wire, error) from error
        raise


async def drive_async(plan: RequestPlan, first: Backend, wire: AsyncWire[_R]) -> _R:
    """The async twin of :func:`drive_sync`, or the hedged loop for a hedged request."""
    if plan.hedging:
        from lbclient._hedge import hedged

        return await hedged(plan, first, wire)
    try:
        status, response = await _send_async(plan, wire, first)
    except Exception as error:
        if not _recorded(plan, error):
            raise
        if not plan.may_retry():
            raise _final(plan, wire, error) from error
        failover = _Failover(plan, wire, None, error)
    else:
        if not plan.retries_status(status) or not plan.may_retry():
            return response
        failover = _Failover(plan, wire, response, None)
    retrying = AsyncRetrying(sleep=_asleep, **failover.strategies())
    try:
        return await retrying(failover.aattempt)
    except Exception as error:
        if _recorded(plan, error):
            raise _final(plan, wire, error) from error
        raise


def _sleep(seconds: float) -> None:
    if seconds > 0:  # time.sleep(0) still costs a system call and a reschedule
        time.sleep(seconds)


async def _asleep(seconds: float) -> None:
    if seconds > 0:
        await anyio.sleep(seconds)


def _outcome(state: RetryCallState) -> Any:
    """When the stop strategy stops: the last outcome stands (its response, or its error)."""
    assert state.outcome is not None
    return state.outcome.result()


# -- failover: the plan's answers as tenacity strategies ---------------------------------------


class _Failover(Generic[_R]):
    """The remaining attempts of one request, as tenacity runs them.

    Tenacity's attempt 1 is the request's first attempt, already made: it is replayed (its
    response returned, or its error raised, again), so that tenacity's attempt numbers and
    the user's strategies count the request's attempts. Every later attempt's backend is taken
    from the plan in ``before``, after the wait."""

    __slots__ = ("_backend", "_error", "_over", "_response", "_waits", "plan", "wire")

    def __init__(
        self,
        plan: RequestPlan,
        wire: Wire[_R] | AsyncWire[_R],
        response: _R | None,
        error: Exception | None,
    ) -> None:
        self.plan = plan
        self.wire = wire
        #: The outcome an attempt with no backend replays: the last response, or error.
        self._response = response
        self._error = error
        self._backend: Backend | None = None
        #: Set once ``take`` found nothing: the last outcome stands.
        self._over = False
        #: The wait before each attempt, by attempt number, drawn once.
        self._waits: dict[int, float] = {}

    def strategies(self) -> dict[str, Any]:
        """Tenacity's ``stop``, ``wait``, ``retry``, ``before`` and hooks for this request: the
        plan's, joined by the policy's own."""
        policy = self.plan.policy
        stop: stop_base = _Stop(self)
        if policy.stop is not None:
            stop = stop | _Theirs(self.plan, policy.stop)
        retry: retry_base = _Retry(self)
        if policy.retry is not None:
            retry = retry & _TheirRetry(self.plan, policy.retry)
        return {
            "stop": stop,
            "wait": _Wait(self),
            "retry": retry,
            "before": self.before,
            "before_sleep": policy.before_sleep,
            "after": policy.after,
            "retry_error_callback": _outcome,
        }

    def wait_for(self, state: RetryCallState) -> float:
        """The wait before the attempt after ``state``'s: the longer of the plan's and the
        policy's own, none while the retry budget has nothing to give (``take`` will say so
        without a useless wait). Drawn once per attempt."""
        number = state.attempt_number
        wait = self._waits.get(number)
        if wait is None:
            plan = self.plan
            wait = plan.wait() if plan.affordable() else 0.0
            theirs = plan.policy.wait
            if theirs is not None:
                wait = max(wait, float(theirs(state)))
            self._waits[number] = wait
        return wait

    def before(self, state: RetryCallState) -> None:
        """Before each attempt: take its backend from the plan (the first attempt's was taken
        when the request began)."""
        if state.attempt_number == 1:
            if self.plan.clock is time.monotonic:  # the user's stop_after_delay: from the start
                state.start_time = self.plan.start
            return
        backend = self.plan.take(waited=True)
        if backend is None:
            self._over = True
        self._backend = backend

    def _next(self) -> Backend | None:
        backend, self._backend = self._backend, None
        if backend is None:  # the first attempt, or nothing left to take: replay
            if self._error is not None:
                raise self._error
            return None
        return backend

    def attempt(self) -> _R:
        backend = self._next()
        if backend is None:
            return self._response  # type: ignore[return-value]
        wire: Wire[_R] = self.wire  # type: ignore[assignment]
        self._discard()
        try:
            _status, response = _send_sync(self.plan, wire, backend)
        except Exception as error:
            self._error = error
            raise
        self._response = response
        return response

    async def aattempt(self) -> _R:
        backend = self._next()
        if backend is None:
            return self._response  # type: ignore[return-value]
        wire: AsyncWire[_R] = self.wire  # type: ignore[assignment]
        retried, self._response = self._response, None
        self._error = None
        if retried is not None:
            await wire.discard(retried)
        try:
            _status, response = await _send_async(self.plan, wire, backend)
        except Exception as error:
            self._error = error
            raise
        self._response = response
        return response

    def _discard(self) -> None:
        """Close the retried response before the next attempt."""
        response, self._response = self._response, None
        self._error = None
        if response is not None:
            self.wire.discard(response)


class _Retry(retry_base):
    """lbclient's ``retry``: whether the outcome is one the plan retries (a failure of the
    attempt that may be resent for this method, or a status to retry)."""

    def __init__(self, failover: _Failover[Any]) -> None:
        self.failover = failover

    def __call__(self, state: RetryCallState) -> bool:
        failover = self.failover
        plan = failover.plan
        if failover._over:
            return False
        outcome = state.outcome
        assert outcome is not None
        error = outcome.exception() if outcome.failed else None
        if error is not None and not _recorded(plan, error):
            return False  # a bug or a cancellation: it propagates as it is
        reason = plan.outcome_refusal(plan.attempts[-1])
        if reason:
            plan.stopped = reason
        return not reason


class _Stop(stop_base):
    """lbclient's ``stop``: out of attempts, no candidate left, or the deadline leaves no
    useful time after the wait."""

    def __init__(self, failover: _Failover[Any]) -> None:
        self.failover = failover

    def __call__(self, state: RetryCallState) -> bool:
        failover = self.failover
        plan = failover.plan
        reason = plan.limit_refusal(failover.wait_for(state))
        if reason:
            plan.stopped = reason
        return bool(reason)


class _Theirs(stop_base):
    """A policy's own ``stop``, noting in the plan that it stopped the request."""

    def __init__(self, plan: RequestPlan, stop: Callable[[RetryCallState], bool]) -> None:
        self.plan = plan
        self.stop = stop

    def __call__(self, state: RetryCallState) -> bool:
        if self.stop(state):
            self.plan.stopped = f"the policy's stop strategy {self.stop!r} stopped it"
            return True
        return False


class _TheirRetry(retry_base):
    """A policy's own ``retry``, asked only of outcomes lbclient would retry, noting in the
    plan when it does not retry one."""

    def __init__(self, plan: RequestPlan, retry: Callable[[RetryCallState], bool]) -> None:
        self.plan = plan
        self.retry = retry

    def __call__(self, state: RetryCallState) -> bool:
        if self.retry(state):
            return True
        self.plan.stopped = f"the policy's retry strategy {self.retry!r} did not retry it"
        return False


class _Wait(wait_base):
    """lbclient's ``wait``, the policy's own folded in (see :meth:`_Failover.wait_for`)."""

    def __init__(self, failover: _Failover[Any]) -> None:
        self.failover = failover

    def __call__(self, state: RetryCallState) -> float:
        return self.failover.wait_for(state)

