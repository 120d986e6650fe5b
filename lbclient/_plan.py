"""A request's plan over the backends: pure questions, and one step that claims.

What lives here: :class:`RequestPlan`, one per request, sans-I/O. Its questions
(:meth:`~RequestPlan.refusal`, :meth:`~RequestPlan.may_retry`, :meth:`~RequestPlan.wait`,
:meth:`~RequestPlan.timeouts`, :meth:`~RequestPlan.buffer_limit`, :meth:`~RequestPlan.describe`,
...) change nothing outside the plan: not the balancer, not the retry budget, not an observer.
:meth:`~RequestPlan.take` is the only step that claims anything (an ejected backend's probe, a
retry from the budget) or counts a retry the budget kept back. The loop records each attempt's
outcome (:meth:`~RequestPlan.failed`, :meth:`~RequestPlan.responded`), which feeds passive health
and the backends' live load; :class:`BodyReport` reports a response body's end the same way.
:class:`Fault` is how an adapter classifies its client's error for the plan.

What may not: any HTTP client or I/O (the adapters translate), running attempts or sleeping
(the loop does, expressing the plan's answers as tenacity strategies), a clock other than the
injected one, and the balancer's internals (only its public methods are used).
"""

from __future__ import annotations

import email.utils
import functools
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Final, NamedTuple

from tenacity import RetryCallState, wait_random_exponential

from lbclient._load import Load
from lbclient._redact import redact
from lbclient.backend import Backend
from lbclient.balancer import LoadBalancer
from lbclient.health import Outcome
from lbclient.retry import Attempt, Failure, RetryPolicy

if TYPE_CHECKING:
    from lbclient._ledger import Ledger
    from lbclient._observe import Watch

__all__ = [
    "EXHAUSTED",
    "BodyReport",
    "Fault",
    "RequestPlan",
    "Timeouts",
    "retry_after_seconds",
]

#: Timeout names, as httpx spells them (requests' (connect, read) map onto two of them).
Timeouts = Mapping[str, "float | None"]

#: Why a retry was not sent when the retry budget had nothing left.
EXHAUSTED: Final = "the retry budget is exhausted"

_NOTHING: frozenset[Backend] = frozenset()
#: What an attempt's ``outcome`` says for each status, made once.
_STATUS_TEXT: Final = {status: f"HTTP {status}" for status in range(100, 600)}
#: Builds a NamedTuple from all its fields at once, skipping its keyword-handling ``__new__``.
_new_tuple = tuple.__new__


class Fault(NamedTuple):
    """How an attempt failed, as the adapter classified its client's error."""

    failure: Failure
    #: A timeout: not blamed on the backend when the deadline cut it short.
    timed_out: bool = False
    #: A failure that would repeat on the same backend (TLS verification, a timeout): that
    #: backend is not tried again by this request.
    barred: bool = False
    #: The client's own limit (a full pool), not the backend's failure: not reported to health.
    ours: bool = False


