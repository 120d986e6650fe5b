"""Zone-aware routing wired into a balancer: which zone a request goes to, and its order there.

What lives here: :func:`check_zone` (a ``zone=`` setting: a str or a :class:`~lbclient.zones.Zone`,
refused with a key-based algorithm); :class:`ZoneState`, the immutable plan of one view (the
:class:`~lbclient.zones.ZonePlan` made by :meth:`Zone.plan` over the full set's backends per
zone, and a selector per zone over that zone's available backends in the view the balancer
selects in: the full set, or the subset's members, which with a zone are a subset taken within
each zone); and :class:`Zones`, which keeps the state of the balancer's current view.

The state is made lazily by the reader that finds it stale: the full view tells
:meth:`Zones.restate` of each change under the book's lock, and a change that moves a backend
in or out of availability bumps a generation; a reader whose view or generation differs from
the state's makes a new one (reading the generation first) and stores it in one assignment.
With a load spill, the state also lapses ``load_every`` seconds (the balancer's clock) after
its reading of the load: the reader that finds it lapsed reads the load once (one pass over
the view's available backends, no lock: plain attributes), plans again, and keeps the zone
selectors when the plan is the same. So a select reads the clock and compares, and the pass
over the backends happens at most once per interval (and per change of availability).
Readers never lock.

A request draws its zone by the plan's shares with the balancer's random source, then selects
among that zone's available backends with the balancer's algorithm; a retry goes to one more
backend of the zone (its selector's order), then to the other zones', then to the rest. A
zone-blind plan (too few backends, the local zone unhealthy, unknown or overloaded) or panic
mode selects as without zones.

What may not: locks, a clock other than the balancer's, I/O, threads. Part of the core.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from itertools import chain, islice

from lbclient._view import Picker, Roster, View, Views, Watch, candidates, order
from lbclient.backend import Backend, shown
from lbclient.health import HealthSnapshot, HealthState
from lbclient.selection.base import Selector, UniqueIterator, fallbacks_after
from lbclient.zones import Zone, ZonePlan, zone_counts, zone_of

__all__ = ["ZoneState", "Zones", "check_zone"]


def check_zone(zone: object, algorithm: object) -> Zone | None:
    """``zone`` as a balancer's setting: None, or a :class:`Zone` (a non-empty str is
    ``Zone(zone)``) with an algorithm that ignores the key. TypeError for another value,
    ValueError for an empty one or with a key-based algorithm."""
    if zone is None:
        return None
    if isinstance(zone, str):
        zone = Zone(zone)
    elif not isinstance(zone, Zone):
        raise TypeError(
            f"zone must be a str, an lbclient.zones.Zone or None, got {shown(zone)} "
            f"({type(zone).__name__})"
        )
    if getattr(algorithm, "keyed", True):
        raise ValueError(
            f"zone= needs an algorithm that ignores the key (RoundRobin, Random, "
            f"SmoothRoundRobin, LeastRequest, PeakEWMA, WeightedRoundRobin, Prequal), not "
            f"{algorithm!r}: zone-aware routing sends a key to the client's own zone, so "
            "clients in different zones would send one key to different backends and break "
            "the key agreement a key-based algorithm is chosen for"
        )
    return zone


def _sound(state: HealthState) -> bool:
    return state.healthy and state.enabled


def _utilization(view: View, backend: Backend) -> float | None:
    report = view.loads[backend].report
    if report is None:
        return None
    used = report.application_utilization
    return report.cpu_utilization if used is None else used


class ZoneState:
    """The zone plan of one view at one generation, and a selector per zone it routes to
    (``picks``: zone, cumulative share, selector; empty when routing is zone-blind);
    ``counts`` the full set's (healthy, total) per zone; ``due`` the clock value at which its
    reading of the load lapses (infinity without a load spill)."""

    __slots__ = ("counts", "due", "generation", "picks", "plan", "selectors", "view")

    def __init__(
        self,
        view: View,
        generation: int,
        plan: ZonePlan,
        selectors: dict[str, Selector],
        counts: tuple[dict[str, int], dict[str, int]],
        due: float,
    ) -> None:
        self.view = view
        self.generation = generation
        self.plan = plan
        self.selectors = selectors
        self.counts = counts
        self.due = due
        picks: list[tuple[str, float, Selector]] = []
        upto = 0.0
        for zone, share in plan.shares.items() if selectors else ():
            upto += share
            if zone in selectors:  # a zone with no available backend in the view: none
                picks.append((zone, upto, selectors[zone]))
        self.picks = tuple(picks)


class Zones:
    """Keeps the zone state of one balancer with ``zone``: ``views`` builds the zone
    selectors (and tells of every change, see :meth:`restate`); ``picker`` and ``random`` are
    the balancer's; ``full()`` is the balancer's full view now."""

    __slots__ = (
        "full",
        "generation",
        "local",
        "picker",
        "prior",
        "random",
        "state",
        "views",
        "zone",
    )

    def __init__(
        self,
        zone: Zone,
        views: Views,
        picker: Picker,
        random: Callable[[], float],
        full: Callable[[], View],
    ) -> None:
        self.zone = zone
        self.local = zone.name
        self.views = views
        self.picker = picker
        self.random = random
        self.full = full
        #: Bumped under the book's lock by every change of availability.
        self.generation = 0
        self.state: ZoneState | None = None
        #: The watcher before this one (a subset's), told first.
        self.prior: Watch | None = views.watch
        views.watch = full().watch = self.restate

    def restate(
        self, full: View, backend: Backend, before: HealthState, after: HealthState
    ) -> None:
        """Under the book's lock: ``backend`` of ``full`` changed from ``before`` to ``after``."""
        if self.prior is not None:
            self.prior(full, backend, before, after)
        if _sound(before) != _sound(after) or before.enabled != after.enabled:
            self.generation += 1

    def current(self, view: View) -> ZoneState:
        """The zone state of ``view`` now (made afresh when stale)."""
        state = self.state
        generation = self.generation
        if state is not None and state.view is view and state.generation == generation:
            if state.due == math.inf:
                return state
            now = self.views.clock()
            if now < state.due:
                return state
            state = self.state = self._make(view, generation, state, now)
            return state
        state = self.state = self._make(view, generation, state)
        return state

    def reading(self, view: View) -> dict[str, float]:
        """The load per available backend of each zone in ``view`` (its mean; a zone with no
        reading left out), as :attr:`Zone.load` says."""
        cells, loads = view.cells, view.loads
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        utilization = self.zone.load == "utilization"
        for backend in view.backends:
            if not _sound(cells[backend].state):
                continue
            if utilization:
                value = _utilization(view, backend)
                if value is None:
                    continue
            else:
                value = loads[backend].in_flight
            zone = zone_of(backend)
            sums[zone] = sums.get(zone, 0.0) + value
            counts[zone] = counts.get(zone, 0) + 1
        return {zone: sums[zone] / counts[zone] for zone in sums}

    def _make(
        self, view: View, generation: int, before: ZoneState | None, now: float | None = None
    ) -> ZoneState:
        zone = self.zone
        fresh = before is None or before.view is not view or before.generation != generation
        if fresh:
            full = self.full()
            cells = full.cells
            counts = zone_counts(full.backends, lambda b: _sound(cells[b].state))
        else:
            assert before is not None
            counts = before.counts
        spill = zone.load_spill is not None
        if spill and now is None:
            now = self.views.clock()
        load = self.reading(view) if spill else None
        spilled = before is not None and before.plan.spilled
        plan = zone.plan(counts[0], counts[1], load, spilled)
        due = math.inf if now is None else now + zone.load_every
        if not fresh and before is not None and plan == before.plan:
            return ZoneState(view, generation, plan, before.selectors, counts, due)
        selectors: dict[str, Selector] = {}
        if plan.mode in ("local", "residual"):
            cells = view.cells
            views = self.views
            for name in plan.shares:
                chosen = tuple(
                    b for b in view.backends if zone_of(b) == name and _sound(cells[b].state)
                )
                if not chosen:
                    continue
                selector = views.selector(chosen, None, None)
                attach = getattr(selector, "attach", None)
                if attach is not None:  # load-aware selectors read the live load
                    attach({b: view.loads[b] for b in chosen}, views.clock, views.total)
                selectors[name] = selector
        return ZoneState(view, generation, plan, selectors, counts, due)

    def draw(self, view: View) -> Selector | None:
        """The selector of the zone drawn for one request; None to select as without zones
        (a zone-blind plan, or panic mode)."""
        state = self.current(view)
        picks = state.picks
        if not picks or view.panic:
            return None
        if len(picks) == 1:
            return picks[0][2]
        point = self.random()
        for _, upto, selector in picks:
            if point < upto:
                return selector
        return picks[-1][2]

    def select(
        self,
        view: View,
        zoned: Selector,
        key: bytes,
        limit: int,
        accept: Callable[[Backend, bool], bool],
        plain: bool,
    ) -> Backend | None:
        """``select`` in ``view`` with ``zoned``, the drawn zone's selector: a due probe, else
        a pick there (``plain``: the balancer's plain acceptance, with a roster); otherwise
        the walk of the zone's order then every backend's."""
        roster = view.roster
        if plain and roster is not None:
            here = Roster(zoned, roster.down, roster.disabled, roster.probes)
            return self.picker.choose(view, here, key, limit)
        walked = chain(islice(zoned.iter(key), len(zoned.backends)), order(view, key))
        return self.picker.walk(view, key, limit, accept, walked)

    def candidates(
        self, view: View, key: bytes, limit: int, after: Backend | None = None
    ) -> Iterator[Backend]:
        """:func:`lbclient._view.candidates` in zone order. A first attempt: the drawn zone's
        backends, then every backend's order. From ``after``: one more backend of its zone
        (its zone's selector's order), then the other zones' backends, then every backend's
        order; so a request whose zone died is saved by its next retry."""
        state = self.current(view)
        zoned = None
        if after is not None and not view.panic:
            zoned = state.selectors.get(zone_of(after))
        elif after is None:
            zoned = self.draw(view)
        if zoned is None:
            return candidates(view, key, limit, after)
        rest = candidates(view, key, limit, after)
        if after is None:
            size = len(zoned.backends)
            return UniqueIterator(chain(zoned.iter(key), rest), len(view.backends) + size)
        first = (after,)
        near = UniqueIterator(fallbacks_after(zoned, key, after), len(zoned.backends), first)
        here = zone_of(after)
        away = (b for b in candidates(view, key, limit, after) if zone_of(b) != here)
        pulls = 2 * len(view.backends) + 1
        return UniqueIterator(chain(islice(near, 1), away, rest), pulls, first)

    def shown(self, snapshot: HealthSnapshot, view: View) -> HealthSnapshot:
        """``snapshot`` with the zone plan of ``view``."""
        return replace(snapshot, zones=self.current(view).plan)
