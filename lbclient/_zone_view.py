"""Zone-aware routing wired into a balancer: which zone a request goes to, and its order there.

What lives here: :func:`check_zone` (a ``zone=`` setting, refused with a key-based algorithm);
:class:`ZoneState`, the immutable plan of one view (the :class:`~lbclient.zones.ZonePlan` over
the backends the balancer selects among, the full set or the subset's members, and a selector
per zone over that zone's available backends); and :class:`Zones`, which keeps the state of the
balancer's current view.

The state is made lazily by the reader that finds it stale: the full view tells
:meth:`Zones.restate` of each change under the book's lock, and a change that moves a backend
in or out of availability bumps a generation; a reader whose view or generation differs from
the state's makes a new one (reading the generation first) and stores it in one assignment.
Readers never lock.

A request draws its zone by the plan's shares with the balancer's random source, then selects
among that zone's available backends with the balancer's algorithm; a retry goes to one more
backend of the zone (its selector's order), then to the other zones', then to the rest. A
zone-blind plan (too few backends, the local zone unhealthy or unknown) or panic mode selects as
without zones.

What may not: locks, a clock, I/O, threads. Part of the core.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from itertools import chain, islice

from lbclient._view import Picker, Roster, View, Views, Watch, candidates, order
from lbclient.backend import Backend, shown
from lbclient.health import HealthSnapshot, HealthState
from lbclient.selection.base import Selector, UniqueIterator, fallbacks_after
from lbclient.zones import ZonePlan, plan_zones, zone_counts, zone_of

__all__ = ["ZoneState", "Zones", "check_zone"]


def check_zone(zone: object, algorithm: object) -> str | None:
    """``zone`` as a balancer's setting: None, or a non-empty str with an algorithm that
    ignores the key. TypeError for another value, ValueError for an empty one or with a
    key-based algorithm."""
    if zone is None:
        return None
    if not isinstance(zone, str):
        raise TypeError(f"zone must be a str or None, got {shown(zone)} ({type(zone).__name__})")
    if not zone or zone.isspace():
        raise ValueError("zone must not be empty")
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


class ZoneState:
    """The zone plan of one view at one generation, and a selector per zone it routes to
    (``picks``: zone, cumulative share, selector; empty when routing is zone-blind)."""

    __slots__ = ("generation", "picks", "plan", "selectors", "view")

    def __init__(
        self,
        view: View,
        generation: int,
        plan: ZonePlan,
        selectors: dict[str, Selector],
    ) -> None:
        self.view = view
        self.generation = generation
        self.plan = plan
        self.selectors = selectors
        picks: list[tuple[str, float, Selector]] = []
        upto = 0.0
        for zone, share in plan.shares.items() if selectors else ():
            upto += share
            picks.append((zone, upto, selectors[zone]))
        self.picks = tuple(picks)


class Zones:
    """Keeps the zone state of one balancer in zone ``local``: ``views`` builds the zone
    selectors (and tells of every change, see :meth:`restate`); ``picker`` and ``random`` are
    the balancer's."""

    __slots__ = ("generation", "local", "picker", "prior", "random", "state", "views")

    def __init__(
        self,
        local: str,
        views: Views,
        picker: Picker,
        random: Callable[[], float],
        full: View,
    ) -> None:
        self.local = local
        self.views = views
        self.picker = picker
        self.random = random
        #: Bumped under the book's lock by every change of availability.
        self.generation = 0
        self.state: ZoneState | None = None
        #: The watcher before this one (a subset's), told first.
        self.prior: Watch | None = views.watch
        views.watch = full.watch = self.restate

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
            return state
        state = self.state = self._make(view, generation)
        return state

    def _make(self, view: View, generation: int) -> ZoneState:
        cells = view.cells
        backends = view.backends

        def available(backend: Backend) -> bool:
            return _sound(cells[backend].state)

        healthy, total = zone_counts(backends, available)
        plan = plan_zones(self.local, healthy, total=total)
        selectors: dict[str, Selector] = {}
        if plan.mode in ("local", "residual"):
            views = self.views
            for zone in plan.shares:
                chosen = tuple(b for b in backends if zone_of(b) == zone and available(b))
                selector = views.selector(chosen, None, None)
                attach = getattr(selector, "attach", None)
                if attach is not None:  # load-aware selectors read the live load
                    attach({b: view.loads[b] for b in chosen}, views.clock, views.total)
                selectors[zone] = selector
        return ZoneState(view, generation, plan, selectors)

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