class RequestPlan:
    """One request's walk over the balancer's backends. Sans-I/O, one per request.

    Candidates come in the balancer's fallback order for ``key``, ready backends of the current
    set only: untried ones first, then (after a backoff) those tried before whose failure may
    not repeat. Questions change nothing outside the plan (they may note, inside it, why the
    request stopped, and draw a backoff once); :meth:`take` claims the chosen backend (its
    probe, if it is one) and spends from the retry budget for every attempt after the first.
    """

    __slots__ = (
        "_barred",
        "_began",
        "_cuts",
        "_delay",
        "_first",
        "_loads",
        "_next",
        "_paid",
        "_retry_after",
        "_skipped",
        "_walk",
        "_walked",
        "asks",
        "attempts",
        "balancer",
        "clock",
        "failure_statuses",
        "key",
        "launched",
        "ledger",
        "method",
        "pause",
        "policy",
        "replayable",
        "revisits",
        "start",
        "stopped",
        "wall",
    )

    #: What is told of this request's steps (an observed plan's, :mod:`lbclient._observe`);
    #: None: nothing is.
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
        #: Statuses reported to passive health as server errors: the balancer's health rule.
        self.failure_statuses = balancer.policy.failure_statuses
        self.clock = clock
        #: The account of retries this request spends from (None: no budget, no totals).
        self.ledger = ledger
        #: The wall clock, for a ``Retry-After`` given as an HTTP date.
        self.wall = wall
        #: Every recorded attempt, in order.
        self.attempts: list[Attempt] = []
        #: The clock's reading when the request began.
        self.start = clock()
        #: Attempts started (recorded or not), the first included.
        self.launched = 0
        #: Attempts that went to a backend this request had tried before.
        self.revisits = 0
        #: Why the request stopped, for the final error (set when a retry is refused).
        self.stopped = ""
        #: The header that asks each backend for a load report (``endpoint-load-metrics-format``),
        #: or None: none asked and none read.
        self.asks: Mapping[str, str] | None = None
        #: Seconds to wait before the attempt on the backend :meth:`take` returned last.
        self.pause = 0.0
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
        self._paid = False
        self._retry_after: float | None = None

    # -- questions: pure -------------------------------------------------------------------

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
        """Whether ``last`` (the attempt recorded last, by default) may be followed by another:
        its outcome allows a retry, attempts remain, a candidate is left and the deadline
        leaves time for it. Notes the reason in :attr:`stopped` when not. Whether the retry
        budget allows it is :meth:`take`'s to find out."""
        self.stopped = self.refusal(last)
        return not self.stopped

    def refusal(self, last: Attempt | None = None) -> str:
        """Why no retry follows ``last`` (the attempt recorded last, by default), or "" when
        one may (the retry budget aside)."""
        return self.outcome_refusal(last or self.attempts[-1]) or self._limits(budget=False)

    def outcome_refusal(self, last: Attempt) -> str:
        """Why the outcome of ``last`` is not one to retry, or "" when it is."""
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
        return ""

    def hedge_refusal(self) -> str:
        """Why no hedge may be sent now beside the attempts in flight, or "" when one may."""
        if not self.hedging:
            return "not hedged"
        return self._limits(budget=True)

    def _limits(self, budget: bool) -> str:
        """What stops one more attempt whatever the last outcome, or "": attempts, candidates,
        the retry budget when ``budget`` (read, never spent), and the deadline."""
        if self.launched >= self.policy.max_attempts:
            return "out of attempts"
        if self._candidate() is None:
            return "no other backend to try"
        if budget and not self.affordable(hedge=True):
            return EXHAUSTED
        return self.deadline_refusal(self.wait())

    def limit_refusal(self, wait: float) -> str:
        """What stops one more attempt after ``wait`` seconds whatever the last outcome, or "":
        out of attempts, no candidate left, or the deadline leaves it no useful time."""
        if self.launched >= self.policy.max_attempts:
            return "out of attempts"
        if self._candidate() is None:
            return "no other backend to try"
        return self.deadline_refusal(wait)

    def affordable(self, hedge: bool = False) -> bool:
        """Whether the budget has a retry (``hedge``: a hedge) to give now: always without a
        budget, and for a retry of an attempt that never reached a server (a requeue)."""
        ledger = self.ledger
        if ledger is None or self._paid or (not hedge and self.requeue):
            return True
        return ledger.can_spend(self.clock(), hedge)

    @property
    def requeue(self) -> bool:
        """Whether a retry now would be a requeue: the attempt recorded last never reached a
        server, so resending adds no load to any (a requeue spends no retry budget)."""
        attempts = self.attempts
        return bool(attempts) and attempts[-1].failure is Failure.NEVER_SENT

    def deadline_refusal(self, wait: float) -> str:
        """Why the deadline leaves no time for an attempt after ``wait`` seconds, or ""."""
        deadline = self.policy.deadline
        if deadline is not None and (self.remaining() or 0.0) - wait < self.share():
            return f"the deadline of {deadline:g} s ran out"
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
        tried yet, a jittered exponential backoff before trying one again (tenacity's full
        jitter, drawn once per attempt), and at least what the last response's
        ``Retry-After`` asked for."""
        if self._delay is None:
            upcoming = self._candidate()
            if upcoming is None or all(a.backend != upcoming for a in self.attempts):
                delay = 0.0
            else:
                delay = backoff(self.policy, self.revisits + 1)
            if self._retry_after is not None:
                delay = max(delay, self._retry_after)
            self._delay = delay
        return self._delay

    def remaining(self) -> float | None:
        """Seconds left before the deadline, or None without one."""
        deadline = self.policy.deadline
        if deadline is None:
            return None
        return deadline - (self.clock() - self.start)

    def buffer_limit(self) -> int:
        """The largest ``Content-Length`` of a response to read inside the attempt about to
        start, so that a connection lost mid-body can still be retried; -1 for none. Bodies are
        read only for requests that would be retried after a maybe-sent failure and have an
        attempt left, never for HEAD and never while hedging (the first response head wins)."""
        policy = self.policy
        if (
            self.method == "HEAD"
            or policy.hedge_after is not None
            or self.launched >= policy.max_attempts
            or not self.retries_maybe_sent()
        ):
            return -1
        return policy.buffer_limit

    def limit(self) -> tuple[float | None, str]:
        """Seconds the attempt about to start may take up to its response head, and what set
        them: ``attempt_timeout`` ("attempt"), or what is left of the deadline when that is
        shorter ("deadline"); (None, "") without either."""
        policy = self.policy
        cap, why = policy.attempt_timeout, "attempt"
        if policy.deadline is not None:
            left = max(self.remaining() or 0.0, 0.001)
            if cap is None or left < cap:
                cap, why = left, "deadline"
        return cap, why if cap is not None else ""

    def timeouts(self, given: Timeouts, backend: Backend | None = None) -> Timeouts:
        """The client's per-operation timeouts for the attempt about to start on ``backend``,
        each capped by :meth:`limit` (a cut noted, for the health report of a timeout)."""
        cap, why = self.limit()
        if cap is None:
            return given
        capped = {name: cap if v is None or v > cap else v for name, v in given.items()}
        if backend is not None and capped != given:
            self._cuts[backend] = why
        return capped

    def headers(self, backend: Backend) -> Mapping[str, str] | None:
        """Headers to add to the request of the attempt on ``backend``: the request for a
        load report (:attr:`asks`), and the watch's trace context (when :attr:`propagates`)."""
        return self.asks

    def loaded(
        self,
        backend: Backend,
        header: str | None,
        rif: str | None = None,
        latency_us: str | None = None,
    ) -> None:
        """Read the load report of the response just received from ``backend`` (the headers'
        values, None where missing) into its load; a bad one is counted there, never raised."""
        load = self._loads.get(backend)
        if load is not None and (header is not None or rif is not None or latency_us is not None):
            self.balancer.read_report(load, header, rif, latency_us, backend)

    def describe(self) -> str:
        """Every attempt, and why there was no other, for the message of the final error."""
        count = len(self.attempts)
        tried = "; ".join(a.describe() for a in self.attempts)
        plural = "attempt" if count == 1 else "attempts"
        why = self.stopped
        note = f" ({why})" if why and why not in ("out of attempts", "a local failure") else ""
        return f"{self.method} failed after {count} {plural}: {tried}{note}"

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
        self._next = again[self.revisits % len(again)]
        return self._next

    # -- taking: the only step that claims -------------------------------------------------

    def take(self, hedge: bool = False, waited: bool = False) -> Backend | None:
        """The backend for the next attempt, or None when no candidate is left or the retry
        budget has nothing to give (then :attr:`stopped` says so and the exhaustion is
        counted). Choosing an ejected backend whose probe is due claims the probe; every
        attempt after the first spends a retry (``hedge``: a hedge) from its budget, but a
        requeue (see :attr:`requeue`), which is counted and free.
        ``waited``: the caller already waited what :meth:`wait` asked, so the attempt starts
        now; otherwise :attr:`pause` says how long to wait before it."""
        balancer = self.balancer
        if not self.launched:
            backend = balancer.select(self.key)  # claims a due probe
            if backend is not None:
                self._first = backend
                self.launched = 1
                self.pause = 0.0
                self._began[backend] = self.clock()
                self._hold(backend)
                return backend
        while True:
            backend = self._candidate()
            if backend is None:
                if not self.stopped:
                    self.stopped = "no other backend to try"
                return None
            delay = 0.0 if waited else self.wait()
            if self.launched and not self._paid:
                ledger = self.ledger
                requeue = not hedge and self.requeue
                if ledger is not None and not ledger.spend(self.clock(), hedge, requeue):
                    self.stopped = EXHAUSTED
                    return None
                self._paid = True
            self._next = None
            self._delay = None
            if balancer.admit(backend):
                if any(a.backend == backend for a in self.attempts):
                    self.revisits += 1
                self._paid = False
                self.launched += 1
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

    # -- recording: what the loop saw ------------------------------------------------------

    def failed(self, backend: Backend, fault: Fault, error: BaseException) -> Attempt:
        """Record a failed attempt and report it to passive health.

        Not reported: local failures, the client's own limits (a full pool), and a timeout
        that the deadline cut short (the backend was not given its normal time).
        """
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        seconds = self._took(backend)
        attempt = Attempt(backend, fault.failure, redact(text), error=error, seconds=seconds)
        load = self._loads.pop(backend, None)
        blamed = fault.failure is not Failure.LOCAL and not fault.ours
        if load is not None:
            if blamed:
                self.balancer.observe(load, seconds, True)
            load.end()
        self.attempts.append(attempt)
        if fault.barred:
            self._barred = {*self._barred, backend}
        cut = self._cuts.pop(backend, None) if self._cuts else None
        left = self.remaining()  # a timeout once the deadline is over was the deadline's doing
        if fault.timed_out and (cut == "deadline" or (left is not None and left <= 0.001)):
            self.stopped = f"the deadline of {self.policy.deadline:g} s ran out"
        elif blamed:
            self.report(backend, Outcome.CONNECTION_FAILURE)
        self._retry_after = None
        return attempt

    def responded(self, backend: Backend, status: int, retry_after: str | None = None) -> None:
        """Record a response head. A failure status is reported to passive health here; a
        success once the body was read (see :class:`BodyReport`). ``retry_after`` is the
        response's ``Retry-After`` header, if its status is one to retry."""
        seconds = self._took(backend)
        text = _STATUS_TEXT.get(status) or f"HTTP {status}"
        self.attempts.append(_new_tuple(Attempt, (backend, None, text, status, None, seconds)))
        if self._cuts:
            self._cuts.pop(backend, None)
        failing = status in self.failure_statuses
        if failing:
            self.report(backend, Outcome.SERVER_ERROR)
        after = None
        if retry_after is not None and self.retries_status(status):
            after = retry_after_seconds(retry_after, self.wall())
        self._retry_after = after
        load = self._loads.get(backend)
        if load is not None:  # it stays in flight until the body is done
            # The failure penalty is held no longer than a Retry-After the plan would wait out.
            hold = None if after is None else min(after, self.policy.retry_after_max)
            self.balancer.observe(load, seconds, failing or status == 429, hold)

    def reporter(self, backend: Backend) -> BodyReport:
        """What reports the body of the response just recorded from ``backend``."""
        status = self.attempts[-1].status if self.attempts else None
        done = status is not None and status in self.failure_statuses
        return BodyReport(self, backend, done, self._loads.pop(backend, None))

    def abandon(self, backend: Backend) -> None:
        """``backend``'s attempt ended with no outcome to record (a hedge that lost its race,
        a cancellation, an error that is not a failure): its load ends."""
        load = self._loads.pop(backend, None)
        if load is not None:
            load.end()

    def report(self, backend: Backend, outcome: Outcome | bool) -> None:
        """Report an outcome of this request's attempt on ``backend`` to passive health."""
        self.balancer.report(backend, outcome)

    def body_ended(self, backend: Backend, ok: bool) -> None:
        """The body of ``backend``'s response is done (read, closed, or failed: ``ok`` False)."""

    @property
    def retries_response(self) -> bool:
        """Whether the response recorded last has a status to retry (attempts permitting)."""
        last = self.attempts[-1] if self.attempts else None
        return last is not None and last.status is not None and self.retries_status(last.status)

    def _took(self, backend: Backend) -> float:
        began = self._began.get(backend, self.start)
        return max(0.0, self.clock() - began)


