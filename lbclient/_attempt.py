"""The attempt loop every adapter shares: a request's plan over the backends, and the loop (on
tenacity) that runs its attempts. Private: the adapters use it; users configure it through
:class:`~lbclient.retry.RetryPolicy`.

A request's walk over backends is a :class:`RequestPlan`: it knows the candidates in fallback
order, what was tried and why it failed, whether one more attempt is allowed, and how long to wait
before it. The adapters only translate: they classify their library's exceptions into a
:class:`~lbclient.retry.Failure` kind, do the I/O of one attempt, and build the final exception.
The rules themselves are described in :mod:`lbclient.retry`.

What may not: any HTTP client (the adapters translate their own exceptions and responses),
or the balancer's internals (only its public methods are used).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_result,
)

from lbclient.backend import Backend
from lbclient.balancer import LoadBalancer
from lbclient.errors import KeyFunctionError, NoBackendAvailable
from lbclient.health import Outcome
from lbclient.retry import Attempt, Failure, RetryPolicy
from lbclient.selection.base import AlgorithmLike

__all__ = [
    "Adapter",
    "RequestPlan",
    "budget_of",
    "policy_from",
    "run_async",
    "run_sync",
]

_T = TypeVar("_T")
_E = TypeVar("_E", bound=Exception)


@dataclass
class RequestPlan:
    """One request's walk over the balancer's backends. Sans-I/O, one per request.

    Candidates come in the balancer's fallback order for ``key``: ready backends first; then,
    only if attempts remain, backends that are enabled but not ready (a last resort, better than
    failing a request that a recovering backend could serve); then backends already tried, again
    in order, after a backoff.
    """

    balancer: LoadBalancer
    key: bytes
    method: str
    replayable: bool
    policy: RetryPolicy
    #: Seconds all attempts together may take; None for no limit.
    budget: float | None = None
    clock: Callable[[], float] = time.monotonic
    attempts: list[Attempt] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._start = self.clock()
        self._walk: Iterator[Backend] | None = None
        self._spares: list[Backend] = []
        self._pending: Backend | None = None
        self._revisits = 0
        self._retry_response = False
        self._delay: float | None = None
        self._clipped = False
        self._began = self._start

    # -- choosing backends -------------------------------------------------------------------

    def first(self) -> Backend | None:
        """The backend for the first attempt, or None if there is none."""
        backend = self.balancer.select(self.key)
        if backend is None:
            backend = self._untried()
        self._began = self.clock()
        return backend

    def _untried(self) -> Backend | None:
        tried = {a.backend for a in self.attempts}
        balancer = self.balancer
        if self._walk is None:
            self._walk = balancer.iter(self.key)
        for backend in self._walk:
            if backend in tried:
                continue
            if balancer.admit(backend):
                return backend
            try:
                if balancer.health(backend).enabled:
                    self._spares.append(backend)
            except ValueError:  # removed by a concurrent update
                continue
        while self._spares:
            backend = self._spares.pop(0)
            if backend not in tried:
                return backend
        return None

    def _following(self) -> Backend:
        """The backend for the next attempt (computed once, before the wait)."""
        if self._pending is None:
            backend = self._untried()
            if backend is None:
                # Every candidate was tried: go round again, oldest first.
                backend = self.attempts[self._revisits % len(self.attempts)].backend
                self._revisits += 1
            self._pending = backend
        return self._pending

    def next(self) -> Backend:
        """The backend for the next retry."""
        backend = self._following()
        self._pending = None
        self._delay = None
        self._clipped = False
        self._began = self.clock()
        return backend

    # -- recording -------------------------------------------------------------------------

    def failed(
        self, backend: Backend, failure: Failure, error: BaseException, timed_out: bool = False
    ) -> None:
        """Record a failed attempt and report it to passive health.

        Not reported: local failures, and a timeout of an attempt whose timeouts were cut to fit
        the request's remaining budget (the backend was not given its normal time).
        """
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        self.attempts.append(Attempt(backend, failure, text, error=error, seconds=self._took()))
        if failure is not Failure.LOCAL and not (timed_out and self._clipped):
            self.balancer.report(backend, False)

    def responded(self, backend: Backend, status: int) -> bool:
        """Record a response; return True if it should be retried (see :meth:`wants_retry`).

        A failure status is reported to passive health here. A success is reported by the
        adapter once the body was read (or closed), so a body that fails counts as a failure.
        """
        self.attempts.append(Attempt(backend, None, f"HTTP {status}", status, seconds=self._took()))
        if status in self.policy.failure_statuses:
            self.balancer.report(backend, Outcome.SERVER_ERROR)
        self._retry_response = (
            status in self.policy.retry_statuses and self._may_resend() and self._can_retry()
        )
        return self._retry_response

    def wants_retry(self, _result: object = None) -> bool:
        """Whether the response just recorded should be retried (a tenacity result predicate)."""
        return self._retry_response

    def _took(self) -> float:
        return max(0.0, self.clock() - self._began)

    # -- deciding --------------------------------------------------------------------------

    def retries_maybe_sent(self) -> bool:
        """Whether a maybe-sent failure of this request would be retried (attempts permitting)."""
        return self.policy.retry_maybe_sent and self._may_resend()

    def _may_resend(self) -> bool:
        return self.method in self.policy.idempotent_methods and self.replayable

    def _can_retry(self) -> bool:
        return len(self.attempts) < self.policy.max_attempts and self._time_for_another()

    def _time_for_another(self) -> bool:
        """Whether, after its backoff, another attempt would still get a fair share of the
        budget (a tenth of it): an attempt that could only time out is not sent."""
        left = self.remaining()
        if left is None:
            return True
        return left - self.wait() >= max(0.001, self.budget_share)

    def should_retry(self, error: BaseException) -> bool:
        """Whether the failure just recorded for ``error`` may be retried.

        An error the adapter did not record (a bug, a cancellation) is never retried.
        """
        if not self.attempts:
            return False
        last = self.attempts[-1]
        if last.failure is None:
            return False
        if last.error is not error:
            return False
        if last.failure is Failure.NEVER_SENT:
            allowed = True
        elif last.failure is Failure.MAYBE_SENT:
            allowed = self.retries_maybe_sent()
        else:
            allowed = False
        return allowed and self._can_retry()

    def remaining(self) -> float | None:
        """Seconds left of the request's budget, or None without a budget."""
        if self.budget is None:
            return None
        return self.budget - (self.clock() - self._start)

    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def wait(self, _state: RetryCallState | None = None) -> float:
        """Seconds to wait before the next attempt: none for a backend not tried yet, a jittered
        exponential backoff before trying one again (drawn once per attempt)."""
        if self._delay is None:
            upcoming = self._following()
            if all(a.backend != upcoming for a in self.attempts):
                self._delay = 0.0
            else:
                ceiling = min(
                    self.policy.backoff_max, self.policy.backoff * 2 ** (self._revisits - 1)
                )
                self._delay = random.uniform(0, ceiling)
        return self._delay

    @property
    def budget_share(self) -> float:
        """The least time worth giving one more attempt: a tenth of the budget."""
        return 0.0 if self.budget is None else self.budget / 10

    def clip(self, timeout: float | None) -> float | None:
        """``timeout`` cut to the time left of the budget (noted, for health reporting)."""
        if timeout is None or self.budget is None or not self.attempts:
            return timeout
        left = max(self.remaining() or 0.0, 0.001)
        if left < timeout:
            self._clipped = True
            return left
        return timeout

    def stop(self, state: RetryCallState | None = None) -> bool:
        """Stop condition: out of attempts, or not enough time left for another one."""
        return len(self.attempts) >= self.policy.max_attempts or not self._time_for_another()

    # -- reporting -------------------------------------------------------------------------

    def describe(self) -> str:
        """Every attempt, for the message of the final error."""
        count = len(self.attempts)
        tried = "; ".join(a.describe() for a in self.attempts)
        last = self.attempts[-1] if self.attempts else None
        note = ""
        if (
            self.budget is not None
            and count < self.policy.max_attempts
            and (not self._time_for_another())
        ):
            note = " (the request's time budget ran out)"
        elif last is not None and last.failure is Failure.MAYBE_SENT:
            if not self.policy.retry_maybe_sent:
                note = " (not retried: retry_maybe_sent is off)"
            elif not self._may_resend():
                why = (
                    f"{self.method} is not idempotent"
                    if self.method not in self.policy.idempotent_methods
                    else "its body cannot be replayed"
                )
                note = f" (not retried: the request may have reached the server and {why})"
        plural = "attempt" if count == 1 else "attempts"
        return f"{self.method} failed after {count} {plural}: {tried}{note}"


