"""LoadBalancer: a set of backends, a selection algorithm and the backends' health.

Everything a request reads lives in one view (sorted backends, built selector, health cells,
set-wide counts) that is replaced whole by :meth:`LoadBalancer.update`. Readers take the current
view with a single attribute read and never lock; writers (updates, health reports, check
results) serialise on a lock. Health cells hold an immutable :class:`HealthState` that a writer
replaces in one assignment. The one write a selection makes is taking the probe of an ejected
backend whose time is up, under the lock; that happens once per ejection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Final

from lbclient.backend import Backend
from lbclient.checks import HealthCheck, Runner, start_runner
from lbclient.health import HealthPolicy, HealthState, Outcome
from lbclient.selection.base import (
    AlgorithmLike,
    Key,
    Selector,
    UniqueIterator,
    check_max_iterations,
    prepare_backends,
    resolve_algorithm,
    to_key,
)
from lbclient.selection.weighted import RoundRobin

__all__ = ["DEFAULT_MAX_ITERATIONS", "BackendHealth", "HealthSnapshot", "LoadBalancer"]

logger = logging.getLogger("lbclient")

#: How many items ``select`` pulls from the selection iterator at most (Pingora's examples).
DEFAULT_MAX_ITERATIONS: Final = 256

Accept = Callable[[Backend, bool], bool]
OnChange = Callable[[Backend, bool], object]


class _Cell:
    """Holds one backend's current HealthState; replaced by writers in one assignment."""

    __slots__ = ("state",)

    def __init__(self, state: HealthState) -> None:
        self.state = state


class _View:
    """What one request reads. The counts change after construction, under the lock only."""

    __slots__ = (
        "backends",
        "by_address",
        "cells",
        "disabled",
        "ejected",
        "impaired",
        "panic",
        "selector",
        "unhealthy",
    )

    def __init__(
        self,
        backends: tuple[Backend, ...],
        selector: Selector,
        cells: dict[Backend, _Cell],
        policy: HealthPolicy,
    ) -> None:
        self.backends = backends
        self.selector = selector
        self.cells = cells
        self.by_address = {b.address: b for b in backends}
        states = [c.state for c in cells.values()]
        #: Backends switched off by hand.
        self.disabled = sum(not s.enabled for s in states)
        #: Enabled backends that are not healthy.
        self.unhealthy = sum(s.enabled and not s.healthy for s in states)
        #: Enabled backends passively ejected: the ejection limit counts these (a backend
        #: switched off by hand never gets its probe, so it must not hold a place).
        self.ejected = sum(s.ejected and s.enabled for s in states)
        #: Backends not (healthy and enabled). Zero lets select skip health altogether.
        self.impaired = sum(not _sound(s) for s in states)
        self.panic = self._panics(policy)

    def _panics(self, policy: HealthPolicy) -> bool:
        enabled = len(self.backends) - self.disabled
        return policy.panics(enabled - self.unhealthy, enabled)

    def store(self, cell: _Cell, after: HealthState, policy: HealthPolicy) -> bool:
        """Put ``after`` in ``cell`` and update the counts; return whether panic mode flipped."""
        before = cell.state
        cell.state = after
        self.disabled += before.enabled - after.enabled
        self.unhealthy += (after.enabled and not after.healthy) - (
            before.enabled and not before.healthy
        )
        self.ejected += (after.ejected and after.enabled) - (before.ejected and before.enabled)
        self.impaired += _sound(before) - _sound(after)
        panic = self._panics(policy)
        flipped = panic != self.panic
        self.panic = panic
        return flipped


def _sound(state: HealthState) -> bool:
    return state.healthy and state.enabled


def _accept_ready(_backend: Backend, ready: bool) -> bool:
    return ready


@dataclass(frozen=True)
class BackendHealth:
    """One backend's health as :meth:`LoadBalancer.snapshot` saw it."""

    backend: Backend
    #: Whether it may take a request now (panic mode included).
    ready: bool
    #: Neither ejected nor failing its active checks.
    healthy: bool
    enabled: bool
    #: Passively ejected (possibly due for its probe).
    ejected: bool
    #: Clock value at which the ejection ends (a probe may go), or None.
    ejected_until: float | None
    #: Seconds until then (0 when the probe is due), or None when not ejected.
    ejection_remaining: float | None
    #: Whether a probe request is out.
    probing: bool
    #: Times ejected (after decay), the multiplier of the next ejection time.
    ejections: int
    consecutive_failures: int
    consecutive_5xx: int
    #: The active checks' verdict: True up, False down, None not checked (yet).
    checked: bool | None


