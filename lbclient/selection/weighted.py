"""Weighted selection with a pluggable 64-bit index algorithm, as Pingora's ``Weighted``.

Given the sorted backends and an algorithm ``ALG(bytes) -> u64``:

* the first pick for ``key`` is ``weighted[h % len(weighted)]`` with ``h = ALG(key)``, where
  ``weighted`` lists every backend ``weight`` times, in sorted order;
* every later pick is ``backends[h % len(backends)]`` with ``h = ALG(le64(h))``: uniform over the
  distinct backends, ignoring weights.

The algorithms differ only in ``ALG``: RoundRobin (a shared counter, ignoring its input), Random,
Hash (xxHash XXH3-64) and FNVHash (FNV-1a 64).
"""

from __future__ import annotations

import itertools
import random
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from lbclient.backend import Backend
from lbclient.hashing import MASK64, fnv1a_64, xxh3_64
from lbclient.selection.base import Key, buildmethod, prepare_backends, to_key

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

#: Up to this total weight the weighted table is expanded for O(1) first picks; above it the
#: first pick is a binary search over cumulative weights (same result, far less memory).
EXPAND_LIMIT: Final = 1 << 22


class WeightedSelector:
    """A weighted selection over a fixed, sorted set of backends."""

    __slots__ = ("_backends", "_count", "_cumulative", "_index", "_table", "_total")

    def __init__(
        self, backends: tuple[Backend, ...], index: IndexFn, *, expand_limit: int = EXPAND_LIMIT
    ) -> None:
        self._backends = backends
        self._index = index
        self._count = len(backends)
        weights = [b.weight for b in backends]
        self._total = sum(weights)
        self._table: tuple[Backend, ...] | None = None
        self._cumulative: list[int] = []
        if self._total <= expand_limit:
            self._table = tuple(
                itertools.chain.from_iterable(itertools.repeat(b, b.weight) for b in backends)
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
        self._h = h = selector._index(self._h.to_bytes(8, "little"))
        return selector._backends[h % count]


class Weighted:
    """Weighted selection driven by an index function ``fn(bytes) -> int`` (taken mod 2**64).

    The subclasses fix the function: :class:`RoundRobin`, :class:`Random`, :class:`Hash` and
    :class:`FNVHash`. Use ``Weighted(fn)`` directly for a hash of your own; it must be
    deterministic over bytes if routing must agree across processes.
    """

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

    @buildmethod
    def build(self, backends: Iterable[Backend | str]) -> WeightedSelector:
        """Build a selector over ``backends`` (sorted and de-duplicated first)."""
        return WeightedSelector(prepare_backends(backends), self.index_function())

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RoundRobin(Weighted):
    """A counter shared by all requests, starting at 0 at every build; the key is ignored.

    Each pick (first or fallback) takes the next counter value, so over ``total_weight``
    consecutive first picks every backend is chosen exactly ``weight`` times.
    """

    def __init__(self) -> None:
        super().__init__()

    def index_function(self) -> IndexFn:
        # itertools.count advances in one C call, so concurrent threads never share a value.
        counter = itertools.count()
        step = counter.__next__

        def next_value(_key: bytes) -> int:
            return step() & MASK64

        return next_value


class Random(Weighted):
    """A random 64-bit value per pick; the key is ignored."""

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self._seed = seed

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
