"""LoadBalancer: a set of backends, a selection algorithm, and the backends' health.

What lives here: selection over one immutable view of the backend set (sorted backends, built
selector, health cells and set-wide counts), replaced whole by :meth:`LoadBalancer.update`.
Readers take the current view with a single attribute read and never lock. Every health change
is delegated to the health book (:mod:`lbclient._book`); background work (active checks,
discovery) is handed in as services that the balancer only starts and stops.

What may not: I/O, sockets, threads or tasks of its own, a clock other than the injected one,
and any import of the checks, the transports or an HTTP client. The one write a selection makes
is taking the probe of an ejected backend whose time is up, under the book's lock, once per
ejection.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Final, Protocol, TypeVar

from lbclient._book import Cell, HealthBook, OnChange, Tally
from lbclient._load import Load, Total
from lbclient.backend import Backend
from lbclient.health import HealthPolicy, HealthSnapshot, HealthState, Outcome
from lbclient.selection.base import (
    AlgorithmLike,
    Key,
    Selector,
    UniqueIterator,
    check_max_iterations,
    fallbacks_after,
    prepare_backends,
    resolve_algorithm,
    to_key,
)
from lbclient.selection.slow_start import SlowStart, slow_start_of
from lbclient.selection.weighted import RoundRobin

__all__ = ["DEFAULT_MAX_ITERATIONS", "ActiveCheck", "Discovery", "LoadBalancer", "Service"]

logger = logging.getLogger("lbclient")

#: How many items ``select`` pulls from the selection iterator at most (Pingora's examples).
DEFAULT_MAX_ITERATIONS: Final = 256

#: Seconds: the time constant of latency estimates and failure penalties, unless the algorithm
#: names its own (``PeakEWMA(decay=...)``).
DEFAULT_DECAY: Final = 10.0

Accept = Callable[[Backend, bool], bool]
_S = TypeVar("_S", bound="_Services")


class Service(Protocol):
    """Background work for a balancer (active checks, discovery), started with the balancer's
    first user and stopped with its last; it keeps its own count of users."""

    def start(self) -> None: ...

    async def astart(self) -> None: ...

    def stop(self) -> None: ...

    async def astop(self) -> None: ...


class ActiveCheck(Protocol):
    """What the balancer needs of a ``health_check`` (:class:`~lbclient.checks.TcpCheck`,
    :class:`~lbclient.checks.HttpCheck`): its thresholds, and a service that runs it."""

    consecutive_successes: int
    consecutive_failures: int

    def bind(self, balancer: LoadBalancer) -> Service: ...


class DiscoveryService(Service, Protocol):
    """A discovery bound to a balancer: a service that also adds its counts to snapshots."""

    def describe(self, snapshot: HealthSnapshot) -> HealthSnapshot: ...


class Discovery(Protocol):
    """What the balancer needs of a ``discovery`` (:mod:`lbclient.discovery`: ``Static``,
    ``DNS``, ``File``, ``Function``): a service that keeps the backend set current through
    :meth:`LoadBalancer.update`, looking up every ``refresh`` seconds (None: its own)."""

    def bind(self, balancer: LoadBalancer, refresh: float | None) -> DiscoveryService: ...


class _View(Tally):
    """What one request reads: the backend set, its selector, its health tally and the
    backends' live load.

    ``previous`` is the view this one replaces when the backends that left it (``removed``)
    and joined it (``added``) are known: then the counts and the index by address are carried
    over and adjusted for those alone (read under the book's lock), so that a small change
    to a large set costs what changed.
    """

    __slots__ = ("backends", "by_address", "loads", "selector")

    def __init__(
        self,
        backends: tuple[Backend, ...],
        selector: Selector,
        cells: dict[Backend, Cell],
        loads: dict[Backend, Load],
        policy: HealthPolicy,
        previous: _View | None = None,
        removed: tuple[Backend, ...] = (),
        added: tuple[Backend, ...] = (),
    ) -> None:
        if previous is None:
            super().__init__(cells, policy)
            self.by_address = {b.address: b for b in backends}
        else:
            left = [previous.cells[b] for b in removed]
            super().__init__(cells, policy, previous, left, [cells[b] for b in added])
            # dict.copy clones the table in C even after deletions, where dict(d) would
            # insert every entry again.
            by_address = self.by_address = previous.by_address.copy()
            for b in removed:
                del by_address[b.address]
            for b in added:
                by_address[b.address] = b
        self.backends = backends
        self.selector = selector
        self.loads = loads


class _Loads:
    """The live load the attempt loop feeds: requests in flight, latency, failure penalty."""

    _view: _View
    _clock: Callable[[], float]
    _decay: float

    def begin(self, backend: Backend) -> Load | None:
        """An attempt to ``backend`` starts: its load, with one more request in flight (None
        for a backend no longer in the set). The caller ends it with ``load.end()``."""
        load = self._view.loads.get(backend)
        if load is not None:
            load.begin()
        return load

    def observe(
        self, load: Load, latency: float | None, failed: bool, hold: float | None = None
    ) -> None:
        """Record an attempt's response head (``latency`` seconds) or failure on ``load``;
        ``hold`` keeps a failure's penalty from decaying for that many seconds."""
        load.observe(self._clock(), latency, failed, self._decay, hold)

    def load(self, backend: Backend | str) -> Load:
        """The live load of ``backend``; ValueError if it is not in the set."""
        view = self._view
        return view.loads[_require(view, backend)]


class _Services:
    """Starting and stopping a balancer's background services (its active checks): each keeps
    its own count of users, so every start needs its close."""

    _services: tuple[Service, ...] = ()

    def start(self: _S) -> _S:
        """Start the active health checks on a daemon thread (if there is a check).

        Every :meth:`start` needs its :meth:`close`: checks run until the last user closes.
        Returns the balancer.
        """
        for service in self._services:
            service.start()
        return self

    async def astart(self: _S) -> _S:
        """Start the active health checks on an asyncio task of the running loop (a daemon
        thread outside asyncio). Pair with :meth:`aclose`."""
        for service in self._services:
            await service.astart()
        return self

    def close(self) -> None:
        """Stop the active health checks once every :meth:`start` was closed. When this returns,
        no check is running (an asyncio task is cancelled; prefer :meth:`aclose` there)."""
        for service in self._services:
            service.stop()

    async def aclose(self) -> None:
        """Stop the active health checks (see :meth:`close`), awaiting an asyncio task."""
        for service in self._services:
            await service.astop()

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self: _S) -> _S:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _accept_ready(_backend: Backend, ready: bool) -> bool:
    return ready


