"""Weighted selection with a pluggable 64-bit index algorithm, as Pingora's ``Weighted``.

Given the sorted backends and an algorithm ``ALG(bytes) -> u64``:

* the first pick for ``key`` is ``weighted[h % len(weighted)]`` with ``h = ALG(key)``, where
  ``weighted`` lists every backend ``weight`` times, in sorted order;
* every later pick is ``backends[h % len(backends)]`` with ``h = ALG(le64(h))``: uniform over the
  distinct backends, ignoring weights.

The algorithms differ only in ``ALG``: RoundRobin (a shared counter, ignoring its input), Random,
Hash (xxHash XXH3-64) and FNVHash (FNV-1a 64). RoundRobin's later picks continue from the first
pick's value instead (``h + 1``, ``h + 2``, ...), so only first picks draw from the counter: the
sequence Pingora yields when no other request picks in between.

The two that ignore the key, RoundRobin and Random, also make a selector among the available
backends alone (:meth:`WeightedSelector.among`), sharing the counter or the random source:
with backends down, the others share the first picks by their weights. The keyed ones keep
Pingora's fallback.
"""

from __future__ import annotations

import itertools
import random
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from lbclient.backend import Backend
from lbclient.hashing import MASK64, fnv1a_64, xxh3_64
from lbclient.selection.base import (
    Change,
    Key,
    Selector,
    _weights_of,
    buildmethod,
    prepare_backends,
    to_key,
)
from lbclient.selection.slow_start import SlowStart, slow_start_of

__all__ = [
    "FNVHash",
    "Hash",
    "Random",
    "RoundRobin",
    "Weighted",
    "WeightedIterator",
    "WeightedSelector",
]

#: An index algorithm: key bytes in, an unsigned 64-bit integer out.
IndexFn = Callable[[bytes], int]

#: The value of a later pick from the value of the pick before it (unsigned 64-bit both).
StepFn = Callable[[int], int]

#: Up to this total weight the weighted table is expanded for O(1) first picks; above it the
#: first pick is a binary search over cumulative weights (same result, far less memory, and
#: far less to redo when the set changes). With every weight 1 the table is the backends.
EXPAND_LIMIT: Final = 1 << 16


