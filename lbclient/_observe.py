"""What metrics and tracing watch: a request's steps, told as they happen.

What lives here: the :class:`Watch` and :class:`Observer` protocols that :mod:`lbclient.metrics`
and :mod:`lbclient.otel` implement; :class:`WatchedPlan` (and :class:`TracedPlan`), the core's
:class:`~lbclient._plan.RequestPlan` with its recording steps and :meth:`take` telling a watch
what they did, its body reports included (they go through the plan's :meth:`report` and
:meth:`body_ended`); and :func:`attach` / :func:`detach`, which keep each adapter
configuration's observers. An adapter with no observer makes plain plans and pays one attribute
read per request.

What may not: a rule of its own (whether to retry, what to report: those are the plan's; a
watched plan only tells what the plan did), an HTTP client, or an import of metrics or tracing
libraries.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from lbclient._plan import EXHAUSTED, Fault, RequestPlan
from lbclient.backend import Backend
from lbclient.balancer import LoadBalancer
from lbclient.health import HealthState, Outcome
from lbclient.retry import Attempt, RetryPolicy

if TYPE_CHECKING:
    from lbclient._config import AdapterConfig
    from lbclient._ledger import Ledger

__all__ = [
    "Observer",
    "TracedPlan",
    "Watch",
    "WatchedPlan",
    "attach",
    "detach",
    "enlist",
    "watched_plan",
]


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

    def responded(
        self, plan: WatchedPlan, backend: Backend, status: int, seconds: float
    ) -> None: ...

    def failed(
        self, plan: WatchedPlan, backend: Backend, attempt: Attempt, fault: Fault
    ) -> None: ...

    def finished(self, plan: WatchedPlan, backend: Backend, ok: bool) -> None: ...

    def abandoned(self, plan: WatchedPlan, backend: Backend) -> None: ...

    def health(self, plan: WatchedPlan, backend: Backend, change: str, reason: str) -> None: ...

    def refused(self, plan: WatchedPlan, backend: Backend | None) -> None: ...

    def ended(self, plan: WatchedPlan, result: object, error: BaseException | None) -> None: ...


class Observer(Protocol):
    """Watches the requests of the adapters it is attached to (see :func:`attach`)."""

    #: Whether its watches want every step (see :class:`Watch`).
    steps: bool

    def watch(self, plan: WatchedPlan, request: object, url: object) -> Watch:
        """The watch of one request (``url`` as the caller gave it, or an object whose
        ``str()`` is: made only by a watch that needs it), before its first attempt."""
        ...


class WatchedPlan(RequestPlan):
    """A plan that tells its :class:`Watch` what is rare (attempts after the first, failures,
    cancellations, health changes, refusals); the watch reads the rest from the plan when the
    request ends. An adapter with observers makes these (:class:`TracedPlan` when one wants
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

    def take(self, hedge: bool = False, waited: bool = False) -> Backend | None:
        backend = RequestPlan.take(self, hedge, waited)
        if backend is None:
            if self.stopped == EXHAUSTED:
                self.watch.refused(self, self._next)
            return None
        self.latest = backend
        if self.launched > 1 or self.steps:
            self._started(backend, hedge)
        return backend

    def _started(self, backend: Backend, hedge: bool) -> None:
        """Tell the watch of the attempt :meth:`take` just started on ``backend``."""
        launched = self.launched
        kind = "hedge" if hedge else "first" if launched == 1 else "retry"
        self.watch.attempt(self, backend, kind, launched - 1, False)

    def headers(self, backend: Backend) -> Mapping[str, str] | None:
        found = self.watch.headers(self, backend)
        asks = self.asks
        if asks is None or not found:
            return found or asks
        return {**asks, **found}

    def failed(self, backend: Backend, fault: Fault, error: BaseException) -> Attempt:
        if self.faults is None:
            self.faults = {}
        self.faults[len(self.attempts)] = fault
        attempt = RequestPlan.failed(self, backend, fault, error)
        self.watch.failed(self, backend, attempt, fault)
        return attempt

    def abandon(self, backend: Backend) -> None:
        self.watch.abandoned(self, backend)
        RequestPlan.abandon(self, backend)

    def report(self, backend: Backend, outcome: Outcome | bool) -> None:
        balancer = self.balancer
        if outcome is True or outcome is Outcome.SUCCESS:
            # A success changes health only when it restores an ejected backend (its probe).
            if balancer.report(backend, outcome):
                self.watch.health(self, backend, "restored", "probe_succeeded")
            return
        before = _state(balancer, backend)
        flipped = balancer.report(backend, outcome)
        _tell_health(self, backend, before, flipped, outcome or Outcome.CONNECTION_FAILURE)


class TracedPlan(WatchedPlan):
    """A :class:`WatchedPlan` whose watch is told of every step as well: each attempt's start
    (probes found out), response head and body's end."""

    __slots__ = ()

    steps = True

    def _started(self, backend: Backend, hedge: bool) -> None:
        launched = self.launched
        kind = "hedge" if hedge else "first" if launched == 1 else "retry"
        # An ejected backend is chosen (panic mode aside) for its probe only.
        state = _state(self.balancer, backend)
        probe = state is not None and state.ejected and not self.balancer.panic
        self.watch.attempt(self, backend, kind, launched - 1, probe)

    def responded(self, backend: Backend, status: int, retry_after: str | None = None) -> None:
        RequestPlan.responded(self, backend, status, retry_after)
        self.watch.responded(self, backend, status, self.attempts[-1].seconds)

    def body_ended(self, backend: Backend, ok: bool) -> None:
        self.watch.finished(self, backend, ok)


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


def watched_plan(
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
    """The plan of one request watched by ``observers`` (one watch, or several as one)."""
    traced = any(observer.steps for observer in observers)
    plan = (TracedPlan if traced else WatchedPlan)(
        balancer, key, method, replayable, policy, time.monotonic, ledger
    )
    plan.faults = plan.latest = None
    if len(observers) == 1:
        watch: Watch = observers[0].watch(plan, request, url)
    else:
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
_clients: weakref.WeakKeyDictionary[LoadBalancer, weakref.WeakSet[AdapterConfig[Any]]] = (
    weakref.WeakKeyDictionary()
)


def enlist(client: AdapterConfig[Any]) -> None:
    """Count ``client`` (an adapter's configuration) among its balancer's clients, with the
    observers attached there."""
    with _observed:
        client.observers = _by_balancer.get(client.balancer, ())
        _clients.setdefault(client.balancer, weakref.WeakSet()).add(client)


def attach(target: AdapterConfig[Any] | LoadBalancer, observer: Observer) -> None:
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


def detach(target: AdapterConfig[Any] | LoadBalancer, observer: Observer) -> None:
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
