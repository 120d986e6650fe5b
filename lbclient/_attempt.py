"""The life of one request, shared by every adapter: its plan over the backends, the one attempt
loop, and what both clients need around it (the selection key, per-attempt timeouts, response
buffering, health reports of bodies, the final error's text). Private: users configure it through
:class:`~lbclient.retry.RetryPolicy` and :class:`~lbclient.retry.RequestOptions`.

Read top to bottom: :class:`RequestPlan` (sans-I/O; its questions are pure, and :meth:`take` is
the only step that claims anything: an ejected backend's probe), then the loops
(:func:`run_sync`, :func:`run_async`), which drive a :class:`Wire` (the adapter's I/O for one
attempt), then :class:`Client` (what an adapter is configured with), then what watches
requests for :mod:`lbclient.metrics` and :mod:`lbclient.otel` (:class:`WatchedPlan`, made only
for a client with observers attached: one without pays one attribute check per request). The
rules themselves are described in :mod:`lbclient.retry`; the backoff between revisits is
tenacity's full-jitter exponential strategy.

What may not: any HTTP client (the adapters translate their own requests, responses and
exceptions), or the balancer's internals (only its public methods are used).
"""

from __future__ import annotations

import email.utils
import functools
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, Generic, NamedTuple, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
from tenacity import RetryCallState, wait_random_exponential

from lbclient._load import Load
from lbclient.backend import Backend
from lbclient.balancer import LoadBalancer
from lbclient.errors import KeyFunctionError, NoBackendAvailable
from lbclient.health import HealthState, Outcome
from lbclient.retry import Attempt, Failure, RetryBudget, RetryPolicy, RetryStats
from lbclient.selection.base import AlgorithmLike

__all__ = [
    "DEFAULT",
    "BodyReport",
    "Client",
    "Fault",
    "Observer",
    "RequestPlan",
    "TracedPlan",
    "Watch",
    "WatchedPlan",
    "Wire",
    "attach",
    "client_of",
    "detach",
    "name_backend",
    "policy_from",
    "redact",
    "run_async",
    "run_sync",
]

_R = TypeVar("_R")

#: Timeout names, as httpx spells them (requests' (connect, read) map onto two of them).
Timeouts = Mapping[str, "float | None"]


_NOTHING: frozenset[Backend] = frozenset()
_EXHAUSTED: Final = "the retry budget is exhausted"


class Fault(NamedTuple):
    """How an attempt failed, as the adapter classified its client's error."""

    failure: Failure
    #: A timeout: not blamed on the backend when the deadline cut it short.
    timed_out: bool = False
    #: A failure that would repeat on the same backend (TLS verification, a timeout): that
    #: backend is not tried again by this request.
    barred: bool = False


class _Decisions:
    """A plan's questions: pure, they change nothing outside the plan (see RequestPlan)."""

    __slots__ = ("_delay", "stopped")

    _delay: float | None
    #: Why the loop stopped, for the final error (set when a retry is refused).
    stopped: str
    attempts: list[Attempt]
    balancer: LoadBalancer
    clock: Callable[[], float]
    ledger: Ledger | None
    method: str
    policy: RetryPolicy
    replayable: bool
    _launched: int
    _paid: bool
    _retry_after: float | None
    _revisits: int
    _start: float

    def _candidate(self) -> Backend | None:
        raise NotImplementedError

    def refused(self) -> None:
        raise NotImplementedError


    @property
    def retries_response(self) -> bool:
        """Whether the response just recorded has a status to retry (attempts permitting)."""
        last = self.attempts[-1] if self.attempts else None
        return last is not None and last.status is not None and self.retries_status(last.status)

    def retries_status(self, status: int) -> bool:
        """Whether a response with ``status`` is one to retry (attempts permitting)."""
        return status in self.policy.retry_statuses and self._may_resend()

    def retries_maybe_sent(self) -> bool:
        """Whether a maybe-sent failure of this request would be retried (attempts permitting)."""
        return self.policy.retry_maybe_sent and self._may_resend()

    def _may_resend(self) -> bool:
        return self.method in self.policy.idempotent_methods and self.replayable

    @property
    def hedging(self) -> bool:
        """Whether this request may be hedged: ``hedge_after`` is set and it may be resent."""
        return self.policy.hedge_after is not None and self._may_resend()

    def may_retry(self, last: Attempt | None = None) -> bool:
        """Whether ``last`` (the attempt just recorded) may be followed by another: its outcome
        allows a retry, attempts and budget remain, a candidate is left, and the deadline leaves
        time for it."""
        self.stopped = self._refusal(last or self.attempts[-1])
        if self.stopped == _EXHAUSTED:
            self.refused()
        return not self.stopped

    def hedge_refusal(self) -> str:
        """Why no hedge may be sent now beside the attempts in flight, or "" when one may."""
        if not self.hedging:
            return "not hedged"
        return self._limits()

    def _refusal(self, last: Attempt) -> str:
        """Why no retry follows ``last``, or "" when one may."""
        policy = self.policy
        if self.stopped.startswith("the deadline"):
            return self.stopped
        if last.failure is None:
            if last.status is None or not self.retries_status(last.status):
                return "a response that is not retried"
            after = self._retry_after
            if after is not None and after > policy.retry_after_max:
                return f"Retry-After of {after:g} s is longer than retry_after_max"
        elif last.failure is Failure.LOCAL:
            return "a local failure"
        elif last.failure is Failure.MAYBE_SENT and not self.retries_maybe_sent():
            if not policy.retry_maybe_sent:
                return "not retried: retry_maybe_sent is off"
            why = (
                f"{self.method} is not idempotent"
                if self.method not in policy.idempotent_methods
                else "its body cannot be replayed"
            )
            return f"not retried: the request may have reached the server and {why}"
        return self._limits()

    def _limits(self) -> str:
        """What stops one more attempt whatever the last outcome, or ""."""
        policy = self.policy
        if self._launched >= policy.max_attempts:
            return "out of attempts"
        if self._candidate() is None:
            return "no other backend to try"
        ledger = self.ledger
        if ledger is not None and not self._paid and not ledger.can_spend(self.clock()):
            return _EXHAUSTED
        if policy.deadline is not None:
            left = self.remaining() or 0.0
            if left - self.wait() < self.share():
                return f"the deadline of {policy.deadline:g} s ran out"
        return ""

    def share(self) -> float:
        """The least time worth giving one more attempt under the deadline: a tenth of the
        deadline, or the attempt timeout when that is shorter."""
        policy = self.policy
        if policy.deadline is None:
            return 0.0
        share = policy.deadline / 10
        if policy.attempt_timeout is not None:
            share = min(share, policy.attempt_timeout)
        return max(share, 0.001)

    def wait(self) -> float:
        """Seconds to wait before an attempt on the next candidate: none for a backend not
        tried yet, a jittered exponential backoff before trying one again (drawn once), and
        at least what the last response's ``Retry-After`` asked for."""
        if self._delay is None:
            upcoming = self._candidate()
            if upcoming is None or all(a.backend != upcoming for a in self.attempts):
                delay = 0.0
            else:
                delay = _backoff(self.policy, self._revisits + 1)
            if self._retry_after is not None:
                delay = max(delay, self._retry_after)
            self._delay = delay
        return self._delay

    def remaining(self) -> float | None:
        """Seconds left before the deadline, or None without one."""
        deadline = self.policy.deadline
        if deadline is None:
            return None
        return deadline - (self.clock() - self._start)

    def buffers(self, status: int, content_length: int | None) -> bool:
        """Whether to read this response's body inside the attempt, so that a connection lost
        mid-body can still be retried: only for requests that would be retried after a
        maybe-sent failure, bodies of known, small size, and never while hedging (the first
        response head wins)."""
        return (
            content_length is not None
            and content_length <= self.policy.buffer_limit
            and self.method != "HEAD"
            and self.retries_maybe_sent()
            and self._launched < self.policy.max_attempts
            and self.policy.hedge_after is None
        )

    def describe(self) -> str:
        """Every attempt, and why there was no other, for the message of the final error."""
        count = len(self.attempts)
        tried = "; ".join(a.describe() for a in self.attempts)
        plural = "attempt" if count == 1 else "attempts"
        why = self.stopped
        note = f" ({why})" if why and why not in ("out of attempts", "a local failure") else ""
        return f"{self.method} failed after {count} {plural}: {tried}{note}"