class WeightedSelector:
    """A weighted selection over a fixed, sorted set of backends.

    ``index`` gives each first pick's value; ``step`` each later pick's value from the previous
    one (None: ``index(le64(h))``, see :meth:`Weighted.step_function`). ``keyed``: the key
    decides the picks (the hashes), so the selection keeps its own fallback when a backend is
    down; False for an index that ignores the key (RoundRobin, Random), whose picks are
    shared among the available backends instead (:meth:`among`). ``ones``: every weight is
    known to be 1 (so none is read).
    """

    __slots__ = (
        "_backends",
        "_count",
        "_cumulative",
        "_index",
        "_keyed",
        "_limit",
        "_step",
        "_table",
        "_total",
    )

    def __init__(
        self,
        backends: tuple[Backend, ...],
        index: IndexFn,
        *,
        step: StepFn | None = None,
        expand_limit: int = EXPAND_LIMIT,
        keyed: bool = True,
        ones: bool = False,
    ) -> None:
        self._backends = backends
        self._index = index
        self._step = step
        self._keyed = keyed
        self._limit = expand_limit
        self._count = len(backends)
        self._table: tuple[Backend, ...] | None = None
        self._cumulative: list[int] = []
        if ones:  # known to weigh 1 each: nothing to sum
            self._total = self._count
            self._table = backends
            return
        weights = _weights_of(backends)
        self._total = sum(weights)
        if self._total == self._count:  # every weight is 1
            self._table = backends
        elif self._total <= expand_limit:
            self._table = tuple(
                itertools.chain.from_iterable(map(itertools.repeat, backends, weights))
            )
        else:
            self._cumulative = list(itertools.accumulate(weights))

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The backends in sorted order."""
        return self._backends

    @property
    def total_weight(self) -> int:
        """The sum of the weights: the length of Pingora's ``weighted`` table."""
        return self._total

    def weighted_pick(self, h: int) -> Backend:
        """``backends[weighted[h % total_weight]]``."""
        table = self._table
        if table is not None:
            return table[h % self._total]
        return self._backends[bisect_right(self._cumulative, h % self._total)]

    def first(self, key: Key) -> Backend | None:
        """The first pick for ``key``; None with no backends."""
        if not self._count:
            return None
        if type(key) is not bytes:
            key = to_key(key)
        h = self._index(key)
        table = self._table
        if table is not None:
            return table[h % self._total]
        return self._backends[bisect_right(self._cumulative, h % self._total)]

    def iter(self, key: Key) -> WeightedIterator:
        """Backends for ``key``: the weighted first pick, then uniform fallbacks, without end."""
        return WeightedIterator(self, to_key(key))

    def iter_after(self, key: Key, first: Backend) -> Iterator[Backend]:
        """Fallbacks for ``key`` once ``first`` was taken as its first pick, without end.

        With a step of its own (RoundRobin), the uniform walk continues from ``first``'s place
        in the sorted backends (from where it would sit, if it is not one of them) and draws
        nothing from the index function; ``first`` comes up again only after every other
        backend. Otherwise this is :meth:`iter`, whose first pick is ``first`` again for a
        deterministic index function. Callers skip ``first`` wherever it comes up.
        """
        if self._step is None:
            return self.iter(key)
        place = bisect_right(self._backends, first)  # just past first, or where it would sit
        return WeightedIterator.continuing(self, (place - 1) & MASK64)

    def among(
        self, available: tuple[Backend, ...], current: Selector | None = None
    ) -> WeightedSelector | None:
        """The same selection among ``available`` (some of the backends, sorted), drawing from
        this selector's index function (RoundRobin's counter goes on, Random's source too);
        this selector itself when they are all of its backends. None for a keyed selection,
        which keeps its fallback. ``current`` is not needed: the shared state lives in the
        index function."""
        if self._keyed:
            return None
        if len(available) == self._count:
            return self
        return WeightedSelector(
            available,
            self._index,
            step=self._step,
            expand_limit=self._limit,
            keyed=False,
            ones=self._table is self._backends,  # every weight 1 here: so among them
        )

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<WeightedSelector backends={self._count} total_weight={self._total}>"


class WeightedIterator(Iterator[Backend]):
    """Pingora's ``WeightedIterator``: first pick weighted, later picks uniform, without end.

    Duplicates are yielded as they come; wrap it in a unique iterator to skip them.
    """

    __slots__ = ("_h", "_key", "_selector")

    def __init__(self, selector: WeightedSelector, key: bytes) -> None:
        self._selector = selector
        self._key: bytes | None = key
        self._h = 0

    @classmethod
    def continuing(cls, selector: WeightedSelector, h: int) -> WeightedIterator:
        """The later picks of a walk whose first pick had the value ``h``."""
        walk = cls(selector, b"")
        walk._key = None
        walk._h = h
        return walk

    def __iter__(self) -> WeightedIterator:
        return self

    def __next__(self) -> Backend:
        selector = self._selector
        count = selector._count
        if not count:
            raise StopIteration
        key = self._key
        if key is not None:
            self._key = None
            self._h = h = selector._index(key)
            return selector.weighted_pick(h)
        step = selector._step
        if step is None:
            self._h = h = selector._index(self._h.to_bytes(8, "little"))
        else:
            self._h = h = step(self._h)
        return selector._backends[h % count]