def _sleep(seconds: float) -> None:
    if seconds > 0:  # time.sleep(0) still costs a system call and a reschedule
        time.sleep(seconds)


async def _asleep(seconds: float) -> None:
    if seconds > 0:
        await anyio.sleep(seconds)  # asyncio or trio, whichever runs the client


def _outcome(state: RetryCallState) -> Any:
    """When tenacity stops: the last response, or the last exception raised again."""
    assert state.outcome is not None
    return state.outcome.result()


def run_sync(
    plan: RequestPlan,
    first: Backend,
    attempt: Callable[[Backend], _T],
    discard: Callable[[_T], object],
) -> _T:
    """Run ``attempt`` on ``first``, then on the plan's next backends while it may retry.

    ``attempt`` does one attempt's I/O, records its outcome on the plan and raises on failure.
    ``discard`` closes a response that is retried. The last failure propagates unchanged; the
    caller turns it into its final error. The first attempt runs outside tenacity (it is not a
    retry, and most requests need no other).
    """
    try:
        result = attempt(first)
    except Exception as exc:
        if not plan.should_retry(exc):
            raise
    else:
        if not plan.wants_retry():
            return result
        discard(result)
    _sleep(plan.wait())  # tenacity waits only between its own attempts

    def before_sleep(state: RetryCallState) -> None:
        if state.outcome is not None and not state.outcome.failed:
            discard(state.outcome.result())

    retrying = Retrying(
        stop=plan.stop,
        wait=plan.wait,
        retry=retry_if_exception(plan.should_retry) | retry_if_result(plan.wants_retry),
        before_sleep=before_sleep,
        sleep=_sleep,
        retry_error_callback=_outcome,
    )
    return retrying(lambda: attempt(plan.next()))