@dataclass(frozen=True)
class HealthSnapshot:
    """The health of every backend at one moment, and whether panic mode is on."""

    #: The clock value of the snapshot.
    at: float
    #: True when fewer backends than the panic threshold are healthy: health is ignored.
    panic: bool
    backends: tuple[BackendHealth, ...]

    @property
    def ready(self) -> int:
        """How many backends may take a request."""
        return sum(b.ready for b in self.backends)

    def __str__(self) -> str:
        lines = [f"panic mode: {'ON' if self.panic else 'off'}"]
        for b in self.backends:
            if not b.enabled:
                state = "disabled"
            elif b.ejected:
                state = f"ejected ({b.ejection_remaining:.1f} s left, #{b.ejections})"
            elif b.checked is False:
                state = "failing checks"
            else:
                state = "healthy"
            lines.append(
                f"{b.backend.address:<24} {'ready' if b.ready else 'not ready':<9} {state}"
            )
        return "\n".join(lines)


class LoadBalancer:
    """Chooses a backend per key, with fallbacks, skipping backends that are not ready.

    ``backends`` are :class:`Backend` objects or ``"host:port"`` strings (may be empty).
    ``algorithm`` is a selection algorithm class (``RoundRobin``, ``Hash``, ``Consistent``...) or
    a configured instance (``Consistent(points_per_weight=160)``).

    Health: every backend starts healthy and enabled. :meth:`report` feeds the outcomes of
    requests to passive outlier detection, as ``health`` (a :class:`HealthPolicy`) says: after
    ``consecutive_failures`` failures in a row a backend is ejected for a while, then one probe
    request decides whether it is back. ``health_check`` (a :class:`~lbclient.checks.TcpCheck`
    or :class:`~lbclient.checks.HttpCheck`) checks every backend actively once :meth:`start`
    (or ``with balancer:``, or a transport using it) started it. Below the panic threshold of
    healthy backends, health is ignored. ``on_change(backend, healthy)`` is called on every
    change of a backend's health, and on the first verdict of its active checks.
    ``clock`` returns seconds (monotonic).
    """

    def __init__(
        self,
        backends: Iterable[Backend | str] = (),
        algorithm: AlgorithmLike = RoundRobin,
        *,
        health: HealthPolicy | None = None,
        health_check: HealthCheck | None = None,
        on_change: OnChange | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if health is None:
            health = HealthPolicy()
        elif not isinstance(health, HealthPolicy):
            raise TypeError(f"health must be a HealthPolicy or None, got {health!r}")
        if health_check is not None and not isinstance(health_check, HealthCheck):
            raise TypeError(
                f"health_check must be a TcpCheck, an HttpCheck or None, got {health_check!r}"
            )
        if on_change is not None and not callable(on_change):
            raise TypeError(f"on_change must be callable or None, got {on_change!r}")
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        self._algorithm = resolve_algorithm(algorithm)
        self._policy = health
        self._health_check = health_check
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._update_lock = threading.Lock()
        self._runner_lock = threading.Lock()
        self._runner: Runner | None = None
        self._users = 0
        self._events: deque[tuple[Backend, bool]] = deque()
        self._delivering = threading.Lock()
        prepared = prepare_backends(backends)
        self._view = _View(
            prepared,
            self._algorithm.build(prepared),
            {b: _Cell(HealthState()) for b in prepared},
            health,
        )

    # -- reading ---------------------------------------------------------------------------

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The current backends, sorted."""
        return self._view.backends

    @property
    def algorithm(self) -> object:
        """The selection algorithm instance."""
        return self._algorithm

    @property
    def policy(self) -> HealthPolicy:
        """The health policy."""
        return self._policy

    @property
    def health_check(self) -> HealthCheck | None:
        """The active health check, if any."""
        return self._health_check

    @property
    def panic(self) -> bool:
        """Whether panic mode is on: too few backends are healthy, so health is ignored."""
        return self._view.panic

    def select(
        self, key: Key = b"", max_iterations: int = DEFAULT_MAX_ITERATIONS
    ) -> Backend | None:
        """The first ready backend for ``key``, or None if none is found.

        At most ``max_iterations`` items are pulled from the selection order. Choosing an
        ejected backend whose probe is due takes the probe: until that request reports back,
        no other request is sent there.
        """
        view = self._view
        if not view.impaired and type(max_iterations) is int and max_iterations > 0:
            return view.selector.first(key)
        return self._select(view, key, max_iterations, _accept_ready)

    def select_with(self, key: Key, max_iterations: int, accept: Accept) -> Backend | None:
        """The first distinct candidate for which ``accept(backend, ready)`` is true, or None.

        Every item pulled from the selection order counts toward ``max_iterations``, repeated
        ones included.
        """
        if not callable(accept):
            raise TypeError(f"accept must be callable as accept(backend, ready), got {accept!r}")
        return self._select(self._view, key, max_iterations, accept)

    def _select(
        self, view: _View, key: Key, max_iterations: object, accept: Accept
    ) -> Backend | None:
        limit = check_max_iterations(max_iterations)
        cells = view.cells
        panic = view.panic
        now: float | None = None
        for backend in UniqueIterator(view.selector.iter(to_key(key)), limit):
            state = cells[backend].state
            probe = False
            if panic or state.healthy:
                ready = state.enabled
            else:
                if now is None:
                    now = self._clock()
                ready = probe = state.enabled and state.probe_due(now)
            if not accept(backend, ready):
                continue
            if probe and not self._claim(view, backend, self._clock()):
                continue  # another request took the probe first
            return backend
        return None

    def iter(
        self, key: Key = b"", max_iterations: int = DEFAULT_MAX_ITERATIONS
    ) -> Iterator[Backend]:
        """Distinct backends for ``key`` in fallback order, ready or not.

        First the distinct items found within ``max_iterations`` pulls of the selection order;
        then, so that a caller walking it never repeats a backend while another remains, every
        backend not yet yielded, in sorted order. Use :meth:`admit` to take only ready ones.
        """
        limit = check_max_iterations(max_iterations)
        view = self._view
        return _candidates(view, to_key(key), limit)

    def ready(self, backend: Backend | str) -> bool:
        """Whether ``backend`` may be chosen now: in the set, enabled, and healthy, due for its
        probe, or in panic mode. False for a backend that is not in the current set."""
        return self._usable(backend, take_probe=False)

    def admit(self, backend: Backend | str) -> bool:
        """Like :meth:`ready`, for a backend about to be sent a request: if it is an ejected
        backend whose probe is due, this request takes the probe."""
        return self._usable(backend, take_probe=True)

    def _usable(self, backend: Backend | str, take_probe: bool) -> bool:
        view = self._view
        found = self._find(view, backend)
        if found is None:
            return False
        state = view.cells[found].state
        if view.panic or state.healthy:
            return state.enabled
        now = self._clock()
        if not (state.enabled and state.probe_due(now)):
            return False
        return not take_probe or self._claim(view, found, now)

    def _claim(self, view: _View, backend: Backend, now: float) -> bool:
        with self._lock:
            cell = view.cells[backend]
            after = self._policy.claim_probe(cell.state, now)
            if after is None:
                return False
            cell.state = after  # counts unchanged: still ejected, still unhealthy
        logger.info("backend %s: ejection over, sending a probe request", backend.address)
        return True

    def health(self, backend: Backend | str) -> HealthState:
        """The current health state of ``backend``; ValueError if it is not in the set."""
        view = self._view
        return view.cells[self._require(view, backend)].state

    def snapshot(self) -> HealthSnapshot:
        """Every backend's health, and whether panic mode is on, as of now."""
        view = self._view
        now = self._clock()
        panic = view.panic
        items = []
        for backend in view.backends:
            s = view.cells[backend].state
            until = s.ejected_until
            items.append(
                BackendHealth(
                    backend=backend,
                    ready=s.enabled if panic else s.ready(now),
                    healthy=s.healthy,
                    enabled=s.enabled,
                    ejected=s.ejected,
                    ejected_until=until,
                    ejection_remaining=None if until is None else max(0.0, until - now),
                    probing=s.probe_until is not None and now < s.probe_until,
                    ejections=self._policy.decayed(s, now),
                    consecutive_failures=s.consecutive_failures,
                    consecutive_5xx=s.consecutive_5xx,
                    checked=s.checked,
                )
            )
        return HealthSnapshot(now, panic, tuple(items))

    def __len__(self) -> int:
        return len(self._view.backends)

    def __repr__(self) -> str:
        view = self._view
        return (
            f"<LoadBalancer algorithm={self._algorithm!r} backends={len(view.backends)} "
            f"impaired={view.impaired}{' panic' if view.panic else ''}>"
        )

    # -- writing ---------------------------------------------------------------------------

    def update(self, backends: Iterable[Backend | str]) -> bool:
        """Replace the backend set; return whether it changed.

        Sets are compared by (address, weight). Backends that stay keep their health; new ones
        start healthy and enabled. Readers see the old view or the new one, never a mix.
        """
        prepared = prepare_backends(backends)
        with self._update_lock:
            if prepared == self._view.backends:
                return False
            selector = self._algorithm.build(prepared)
            with self._lock:
                old = self._view.cells
                cells = {b: old.get(b) or _Cell(HealthState()) for b in prepared}
                self._view = _View(prepared, selector, cells, self._policy)
        logger.debug("backends updated: %d backends", len(prepared))
        return True

    def set_enabled(self, backend: Backend | str, enabled: bool) -> None:
        """Switch ``backend`` on or off by hand; ValueError if it is not in the current set."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {enabled!r}")
        with self._lock:
            view = self._view
            cell = view.cells[self._require(view, backend)]
            if cell.state.enabled == enabled:
                return
            after = replace(cell.state, enabled=enabled)
            panic = view.store(cell, after, self._policy)
        if panic:
            self._log_panic(view)

    def report(self, backend: Backend | str, outcome: bool | Outcome) -> bool:
        """Record the outcome of one request to ``backend``; return whether its health changed.

        ``outcome`` is an :class:`Outcome`, or a bool: True for a success, False for a
        connection-level failure. Reports for a backend no longer in the set (an update raced
        the request) are ignored.
        """
        if outcome is True:
            outcome = Outcome.SUCCESS
            # The common case needs no lock: a success on a backend with no failure streak
            # and no ejection changes nothing.
            cell = self._view.cells.get(backend) if isinstance(backend, Backend) else None
            if cell is not None:
                state = cell.state
                if (
                    state.ejected_until is None
                    and not state.consecutive_failures
                    and not state.consecutive_5xx
                ):
                    return False
        elif outcome is False:
            outcome = Outcome.CONNECTION_FAILURE
        elif not isinstance(outcome, Outcome):
            raise TypeError(f"outcome must be an Outcome or a bool, got {outcome!r}")
        policy = self._policy
        with self._lock:
            view = self._view
            found = self._find(view, backend)
            if found is None:
                return False
            cell = view.cells[found]
            before = cell.state
            now = self._clock()
            may_eject = view.ejected < policy.ejection_limit(len(view.backends))
            after = policy.observe(before, outcome, now, may_eject)
            if after is before:
                return False
            panic = view.store(cell, after, policy)
            flipped = self._queue(found, before, after)
        self._log_report(found, before, after, outcome, now)
        if panic:
            self._log_panic(view)
        self._deliver()
        return flipped

    def report_check(self, backend: Backend | str, ok: bool, detail: str = "") -> bool:
        """Record one active health check result for ``backend``; return whether its health
        changed. The check runner calls this; so may a checker of your own. Thresholds are the
        ``health_check``'s (1 and 1 without one); ``detail`` says why a check failed, for
        the log."""
        if not isinstance(ok, bool):
            raise TypeError(f"ok must be a bool, got {ok!r}")
        check = self._health_check
        successes = 1 if check is None else check.consecutive_successes
        failures = 1 if check is None else check.consecutive_failures
        policy = self._policy
        with self._lock:
            view = self._view
            found = self._find(view, backend)
            if found is None:
                return False
            cell = view.cells[found]
            before = cell.state
            after = policy.check(before, ok, successes, failures)
            if ok and after.checked and after.ejected:
                after = policy.restore(after, self._clock())
            if after is before:
                return False
            panic = view.store(cell, after, policy)
            first = before.checked is None and after.checked is not None
            flipped = self._queue(found, before, after, first)
        address = found.address
        if after.checked != before.checked:
            if after.checked:
                logger.info("backend %s passes its health check", address)
            else:
                logger.warning("backend %s fails its health check: %s", address, detail)
        elif not ok:
            logger.debug("backend %s health check failed: %s", address, detail)
        if before.ejected and not after.ejected:
            logger.info("backend %s restored: its health check passed", address)
        if panic:
            self._log_panic(view)
        self._deliver()
        return flipped

    def _queue(
        self, backend: Backend, before: HealthState, after: HealthState, first: bool = False
    ) -> bool:
        """Under the lock: queue the on_change call for a change, in the order of the changes.
        Return whether health flipped."""
        healthy = after.healthy
        flipped = healthy != before.healthy
        if (flipped or first) and self._on_change is not None:
            self._events.append((backend, healthy))
        return flipped

    def _deliver(self) -> None:
        """Call on_change for queued changes, in order, one thread at a time. A thread that
        finds another delivering leaves its events to it; a callback that changes health
        itself has its own event delivered after it returns."""
        callback = self._on_change
        events = self._events
        while events and callback is not None:
            if not self._delivering.acquire(blocking=False):
                return
            try:
                while events:
                    backend, healthy = events.popleft()
                    try:
                        callback(backend, healthy)
                    except Exception:
                        logger.exception(
                            "on_change callback failed for backend %s", backend.address
                        )
            finally:
                self._delivering.release()

    def _log_report(
        self,
        backend: Backend,
        before: HealthState,
        after: HealthState,
        outcome: Outcome,
        now: float,
    ) -> None:
        address = backend.address
        if after.ejected_until is not None and after.ejected_until != before.ejected_until:
            seconds = after.ejected_until - now
            if before.ejected:
                why = "its probe request failed"
            elif outcome is Outcome.SERVER_ERROR and not self._policy.combine_failures:
                why = _times(before.consecutive_5xx + 1, "server error")
            else:
                why = _times(before.consecutive_failures + 1, "failure")
            logger.warning(
                "backend %s ejected for %g s after %s (ejection %d)",
                address,
                seconds,
                why,
                after.ejections,
            )
        elif before.ejected and not after.ejected:
            logger.info("backend %s restored: its probe request succeeded", address)

    def _log_panic(self, view: _View) -> None:
        enabled = len(view.backends) - view.disabled
        healthy = enabled - view.unhealthy
        if view.panic:
            logger.warning(
                "panic mode on: %d of %d backends healthy, below %g%%; ignoring health",
                healthy,
                enabled,
                self._policy.panic_threshold,
            )
        else:
            logger.info("panic mode off: %d of %d backends healthy", healthy, enabled)

    # -- active checks -----------------------------------------------------------------------

    def start(self) -> LoadBalancer:
        """Start the active health checks on a daemon thread (if there is a check).

        Every :meth:`start` needs its :meth:`close`: checks run until the last user closes.
        Returns the balancer.
        """
        self._acquire(asynchronous=False)
        return self

    async def astart(self) -> LoadBalancer:
        """Start the active health checks on an asyncio task of the running loop (a daemon
        thread outside asyncio). Pair with :meth:`aclose`."""
        self._acquire(asynchronous=True)
        return self

    def _acquire(self, asynchronous: bool) -> None:
        check = self._health_check
        if check is None:
            return
        with self._runner_lock:
            self._users += 1
            stale = self._runner
            if stale is not None and stale.serves(asynchronous):
                return
            # None yet; or a task on another (or a finished) event loop, which cannot serve
            # this user: a thread serves users of every kind.
            self._runner = start_runner(
                check,
                lambda: self._view.backends,
                self.report_check,
                asynchronous and stale is None,
            )
        if stale is not None:
            stale.stop()

    def _release(self) -> Runner | None:
        with self._runner_lock:
            if self._users == 0:
                return None
            self._users -= 1
            if self._users:
                return None
            runner, self._runner = self._runner, None
            return runner

    def close(self) -> None:
        """Stop the active health checks once every :meth:`start` was closed. When this returns,
        no check is running (an asyncio task is cancelled; prefer :meth:`aclose` there)."""
        runner = self._release()
        if runner is not None:
            runner.stop()

    async def aclose(self) -> None:
        """Stop the active health checks (see :meth:`close`), awaiting an asyncio task."""
        runner = self._release()
        if runner is not None:
            await runner.astop()

    def __enter__(self) -> LoadBalancer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> LoadBalancer:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _find(view: _View, backend: Backend | str) -> Backend | None:
        if isinstance(backend, Backend):
            return backend if backend in view.cells else None
        if isinstance(backend, str):
            return view.by_address.get(Backend(backend).address)
        raise TypeError(
            f"expected a Backend or an address string, got {backend!r} ({type(backend).__name__})"
        )

    @classmethod
    def _require(cls, view: _View, backend: Backend | str) -> Backend:
        found = cls._find(view, backend)
        if found is None:
            raise ValueError(f"{backend!r} is not one of this balancer's backends")
        return found


def _times(count: int, what: str) -> str:
    return f"1 {what}" if count == 1 else f"{count} {what}s in a row"


def _candidates(view: _View, key: bytes, limit: int) -> Iterator[Backend]:
    unique = UniqueIterator(view.selector.iter(key), limit)
    yield from unique
    seen = unique.seen
    for backend in view.backends:
        if backend not in seen:
            yield backend