class Weighted:
    """Weighted selection driven by an index function ``fn(bytes) -> int`` (taken mod 2**64).

    The subclasses fix the function: :class:`RoundRobin`, :class:`Random`, :class:`Hash` and
    :class:`FNVHash`. Use ``Weighted(fn)`` directly for a hash of your own; it must be
    deterministic over bytes if routing must agree across processes.
    """

    #: Whether the key decides the picks. A keyed selection keeps Pingora's fallback when its
    #: pick is down; one that ignores the key shares its picks among the available backends.
    keyed: bool = True

    def __init__(self, index: IndexFn | None = None) -> None:
        if index is not None and not callable(index):
            raise TypeError(f"index must be a callable taking bytes, got {index!r}")
        self._fn = index

    def index_function(self) -> IndexFn:
        """A fresh index function for one build (stateful algorithms start over per build)."""
        fn = self._fn
        if fn is None:
            raise TypeError("Weighted() needs an index function, e.g. Weighted(my_hash)")

        def masked(data: bytes) -> int:
            value = fn(data)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"index function {fn!r} must return an int, got {value!r} "
                    f"({type(value).__name__})"
                )
            return value & MASK64

        return masked

    def step_function(self, index: IndexFn) -> StepFn | None:
        """How a later pick's value follows from the previous one, for the build using ``index``.

        None (the default) is Pingora's ``index(le64(h))``. A function ``step(h)`` replaces it:
        later picks then follow from the first pick's value alone, never drawing from the index
        function's state, and a walk can continue from a first pick taken elsewhere
        (:meth:`WeightedSelector.iter_after`).
        """
        return None

    @buildmethod
    def build(self, backends: Iterable[Backend | str]) -> WeightedSelector:
        """Build a selector over ``backends`` (sorted and de-duplicated first)."""
        index = self.index_function()
        return WeightedSelector(
            prepare_backends(backends), index, step=self.step_function(index), keyed=self.keyed
        )

    def rebuild(
        self,
        previous: Selector | None,
        backends: tuple[Backend, ...],
        change: Change | None = None,
    ) -> WeightedSelector:
        """The selector over ``backends`` (sorted and de-duplicated), as ``build`` makes it,
        with a fresh index function (RoundRobin's counter starts over). Nothing is carried
        from ``previous``: the table is made in a few passes over the weights, none of them
        a Python loop."""
        index = self.index_function()
        return WeightedSelector(backends, index, step=self.step_function(index), keyed=self.keyed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RoundRobin(Weighted):
    """A counter shared by all requests, starting at 0 at every build; the key is ignored.

    Each first pick takes the next counter value, so over ``total_weight`` consecutive first
    picks every backend is chosen exactly ``weight`` times, however many fallbacks requests
    walk. Fallbacks continue from their first pick's value (``h + 1``, ``h + 2``, ...) and leave
    the counter alone; with no other request picking in between, that is Pingora's sequence.
    With backends unavailable, the first picks go round the available ones alone, from the same
    counter: over their total weight of picks each is chosen exactly ``weight`` times.

    * ``slow_start``: a :class:`~lbclient.selection.slow_start.SlowStart` (or a window in
      seconds) for backends that join or return from an ejection (None: none).
    """

    keyed = False

    def __init__(self, *, slow_start: SlowStart | float | None = None) -> None:
        super().__init__()
        self.slow_start = slow_start_of(slow_start)

    def index_function(self) -> IndexFn:
        # itertools.count advances in one C call, so concurrent threads never share a value.
        counter = itertools.count()
        step = counter.__next__

        def next_value(_key: bytes) -> int:
            return step() & MASK64

        return next_value

    def step_function(self, index: IndexFn) -> StepFn:
        """The next value after the previous one, as the counter would have given it alone."""
        return _successor


def _successor(h: int) -> int:
    return (h + 1) & MASK64


class Random(Weighted):
    """A random 64-bit value per pick; the key is ignored. With backends unavailable, each
    first pick is drawn by weight among the available ones.

    * ``seed``: the seed of the picks' random source (None: from the system).
    * ``slow_start``: as for :class:`RoundRobin` (None).
    """

    keyed = False

    def __init__(
        self, seed: int | None = None, *, slow_start: SlowStart | float | None = None
    ) -> None:
        super().__init__()
        self._seed = seed
        self.slow_start = slow_start_of(slow_start)

    def index_function(self) -> IndexFn:
        bits = random.Random(self._seed).getrandbits

        def next_value(_key: bytes) -> int:
            return bits(64)

        return next_value


class Hash(Weighted):
    """xxHash XXH3-64 (seed 0) of the key bytes: the same key always gets the same backend."""

    def __init__(self) -> None:
        super().__init__()

    def index_function(self) -> IndexFn:
        return xxh3_64


class FNVHash(Weighted):
    """FNV-1a 64 of the key bytes, bit-identical to Pingora's ``FNVHash``."""

    def __init__(self) -> None:
        super().__init__()

    def index_function(self) -> IndexFn:
        return fnv1a_64