async def run_async(
    plan: RequestPlan,
    first: Backend,
    attempt: Callable[[Backend], Awaitable[_T]],
    discard: Callable[[_T], Awaitable[object]],
) -> _T:
    """The async twin of :func:`run_sync` (asyncio or trio). A new AsyncRetrying per request:
    they are not safe to share between concurrent tasks."""
    try:
        result = await attempt(first)
    except Exception as exc:
        if not plan.should_retry(exc):
            raise
    else:
        if not plan.wants_retry():
            return result
        await discard(result)
    await _asleep(plan.wait())

    async def before_sleep(state: RetryCallState) -> None:
        if state.outcome is not None and not state.outcome.failed:
            await discard(state.outcome.result())

    retrying = AsyncRetrying(
        stop=plan.stop,
        wait=plan.wait,
        retry=retry_if_exception(plan.should_retry) | retry_if_result(plan.wants_retry),
        before_sleep=before_sleep,
        sleep=_asleep,
        retry_error_callback=_outcome,
    )

    async def next_attempt() -> _T:
        return await attempt(plan.next())

    last: _T = await retrying(next_attempt)
    return last


def budget_of(phases: Iterable[float | None], pool: float | None = None) -> float | None:
    """The time all attempts of a request may take together: its longest timeout.

    ``phases`` are the timeouts of the network phases (connect, read, write): if any is None the
    request may legitimately take forever, so there is no budget. ``pool`` (waiting for a local
    connection slot) counts when set.
    """
    values = list(phases)
    if not values or any(v is None for v in values):
        return None
    if pool is not None:
        values.append(pool)
    return float(max(v for v in values if v is not None))


