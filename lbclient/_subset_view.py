"""Subsetting wired into a balancer: the view its selection reads when it has a subset.

What lives here: :func:`check_subset` (a ``subset=`` setting, refused with a key-based
algorithm); :class:`MemberView`, the immutable view of the backends a client with a subset
selects among; and :class:`Members`, which makes a balancer's member views and replaces one whole
when a change of health moves a backend in or out.

A member view holds the subset's members (the first ``size`` available candidates of
:meth:`Subset.members`: an unavailable member replaced by the next available candidate outside
the subset) and, held beside them, the subset's own backends that are unavailable but enabled:
an ejected member stays reachable for its probe, and when the probe succeeds it is a member
again and its replacement leaves. With a zone (``split``: a backend's zone), the subset is taken
within each zone: ``size`` members of each zone's backends, so that zone-aware routing keeps a
subset's evenness in the zone it routes to. Its health cells and loads are the balancer's own
objects (the full view's), so health is kept for every backend of the full set. Panic mode is
the subset's: fewer available members than the panic threshold of the subset's size (of each
zone's, with a zone; or of the enabled backends, when fewer).

The full view tells :meth:`Members.restate` of each change under the book's lock; a change that
moves no backend in or out of availability (a failure streak, a probe taken) is kept in the
member view in place, as the full view keeps its own; one that does makes a new member view
only if the members or the held backends change, and the balancer swaps it in one assignment.

What may not: locks, a clock, I/O, threads. Part of the core.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from lbclient._book import Cell
from lbclient._load import Load
from lbclient._view import View, Views
from lbclient.backend import Backend
from lbclient.health import HealthPolicy, HealthSnapshot, HealthState
from lbclient.selection.base import Selector
from lbclient.subsets import Subset

__all__ = ["MemberView", "Members", "check_subset"]


def check_subset(subset: object, algorithm: object) -> Subset | None:
    """``subset`` as a balancer's setting: None, or a :class:`Subset` with an algorithm that
    ignores the key (its class says ``keyed = False``). TypeError for another value,
    ValueError with a key-based algorithm."""
    if subset is None:
        return None
    if not isinstance(subset, Subset):
        raise TypeError(f"subset must be an lbclient.Subset or None, got {subset!r}")
    if getattr(algorithm, "keyed", True):
        raise ValueError(
            f"subset= needs an algorithm that ignores the key (RoundRobin, Random, "
            f"SmoothRoundRobin, LeastRequest, PeakEWMA, WeightedRoundRobin, Prequal), not "
            f"{algorithm!r}: each client of a fleet has a subset of its own, so a key-based "
            "algorithm would send one key to different backends from different clients and "
            "break the key agreement it is chosen for"
        )
    return subset


def _sound(state: HealthState) -> bool:
    return state.healthy and state.enabled


class MemberView(View):
    """The view a balancer with a subset selects in: the members and the held backends (see
    the module). ``members`` in candidate order, ``held`` the subset's own backends
    unavailable now, ``subset`` the subset regardless of health, ``quota`` the size panic
    mode is measured against."""

    __slots__ = ("held", "members", "quota", "subset")

    def __init__(
        self,
        backends: tuple[Backend, ...],
        selector: Selector,
        cells: dict[Backend, Cell],
        loads: dict[Backend, Load],
        policy: HealthPolicy,
        shape: tuple[tuple[Backend, ...], tuple[Backend, ...], tuple[Backend, ...], int],
    ) -> None:
        self.members, self.held, self.subset, self.quota = shape
        super().__init__(backends, selector, cells, loads, policy)

    @property
    def enabled(self) -> int:
        """The subset's size (the enabled backends, when fewer): what panic is measured by."""
        return self.quota

    @property
    def healthy(self) -> int:
        """The available members."""
        return len(self.cells) - self.disabled - self.unhealthy


