"""LoadBalancer: a set of backends, a selection algorithm, and the backends' health.

What lives here: selection over one immutable view of the backend set (sorted backends, built
selector, health cells and set-wide counts), replaced whole by :meth:`LoadBalancer.update`.
Readers take the current view with a single attribute read and never lock. Every health change
is delegated to the health book (:mod:`lbclient._book`), the making of each view to
:mod:`lbclient._view`. It offers the public methods background work calls
(:meth:`~LoadBalancer.report_check`, :meth:`~LoadBalancer.update`,
:meth:`~LoadBalancer.report_discovery`), and defines the :class:`Lifecycle` port through which
``with balancer:`` starts and stops what runs beside it.

What may not: I/O, sockets, threads or tasks of its own, a clock or a random source other than
the injected ones, and any import of the checks, discovery, the services layer, the transports
or an HTTP client. It does not bind, start or stop checks or discovery, nor read a check's
settings: ``health_check`` and ``discovery`` are kept for the services layer, which makes its
lifecycle (:func:`install_lifecycle`). The one write a selection makes is taking the probe of an
ejected backend whose time is up, under the book's lock, once per ejection."""

from __future__ import annotations

import logging
import operator
import random as _random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from lbclient._book import HealthBook, OnChange
from lbclient._lifecycle import Lifecycle, Running
from lbclient._lifecycle import bad_setting as bad_setting
from lbclient._load import Load, Total
from lbclient._subset_view import Members, MemberView, check_subset
from lbclient._view import Picker, View, Views, candidates, find, require
from lbclient._zone_view import Zones, check_zone
from lbclient.backend import Backend
from lbclient.health import HealthPolicy, HealthSnapshot, HealthState, Outcome, WatchState
from lbclient.reports import LoadReport
from lbclient.selection.base import (
    AlgorithmLike,
    Key,
    check_max_iterations,
    prepare_backends,
    resolve_algorithm,
    to_key,
)
from lbclient.selection.slow_start import SlowStart, slow_start_of
from lbclient.selection.weighted import RoundRobin
from lbclient.subsets import Subset
from lbclient.zones import Zone, zone_of

__all__ = ["DEFAULT_MAX_ITERATIONS", "Lifecycle", "LoadBalancer", "install_lifecycle"]

logger = logging.getLogger("lbclient")

#: How many items ``select`` pulls from the selection iterator at most (Pingora's examples).
DEFAULT_MAX_ITERATIONS: Final = 256

#: Seconds: the time constant of latency estimates and failure penalties, unless the algorithm
#: names its own (``PeakEWMA(decay=...)``).
DEFAULT_DECAY: Final = 10.0

Accept = Callable[[Backend, bool], bool]


#: Makes the lifecycle of a balancer that has a ``health_check`` or a ``discovery``.
_make_lifecycle: Callable[[LoadBalancer], Lifecycle] | None = None


def install_lifecycle(make: Callable[[LoadBalancer], Lifecycle]) -> None:
    """Have ``make(balancer)`` give the :class:`Lifecycle` of every balancer built from now on
    with a ``health_check`` or a ``discovery`` (called once, at the end of its construction).

    lbclient's services layer (:mod:`lbclient._services`) installs itself when it is imported,
    and the modules of checks and discovery sources import it, so a balancer given one always
    has its lifecycle while the balancer imports none of them."""
    global _make_lifecycle
    _make_lifecycle = make


def _accept_ready(_backend: Backend, ready: bool) -> bool:
    return ready