class _Writes:
    """What changes a balancer: a new backend set, and the health reports of requests and
    checks (delegated to the health book)."""

    _view: _View
    _book: HealthBook
    _algorithm: Any
    _policy: HealthPolicy
    _clock: Callable[[], float]
    _update_lock: threading.Lock
    _total: Total
    _health_check: ActiveCheck | None
    _discovery: Discovery | None
    _refresh: Any
    _decay: float

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The current backends, sorted."""
        return self._view.backends

    def _new_view(
        self,
        prepared: tuple[Backend, ...],
        old: _View | None,
        selector: Selector | None = None,
        moved: tuple[tuple[Backend, ...], tuple[Backend, ...]] | None = None,
    ) -> _View:
        """A view of ``prepared``: backends that stay keep their health cell and load.

        ``selector`` is the one built for ``prepared`` (None: built here). ``moved`` holds the
        backends that left ``old``'s set and those that joined it, as objects (None: not
        known); then only their cells and loads are touched, and the health counts and the
        index by address are ``old``'s, adjusted for them (call under the book's lock).
        """
        # Backends of the first set do not ramp up; those that join later do, from now.
        now = -math.inf if old is None else self._clock()
        if selector is None:
            rebuild = getattr(self._algorithm, "rebuild", None)
            # A rebuild with no previous selector is a build that takes ``prepared`` as it is.
            selector = (
                self._algorithm.build(prepared) if rebuild is None else rebuild(None, prepared)
            )
        if old is None or moved is None:
            loads = {} if old is None else old.loads
            cells = HealthBook.cells(prepared, old)
            carried = {b: loads.get(b) or Load(now, self._total) for b in prepared}
            view = _View(prepared, selector, cells, carried, self._policy)
        else:
            # An equal backend that is another object (other metadata) keeps its cell and load.
            removed, added = moved
            cells = old.cells.copy()  # a clone in C, even of a dict with deletions
            carried = old.loads.copy()
            left_cells = {b: cells.pop(b) for b in removed}
            left_loads = {b: carried.pop(b) for b in removed}
            for b in added:
                cells[b] = left_cells.get(b) or Cell(HealthState())
                carried[b] = left_loads.get(b) or Load(now, self._total)
            view = _View(prepared, selector, cells, carried, self._policy, old, removed, added)
        attach = getattr(view.selector, "attach", None)
        if attach is not None:  # load-aware selectors read the live load
            attach(view.loads, self._clock, self._total)
        return view

    def __reduce__(self) -> tuple[Any, ...]:
        # The configuration travels; health, load, running checks and discovery start afresh.
        return (
            _restore,
            (
                self.backends,
                self._algorithm,
                self._policy,
                self._health_check,
                self._book.on_change,
                self._clock,
                self._discovery,
                self._refresh,
            ),
        )

    def update(self, backends: Iterable[Backend | str]) -> bool:
        """Replace the backend set; return whether it changed.

        Sets are compared by (address, weight). Backends that stay keep their health; new ones
        start healthy and enabled. Readers see the old view or the new one, never a mix.

        A change costs what changed: backends equal to current ones (same metadata) are taken
        as the current objects, and an algorithm that can rebuild its selector from the
        previous one (:class:`~lbclient.selection.base.Rebuildable`) is asked to.
        """
        from lbclient.selection.base import changes, prepare_update

        hint = self._view
        prepared, change = prepare_update(backends, hint.backends, hint.by_address)
        with self._update_lock:
            old = self._view
            if prepared is old.backends or prepared == old.backends:
                return False
            if old is not hint:  # another update came first: the change is against its set
                change = changes(old.backends, prepared)
            rebuild = getattr(self._algorithm, "rebuild", None)
            selector: Selector = (
                self._algorithm.build(prepared)
                if rebuild is None
                else rebuild(old.selector, prepared, change)
            )
            with self._book.lock:
                # Cells and counts are taken under the lock: no health change is lost.
                self._view = self._new_view(
                    prepared, old, selector, (change.removed, change.added)
                )
        logger.debug("backends updated: %d backends", len(prepared))
        return True

    def set_enabled(self, backend: Backend | str, enabled: bool) -> None:
        """Switch ``backend`` on or off by hand; ValueError if it is not in the current set."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {enabled!r}")
        if not self._book.set_enabled(_require(self._view, backend), enabled):
            raise ValueError(f"{backend!r} is not one of this balancer's backends")

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
        found = _find(self._view, backend)
        return found is not None and self._book.observe(found, outcome)

    def report_check(self, backend: Backend | str, ok: bool, detail: str = "") -> bool:
        """Record one active health check result for ``backend``; return whether its health
        changed. The check runner calls this; so may a checker of your own. Thresholds are the
        ``health_check``'s (1 and 1 without one); ``detail`` says why a check failed, for
        the log."""
        if not isinstance(ok, bool):
            raise TypeError(f"ok must be a bool, got {ok!r}")
        check = self._health_check
        thresholds = (
            (1, 1)
            if check is None
            else (check.consecutive_successes, check.consecutive_failures)
        )
        found = _find(self._view, backend)
        return found is not None and self._book.check(found, ok, detail, thresholds)