class Members:
    """Makes the member views of one balancer with ``subset``: ``views`` builds their
    selectors (and tells of every change, see :meth:`restate`); ``publish`` swaps a new member
    view in."""

    __slots__ = ("current", "full", "order", "publish", "split", "subset", "views")

    def __init__(
        self,
        subset: Subset,
        views: Views,
        publish: Callable[[MemberView], object],
        split: Callable[[Backend], str] | None = None,
    ) -> None:
        self.subset = subset
        self.views = views
        self.publish = publish
        #: Backends in groups (a balancer's zones), each with a subset of its own; or None.
        self.split = split
        #: The full view the current member view was made of, and that member view.
        self.full: View | None = None
        self.current: MemberView | None = None
        #: The full set and its candidates in this client's order, a tuple per group (computed
        #: once per set).
        self.order: tuple[tuple[Backend, ...], tuple[tuple[Backend, ...], ...]] = ((), ())
        views.watch = self.restate

    def build(self, full: View) -> MemberView:
        """The member view of ``full`` (under the book's lock once ``full`` is shared)."""
        if self.order[0] is not full.backends:
            self.order = (full.backends, self._groups(full.backends))
        full.watch = self.views.watch  # the first view was made before this was watching
        self.full = full
        self.current = self._make(full, *self._chosen(full))
        return self.current

    def _groups(self, backends: tuple[Backend, ...]) -> tuple[tuple[Backend, ...], ...]:
        """The candidates of each group (one group, the whole set, without ``split``)."""
        split = self.split
        if split is None:
            return (self.subset.candidates(backends),)
        groups: dict[str, list[Backend]] = {}
        for backend in backends:
            groups.setdefault(split(backend), []).append(backend)
        return tuple(self.subset.candidates(groups[name]) for name in sorted(groups))

    def _chosen(self, full: View) -> tuple[tuple[Backend, ...], tuple[Backend, ...]]:
        """The members (the first ``size`` available candidates of each group) and the held
        backends."""
        cells = full.cells
        size = self.subset.size
        members: list[Backend] = []
        held: list[Backend] = []
        for group in self.order[1]:
            taken = 0
            for i, backend in enumerate(group):
                state = cells[backend].state
                if _sound(state):
                    members.append(backend)
                    taken += 1
                    if taken == size:
                        break
                elif i < size and state.enabled:
                    held.append(backend)
        return tuple(members), tuple(held)

    def _quota(self, full: View) -> int:
        return min(sum(min(self.subset.size, len(g)) for g in self.order[1]), full.enabled)

    def _make(
        self, full: View, members: tuple[Backend, ...], held: tuple[Backend, ...]
    ) -> MemberView:
        chosen = set(members).union(held)
        backends = tuple(b for b in full.backends if b in chosen)
        views = self.views
        selector = views.selector(backends, None, None)
        cells = {b: full.cells[b] for b in backends}
        loads = {b: full.loads[b] for b in backends}
        subset = tuple(b for group in self.order[1] for b in group[: self.subset.size])
        quota = self._quota(full)
        view = MemberView(
            backends, selector, cells, loads, views.policy, (members, held, subset, quota)
        )
        attach = getattr(selector, "attach", None)
        if attach is not None:  # load-aware selectors read the live load
            attach(loads, views.clock, views.total)
        return view

    def restate(
        self, full: View, backend: Backend, before: HealthState, after: HealthState
    ) -> None:
        """Under the book's lock: ``backend`` of ``full`` changed from ``before`` to ``after``."""
        current = self.current
        if full is not self.full or current is None:
            return  # a view an update replaced
        inside = backend in current.cells
        if _sound(before) == _sound(after) and before.enabled == after.enabled:
            if inside:
                current.restate(backend, before, after, False)
            return
        members, held = self._chosen(full)
        quota = self._quota(full)
        if not inside and (members, held, quota) == (current.members, current.held, current.quota):
            return
        self.current = self._make(full, members, held)
        self.publish(self.current)

    def shown(self, snapshot: HealthSnapshot) -> HealthSnapshot:
        """``snapshot`` of the full set with the subset's panic mode, subset and members."""
        current = self.current
        assert current is not None
        return replace(
            snapshot, panic=current.panic, subset=current.subset, members=current.members
        )
