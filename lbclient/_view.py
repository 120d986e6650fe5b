"""The view: one backend set as every request reads it, and how the next one is made.

What lives here: :class:`View`, the immutable snapshot a balancer swaps in one assignment (the
sorted backends, their selector, their health cells and set-wide counts, their live loads, an
index by address); :class:`Views`, which makes a balancer's views, building or rebuilding the
selector with its algorithm and carrying health and load over for the backends that stay,
adjusting the counts for what changed alone; and the lookups a request makes in one view
(:func:`find`, :func:`require`, :func:`candidates`).

What may not: locks (the balancer and the health book hold them), a clock other than the one
passed in, I/O, threads. Part of the core.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from lbclient._book import Cell, HealthBook, Tally
from lbclient._load import Load, Total
from lbclient.backend import Backend
from lbclient.health import HealthPolicy, HealthState
from lbclient.selection.base import Selector, UniqueIterator, fallbacks_after

__all__ = ["View", "Views", "candidates", "find", "require"]


class View(Tally):
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


class Views:
    """Makes the views of one balancer: ``algorithm`` builds their selectors, ``policy`` counts
    their health, ``clock`` dates the arrival of backends (for slow start), ``total`` counts
    requests in flight over every backend (for bounded loads)."""

    __slots__ = ("algorithm", "clock", "policy", "total")

    def __init__(
        self, algorithm: Any, policy: HealthPolicy, clock: Callable[[], float], total: Total
    ) -> None:
        self.algorithm = algorithm
        self.policy = policy
        self.clock = clock
        self.total = total

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


def candidates(
    view: View, key: bytes, limit: int, after: Backend | None = None
) -> Iterator[Backend]:
    """Distinct backends for ``key`` in fallback order: those found within ``limit`` pulls of
    the selection order (continuing from ``after``, never yielding it), then every other
    backend, in sorted order."""
    if after is None:
        unique = UniqueIterator(view.selector.iter(key), limit)
    else:
        unique = UniqueIterator(fallbacks_after(view.selector, key, after), limit, (after,))
    yield from unique
    seen = unique.seen
    for backend in view.backends:
        if backend not in seen:
            yield backend
