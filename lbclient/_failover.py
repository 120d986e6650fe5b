"""Failover through tenacity: the plan's answers as tenacity strategies.

What lives here: :class:`Failover`, the remaining attempts of one request as a tenacity
``Retrying`` (or ``AsyncRetrying``) runs them, made for that request only (a controller is not
shared between tasks). Its strategies are the plan's answers: ``retry`` (is this outcome
retried, for this method?), ``stop`` (attempts, candidates, the deadline after the wait),
``wait`` (none before a new backend, full-jitter backoff before a revisit, ``Retry-After``) and
``before`` (take the next backend from the fallback order; the plan's ``take`` spends from the
retry budget, or finds it empty). A policy's own tenacity strategies join them: ``stop`` with
``|``, ``retry`` with ``&``, ``wait`` the longer of the two, and its ``before_sleep`` and
``after`` hooks; none can make the loop retry what the plan refuses. Sleeps of zero are skipped
(a zero sleep still costs a system call), and async sleeps go through anyio, so trio works.

What may not: a rule of its own (the strategies only ask the plan), an HTTP client, or the
hedged race (:mod:`lbclient._hedge`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
from tenacity import RetryCallState, retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from lbclient._plan import RequestPlan
from lbclient._wire import AsyncWire, Wire, recorded, send_async, send_sync
from lbclient.backend import Backend

__all__ = ["Failover", "asleep", "sleep"]

_R = TypeVar("_R")


def sleep(seconds: float) -> None:
    if seconds > 0:  # time.sleep(0) still costs a system call and a reschedule
        time.sleep(seconds)


async def asleep(seconds: float) -> None:
    if seconds > 0:
        await anyio.sleep(seconds)


def _outcome(state: RetryCallState) -> Any:
    """When the stop strategy stops: the last outcome stands (its response, or its error)."""
    assert state.outcome is not None
    return state.outcome.result()


class Failover(Generic[_R]):
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
            _status, response = send_sync(self.plan, wire, backend)
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
            _status, response = await send_async(self.plan, wire, backend)
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

    def __init__(self, failover: Failover[Any]) -> None:
        self.failover = failover

    def __call__(self, state: RetryCallState) -> bool:
        failover = self.failover
        plan = failover.plan
        if failover._over:
            return False
        outcome = state.outcome
        assert outcome is not None
        error = outcome.exception() if outcome.failed else None
        if error is not None and not recorded(plan, error):
            return False  # a bug or a cancellation: it propagates as it is
        reason = plan.outcome_refusal(plan.attempts[-1])
        if reason:
            plan.stopped = reason
        return not reason


class _Stop(stop_base):
    """lbclient's ``stop``: out of attempts, no candidate left, or the deadline leaves no
    useful time after the wait."""

    def __init__(self, failover: Failover[Any]) -> None:
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
    """lbclient's ``wait``, the policy's own folded in (see :meth:`Failover.wait_for`)."""

    def __init__(self, failover: Failover[Any]) -> None:
        self.failover = failover

    def __call__(self, state: RetryCallState) -> float:
        return self.failover.wait_for(state)
