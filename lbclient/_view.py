"""The view: one backend set as every request reads it, and how the next one is made.

What lives here: :class:`View`, the immutable snapshot a balancer swaps in one assignment (the
sorted backends, their selector, their health cells and set-wide counts, their live loads, an
index by address, and the :class:`Roster` of the backends available now); :class:`Views`,
which makes a balancer's views, building or rebuilding the selector with its algorithm and
carrying health and load over for the backends that stay, adjusting the counts for what changed
alone; the lookups a request makes in one view (:func:`find`, :func:`require`, :func:`order`,
:func:`candidates`); and :class:`Picker`, how a balancer's ``select`` chooses in one view, with
the clock and random source the balancer was given.

The roster is what a selection that follows weights (round robin, random, smooth) chooses
among while backends are unavailable: the selector over the available ones (the view's own
while all are), and the ejected backends whose probe may come due. The health book replaces it
whole, under its lock, through :meth:`View.restate` when a change moves a backend in or out;
changes that move none (a failure streak growing) leave it alone, and with every backend
available it is the view's selector, so the common path costs nothing more.

What may not: locks (the balancer and the health book hold them; a probe is taken through the
book), a clock or a random source other than the ones passed in, I/O, threads. Part of the
core.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from operator import itemgetter
from typing import Any

from lbclient._book import Cell, HealthBook, Tally
from lbclient._load import Load, Total
from lbclient.backend import Backend
from lbclient.health import HealthPolicy, HealthState
from lbclient.selection.base import Selector, UniqueIterator, among, fallbacks_after, without
from lbclient.selection.slow_start import SlowStart

__all__ = ["Picker", "Roster", "View", "Views", "candidates", "find", "order", "require"]

_NONE: frozenset[Backend] = frozenset()
#: Told of a change of a backend in a view: ``watch(view, backend, before, after)``.
Watch = Callable[["View", Backend, HealthState, HealthState], None]
_time = itemgetter(0)


def _probe_time(state: HealthState) -> float | None:
    """When the probe of an unavailable backend may be due (None: not by the clock alone, as
    for a backend switched off, failing its checks, or not ejected)."""
    until = state.ejected_until
    if until is None or not state.enabled or state.checked is False:
        return None
    probing = state.probe_until
    return until if probing is None or probing < until else probing


def _moved(backends: tuple[Backend, ...], backend: Backend, present: bool) -> tuple[Backend, ...]:
    """The sorted ``backends`` with ``backend`` in them (``present``) or not."""
    i = bisect_left(backends, backend)
    there = i < len(backends) and (backends[i] is backend or backends[i] == backend)
    if present == there:
        return backends
    if present:
        return (*backends[:i], backend, *backends[i:])
    return backends[:i] + backends[i + 1 :]


class Roster:
    """The backends a selection that follows weights may choose now, in one view: immutable,
    replaced whole.

    ``selector`` picks among the available ones (the view's own while all are); ``down`` are
    the backends not healthy and enabled, ``disabled`` those switched off by hand (in panic
    mode only these are out); ``probes`` are the ejected, enabled backends by the clock value
    from which their probe may be due (earliest first), ``due`` the earliest of those.
    """

    __slots__ = ("disabled", "down", "due", "probes", "selector")

    def __init__(
        self,
        selector: Selector,
        down: frozenset[Backend] = _NONE,
        disabled: frozenset[Backend] = _NONE,
        probes: tuple[tuple[float, Backend], ...] = (),
    ) -> None:
        self.selector = selector
        self.down = down
        self.disabled = disabled
        self.probes = probes
        self.due = probes[0][0] if probes else math.inf


class View(Tally):
    """What one request reads: the backend set, its selector, its health tally and the
    backends' live load.

    ``previous`` is the view this one replaces when the backends that left it (``removed``)
    and joined it (``added``) are known: then the counts and the index by address are carried
    over and adjusted for those alone (read under the book's lock), so that a small change
    to a large set costs what changed.
    """

    __slots__ = ("backends", "by_address", "loads", "roster", "selector", "watch")

    #: The backends available now and the selector among them; None for a selection that
    #: keeps its own fallback order (the key-based ones). Replaced by :meth:`restate`.
    roster: Roster | None

    def __init__(
        self,
        backends: tuple[Backend, ...],
        selector: Selector,
        cells: dict[Backend, Cell],
        loads: dict[Backend, Load],
        policy: HealthPolicy,
        previous: View | None = None,
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
        self.roster = None
        #: Told of every change after this view's own (a balancer's subset: see
        #: :mod:`lbclient._subset_view`); None for none.
        self.watch: Watch | None = None
        if among(selector, backends) is not None:
            self.roster = self._first_roster(previous, removed, added)

    def _first_roster(
        self, previous: View | None, removed: tuple[Backend, ...], added: tuple[Backend, ...]
    ) -> Roster:
        """The roster of a new view: ``previous``'s, less the backends that left and with
        those that joined, reading no other backend's state (counted afresh without
        ``previous``). The selector among the available starts afresh, as the view's own
        does."""
        if not self.impaired:
            return Roster(self.selector)
        cells = self.cells
        known = None if previous is None else previous.roster
        if known is None or previous is None:
            states = ((b, c.state) for b, c in cells.items())
            impaired = [(b, s) for b, s in states if not (s.healthy and s.enabled)]
            down = frozenset(b for b, _ in impaired)
            disabled = frozenset(b for b, state in impaired if not state.enabled)
            return self._roster(down, disabled, None)
        gone = frozenset(removed)
        joined = [(b, cells[b].state) for b in added]
        down = (known.down - gone).union(b for b, s in joined if not (s.healthy and s.enabled))
        disabled = (known.disabled - gone).union(b for b, s in joined if not s.enabled)
        probes = None
        available = None
        if self.panic == previous.panic:
            if not self.panic:
                left = set(map(id, removed))
                entries = [e for e in known.probes if id(e[1]) not in left]
                for backend, state in joined:
                    due = _probe_time(state)
                    if due is not None and not (state.healthy and state.enabled):
                        insort(entries, (due, backend), key=_time)
                probes = tuple(entries)
            if len(removed) + len(added) <= 64:  # a few: moved one by one, as copies
                out = disabled if self.panic else down
                available = known.selector.backends
                for backend in removed:
                    available = _moved(available, backend, False)
                for backend in added:
                    available = _moved(available, backend, backend not in out)
        return self._roster(down, disabled, None, None, probes, available)

    def _roster(
        self,
        down: frozenset[Backend],
        disabled: frozenset[Backend],
        current: Selector | None,
        kept: tuple[frozenset[Backend], Selector] | None = None,
        probes: tuple[tuple[float, Backend], ...] | None = None,
        available: tuple[Backend, ...] | None = None,
    ) -> Roster:
        """The roster with these backends down and disabled; the selector among the available
        (``available``, or found) carries on from ``current``, or is ``kept``'s (the backends
        that were out, and their selector) if the same backends are out; ``probes`` as given
        (None: found)."""
        out = disabled if self.panic else down
        if kept is not None and kept[0] == out:
            selector: Selector | None = kept[1]
        else:
            if available is None:
                available = without(self.backends, out)
            selector = among(self.selector, available, current)
        assert selector is not None  # the view has a roster only for such a selector
        if probes is None:
            probes = () if self.panic else self._probes(down)
        return Roster(selector, down, disabled, probes)

    def _probes(self, down: Iterable[Backend]) -> tuple[tuple[float, Backend], ...]:
        cells = self.cells
        times = ((_probe_time(cells[b].state), b) for b in down)
        return tuple(sorted(((t, b) for t, b in times if t is not None), key=_time))

    @staticmethod
    def _reprobed(
        probes: tuple[tuple[float, Backend], ...], own: Backend, after: HealthState
    ) -> tuple[tuple[float, Backend], ...]:
        """``probes`` with ``own``'s entry (the view's object) as ``after`` has it."""
        kept = [entry for entry in probes if entry[1] is not own]
        due = _probe_time(after)
        if due is not None and not (after.healthy and after.enabled):
            insort(kept, (due, own), key=_time)
        return tuple(kept)

    def restate(
        self, backend: Backend, before: HealthState, after: HealthState, flipped: bool
    ) -> None:
        """Under the book's lock: keep the roster current after ``backend``'s change, and tell
        :attr:`watch`."""
        if self.watch is not None:
            self.watch(self, backend, before, after)
        roster = self.roster
        if roster is None:
            return
        was = before.healthy and before.enabled
        now = after.healthy and after.enabled
        own = self.by_address.get(backend.address, backend)
        if was == now and before.enabled == after.enabled and not flipped:
            if _probe_time(before) != _probe_time(after) and not self.panic:
                timed = self._reprobed(roster.probes, own, after)
                self.roster = Roster(roster.selector, roster.down, roster.disabled, timed)
            return
        down, disabled = roster.down, roster.disabled
        if was != now:
            down = down - {own} if now else down | {own}
        if before.enabled != after.enabled:
            disabled = disabled - {own} if after.enabled else disabled | {own}
        was_out = roster.disabled if self.panic != flipped else roster.down
        probes: tuple[tuple[float, Backend], ...] | None = None  # found afresh when panic
        available: tuple[Backend, ...] | None = None  # mode flips
        if not flipped:
            probes = () if self.panic else self._reprobed(roster.probes, own, after)
            # Only this backend moved: the available ones are the previous ones, it added or
            # taken out (a copy, not a pass over the set).
            out = disabled if self.panic else down
            available = _moved(roster.selector.backends, own, own not in out)
        self.roster = self._roster(
            down, disabled, roster.selector, (was_out, roster.selector), probes, available
        )


class Views:
    """Makes the views of one balancer: ``algorithm`` builds their selectors, ``policy`` counts
    their health, ``clock`` dates the arrival of backends (for slow start), ``total`` counts
    requests in flight over every backend (for bounded loads)."""

    __slots__ = ("algorithm", "clock", "policy", "total", "watch")

    def __init__(
        self, algorithm: Any, policy: HealthPolicy, clock: Callable[[], float], total: Total
    ) -> None:
        self.algorithm = algorithm
        self.policy = policy
        self.clock = clock
        self.total = total
        #: Given to every view made (:attr:`View.watch`).
        self.watch: Watch | None = None

    def selector(self, prepared: tuple[Backend, ...], old: View | None, change: Any) -> Selector:
        """The selector of ``prepared``: rebuilt from ``old``'s, told of ``change``, by an
        algorithm that can (:class:`~lbclient.selection.base.Rebuildable`), built otherwise."""
        rebuild = getattr(self.algorithm, "rebuild", None)
        if rebuild is None:
            built: Selector = self.algorithm.build(prepared)
            return built
        if old is None:  # a rebuild with no previous selector takes ``prepared`` as it is
            first: Selector = rebuild(None, prepared)
            return first
        rebuilt: Selector = rebuild(old.selector, prepared, change)
        return rebuilt

    def view(
        self,
        prepared: tuple[Backend, ...],
        old: View | None,
        selector: Selector | None = None,
        moved: tuple[tuple[Backend, ...], tuple[Backend, ...]] | None = None,
    ) -> View:
        """A view of ``prepared``: backends that stay keep their health cell and load.

        ``selector`` is the one built for ``prepared`` (None: built here). ``moved`` holds the
        backends that left ``old``'s set and those that joined it, as objects (None: not
        known); then only their cells and loads are touched, and the health counts and the
        index by address are ``old``'s, adjusted for them (call under the book's lock).
        """
        # Backends of the first set do not ramp up; those that join later do, from now.
        now = -math.inf if old is None else self.clock()
        if selector is None:
            selector = self.selector(prepared, None, None)
        total, policy = self.total, self.policy
        if old is None or moved is None:
            loads = {} if old is None else old.loads
            cells = HealthBook.cells(prepared, old)
            carried = {b: loads.get(b) or Load(now, total) for b in prepared}
            view = View(prepared, selector, cells, carried, policy)
        else:
            # An equal backend that is another object (other metadata) keeps its cell and load.
            removed, added = moved
            cells = old.cells.copy()  # a clone in C, even of a dict with deletions
            carried = old.loads.copy()
            left_cells = {b: cells.pop(b) for b in removed}
            left_loads = {b: carried.pop(b) for b in removed}
            for b in added:
                cells[b] = left_cells.get(b) or Cell(HealthState())
                carried[b] = left_loads.get(b) or Load(now, total)
            view = View(prepared, selector, cells, carried, policy, old, removed, added)
        attach = getattr(view.selector, "attach", None)
        if attach is not None:  # load-aware selectors read the live load
            attach(view.loads, self.clock, total)
        view.watch = self.watch
        return view


def find(view: View, backend: Backend | str) -> Backend | None:
    """``backend`` as ``view`` holds it (a string by its address), or None if not there."""
    if isinstance(backend, Backend):
        return backend if backend in view.cells else None
    if isinstance(backend, str):
        return view.by_address.get(Backend(backend).address)
    raise TypeError(
        f"expected a Backend or an address string, got {backend!r} ({type(backend).__name__})"
    )


def require(view: View, backend: Backend | str) -> Backend:
    """:func:`find`, or ValueError if ``backend`` is not in ``view``."""
    found = find(view, backend)
    if found is None:
        raise ValueError(f"{backend!r} is not one of this balancer's backends")
    return found


def order(view: View, key: bytes) -> Iterator[Backend]:
    """The selection order for ``key`` over every backend of ``view``, without end.

    The selector's own, unless a selection that follows weights has backends unavailable:
    then a pick among the available ones (by weight), the other available ones by the
    selection's fallback order from it, then its fallback order over every backend."""
    roster = view.roster
    if roster is None or roster.selector is view.selector:
        return view.selector.iter(key)
    active = roster.selector
    first = active.first(key)
    if first is None:
        return view.selector.iter(key)
    return chain(
        (first,),
        islice(fallbacks_after(active, key, first), len(active.backends) - 1),
        fallbacks_after(view.selector, key, first),
    )