def policy_from(
    policy: RetryPolicy | None,
    max_attempts: int,
    retry_maybe_sent: bool,
    retry_statuses: Collection[int],
    failure_statuses: Collection[int],
) -> RetryPolicy:
    """The policy an adapter runs with: ``policy`` if given, else one from the options."""
    if policy is not None:
        if not isinstance(policy, RetryPolicy):
            raise TypeError(f"policy must be a RetryPolicy, got {policy!r}")
        return policy
    return RetryPolicy(
        max_attempts=max_attempts,
        retry_maybe_sent=retry_maybe_sent,
        retry_statuses=retry_statuses,
        failure_statuses=failure_statuses,
    )


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class Adapter:
    """What every client adapter is configured with, and how it starts a request's plan.

    Client-agnostic: the httpx transports and the requests adapter both build on it, so the key
    function's contract, the balancer's construction and the no-backend error are defined once.
    """

    def __init__(
        self,
        balancer: LoadBalancer | Iterable[Backend | str],
        *,
        key: Callable[[Any], bytes | str | None] | None,
        algorithm: AlgorithmLike | None,
        policy: RetryPolicy,
        unavailable: Callable[[str, Any], NoBackendAvailable],
    ) -> None:
        if isinstance(balancer, LoadBalancer):
            if algorithm is not None:
                raise TypeError("algorithm= applies only when backends are given, not a balancer")
            self.balancer = balancer
        elif algorithm is None:
            self.balancer = LoadBalancer(balancer)
        else:
            self.balancer = LoadBalancer(balancer, algorithm)
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function of the request, got {key!r}")
        self.key = key
        self.policy = policy
        #: Makes the adapter's own NoBackendAvailable (message, request).
        self.unavailable = unavailable
        #: True until the balancer's active checks were started for this adapter (False at
        #: once when the balancer has none): the per-request test is one attribute read.
        self.checks_pending = self.balancer.health_check is not None
        self._checking = False
        self._checks_lock = threading.Lock()

    def start_checks(self) -> None:
        """Start the balancer's active health checks on a thread, once for this adapter."""
        with self._checks_lock:
            if self.checks_pending:
                self.checks_pending = False
                self._checking = True
                self.balancer.start()

    async def astart_checks(self) -> None:
        """Start the balancer's active health checks on an asyncio task, once."""
        with self._checks_lock:  # astart never suspends: the lock is not held across a wait
            if self.checks_pending:
                self.checks_pending = False
                self._checking = True
                await self.balancer.astart()

    def _stop(self) -> bool:
        with self._checks_lock:
            self.checks_pending = False
            started, self._checking = self._checking, False
            return started

    def stop_checks(self) -> None:
        """Stop the checks this adapter started (others' keep running)."""
        if self._stop():
            self.balancer.close()

    async def astop_checks(self) -> None:
        """Stop the checks this adapter started, awaiting their task."""
        if self._stop():
            await self.balancer.aclose()

    @staticmethod
    def final_error(exc: _E, plan: RequestPlan, request: object) -> _E:
        """The final error of a request whose attempts all failed: of the last failure's class
        (as the client itself would raise), naming every attempt, with them as ``.attempts``."""
        error = type(exc)(plan.describe(), request=request)  # type: ignore[call-arg]
        error.attempts = tuple(plan.attempts)  # type: ignore[attr-defined]
        return error

    def key_of(self, request: object, method: str, url: str) -> bytes:
        """The selection key of ``request``; KeyFunctionError if the key function fails."""
        fn = self.key
        if fn is None:
            return b""
        try:
            value = fn(request)
        except Exception as exc:
            raise KeyFunctionError(
                f"key function {_name(fn)} raised {type(exc).__name__}: {exc} for "
                f"{method} {url}; nothing was sent"
            ) from exc
        if type(value) is bytes:
            return value
        if isinstance(value, str):
            return value.encode("utf-8")
        if value is None:
            return b""
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        raise KeyFunctionError(
            f"key function {_name(fn)} returned {value!r} ({type(value).__name__}) for "
            f"{method} {url}; it must return bytes, str or None; nothing was sent"
        )

    def start(
        self, request: object, method: str, url: str, replayable: bool, budget: float | None
    ) -> tuple[RequestPlan, Backend]:
        """The plan for one request and its first backend; NoBackendAvailable if none."""
        plan = RequestPlan(
            self.balancer,
            self.key_of(request, method, url),
            method,
            replayable,
            self.policy,
            budget,
        )
        first = plan.first()
        if first is None:
            count = len(self.balancer.backends)
            why = "it has no backends" if not count else f"all {count} backends are disabled"
            raise self.unavailable(f"no backend available for {method} {url}: {why}", request)
        return plan, first
