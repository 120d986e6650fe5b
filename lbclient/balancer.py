"""LoadBalancer: a set of backends, a selection algorithm and the backends' health.

Everything a request reads lives in one snapshot (sorted backends, built selector, health cells)
that is replaced whole by :meth:`LoadBalancer.update`. Readers take the current snapshot with a
single attribute read and never lock; writers (updates, health reports) serialise on a lock.
Health cells hold an immutable :class:`HealthState` that a writer replaces in one assignment.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from lbclient.backend import Backend
from lbclient.health import HealthPolicy, HealthState
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

__all__ = ["DEFAULT_MAX_ITERATIONS", "LoadBalancer"]

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


class _Snapshot:
    """What one request reads. Only ``impaired`` changes after construction (under the lock)."""

    __slots__ = ("backends", "by_address", "cells", "impaired", "selector")

    def __init__(
        self, backends: tuple[Backend, ...], selector: Selector, cells: dict[Backend, _Cell]
    ) -> None:
        self.backends = backends
        self.selector = selector
        self.cells = cells
        self.by_address = {b.address: b for b in backends}
        #: How many backends are not (healthy and enabled). Zero lets select skip health.
        self.impaired = sum(1 for c in cells.values() if not _sound(c.state))


def _sound(state: HealthState) -> bool:
    return state.healthy and state.enabled


def _accept_ready(_backend: Backend, ready: bool) -> bool:
    return ready


class LoadBalancer:
    """Chooses a backend per key, with fallbacks, skipping backends that are not ready.

    ``backends`` are :class:`Backend` objects or ``"host:port"`` strings (may be empty).
    ``algorithm`` is a selection algorithm class (``RoundRobin``, ``Hash``, ``Consistent``...) or
    a configured instance (``Consistent(points_per_weight=160)``).

    Health: every backend starts healthy and enabled. :meth:`report` feeds outcomes;
    ``consecutive_failures`` failures in a row make a backend unhealthy,
    ``consecutive_successes`` successes in a row make it healthy again, and ``cooldown`` seconds
    after becoming unhealthy it is eligible again for a request that decides its fate.
    ``on_change(backend, healthy)`` is called on every flip. ``clock`` returns seconds (monotonic).
    """

    def __init__(
        self,
        backends: Iterable[Backend | str] = (),
        algorithm: AlgorithmLike = RoundRobin,
        *,
        consecutive_failures: int = 1,
        consecutive_successes: int = 1,
        cooldown: float = 10.0,
        on_change: OnChange | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if on_change is not None and not callable(on_change):
            raise TypeError(f"on_change must be callable or None, got {on_change!r}")
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        self._algorithm = resolve_algorithm(algorithm)
        self._policy = HealthPolicy(consecutive_failures, consecutive_successes, cooldown)
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._update_lock = threading.Lock()
        prepared = prepare_backends(backends)
        self._snap = _Snapshot(
            prepared, self._algorithm.build(prepared), {b: _Cell(HealthState()) for b in prepared}
        )

    # -- reading ---------------------------------------------------------------------------

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The current backends, sorted."""
        return self._snap.backends

    @property
    def algorithm(self) -> object:
        """The selection algorithm instance."""
        return self._algorithm

    @property
    def policy(self) -> HealthPolicy:
        """The passive health policy."""
        return self._policy

    def select(
        self, key: Key = b"", max_iterations: int = DEFAULT_MAX_ITERATIONS
    ) -> Backend | None:
        """The first ready backend for ``key``, or None if none is found.

        At most ``max_iterations`` items are pulled from the selection order.
        """
        snap = self._snap
        if not snap.impaired and type(max_iterations) is int and max_iterations > 0:
            return snap.selector.first(key)
        return self._select(snap, key, max_iterations, _accept_ready)

    def select_with(self, key: Key, max_iterations: int, accept: Accept) -> Backend | None:
        """The first distinct candidate for which ``accept(backend, ready)`` is true, or None.

        Every item pulled from the selection order counts toward ``max_iterations``, repeated
        ones included.
        """
        if not callable(accept):
            raise TypeError(f"accept must be callable as accept(backend, ready), got {accept!r}")
        return self._select(self._snap, key, max_iterations, accept)

    def _select(
        self, snap: _Snapshot, key: Key, max_iterations: object, accept: Accept
    ) -> Backend | None:
        limit = check_max_iterations(max_iterations)
        cells = snap.cells
        now: float | None = None
        for backend in UniqueIterator(snap.selector.iter(to_key(key)), limit):
            state = cells[backend].state
            if state.healthy:
                ready = state.enabled
            else:
                if now is None:
                    now = self._clock()
                ready = state.ready(now)
            if accept(backend, ready):
                return backend
        return None

    def iter(
        self, key: Key = b"", max_iterations: int = DEFAULT_MAX_ITERATIONS
    ) -> Iterator[Backend]:
        """Distinct backends for ``key`` in fallback order, ready or not.

        First the distinct items found within ``max_iterations`` pulls of the selection order;
        then, so that a caller walking it never repeats a backend while another remains, every
        backend not yet yielded, in sorted order. Check :meth:`ready` to skip sick ones.
        """
        limit = check_max_iterations(max_iterations)
        snap = self._snap
        return _candidates(snap, to_key(key), limit)

    def ready(self, backend: Backend | str) -> bool:
        """Whether ``backend`` may be chosen now: in the set, enabled, and healthy or cooled
        down. False for a backend that is not in the current set."""
        snap = self._snap
        found = self._find(snap, backend)
        if found is None:
            return False
        state = snap.cells[found].state
        return state.ready(self._clock()) if not state.healthy else state.enabled

    def health(self, backend: Backend | str) -> HealthState:
        """The current health state of ``backend``; ValueError if it is not in the set."""
        snap = self._snap
        return snap.cells[self._require(snap, backend)].state

    def __len__(self) -> int:
        return len(self._snap.backends)

    def __repr__(self) -> str:
        snap = self._snap
        return (
            f"<LoadBalancer algorithm={self._algorithm!r} backends={len(snap.backends)} "
            f"impaired={snap.impaired}>"
        )

    # -- writing ---------------------------------------------------------------------------

    def update(self, backends: Iterable[Backend | str]) -> bool:
        """Replace the backend set; return whether it changed.

        Sets are compared by (address, weight). Backends that stay keep their health; new ones
        start healthy and enabled. Readers see the old snapshot or the new one, never a mix.
        """
        prepared = prepare_backends(backends)
        with self._update_lock:
            if prepared == self._snap.backends:
                return False
            selector = self._algorithm.build(prepared)
            with self._lock:
                old = self._snap.cells
                cells = {b: old.get(b) or _Cell(HealthState()) for b in prepared}
                self._snap = _Snapshot(prepared, selector, cells)
        logger.debug("backends updated: %d backends", len(prepared))
        return True

    def set_enabled(self, backend: Backend | str, enabled: bool) -> None:
        """Switch ``backend`` on or off by hand; ValueError if it is not in the current set."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {enabled!r}")
        with self._lock:
            snap = self._snap
            cell = snap.cells[self._require(snap, backend)]
            before = cell.state
            if before.enabled != enabled:
                cell.state = HealthState(
                    before.healthy, enabled, before.consecutive, before.retry_at
                )
                snap.impaired += _sound(before) - _sound(cell.state)

    def report(self, backend: Backend | str, ok: bool) -> bool:
        """Record one outcome for ``backend``; return whether its health flipped.

        Reports for a backend no longer in the set (an update raced the request) are ignored.
        """
        if not isinstance(ok, bool):
            raise TypeError(f"ok must be a bool, got {ok!r}")
        if ok:
            # The common case needs no lock: a success on a healthy backend with no failure
            # streak changes nothing.
            cell = self._snap.cells.get(backend) if isinstance(backend, Backend) else None
            if cell is not None:
                state = cell.state
                if state.healthy and not state.consecutive:
                    return False
        with self._lock:
            snap = self._snap
            found = self._find(snap, backend)
            if found is None:
                return False
            cell = snap.cells[found]
            before = cell.state
            after = self._policy.observe(before, ok, self._clock())
            if after is before:
                return False
            cell.state = after
            snap.impaired += _sound(before) - _sound(after)
        flipped = after.healthy != before.healthy
        if flipped:
            self._changed(found, after.healthy)
        return flipped

    def _changed(self, backend: Backend, healthy: bool) -> None:
        if healthy:
            logger.info("backend %s became healthy", backend.address)
        else:
            logger.warning("backend %s became unhealthy", backend.address)
        callback = self._on_change
        if callback is not None:
            try:
                callback(backend, healthy)
            except Exception:
                logger.exception("on_change callback failed for backend %s", backend.address)

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _find(snap: _Snapshot, backend: Backend | str) -> Backend | None:
        if isinstance(backend, Backend):
            return backend if backend in snap.cells else None
        if isinstance(backend, str):
            return snap.by_address.get(Backend(backend).address)
        raise TypeError(
            f"expected a Backend or an address string, got {backend!r} ({type(backend).__name__})"
        )

    @classmethod
    def _require(cls, snap: _Snapshot, backend: Backend | str) -> Backend:
        found = cls._find(snap, backend)
        if found is None:
            raise ValueError(f"{backend!r} is not one of this balancer's backends")
        return found


def _candidates(snap: _Snapshot, key: bytes, limit: int) -> Iterator[Backend]:
    unique = UniqueIterator(snap.selector.iter(key), limit)
    yield from unique
    seen = unique.seen
    for backend in snap.backends:
        if backend not in seen:
            yield backend