class LoadBalancer(_Services, _Loads, _Writes):
    """Chooses a backend per key, with fallbacks, skipping backends that are not ready.

    Every backend starts healthy and enabled. :meth:`report` feeds the outcomes of requests to
    passive outlier detection; after too many failures in a row a backend is ejected for a
    while, then one probe request decides whether it is back. Below the panic threshold of
    healthy backends, health is ignored.

    * ``backends``: :class:`Backend` objects or ``"host:port"`` strings (may be empty; ``()``).
    * ``algorithm``: a selection algorithm class (``RoundRobin``, ``Random``, ``Hash``,
      ``FNVHash``, ``Consistent``) or a configured instance such as ``Consistent()``
      (``RoundRobin``).
    * ``health``: the :class:`HealthPolicy` of passive outlier detection and panic mode
      (``HealthPolicy()``: 5 failures in a row eject for 30 s, see its defaults).
    * ``health_check``: a :class:`~lbclient.TcpCheck` or :class:`~lbclient.HttpCheck` run on
      every backend once :meth:`start` (``with balancer:``, or a transport using it) started
      it (None: no active checks).
    * ``discovery``: where the backends come from (:mod:`lbclient.discovery`): once
      :meth:`start` started it, it looks them up before :meth:`start` returns, then keeps the
      set current in the background; ``backends`` are the set until its first answer (None).
    * ``refresh``: seconds between lookups of a discovery whose answers carry no TTL (None:
      the discovery's own; DNS follows the records' TTL).
    * ``on_change``: called as ``on_change(backend, healthy)`` on every change of a backend's
      health, and on the first verdict of its active checks, in order (None).
    * ``clock``: returns seconds, monotonic; the only clock the balancer reads
      (``time.monotonic``).
    """

    def __init__(
        self,
        backends: Iterable[Backend | str] = (),
        algorithm: AlgorithmLike = RoundRobin,
        *,
        health: HealthPolicy | None = None,
        health_check: ActiveCheck | None = None,
        discovery: Discovery | None = None,
        refresh: float | None = None,
        on_change: OnChange | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if health is None:
            health = HealthPolicy()
        elif not isinstance(health, HealthPolicy):
            raise TypeError(f"health must be a HealthPolicy or None, got {health!r}")
        if health_check is not None and not callable(getattr(health_check, "bind", None)):
            raise TypeError(
                f"health_check must be a TcpCheck, an HttpCheck or None, got {health_check!r}"
            )
        if discovery is not None and not callable(getattr(discovery, "bind", None)):
            raise TypeError(
                "discovery must be a source of lbclient.discovery (Static, DNS, File, or "
                f"Function(fn) around a function of your own) or None, got {discovery!r}"
            )
        if refresh is not None:
            if discovery is None:
                raise TypeError("refresh= applies only with discovery=")
            if isinstance(refresh, bool) or not isinstance(refresh, (int, float)):
                raise TypeError(f"refresh must be a number of seconds or None, got {refresh!r}")
            if not math.isfinite(refresh) or refresh <= 0:
                raise ValueError(f"refresh must be a finite number > 0, got {refresh!r}")
        if on_change is not None and not callable(on_change):
            raise TypeError(f"on_change must be callable or None, got {on_change!r}")
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        self._algorithm = resolve_algorithm(algorithm)
        self._policy = health
        self._clock = clock
        self._book = HealthBook(health, clock, on_change, lambda: self._view)
        self._update_lock = threading.Lock()
        #: The time constant (seconds) of the latency estimate and the failure penalty.
        self._decay = float(getattr(self._algorithm, "decay", DEFAULT_DECAY))
        #: Requests in flight over every backend, for bounded loads.
        self._total = Total()
        self._slow_start: SlowStart | None = slow_start_of(
            getattr(self._algorithm, "slow_start", None)
        )
        prepared = prepare_backends(backends)
        self._view = self._new_view(prepared, None)
        self._health_check = health_check
        self._discovery = discovery
        self._refresh = refresh
        services: list[Service] = []
        if discovery is not None:  # first: checks start on the discovered set
            found = discovery.bind(self, refresh)
            self._book.extend = found.describe
            services.append(found)
        if health_check is not None:
            services.append(health_check.bind(self))
        self._services: tuple[Service, ...] = tuple(services)

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
    def health_check(self) -> ActiveCheck | None:
        """The active health check, if any."""
        return self._health_check

    @property
    def discovery(self) -> Discovery | None:
        """Where the backends come from, if a discovery keeps them current."""
        return self._discovery

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
        if (
            not view.impaired
            and self._slow_start is None
            and type(max_iterations) is int
            and max_iterations > 0
        ):
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
        ramp = self._slow_start
        now: float | None = None
        passed: Backend | None = None  # a ramping backend passed over, as a last resort
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
            if ramp is not None and not probe:
                if now is None:
                    now = self._clock()
                restored = state.restored_at if state.restored_at > 0.0 else -math.inf
                since = max(view.loads[backend].joined, restored)
                if now - since < ramp.window and random.random() >= ramp.factor(now - since):
                    passed = passed or backend
                    continue  # still ramping up: this time, the next candidate
            if probe and not self._book.claim(view, backend, self._clock()):
                continue  # another request took the probe first
            return backend
        return passed

    def iter(
        self,
        key: Key = b"",
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
        *,
        after: Backend | None = None,
    ) -> Iterator[Backend]:
        """Distinct backends for ``key`` in fallback order, ready or not.

        First the distinct items found within ``max_iterations`` pulls of the selection order;
        then, so that a caller walking it never repeats a backend while another remains, every
        backend not yet yielded, in sorted order. Use :meth:`admit` to take only ready ones.

        * ``after``: this request's first pick, already taken (by :meth:`select`): the order
          continues from it, draws no first pick of its own, and never yields it (None).
        """
        limit = check_max_iterations(max_iterations)
        if after is not None and not isinstance(after, Backend):
            raise TypeError(f"after must be a Backend or None, got {after!r}")
        return _candidates(self._view, to_key(key), limit, after)

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
        found = _find(view, backend)
        if found is None:
            return False
        state = view.cells[found].state
        if view.panic or state.healthy:
            return state.enabled
        now = self._clock()
        if not (state.enabled and state.probe_due(now)):
            return False
        return not take_probe or self._book.claim(view, found, now)

    def health(self, backend: Backend | str) -> HealthState:
        """The current health state of ``backend``; ValueError if it is not in the set."""
        view = self._view
        return view.cells[_require(view, backend)].state

    def snapshot(self) -> HealthSnapshot:
        """Every backend's health and load, and whether panic mode is on, as of now."""
        view = self._view
        return self._book.snapshot(view.backends, view, view.loads, self._decay)

    def __len__(self) -> int:
        return len(self._view.backends)

    def __repr__(self) -> str:
        view = self._view
        return (
            f"<LoadBalancer algorithm={self._algorithm!r} backends={len(view.backends)} "
            f"impaired={view.impaired}{' panic' if view.panic else ''}>"
        )






def _restore(
    backends: tuple[Backend, ...],
    algorithm: AlgorithmLike,
    health: HealthPolicy,
    health_check: ActiveCheck | None,
    on_change: OnChange | None,
    clock: Callable[[], float],
    discovery: Discovery | None = None,
    refresh: float | None = None,
) -> LoadBalancer:
    return LoadBalancer(
        backends, algorithm, health=health, health_check=health_check, on_change=on_change,
        clock=clock, discovery=discovery, refresh=refresh,
    )


def _find(view: _View, backend: Backend | str) -> Backend | None:
    if isinstance(backend, Backend):
        return backend if backend in view.cells else None
    if isinstance(backend, str):
        return view.by_address.get(Backend(backend).address)
    raise TypeError(
        f"expected a Backend or an address string, got {backend!r} ({type(backend).__name__})"
    )


def _require(view: _View, backend: Backend | str) -> Backend:
    found = _find(view, backend)
    if found is None:
        raise ValueError(f"{backend!r} is not one of this balancer's backends")
    return found


def _candidates(
    view: _View, key: bytes, limit: int, after: Backend | None = None
) -> Iterator[Backend]:
    if after is None:
        unique = UniqueIterator(view.selector.iter(key), limit)
    else:
        unique = UniqueIterator(fallbacks_after(view.selector, key, after), limit, (after,))
    yield from unique
    seen = unique.seen
    for backend in view.backends:
        if backend not in seen:
            yield backend