class LoadBalancer(Running):
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
    * ``random``: returns a float in [0, 1); the only random source the balancer draws from,
      for slow start's ramp (``random.random``). The algorithms that draw take their own
      (``Random(seed=)``; ``random=`` of ``LeastRequest``, ``PeakEWMA``, ``WeightedRoundRobin``
      and ``Prequal``): inject seeded ones (``random.Random(7).random``) to make selection
      repeatable.
    * ``subset``: a :class:`~lbclient.Subset`: select only among its members, an unavailable
      one replaced by the next candidate outside it until it returns (None: every backend).
      Needs an algorithm that ignores the key (ValueError otherwise). Health is kept for every
      backend; panic mode is the subset's.
    * ``zone``: this client's zone, a str or a :class:`~lbclient.zones.Zone`: Envoy's rule over
      the backends' ``metadata["zone"]``, and a load spill (:mod:`lbclient.zones`; None: blind);
      a subset is taken within each zone. Key-less algorithms only (ValueError otherwise).

    The check and the discovery run on one runner per balancer (a thread and a few workers
    for sync users, tasks of the running loop for asyncio ones), kept by lbclient's services
    layer, which the balancer reaches only through its :class:`Lifecycle` port."""

    def __init__(
        self,
        backends: Iterable[Backend | str] = (),
        algorithm: AlgorithmLike = RoundRobin,
        *,
        health: HealthPolicy | None = None,
        health_check: object | None = None,
        discovery: object | None = None,
        refresh: float | None = None,
        on_change: OnChange | None = None,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
        subset: Subset | None = None,
        zone: str | Zone | None = None,
    ) -> None:
        if health is None:
            health = HealthPolicy()
        elif not isinstance(health, HealthPolicy):
            raise TypeError(f"health must be a HealthPolicy or None, got {health!r}")
        if refresh is not None and discovery is None:
            raise TypeError("refresh= applies only with discovery=")
        if on_change is not None and not callable(on_change):
            raise TypeError(f"on_change must be callable or None, got {on_change!r}")
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        if not callable(random):
            raise TypeError(f"random must be callable, got {random!r}")
        self._algorithm = resolve_algorithm(algorithm)
        subset, zone = check_subset(subset, self._algorithm), check_zone(zone, self._algorithm)
        self._policy = health
        self._clock = clock
        self._random = random
        self._book = HealthBook(health, clock, on_change, lambda: self._view)
        self._update_lock = threading.Lock()
        #: The time constant (seconds) of the latency estimate and the failure penalty.
        self._decay = float(getattr(self._algorithm, "decay", DEFAULT_DECAY))
        #: Makes each view; counts requests in flight over every backend, for bounded loads.
        self._views = Views(self._algorithm, health, clock, Total())
        self._slow_start: SlowStart | None = slow_start_of(
            getattr(self._algorithm, "slow_start", None)
        )
        #: How a select chooses in a view (the walk, the choice among the available).
        self._picker = Picker(self._book, clock, random, self._slow_start)
        prepared = prepare_backends(backends)
        self._view = self._views.view(prepared, None)
        #: The view selection reads: the full one, or the subset's (swapped in on its changes).
        split = None if zone is None else zone_of  # with a zone, a subset within each zone
        self._members = None if subset is None else Members(subset, self._views, self._swap, split)
        self._pick: View = self._view if self._members is None else self._members.build(self._view)
        self._zones = (
            None
            if zone is None
            else Zones(zone, self._views, self._picker, random, lambda: self._view)
        )
        #: What the discovery reported (refreshes, failures, error, priority), for snapshots.
        self._found: tuple[int, int, str | None, int | None] = (0, 0, None, None)
        self._health_check = health_check
        self._discovery = discovery
        self._refresh = refresh
        self._services: Lifecycle | None = None
        if health_check is not None or discovery is not None:
            make = _make_lifecycle
            if make is None:  # neither an lbclient check nor a source: nothing installed it
                if health_check is not None:
                    raise bad_setting("health_check", health_check)
                raise bad_setting("discovery", discovery)
            self._services = make(self)

    # -- reading ---------------------------------------------------------------------------

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The current backends, sorted: the full set, with a subset too (see :attr:`members`)."""
        return self._view.backends

    @property
    def members(self) -> tuple[Backend, ...]:
        """The backends selection uses now: the subset's members, replacements included (the
        current backends without a subset); :attr:`backends` is the full set."""
        pick = self._pick
        return pick.members if isinstance(pick, MemberView) else pick.backends

    @property
    def subset(self) -> Subset | None:
        """The ``subset`` setting (None: every backend)."""
        return None if self._members is None else self._members.subset

    @property
    def zone(self) -> Zone | None:
        """The ``zone`` setting, as a :class:`~lbclient.zones.Zone` (None: zone-blind)."""
        return None if self._zones is None else self._zones.zone

    def _swap(self, pick: MemberView) -> None:
        self._pick = pick

    @property
    def algorithm(self) -> object:
        """The selection algorithm instance."""
        return self._algorithm

    @property
    def policy(self) -> HealthPolicy:
        """The health policy."""
        return self._policy

    @property
    def health_check(self) -> Any:
        """The ``health_check`` setting: the active check run beside the balancer, if any."""
        return self._health_check

    @property
    def discovery(self) -> Any:
        """The ``discovery`` setting: where the backends come from, if a discovery keeps them
        current."""
        return self._discovery

    @property
    def refresh(self) -> float | None:
        """The ``refresh`` setting: seconds between a discovery's lookups (None: its own)."""
        return self._refresh

    @property
    def services(self) -> Lifecycle | None:
        """What runs beside the balancer (its discovery and active check), as the services
        layer made it; None with neither. :meth:`start` and the rest forward to it."""
        return self._services

    @property
    def panic(self) -> bool:
        """Whether panic mode is on: too few backends are healthy, so health is ignored."""
        return self._pick.panic

    def select(
        self, key: Key = b"", max_iterations: int = DEFAULT_MAX_ITERATIONS
    ) -> Backend | None:
        """The first ready backend for ``key``, or None if none is found.

        At most ``max_iterations`` items are pulled from the selection order. Choosing an
        ejected backend whose probe is due takes the probe: until that request reports back,
        no other request is sent there.

        An algorithm that follows weights and ignores the key (``RoundRobin``, ``Random``,
        ``SmoothRoundRobin``) chooses among the available backends alone, so they share what
        the unavailable ones would have had by their weights; an ejected backend whose probe
        is due is chosen first, for that one request. The key-based algorithms keep their own
        fallback: the next candidate of the key's order."""
        view = self._pick
        if (
            not view.impaired
            and self._slow_start is None
            and self._zones is None
            and type(max_iterations) is int
            and max_iterations > 0
        ):
            return view.selector.first(key)
        return self._select(view, key, max_iterations, _accept_ready)

    def select_with(self, key: Key, max_iterations: int, accept: Accept) -> Backend | None:
        """The first distinct candidate for which ``accept(backend, ready)`` is true, or None.

        Every item pulled from the selection order counts toward ``max_iterations``, repeated
        ones included. Every backend is offered in time, available or not; with an algorithm
        that follows weights and backends unavailable, the order starts with a pick among the
        available ones (see :func:`lbclient._view.order`)."""
        if not callable(accept):
            raise TypeError(f"accept must be callable as accept(backend, ready), got {accept!r}")
        return self._select(self._pick, key, max_iterations, accept)

    def _select(
        self, view: View, key: Key, max_iterations: object, accept: Accept
    ) -> Backend | None:
        limit = check_max_iterations(max_iterations)
        zones, roster = self._zones, view.roster
        if zones is not None and (zoned := zones.draw(view)) is not None:
            return zones.select(view, zoned, to_key(key), limit, accept, accept is _accept_ready)
        if roster is not None and accept is _accept_ready:
            return self._picker.choose(view, roster, to_key(key), limit)
        return self._picker.walk(view, to_key(key), limit, accept)

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
          continues from it, draws no first pick of its own, and never yields it (None)."""
        limit = check_max_iterations(max_iterations)
        if after is not None and not isinstance(after, Backend):
            raise TypeError(f"after must be a Backend or None, got {after!r}")
        walk = candidates if self._zones is None else self._zones.candidates
        return walk(self._pick, to_key(key), limit, after)

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
        found = find(view, backend)
        if found is None:
            return False
        state = view.cells[found].state
        if self._pick.panic or state.healthy:
            return state.enabled
        now = self._clock()
        if not (state.enabled and state.probe_due(now)):
            return False
        return not take_probe or self._book.claim(view, found, now)

    def health(self, backend: Backend | str) -> HealthState:
        """The current health state of ``backend``; ValueError if it is not in the set."""
        view = self._view
        return view.cells[require(view, backend)].state

    # -- the live load ------------------------------------------------------------------------

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

    def read_report(
        self,
        load: Load,
        header: str | bytes | None,
        rif: str | None = None,
        latency_us: str | None = None,
        backend: Backend | None = None,
        probe: bool = False,
    ) -> LoadReport | None:
        """Read a response's (or a ``probe``'s) load report into ``load`` at the balancer's
        clock (see :meth:`Load.read`); one kept is also told to the current selector, as
        ``selector.reported(backend, report, probe)`` where it has that method."""
        report = load.read(header, rif, latency_us, self._clock())
        tell = None if backend is None else getattr(self._pick.selector, "reported", None)
        if report is not None and tell is not None:
            tell(backend, report, probe)
        return report

    def report_load(
        self,
        backend: Backend | str,
        header: str | bytes | None = None,
        *,
        rif: str | None = None,
        latency_us: str | None = None,
        probe: bool = False,
    ) -> LoadReport | None:
        """Record the load report ``backend`` sent (an ``endpoint-load-metrics`` header's
        value, or Prequal's ``x-prequal-rif`` and ``x-prequal-latency-us``), as a response or a
        ``probe`` brought it; what was kept, or None (refused and counted, or none given).
        ValueError if ``backend`` is not in the set."""
        found = require(view := self._view, backend)
        return self.read_report(view.loads[found], header, rif, latency_us, found, probe)

    def probe_targets(self) -> list[Backend]:
        """The backends to probe for one request, if the algorithm probes (Prequal): ready
        ones only; none otherwise. Deciding only: the transports send the probes."""
        ask = getattr(self._pick.selector, "probes_for_request", None)
        return [] if ask is None else list(ask(self.ready))

    def load(self, backend: Backend | str) -> Load:
        """The live load of ``backend``; ValueError if it is not in the set."""
        view = self._view
        return view.loads[require(view, backend)]

    # -- changes ------------------------------------------------------------------------------

    def update(self, backends: Iterable[Backend | str]) -> bool:
        """Replace the backend set; return whether it changed.

        Sets are compared by (address, weight) and metadata (a backend whose metadata changed,
        its zone say, is replaced by the new one and keeps its health and load). Backends that
        stay keep their health; new ones start healthy and enabled. Readers see the old view or
        the new one, never a mix.

        A change costs what changed: backends equal to current ones (same metadata) are taken
        as the current objects, and an algorithm that can rebuild its selector from the
        previous one (:class:`~lbclient.selection.base.Rebuildable`) is asked to."""
        from lbclient.selection.base import changes, prepare_update

        hint = self._view
        prepared, change = prepare_update(backends, hint.backends, hint.by_address)
        with self._update_lock:
            old = self._view
            if prepared is old.backends or (
                len(prepared) == len(old.backends)
                and all(map(operator.is_, prepared, old.backends))
            ):
                return False  # the same objects: no metadata changed either
            if old is not hint:  # another update came first: the change is against its set
                change = changes(old.backends, prepared)
            selector = self._views.selector(prepared, old, change)
            with self._book.lock:
                # Cells and counts are taken under the lock: no health change is lost.
                self._view = view = self._views.view(
                    prepared, old, selector, (change.removed, change.added)
                )
                self._pick = view if self._members is None else self._members.build(view)
        logger.debug("backends updated: %d backends", len(prepared))
        return True

    def set_enabled(self, backend: Backend | str, enabled: bool) -> None:
        """Switch ``backend`` on or off by hand; ValueError if it is not in the current set."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {enabled!r}")
        if not self._book.set_enabled(require(self._view, backend), enabled):
            raise ValueError(f"{backend!r} is not one of this balancer's backends")

    def report(self, backend: Backend | str, outcome: bool | Outcome) -> bool:
        """Record the outcome of one request to ``backend``; return whether its health changed.

        ``outcome`` is an :class:`Outcome`, or a bool: True for a success, False for a
        connection-level failure. Reports for a backend no longer in the set (an update raced
        the request) are ignored."""
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
        found = find(self._view, backend)
        return found is not None and self._book.observe(found, outcome)

    def report_check(
        self,
        backend: Backend | str,
        ok: bool,
        detail: str = "",
        *,
        successes: int = 1,
        failures: int = 1,
    ) -> bool:
        """Record one active health check result for ``backend``; return whether its health
        changed. The check's job calls this; so may a checker of your own.

        ``successes`` and ``failures`` are the results in a row that flip the check's verdict
        up and down (1 and 1: every result decides); a check passes its own thresholds.
        ``detail`` says why a check failed, for the log."""
        if not isinstance(ok, bool):
            raise TypeError(f"ok must be a bool, got {ok!r}")
        found = find(self._view, backend)
        return found is not None and self._book.check(found, ok, detail, (successes, failures))

    def report_discovery(
        self,
        *,
        refreshes: int,
        failures: int,
        error: str | None,
        priority: int | None,
        part_failures: dict[str, int] | None = None,
        partial: str | None = None,
        watch: WatchState | None = None,
    ) -> None:
        """Record how the discovery keeping the backends current fares, for :meth:`snapshot`:
        answers so far (empty ones included), failed lookups, why the latest lookup failed
        (None once one succeeds), the priority group in use (None without priorities), the
        parts of answers that failed while the rest answered, counted by part (DNS: by record
        type, ``{"AAAA": 3}``), what failed in the latest answer (None once one is whole), and
        a watched discovery's state (:class:`~lbclient.health.WatchState`).
        The discovery's refresh calls this after each lookup; so may a discovery of your own.
        """
        self._book.discovery_parts = (dict(part_failures or {}), partial)
        self._book.discovery_watch = watch
        self._found = (refreshes, failures, error, priority)

    def snapshot(self) -> HealthSnapshot:
        """Every backend's health and load, and whether panic mode is on, as of now."""
        view = self._view
        shot = self._book.snapshot(view.backends, view, view.loads, self._decay, self._found)
        shot = shot if self._members is None else self._members.shown(shot)
        return shot if self._zones is None else self._zones.shown(shot, self._pick)

    def __len__(self) -> int:
        return len(self._view.backends)

    def __repr__(self) -> str:
        view = self._view
        return (
            f"<LoadBalancer algorithm={self._algorithm!r} backends={len(view.backends)} "
            f"impaired={view.impaired}{' panic' if view.panic else ''}>"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # The settings travel; health, load, and what ran beside the balancer start afresh.
        settings: dict[str, Any] = {
            "health": self._policy,
            "health_check": self._health_check,
            "on_change": self._book.on_change,
            "clock": self._clock,
            "discovery": self._discovery,
            "refresh": self._refresh,
            "subset": self.subset,
            "zone": self.zone,
        }
        if self._random is not _random.random:
            settings["random"] = self._random
        return (_restore, (self.backends, self._algorithm, settings))


def _restore(
    backends: tuple[Backend, ...], algorithm: AlgorithmLike, settings: dict[str, Any]
) -> LoadBalancer:
    return LoadBalancer(backends, algorithm, **settings)