def candidates(
    view: View, key: bytes, limit: int, after: Backend | None = None
) -> Iterator[Backend]:
    """Distinct backends for ``key`` in fallback order: those found within ``limit`` pulls of
    the selection order (continuing from ``after``, never yielding it), then every other
    backend, in sorted order.

    From ``after``, a selection that follows weights walks the selector that picks now (the
    roster's, among the available backends), so that retries follow its current state."""
    if after is None:
        unique = UniqueIterator(order(view, key), limit)
    else:
        roster = view.roster
        walking = view.selector if roster is None else roster.selector
        unique = UniqueIterator(fallbacks_after(walking, key, after), limit, (after,))
    yield from unique
    seen = unique.seen
    for backend in view.backends:
        if backend not in seen:
            yield backend


class Picker:
    """How one balancer's ``select`` chooses a backend in a view: ``clock`` and ``random`` are
    the balancer's injected ones, ``ramp`` its slow start (None: none), ``book`` its health
    book, through which a due probe is taken."""

    __slots__ = ("book", "clock", "ramp", "random")

    def __init__(
        self,
        book: HealthBook,
        clock: Callable[[], float],
        random: Callable[[], float],
        ramp: SlowStart | None,
    ) -> None:
        self.book = book
        self.clock = clock
        self.random = random
        self.ramp = ramp

    def _ramping(self, view: View, backend: Backend, state: HealthState, now: float) -> bool:
        """Whether slow start passes ``backend`` over this time (drawing from ``random``)."""
        ramp = self.ramp
        assert ramp is not None
        restored = state.restored_at if state.restored_at > 0.0 else -math.inf
        age = now - max(view.loads[backend].joined, restored)
        return age < ramp.window and self.random() >= ramp.factor(age)

    def walk(
        self,
        view: View,
        key: bytes,
        limit: int,
        accept: Callable[[Backend, bool], bool],
        walked: Iterator[Backend] | None = None,
    ) -> Backend | None:
        """The first distinct candidate of :func:`order` (or of ``walked``) within ``limit``
        pulls that ``accept(backend, ready)`` takes, a ramping one passed over unless nothing
        else is; a due probe is taken when it is chosen."""
        cells = view.cells
        panic = view.panic
        now: float | None = None
        passed: Backend | None = None  # a ramping backend passed over, as a last resort
        for backend in UniqueIterator(order(view, key) if walked is None else walked, limit):
            state = cells[backend].state
            probe = False
            if panic or state.healthy:
                ready = state.enabled
            else:
                if now is None:
                    now = self.clock()
                ready = probe = state.enabled and state.probe_due(now)
            if not accept(backend, ready):
                continue
            if self.ramp is not None and not probe:
                if now is None:
                    now = self.clock()
                if self._ramping(view, backend, state, now):
                    passed = passed or backend
                    continue  # still ramping up: this time, the next candidate
            if probe and not self.book.claim(view, backend, self.clock()):
                continue  # another request took the probe first
            return backend
        return passed

    def choose(self, view: View, roster: Roster, key: bytes, limit: int) -> Backend | None:
        """``select`` for a selection that follows weights: a due probe, else a pick among the
        available backends. Each pick pulls one item of ``limit``; a ramping backend passed
        over spends its pick, and the next is drawn afresh (not given to its neighbour)."""
        if not limit:
            return None
        if roster.probes:
            now = self.clock()
            if now >= roster.due:
                cells = view.cells
                for due, backend in roster.probes:
                    if due > now:
                        break
                    state = cells[backend].state
                    due_now = state.enabled and state.probe_due(now)
                    if due_now and self.book.claim(view, backend, now):
                        return backend
        selector = roster.selector
        if self.ramp is None:
            return selector.first(key)
        passed: Backend | None = None  # a ramping backend passed over, as a last resort
        now = self.clock()
        for _ in range(limit):
            picked = selector.first(key)
            if picked is None:
                break
            if self._ramping(view, picked, view.cells[picked].state, now):
                passed = passed or picked
                continue
            return picked
        return passed