class BodyReport:
    """Reports the body of one attempt's response once, through its plan: read to the end (or
    closed unread) is a success, a failure while reading a failure (a failure status was
    reported with the head already), and a read the caller cut short neither; either way the
    attempt's load ends then."""

    __slots__ = ("_backend", "_done", "_load", "_plan")

    def __init__(
        self, plan: RequestPlan, backend: Backend, done: bool, load: Load | None = None
    ) -> None:
        self._plan: RequestPlan | None = plan
        self._backend = backend
        self._done = done
        self._load = load

    @property
    def backend(self) -> Backend:
        return self._backend

    def __call__(self, ok: bool | None) -> None:
        """The body is done: ``ok`` True (read or closed unread), False (failed while read),
        None (closed part-read by the caller). Only the first call counts."""
        plan, self._plan = self._plan, None
        if plan is None:
            return
        load, self._load = self._load, None
        if load is not None:  # the attempt is over: out of flight
            if ok is False:
                plan.balancer.observe(load, None, True)
            load.end()
        if ok is not None and not self._done:
            plan.report(self._backend, ok)  # a bool: the balancer's fast path for a success
        plan.body_ended(self._backend, ok is not False)


def retry_after_seconds(value: str, now: float) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delay-seconds or an HTTP date, against
    the wall clock ``now``), or None if it is neither."""
    text = value.strip()
    if text.isascii() and text.isdigit():  # "²" is a digit to str.isdigit, not to HTTP
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    try:
        return max(0.0, when.timestamp() - now)
    except (OverflowError, OSError, ValueError):  # a date past what the platform can count
        return None


def backoff(policy: RetryPolicy, revisit: int) -> float:
    """The full-jitter exponential backoff before the ``revisit``-th revisit: uniform in
    ``[0, min(backoff_max, backoff * 2 ** (revisit - 1))]``, drawn by tenacity's
    ``wait_random_exponential``."""
    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.attempt_number = revisit
    return float(_strategy(policy.backoff, policy.backoff_max)(state))


@functools.lru_cache(maxsize=64)
def _strategy(base: float, cap: float) -> wait_random_exponential:
    return wait_random_exponential(multiplier=base, max=cap)