class RequestPlan(_Decisions):
    """One request's walk over the balancer's backends. Sans-I/O, one per request.

    Candidates come in the balancer's fallback order for ``key``, ready backends of the current
    set only: untried ones first, then (after a backoff) those tried before whose failure may
    not repeat. Questions (:meth:`may_retry`, :meth:`may_hedge`, :meth:`wait`,
    :meth:`describe`) change nothing outside the plan; :meth:`take` claims the chosen backend
    (its probe, if it is one) and spends from the retry budget for every attempt after the
    first.
    """

    __slots__ = (
        "_barred",
        "_began",
        "_cuts",
        "_first",
        "_launched",
        "_loads",
        "_next",
        "_paid",
        "_retry_after",
        "_revisits",
        "_skipped",
        "_start",
        "_walk",
        "_walked",
        "attempts",
        "balancer",
        "clock",
        "key",
        "ledger",
        "method",
        "pause",
        "policy",
        "replayable",
        "wall",
    )

    #: What is told of this request's steps (a :class:`WatchedPlan`'s); None: nothing is.
    watch: Watch | None = None
    #: Whether each attempt carries headers from the watch (:meth:`headers`): trace context.
    propagates: bool = False

    def __init__(
        self,
        balancer: LoadBalancer,
        key: bytes,
        method: str,
        replayable: bool,
        policy: RetryPolicy,
        clock: Callable[[], float] = time.monotonic,
        ledger: Ledger | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.balancer = balancer
        self.key = key
        self.method = method
        self.replayable = replayable
        self.policy = policy
        self.clock = clock
        #: The account of retries this request spends from (None: no budget, no totals).
        self.ledger = ledger
        #: The wall clock, for a ``Retry-After`` given as an HTTP date.
        self.wall = wall
        self.attempts: list[Attempt] = []
        self._start = clock()
        self._began: dict[Backend, float] = {}
        self._loads: dict[Backend, Load] = {}
        self._cuts: dict[Backend, str] = {}
        self._first: Backend | None = None
        self._walk: Iterator[Backend] | None = None
        self._walked: tuple[Backend, ...] = ()
        self._barred: set[Backend] | frozenset[Backend] = _NOTHING
        self._skipped: set[Backend] | frozenset[Backend] = _NOTHING
        self._next: Backend | None = None
        self._delay: float | None = None
        self._revisits = 0
        self._launched = 0
        self._paid = False
        self._retry_after: float | None = None
        #: Why the loop stopped, for the final error (set when a retry is refused).
        self.stopped: str = ""
        #: Seconds to wait before the attempt on the backend :meth:`take` returned last.
        self.pause = 0.0

    # -- choosing (the only claiming step) --------------------------------------------------

    def take(self, hedge: bool = False) -> Backend | None:
        """The backend for the next attempt, or None when no candidate is left (or the retry
        budget is empty). Choosing an ejected backend whose probe is due claims the probe."""
        balancer = self.balancer
        if not self._launched:
            backend = balancer.select(self.key)  # claims a due probe
            if backend is not None:
                self._first = backend
                self._launched = 1
                self._began[backend] = self.clock()
                self._hold(backend)
                return backend
        while True:
            backend = self._candidate()
            if backend is None:
                return None
            delay = self.wait()
            if self._launched and not self._paid:
                ledger = self.ledger
                if ledger is not None and not ledger.spend(self.clock(), hedge):
                    self.stopped = _EXHAUSTED
                    return None
                self._paid = True
            self._next = None
            self._delay = None
            if balancer.admit(backend):
                if any(a.backend == backend for a in self.attempts):
                    self._revisits += 1
                self._paid = False
                self._launched += 1
                self.pause = delay
                self._began[backend] = self.clock() + delay
                self._hold(backend)
                return backend
            self._skipped = {*self._skipped, backend}  # its probe went to another request

    def _hold(self, backend: Backend) -> None:
        """Count the attempt about to start in ``backend``'s load."""
        load = self.balancer.begin(backend)
        if load is not None:
            self._loads[backend] = load

    def reporter(self, backend: Backend) -> BodyReport:
        """What reports the body of the response just recorded from ``backend``: its end is
        a success (a failure status was reported with the head), a failure while reading it a
        failure; either way the attempt's load ends then."""
        status = self.attempts[-1].status if self.attempts else None
        done = status is not None and status in self.policy.failure_statuses
        return BodyReport(self.balancer, backend, done, self._loads.pop(backend, None))

    def release(self, backend: Backend) -> Load | None:
        """Hand over the load of ``backend``'s attempt: to the body's report, or to nobody
        (an attempt cancelled, or failed with an error that is not a failure): then it ends."""
        return self._loads.pop(backend, None)

    def _candidate(self) -> Backend | None:
        """The backend :meth:`take` would choose next, found without claiming anything."""
        if self._next is not None:
            return self._next
        balancer = self.balancer
        current = balancer.backends
        tried = {a.backend for a in self.attempts} | self._began.keys()
        if self._walk is None or self._walked is not current:
            self._walk = balancer.iter(self.key, after=self._first)
            self._walked = current
        for backend in self._walk:
            if backend not in tried and backend not in self._skipped and balancer.ready(backend):
                self._next = backend
                return backend
        members = set(current)
        again = [
            b
            for b in dict.fromkeys(a.backend for a in self.attempts)
            if b not in self._barred and b in members and balancer.ready(b)
        ]
        if not again:
            return None
        self._next = again[self._revisits % len(again)]
        return self._next

    # -- recording ---------------------------------------------------------------------------

    def timeouts(self, given: Timeouts, backend: Backend | None = None) -> Timeouts:
        """The client's per-operation timeouts for the attempt about to start on ``backend``,
        each capped by ``attempt_timeout`` and by what is left of the deadline (noted, for
        health reports)."""
        policy = self.policy
        cap = policy.attempt_timeout
        why = "attempt"
        if policy.deadline is not None:
            left = max(self.remaining() or 0.0, 0.001)
            if cap is None or left < cap:
                cap, why = left, "deadline"
        if cap is None:
            return given
        capped: dict[str, float | None] = {}
        cut = False
        for name, value in given.items():
            if value is None or value > cap:
                capped[name] = cap
                cut = True
            else:
                capped[name] = value
        if cut and backend is not None:
            self._cuts[backend] = why
        return capped

    def failed(self, backend: Backend, fault: Fault, error: BaseException) -> Attempt:
        """Record a failed attempt and report it to passive health.

        Not reported: local failures, and a timeout that the deadline cut short (the backend
        was not given its normal time).
        """
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        seconds = self._took(backend)
        attempt = Attempt(backend, fault.failure, redact(text), error=error, seconds=seconds)
        load = self._loads.pop(backend, None)
        if load is not None:
            if fault.failure is not Failure.LOCAL:
                self.balancer.observe(load, seconds, True)
            load.end()
        self.attempts.append(attempt)
        if fault.barred:
            self._barred = {*self._barred, backend}
        cut = self._cuts.pop(backend, None) if self._cuts else None
        if fault.timed_out and cut == "deadline":
            self.stopped = f"the deadline of {self.policy.deadline:g} s ran out"
        elif fault.failure is not Failure.LOCAL:
            self._report(backend, Outcome.CONNECTION_FAILURE)
        self._retry_after = None
        return attempt

    def responded(self, backend: Backend, status: int, retry_after: str | None = None) -> bool:
        """Record a response; return whether its status is one to retry. A failure status is
        reported to passive health here; a success once the body was read (see
        :class:`BodyReport`). ``retry_after`` is the response's ``Retry-After`` header."""
        policy = self.policy
        seconds = self._took(backend)
        text = _STATUS_TEXT.get(status) or f"HTTP {status}"
        self.attempts.append(_new_tuple(Attempt, (backend, None, text, status, None, seconds)))
        if self._cuts:
            self._cuts.pop(backend, None)
        failing = status in policy.failure_statuses
        if failing:
            self._report(backend, Outcome.SERVER_ERROR)
        retry = status in policy.retry_statuses and self._may_resend()
        after = retry_after_seconds(retry_after, self.wall()) if retry_after else None
        self._retry_after = after if retry else None
        load = self._loads.get(backend)
        if load is not None:  # it stays in flight until the body is done
            self.balancer.observe(load, seconds, failing or status == 429, after)
        return retry

    def _took(self, backend: Backend) -> float:
        began = self._began.get(backend, self._start)
        return max(0.0, self.clock() - began)

    def _report(self, backend: Backend, outcome: Outcome) -> None:
        """Report a failed attempt's outcome to passive health."""
        self.balancer.report(backend, outcome)

    def headers(self, backend: Backend) -> Mapping[str, str] | None:
        """Headers to add to the request of the attempt on ``backend`` (when
        :attr:`propagates`)."""
        return None

    def refused(self) -> None:
        """A retry or hedge was kept back because the retry budget was empty."""
        if self.ledger is not None:
            self.ledger.refused()


#: What an attempt's ``outcome`` says for each status, made once.
_STATUS_TEXT: Final = {status: f"HTTP {status}" for status in range(100, 600)}
#: Builds a NamedTuple from all its fields at once, skipping its keyword-handling ``__new__``.
_new_tuple = tuple.__new__


def retry_after_seconds(value: str, now: float) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delay-seconds or an HTTP date, against
    the wall clock ``now``), or None if it is neither."""
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def _backoff(policy: RetryPolicy, revisit: int) -> float:
    """The full-jitter exponential backoff before the ``revisit``-th revisit: uniform in
    ``[0, min(backoff_max, backoff * 2 ** (revisit - 1))]``, by tenacity's strategy."""
    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.attempt_number = revisit
    return float(_strategy(policy.backoff, policy.backoff_max)(state))


@functools.lru_cache(maxsize=64)
def _strategy(backoff: float, backoff_max: float) -> wait_random_exponential:
    return wait_random_exponential(multiplier=backoff, max=backoff_max)


class Ledger:
    """The live account of one transport's or adapter's retries: totals, and the retry
    budget's window of requests and retries, in slots of a tenth of the window. The window
    holds the ten slots before the current one as well, so nothing leaves it sooner than
    ``window`` seconds after it happened. Every update is a few additions under a lock never
    held across I/O."""

    __slots__ = (
        "_epochs",
        "_lock",
        "_requests",
        "_spent",
        "_width",
        "budget",
        "exhaustions",
        "hedge_wins",
        "hedges",
        "requests",
        "retries",
    )

    SLOTS = 11  # the current slot and ten whole ones before it

    def __init__(self, budget: RetryBudget | None) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._width = (budget.window if budget is not None else 10.0) / (self.SLOTS - 1)
        self._epochs = [-1] * self.SLOTS
        self._requests = [0] * self.SLOTS
        self._spent = [0] * self.SLOTS
        self.requests = self.retries = self.hedges = self.hedge_wins = self.exhaustions = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"budget": self.budget}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["budget"])  # type: ignore[misc]

    def _slot(self, now: float) -> int:
        """Under the lock: the slot of ``now``, emptied if it last held an older period."""
        epoch = int(now // self._width)
        slot = epoch % self.SLOTS
        if self._epochs[slot] != epoch:
            self._epochs[slot] = epoch
            self._requests[slot] = 0
            self._spent[slot] = 0
        return slot

    def _balance(self, now: float) -> float:
        budget = self.budget
        if budget is None:
            return math.inf
        oldest = int(now // self._width) - self.SLOTS + 1
        requests = spent = 0
        for epoch, n, used in zip(self._epochs, self._requests, self._spent, strict=True):
            if epoch >= oldest:
                requests += n
                spent += used
        return budget.ratio * requests + budget.min_per_second * budget.window - spent

    def deposit(self, now: float) -> None:
        """One request started."""
        epoch = int(now // self._width)
        slot = epoch % self.SLOTS
        with self._lock:  # as _slot, inline: this runs once per request
            self.requests += 1
            if self._epochs[slot] != epoch:
                self._epochs[slot] = epoch
                self._requests[slot] = 0
                self._spent[slot] = 0
            self._requests[slot] += 1

    def can_spend(self, now: float) -> bool:
        """Whether one more retry fits the budget now."""
        return self._balance(now) >= 1

    def refused(self) -> None:
        """A retry was not sent because the budget was empty."""
        with self._lock:
            self.exhaustions += 1

    def spend(self, now: float, hedge: bool = False) -> bool:
        """Take one retry (or hedge) from the budget; False (an exhaustion) if none is left."""
        with self._lock:
            slot = self._slot(now)
            if self._balance(now) < 1:
                self.exhaustions += 1
                return False
            self._spent[slot] += 1
            self.retries += 1
            if hedge:
                self.hedges += 1
            return True

    def won(self) -> None:
        """A hedge's response won its race."""
        with self._lock:
            self.hedge_wins += 1

    def stats(self, now: float) -> RetryStats:
        with self._lock:
            balance = self._balance(now)
            oldest = int(now // self._width) - self.SLOTS + 1
            spent = sum(
                used for epoch, used in zip(self._epochs, self._spent, strict=True)
                if epoch >= oldest
            )
            return RetryStats(
                requests=self.requests,
                retries=self.retries,
                hedges=self.hedges,
                hedge_wins=self.hedge_wins,
                exhaustions=self.exhaustions,
                budget_remaining=None if self.budget is None else max(0.0, balance),
                budget_spent=spent,
            )


# -- the loop ----------------------------------------------------------------------------------


class Wire(Protocol[_R]):
    """An adapter's part of one request: the I/O of one attempt, and its client's words."""

    def send(self, backend: Backend) -> _R:
        """Send the request to ``backend``; record the response on the plan (or raise the
        client's error for a failure, unrecorded)."""
        ...

    def fault(self, error: Exception) -> Fault | None:
        """How ``error`` failed, or None if it is not a failure of the attempt (a bug, a
        cancellation): then it propagates as it is."""
        ...

    def discard(self, response: _R) -> None:
        """Close a response that is retried."""
        ...

    def final(self, error: Exception) -> Exception:
        """The error for the caller when the last attempt failed with ``error``."""
        ...


class AsyncWire(Protocol[_R]):
    """The async twin of :class:`Wire`."""

    async def send(self, backend: Backend) -> _R: ...

    def fault(self, error: Exception) -> Fault | None: ...

    async def discard(self, response: _R) -> None: ...

    def final(self, error: Exception) -> Exception: ...


def run_sync(plan: RequestPlan, first: Backend, wire: Wire[_R]) -> _R:
    """Send the request to ``first``, then to the plan's next backends while it may retry.

    Returns the last response (retried statuses included, when no retry is left), or raises
    the wire's final error for the last failure.
    """
    watch = plan.watch
    if watch is None:
        return _run_sync(plan, first, wire)
    assert isinstance(plan, WatchedPlan)
    try:
        result = _run_sync(plan, first, wire)
    except BaseException as error:
        watch.ended(plan, None, error)
        raise
    watch.ended(plan, result, None)
    return result


def _run_sync(plan: RequestPlan, first: Backend, wire: Wire[_R]) -> _R:
    backend = first
    while True:
        try:
            result = wire.send(backend)
        except Exception as error:
            fault = wire.fault(error)
            if fault is None:
                _abandon(plan, backend)
                raise
            plan.failed(backend, fault, error)
            following = plan.take() if plan.may_retry() else None
            if following is None:
                raise wire.final(error) from error
        except BaseException:  # cancelled or interrupted: no outcome to record
            _abandon(plan, backend)
            raise
        else:
            if not plan.retries_response:
                return result
            following = plan.take() if plan.may_retry() else None
            if following is None:
                return result
            wire.discard(result)
        if plan.pause > 0:  # time.sleep(0) still costs a system call and a reschedule
            time.sleep(plan.pause)
        backend = following


async def run_async(plan: RequestPlan, first: Backend, wire: AsyncWire[_R]) -> _R:
    """The async twin of :func:`run_sync` (asyncio or trio); hedges when the plan says so."""
    watch = plan.watch
    if watch is None:
        return await _run_async(plan, first, wire)
    assert isinstance(plan, WatchedPlan)
    try:
        result = await _run_async(plan, first, wire)
    except BaseException as error:
        watch.ended(plan, None, error)
        raise
    watch.ended(plan, result, None)
    return result


async def _run_async(plan: RequestPlan, first: Backend, wire: AsyncWire[_R]) -> _R:
    if plan.hedging:
        return await _run_hedged(plan, first, wire)
    backend = first
    while True:
        try:
            result = await wire.send(backend)
        except Exception as error:
            fault = wire.fault(error)
            if fault is None:
                _abandon(plan, backend)
                raise
            plan.failed(backend, fault, error)
            following = plan.take() if plan.may_retry() else None
            if following is None:
                raise wire.final(error) from error
        except BaseException:  # cancelled or interrupted: no outcome to record
            _abandon(plan, backend)
            raise
        else:
            if not plan.retries_response:
                return result
            following = plan.take() if plan.may_retry() else None
            if following is None:
                return result
            await wire.discard(result)
        if plan.pause > 0:
            await anyio.sleep(plan.pause)
        backend = following


_Outcome = tuple[Backend, Any, "Exception | None"]


async def _run_hedged(plan: RequestPlan, first: Backend, wire: AsyncWire[_R]) -> _R:
    """Attempts that race: after ``hedge_after`` without a response head, the next candidate
    gets the request too. The first head that is not a status to retry wins; the others are
    cancelled (their connections closed, never returned to a pool mid-response), and any
    response that arrived too late is closed. Failures are retried as in the plain loop."""
    hedge_after = plan.policy.hedge_after
    assert hedge_after is not None
    counted = False  # an empty budget that kept a hedge back, once per request
    sender, receiver = anyio.create_memory_object_stream[_Outcome](math.inf)
    in_flight: set[Backend] = set()
    spare: _R | None = None  # a response with a status to retry, returned if nothing better
    last_error: Exception | None = None

    async def attempt(backend: Backend, pause: float) -> None:
        try:
            if pause > 0:
                await anyio.sleep(pause)
            result = await wire.send(backend)
        except Exception as error:
            sender.send_nowait((backend, None, error))
        except BaseException:  # cancelled: it lost the race
            _abandon(plan, backend)
            raise
        else:
            sender.send_nowait((backend, result, None))

    def launch(group: anyio.abc.TaskGroup, backend: Backend, pause: float = 0.0) -> None:
        in_flight.add(backend)
        group.start_soon(attempt, backend, pause)

    winner: _R | None = None
    try:
        async with anyio.create_task_group() as group:
            launch(group, first)
            while in_flight:
                outcome: _Outcome | None = None
                refusal = plan.hedge_refusal()
                if not refusal or (refusal == _EXHAUSTED and not counted):
                    with anyio.move_on_after(hedge_after):
                        outcome = await receiver.receive()
                    if outcome is None:  # no head yet: hedge, if the budget allows it now
                        refusal = plan.hedge_refusal()
                        if refusal == _EXHAUSTED and plan.ledger is not None:
                            plan.refused()
                            counted = True
                        elif not refusal:
                            hedge = plan.take(hedge=True)
                            if hedge is not None:
                                launch(group, hedge, plan.pause)
                        continue
                else:
                    outcome = await receiver.receive()
                backend, result, error = outcome
                in_flight.discard(backend)
                if error is not None:
                    fault = wire.fault(error)
                    if fault is None:
                        _abandon(plan, backend)
                        raise error
                    last = plan.failed(backend, fault, error)
                    last_error = error
                elif plan.retries_status(_status(result)):
                    if spare is not None:
                        await wire.discard(spare)
                    spare = result
                    last = next(a for a in reversed(plan.attempts) if a.backend == backend)
                else:
                    winner = result
                    if backend != first and plan.ledger is not None:
                        plan.ledger.won()
                    group.cancel_scope.cancel()
                    break
                if not in_flight:
                    following = plan.take() if plan.may_retry(last) else None
                    if following is not None:
                        launch(group, following, plan.pause)
    finally:
        sender.close()
        async for _backend, late, _error in receiver:
            if late is not None and late is not winner:
                with anyio.CancelScope(shield=True):
                    await wire.discard(late)
    if winner is not None:
        if spare is not None:
            await wire.discard(spare)
        return winner
    if spare is not None:
        return spare
    assert last_error is not None
    raise wire.final(last_error) from last_error


def _abandon(plan: RequestPlan, backend: Backend) -> None:
    """End the load of an attempt that ended with no outcome to record."""
    load = plan.release(backend)
    if load is not None:
        load.end()


def _status(response: object) -> int:
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else 0


# -- what both adapters share around the loop --------------------------------------------------


class BodyReport:
    """Reports one attempt's outcome to passive health once its body was read to the end,
    failed, or was closed unread (a failure status was reported with the head already), and
    ends the attempt's load then."""

    __slots__ = ("_backend", "_balancer", "_done", "_load", "after")

    def __init__(
        self, balancer: LoadBalancer, backend: Backend, done: bool, load: Load | None = None
    ) -> None:
        self._balancer = balancer
        self._backend = backend
        self._done = done
        self._load = load
        #: Called once when the attempt is over (the adapter frees its place in the pool).
        self.after: Callable[[], object] | None = None

    @property
    def backend(self) -> Backend:
        return self._backend

    def __call__(self, ok: bool) -> None:
        load, self._load = self._load, None
        if load is not None:  # the attempt is over: out of flight
            if not ok:
                self._balancer.observe(load, None, True)
            load.end()
        after, self.after = self.after, None
        if after is not None:
            after()
        if not self._done:
            self._done = True
            self._balancer.report(self._backend, ok)


def name_backend(error: BaseException, backend: Backend) -> BaseException:
    """``error`` (raised while reading a response body) with the backend named in its message,
    keeping its class and its other arguments."""
    where = f"(while reading the response body from backend {backend.address})"
    if error.args and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]} {where}", *error.args[1:])
    else:
        error.args = (*error.args, where)
    return error


def redact(text: str) -> str:
    """``text`` (a URL, or a message holding one) with any URL password replaced."""
    if "@" not in text:
        return text
    return " ".join(_redact_url(word) for word in text.split(" "))


def _redact_url(word: str) -> str:
    if "@" not in word or "://" not in word:
        return word
    try:
        parts = urlsplit(word)
        password = parts.password
    except ValueError:
        return word
    if not password:
        return word
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:[secure]@{hostport}"))


class Default:
    """The type of :data:`DEFAULT`."""

    def __repr__(self) -> str:
        return "DEFAULT"


#: "Not given", where None is a meaningful value (``budget=None`` turns the budget off).
DEFAULT: Final = Default()


def policy_from(policy: RetryPolicy | None, **options: Any) -> RetryPolicy:
    """The policy an adapter runs with: ``policy``, or one made from the flat options that were
    given (those left at None, or at DEFAULT, keep RetryPolicy's defaults). Both at once is a
    TypeError."""
    given = {
        name: value
        for name, value in options.items()
        if value is not DEFAULT and (value is not None or name == "budget")
    }
    if policy is not None:
        if not isinstance(policy, RetryPolicy):
            raise TypeError(f"policy must be a RetryPolicy, got {policy!r}")
        if given:
            names = ", ".join(sorted(given))
            raise TypeError(f"give either policy= or {names}, not both (policy={policy!r})")
        return policy
    return RetryPolicy(**given)


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class Client(Generic[_R]):
    """What every client adapter is configured with, and how it starts a request's plan.

    Client-agnostic: the httpx transports and the requests adapter both build on it, so the key
    function's contract, the balancer's construction, the hosts served, the checks' lifecycle
    and the no-backend error are defined once.
    """

    def __init__(
        self,
        balancer: LoadBalancer | Iterable[Backend | str],
        *,
        key: Callable[[Any], bytes | str | None] | None,
        algorithm: AlgorithmLike | None,
        policy: RetryPolicy,
        hosts: Iterable[str] | None,
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
        #: The account every request through this adapter spends its retries from.
        self.ledger = Ledger(policy.budget)
        self.hosts = _hosts(hosts)
        #: Makes the adapter's own NoBackendAvailable (message, request).
        self.unavailable = unavailable
        #: True until the balancer's services (active checks, discovery) were started for this
        #: adapter (False at once when it has none): the per-request test is one attribute read.
        self.checks_pending = _has_services(self.balancer)
        self._checking = False
        self._lock = threading.Lock()
        self._starting = threading.Lock()  # held while the services start (a thread waits)
        self._astarting = anyio.Lock()  # the same for tasks, without blocking the event loop
        #: What watches this client's requests (:func:`attach`); while it is empty, the
        #: per-request test is one attribute read and nothing else is paid.
        self.observers: tuple[Observer, ...] = ()
        _enlist(self)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        del state["_starting"]
        del state["_astarting"]
        del state["observers"]  # they watch this process's clients, not a copy's
        state["checks_pending"] = _has_services(self.balancer)
        state["_checking"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._starting = threading.Lock()
        self._astarting = anyio.Lock()
        _enlist(self)

    # -- hosts -----------------------------------------------------------------------------

    def serves(self, host: str) -> bool:
        """Whether requests for ``host`` go to the backends. Without ``hosts=``, the host of
        the first request is the one served from then on."""
        hosts = self.hosts
        if hosts is None:
            with self._lock:
                if self.hosts is None:
                    self.hosts = frozenset({host.lower()})
                hosts = self.hosts
        return host.lower() in hosts

    # -- active checks ---------------------------------------------------------------------

    def start_checks(self) -> None:
        """Start the balancer's services (active checks, discovery) on a thread, once for this
        adapter. Requests that arrive meanwhile wait: discovery's first answer comes first."""
        with self._starting:
            if self.checks_pending:
                self.balancer.start()
                with self._lock:
                    self._checking = True
                    self.checks_pending = False

    async def astart_checks(self) -> None:
        """Start the balancer's services on an asyncio task (or a thread outside asyncio),
        once. Tasks that arrive meanwhile wait, without blocking the event loop."""
        async with self._astarting:
            if self.checks_pending:
                await self.balancer.astart()
                with self._lock:
                    self._checking = True
                    self.checks_pending = False

    def _stop(self) -> bool:
        with self._lock:
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

    # -- one request -------------------------------------------------------------------------

    def key_of(self, request: object, method: str, url: object) -> bytes:
        """The selection key of ``request``; KeyFunctionError if the key function fails.
        ``url`` is the request's URL, or an object whose ``str()`` is (made only for a
        message)."""
        fn = self.key
        if fn is None:
            return b""
        try:
            value = fn(request)
            if type(value) is bytes:
                return value
            if isinstance(value, str):
                return value.encode("utf-8")
        except Exception as exc:
            what = (
                f"returned a str that cannot be encoded as UTF-8 ({exc})"
                if isinstance(exc, UnicodeEncodeError)
                else f"raised {type(exc).__name__}: {exc}"
            )
            raise KeyFunctionError(
                f"key function {_name(fn)} {what} for {method} {redact(str(url))}; nothing was sent"
            ) from exc
        if value is None:
            return b""
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        raise KeyFunctionError(
            f"key function {_name(fn)} returned {value!r} ({type(value).__name__}) for "
            f"{method} {redact(str(url))}; it must return bytes, str or None; nothing was sent"
        )

    def start(
        self,
        request: object,
        method: str,
        url: object,
        replayable: bool,
        policy: RetryPolicy,
    ) -> tuple[RequestPlan, Backend]:
        """The plan for one request and its first backend; NoBackendAvailable if none.
        ``url``: the request's URL, or an object whose ``str()`` is (made only when needed)."""
        ledger = self.ledger
        key = self.key_of(request, method, url)
        observers = self.observers
        plan = (
            _watched_plan(
                observers, request, url, self.balancer, key, method, replayable, policy, ledger
            )
            if observers
            else RequestPlan(self.balancer, key, method, replayable, policy, ledger=ledger)
        )
        ledger.deposit(plan._start)
        first = plan.take()
        if first is None:
            error = self.unavailable(
                f"no backend available for {method} {redact(str(url))}: {self._why_none()}",
                request,
            )
            if isinstance(plan, WatchedPlan):
                plan.watch.ended(plan, None, error)
            raise error
        return plan, first

    def stats(self) -> RetryStats:
        """Requests, retries, hedges and the retry budget's state, as of now."""
        return self.ledger.stats(time.monotonic())

    def _why_none(self) -> str:
        snapshot = self.balancer.snapshot()
        count = len(snapshot.backends)
        if not count:
            if snapshot.discovery_error is not None:
                return f"it has no backends: discovery failed: {snapshot.discovery_error}"
            if self.balancer.discovery is None:
                return "it has no backends"
            if snapshot.discovery_refreshes:
                return "it has no backends: discovery found none"
            return "it has no backends: discovery has not answered (is the balancer started?)"
        enabled = sum(b.enabled for b in snapshot.backends)
        if not enabled:
            return f"all {count} backends are disabled"
        return (
            f"none of its {enabled} enabled backends is healthy and panic mode is off "
            f"(panic_threshold={self.balancer.policy.panic_threshold:g})"
        )


def _has_services(balancer: LoadBalancer) -> bool:
    return balancer.health_check is not None or getattr(balancer, "discovery", None) is not None


def _hosts(hosts: Iterable[str] | None) -> frozenset[str] | None:
    if hosts is None:
        return None
    if isinstance(hosts, str):
        hosts = [hosts]
    names = frozenset(hosts)
    for name in names:
        if not isinstance(name, str) or not name or "/" in name or "@" in name:
            raise ValueError(f"hosts must be host names like 'users', got {name!r}")
    if not names:
        raise ValueError("hosts must name at least one host, got none")
    return frozenset(name.lower() for name in names)



# -- watching requests: metrics and tracing ----------------------------------------------------


class Watch(Protocol):
    """What is told of one request's steps as they happen (by :mod:`lbclient.metrics` and
    :mod:`lbclient.otel`), on the thread or task of each step. The plan holds the rest: every
    recorded attempt (``plan.attempts``) and how each failed one failed (``plan.faults``,
    by index; None before the first failure).

    * ``attempt``: an attempt starts on ``backend``; ``kind`` is "first", "retry" or "hedge",
      ``resend`` the number of attempts before it, ``probe`` whether it is an ejected
      backend's probe (found out for a watch with ``steps`` only); it starts ``plan.pause``
      seconds from now.
    * ``headers``: headers to add to the attempt's request (trace context), or None.
    * ``responded``: its response head, ``seconds`` after it started.
    * ``failed``: it failed, as recorded in ``attempt``, the way ``fault`` says.
    * ``finished``: its response body is done (read, closed, or failed: ``ok`` False).
    * ``abandoned``: it ended with no outcome (a hedge that lost its race, a cancellation).
    * ``health``: its outcome changed ``backend``'s health: ``change`` "ejected" (``reason``
      "consecutive_failures", "consecutive_5xx" or "probe_failed") or "restored"
      ("probe_succeeded").
    * ``refused``: a retry or hedge to ``backend`` was kept back by the empty retry budget.
    * ``ended``: the request is over, with ``result`` (the response) or ``error``.

    A watch whose ``steps`` is false is told only of what is rare (attempts after the first,
    failures, cancellations, health changes, refusals) and of each request's end: counting
    needs no more, and the common path stays short. ``headers`` is asked only of a watch that
    ``propagates``.
    """

    #: Whether it is told of every step: each attempt's start, head and body.
    steps: bool
    #: Whether it adds headers to each attempt's request.
    propagates: bool

    def attempt(
        self, plan: WatchedPlan, backend: Backend, kind: str, resend: int, probe: bool
    ) -> None: ...

    def headers(self, plan: WatchedPlan, backend: Backend) -> Mapping[str, str] | None: ...

    def responded(self, plan: WatchedPlan, backend: Backend, status: int, seconds: float) -> None:
        ...

    def failed(self, plan: WatchedPlan, backend: Backend, attempt: Attempt, fault: Fault) -> None:
        ...

    def finished(self, plan: WatchedPlan, backend: Backend, ok: bool) -> None: ...

    def abandoned(self, plan: WatchedPlan, backend: Backend) -> None: ...

    def health(self, plan: WatchedPlan, backend: Backend, change: str, reason: str) -> None: ...

    def refused(self, plan: WatchedPlan, backend: Backend | None) -> None: ...

    def ended(self, plan: WatchedPlan, result: object, error: BaseException | None) -> None: ...


class Observer(Protocol):
    """Watches the requests of the clients it is attached to (see :func:`attach`)."""

    #: Whether its watches want every step (see :class:`Watch`).
    steps: bool

    def watch(self, plan: WatchedPlan, request: object, url: object) -> Watch:
        """The watch of one request (``url`` as the caller gave it, or an object whose
        ``str()`` is: made only by a watch that needs it), before its first attempt."""
        ...


class WatchedPlan(RequestPlan):
    """A plan that tells its :class:`Watch` what is rare (attempts after the first, failures,
    cancellations, health changes, refusals); the watch reads the rest from the plan when the
    request ends. A client with observers makes these (:class:`TracedPlan` when one wants
    every step); one without makes plain plans, which pay nothing for watching."""

    __slots__ = ("faults", "latest", "propagates", "watch")

    watch: Watch
    #: How each failed attempt failed, by its index in :attr:`attempts` (None before the
    #: first failure).
    faults: dict[int, Fault] | None
    #: The backend of the attempt started last.
    latest: Backend | None
    #: Whether the watch is told of every step (:class:`TracedPlan`).
    steps = False

    def take(self, hedge: bool = False) -> Backend | None:
        backend = RequestPlan.take(self, hedge)
        if backend is None:
            if self.stopped == _EXHAUSTED:
                self.watch.refused(self, self._next)
            return None
        self.latest = backend
        if self._launched > 1 or self.steps:
            self._started(backend, hedge)
        return backend

    def _started(self, backend: Backend, hedge: bool) -> None:
        """Tell the watch of the attempt :meth:`take` just started on ``backend``."""
        launched = self._launched
        kind = "hedge" if hedge else "first" if launched == 1 else "retry"
        self.watch.attempt(self, backend, kind, launched - 1, False)

    def headers(self, backend: Backend) -> Mapping[str, str] | None:
        return self.watch.headers(self, backend)

    def failed(self, backend: Backend, fault: Fault, error: BaseException) -> Attempt:
        if self.faults is None:
            self.faults = {}
        self.faults[len(self.attempts)] = fault
        attempt = super().failed(backend, fault, error)
        self.watch.failed(self, backend, attempt, fault)
        return attempt

    def reporter(self, backend: Backend) -> BodyReport:
        status = self.attempts[-1].status if self.attempts else None
        done = status is not None and status in self.policy.failure_statuses
        return _WatchedReport(self.balancer, backend, done, self._loads.pop(backend, None), self)

    def release(self, backend: Backend) -> Load | None:
        self.watch.abandoned(self, backend)
        return super().release(backend)

    def refused(self) -> None:
        super().refused()
        self.watch.refused(self, self._next)

    def _report(self, backend: Backend, outcome: Outcome) -> None:
        before = _state(self.balancer, backend)
        flipped = self.balancer.report(backend, outcome)
        _tell_health(self, backend, before, flipped, outcome)


class TracedPlan(WatchedPlan):
    """A :class:`WatchedPlan` whose watch is told of every step as well: each attempt's start
    (probes found out), response head and body's end."""

    __slots__ = ()

    steps = True

    def _started(self, backend: Backend, hedge: bool) -> None:
        launched = self._launched
        kind = "hedge" if hedge else "first" if launched == 1 else "retry"
        # An ejected backend is chosen (panic mode aside) for its probe only.
        state = _state(self.balancer, backend)
        probe = state is not None and state.ejected and not self.balancer.panic
        self.watch.attempt(self, backend, kind, launched - 1, probe)

    def responded(self, backend: Backend, status: int, retry_after: str | None = None) -> bool:
        retry = super().responded(backend, status, retry_after)
        self.watch.responded(self, backend, status, self.attempts[-1].seconds)
        return retry


class _WatchedReport(BodyReport):
    """A :class:`BodyReport` that tells the plan's watch what its report did to the backend's
    health, and when the body is done (a watch with ``steps``)."""

    __slots__ = ("_plan",)

    def __init__(
        self,
        balancer: LoadBalancer,
        backend: Backend,
        done: bool,
        load: Load | None,
        plan: WatchedPlan,
    ) -> None:
        self._balancer = balancer
        self._backend = backend
        self._done = done
        self._load = load
        self.after: Callable[[], object] | None = None
        self._plan: WatchedPlan | None = plan

    def __call__(self, ok: bool) -> None:
        plan, self._plan = self._plan, None
        if plan is None or self._done:
            BodyReport.__call__(self, ok)
        else:
            # As BodyReport does, seeing what the report changed. A success changes health only
            # when it flips it (a probe's restores); a failure may also eject again a backend
            # whose probe it was, which flips nothing.
            backend, balancer = self._backend, self._balancer
            before = None if ok else _state(balancer, backend)
            self._done = True
            load, self._load = self._load, None
            if load is not None:
                if not ok:
                    balancer.observe(load, None, True)
                load.end()
            after, self.after = self.after, None
            if after is not None:
                after()
            flipped = balancer.report(backend, ok)
            if ok and flipped:
                plan.watch.health(plan, backend, "restored", "probe_succeeded")
            elif not ok:
                _tell_health(plan, backend, before, flipped, Outcome.CONNECTION_FAILURE)
        if plan is not None and plan.steps:
            plan.watch.finished(plan, self._backend, ok)


def _state(balancer: LoadBalancer, backend: Backend) -> HealthState | None:
    try:
        return balancer.health(backend)
    except ValueError:  # no longer in the set
        return None


def _tell_health(
    plan: WatchedPlan,
    backend: Backend,
    before: HealthState | None,
    flipped: bool,
    outcome: Outcome,
) -> None:
    """Tell the watch if the report of ``outcome`` (which returned ``flipped``) ejected or
    restored ``backend``."""
    if before is None or (not flipped and not before.ejected and before.checked is not False):
        return  # neither an ejection nor a restoration
    after = _state(plan.balancer, backend)
    if after is None:
        return
    if after.ejected_until is not None and after.ejected_until != before.ejected_until:
        if before.ejected:
            reason = "probe_failed"
        elif outcome is Outcome.SERVER_ERROR and not plan.balancer.policy.combine_failures:
            reason = "consecutive_5xx"
        else:
            reason = "consecutive_failures"
        plan.watch.health(plan, backend, "ejected", reason)
    elif before.ejected and not after.ejected:
        plan.watch.health(plan, backend, "restored", "probe_succeeded")


class _Fanout:
    """Several watches as one, told in the order their observers were attached."""

    __slots__ = ("_watches", "propagates", "steps")

    def __init__(self, watches: tuple[Watch, ...]) -> None:
        self._watches = watches
        self.steps = any(watch.steps for watch in watches)
        self.propagates = any(watch.propagates for watch in watches)

    def attempt(
        self, plan: WatchedPlan, backend: Backend, kind: str, resend: int, probe: bool
    ) -> None:
        for watch in self._watches:
            if watch.steps or kind != "first":
                watch.attempt(plan, backend, kind, resend, probe)

    def headers(self, plan: WatchedPlan, backend: Backend) -> Mapping[str, str] | None:
        found: dict[str, str] = {}
        for watch in self._watches:
            if watch.propagates:
                found.update(watch.headers(plan, backend) or {})
        return found or None

    def responded(self, plan: WatchedPlan, backend: Backend, status: int, seconds: float) -> None:
        for watch in self._watches:
            if watch.steps:
                watch.responded(plan, backend, status, seconds)

    def failed(self, plan: WatchedPlan, backend: Backend, attempt: Attempt, fault: Fault) -> None:
        for watch in self._watches:
            watch.failed(plan, backend, attempt, fault)

    def finished(self, plan: WatchedPlan, backend: Backend, ok: bool) -> None:
        for watch in self._watches:
            if watch.steps:
                watch.finished(plan, backend, ok)

    def abandoned(self, plan: WatchedPlan, backend: Backend) -> None:
        for watch in self._watches:
            watch.abandoned(plan, backend)

    def health(self, plan: WatchedPlan, backend: Backend, change: str, reason: str) -> None:
        for watch in self._watches:
            watch.health(plan, backend, change, reason)

    def refused(self, plan: WatchedPlan, backend: Backend | None) -> None:
        for watch in self._watches:
            watch.refused(plan, backend)

    def ended(self, plan: WatchedPlan, result: object, error: BaseException | None) -> None:
        for watch in self._watches:
            watch.ended(plan, result, error)


def _watched_plan(
    observers: tuple[Observer, ...],
    request: object,
    url: object,
    balancer: LoadBalancer,
    key: bytes,
    method: str,
    replayable: bool,
    policy: RetryPolicy,
    ledger: Ledger,
) -> WatchedPlan:
    if len(observers) == 1:
        observer = observers[0]
        plan = (TracedPlan if observer.steps else WatchedPlan)(
            balancer, key, method, replayable, policy, time.monotonic, ledger
        )
        plan.faults = plan.latest = None
        watch = observer.watch(plan, request, url)
    else:
        traced = any(observer.steps for observer in observers)
        plan = (TracedPlan if traced else WatchedPlan)(
            balancer, key, method, replayable, policy, time.monotonic, ledger
        )
        plan.faults = plan.latest = None
        watch = _Fanout(tuple(observer.watch(plan, request, url) for observer in observers))
    plan.watch = watch
    plan.propagates = watch.propagates
    return plan


_observed = threading.Lock()
#: Observers attached to a balancer: every client of it gets them, those made later too.
_by_balancer: weakref.WeakKeyDictionary[LoadBalancer, tuple[Observer, ...]] = (
    weakref.WeakKeyDictionary()
)
#: The clients of each balancer, so that an observer attached to it reaches them all.
_clients: weakref.WeakKeyDictionary[LoadBalancer, weakref.WeakSet[Client[Any]]] = (
    weakref.WeakKeyDictionary()
)


def _enlist(client: Client[Any]) -> None:
    """Count ``client`` among its balancer's clients, with the observers attached there."""
    with _observed:
        client.observers = _by_balancer.get(client.balancer, ())
        _clients.setdefault(client.balancer, weakref.WeakSet()).add(client)


def attach(target: Client[Any] | LoadBalancer, observer: Observer) -> None:
    """Have ``observer`` watch the requests of ``target``: one client, or every client of a
    balancer (those made later as well)."""
    with _observed:
        if isinstance(target, LoadBalancer):
            _by_balancer[target] = (*_by_balancer.get(target, ()), observer)
            clients = list(_clients.get(target, ()))
        else:
            clients = [target]
        for client in clients:
            client.observers = (*client.observers, observer)


def detach(target: Client[Any] | LoadBalancer, observer: Observer) -> None:
    """Undo :func:`attach` (requests under way are still told of their steps)."""

    def without(observers: tuple[Observer, ...]) -> tuple[Observer, ...]:
        index = next((i for i, o in enumerate(observers) if o is observer), None)
        return observers if index is None else observers[:index] + observers[index + 1 :]

    with _observed:
        if isinstance(target, LoadBalancer):
            left = without(_by_balancer.get(target, ()))
            if left:
                _by_balancer[target] = left
            else:
                _by_balancer.pop(target, None)
            clients = list(_clients.get(target, ()))
        else:
            clients = [target]
        for client in clients:
            client.observers = without(client.observers)


def client_of(target: object) -> Client[Any] | None:
    """The :class:`Client` of an httpx transport or a requests adapter, or None for anything
    else."""
    client = getattr(target, "_client", None)  # LBAdapter
    if client is None:
        client = getattr(getattr(target, "_common", None), "client", None)  # httpx transports
    return client if isinstance(client, Client) else None
