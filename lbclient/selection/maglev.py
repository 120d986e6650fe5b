"""Maglev hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer",
NSDI 2016, section 3.4): a prime-size lookup table filled from per-backend permutations.

The table, of prime size ``M`` (``table_size``), for the backends in sorted order:

* each backend's address (UTF-8) gives ``offset = xxh3_64(address, seed=0) % M`` and
  ``skip = xxh3_64(address, seed=1) % (M - 1) + 1``; its permutation of the slots is
  ``offset, offset + skip, offset + 2 * skip, ...`` (mod ``M``), which visits every slot because
  ``M`` is prime;
* weights are first divided by their greatest common divisor (so only their ratios matter);
* the backends then take turns, in sorted order, each taking ``weight`` turns in a row per
  round; a turn claims the first slot of the backend's permutation not yet claimed (by anyone),
  going on from where its previous turn stopped; this stops when every slot is claimed.

Every turn claims exactly one slot, so with ``W`` the total of the divided weights, a backend of
divided weight ``w`` ends with ``w`` slots per full round plus at most ``w`` from the last,
partial one: its share of the slots is within ``W / M`` (relative) of its fair share ``w / W``,
under 1% when ``M`` is over 100 times ``W``.

A key goes to ``table[xxh3_64(key) % M]``. Its fallbacks are the distinct backends met walking
the table on from that slot, wrapping; once every backend has come up, the same order repeats.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, compress, cycle, repeat
from operator import mod, mul, not_, sub
from typing import Final

import xxhash

from lbclient.backend import Backend
from lbclient.hashing import xxh3_64
from lbclient.selection.base import (
    Change,
    Key,
    Selector,
    buildmethod,
    changes,
    prepare_backends,
    same_weight,
    small,
    splice,
    to_key,
    weights_of,
)

__all__ = ["DEFAULT_TABLE_SIZE", "MAX_TABLE_SIZE", "Maglev", "MaglevSelector"]

#: The table size of the paper's section 5.3 and of Envoy: a prime.
DEFAULT_TABLE_SIZE: Final = 65_537

#: The largest table accepted: the table holds one reference per slot.
MAX_TABLE_SIZE: Final = 1 << 24

#: Seeds of the two backend hashes (xxHash XXH3-64 of the address).
OFFSET_SEED: Final = 0
SKIP_SEED: Final = 1

_seeded = xxhash.xxh3_64_intdigest


def is_prime(n: int) -> bool:
    """Whether ``n`` is a prime number (trial division; meant for table sizes)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def check_table_size(value: object) -> int:
    """Return ``value`` if it is a valid Maglev table size, else raise naming the value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"table_size must be an int, got {value!r} ({type(value).__name__})")
    if not 2 <= value <= MAX_TABLE_SIZE:
        raise ValueError(f"table_size must be a prime in 2..{MAX_TABLE_SIZE:,}, got {value}")
    if not is_prime(value):
        raise ValueError(
            f"table_size must be a prime number, got {value} (e.g. {DEFAULT_TABLE_SIZE} or "
            "655373)"
        )
    return value


def permutation_start(address: str, table_size: int) -> tuple[int, int]:
    """The ``(offset, skip)`` of the permutation of the backend at ``address``."""
    data = address.encode("utf-8")
    offset = _seeded(data, OFFSET_SEED) % table_size
    skip = _seeded(data, SKIP_SEED) % (table_size - 1) + 1
    return offset, skip


def _fill(
    backends: tuple[Backend, ...], size: int, offsets: Sequence[int], skips: Sequence[int]
) -> array[int]:
    """The owner (index into ``backends``) of every slot of the table, given each backend's
    permutation ``(offsets[i], skips[i])``."""
    weights = weights_of(backends)
    divisor = math.gcd(*weights)
    if same_weight(weights):
        turns: Sequence[int] = range(len(backends))  # one turn each per round
    else:
        turns = [i for i, w in enumerate(weights) for _ in range(w // divisor)]
    if size < len(turns):
        raise ValueError(
            f"Maglev table_size {size} is smaller than the total weight {len(turns)} of the "
            f"{len(backends)} backends (weights divided by their common divisor {divisor}); "
            "give a prime table_size at least 100 times the total weight for a 1% balance, "
            "or lower the weights"
        )
    place = list(offsets)
    steps = list(skips)
    owners = array("l", [-1]) * size
    taken = bytearray(size)
    left = size
    # Late in the fill most slots a turn looks at are taken: with few slots left, a turn finds
    # its slot among the free ones instead, as the one fewest steps along its permutation
    # (the same slot a walk would reach).
    late = math.isqrt(size)
    free: list[int] = []
    inverses: dict[int, int] = {}
    while left:
        for i in turns:
            slot = place[i]
            skip = steps[i]
            if left > late:
                while taken[slot]:
                    slot += skip
                    if slot >= size:
                        slot -= size
            else:
                if not free:
                    free = list(compress(range(size), map(not_, taken)))
                inverse = inverses.get(i)
                if inverse is None:
                    inverse = inverses[i] = pow(skip, -1, size)
                along = list(map(mod, map(mul, map(sub, free, repeat(slot)), repeat(inverse)),
                                 repeat(size)))
                j = along.index(min(along))
                slot = free[j]
                free[j] = free[-1]
                free.pop()
            taken[slot] = 1
            owners[slot] = i
            slot += skip
            place[i] = slot - size if slot >= size else slot
            left -= 1
            if not left:
                break
    return owners


def _offset(backend: Backend, size: int) -> int:
    return permutation_start(backend.address, size)[0]


def _skip(backend: Backend, size: int) -> int:
    return permutation_start(backend.address, size)[1]


class MaglevSelector:
    """A built Maglev lookup table over a fixed, sorted set of backends. Immutable."""

    __slots__ = ("_backends", "_count", "_offsets", "_owners", "_size", "_skips", "_table")

    def __init__(
        self,
        backends: tuple[Backend, ...],
        table_size: int,
        *,
        permutations: tuple[Sequence[int], Sequence[int]] | None = None,
    ) -> None:
        self._backends = backends
        self._count = len(backends)
        self._size = table_size
        if permutations is None:
            starts = [permutation_start(b.address, table_size) for b in backends]
            permutations = ([o for o, _ in starts], [k for _, k in starts])
        #: Each backend's permutation: its first slot, and the step between its slots.
        self._offsets = array("L", permutations[0])
        self._skips = array("L", permutations[1])
        if backends:
            self._owners = _fill(backends, table_size, self._offsets, self._skips)
            self._table = tuple(map(backends.__getitem__, self._owners))
        else:
            self._owners = array("l")
            self._table = ()

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The backends in sorted order."""
        return self._backends

    @property
    def table_size(self) -> int:
        """The number of slots of the table (``M``)."""
        return self._size

    @property
    def table(self) -> tuple[Backend, ...]:
        """The backend of every slot, in slot order (empty with no backends)."""
        return self._table

    def slot(self, key: Key) -> int:
        """The slot ``key`` looks up: ``xxh3_64(key) % table_size``."""
        if type(key) is not bytes:
            key = to_key(key)
        return xxh3_64(key) % self._size

    def first(self, key: Key) -> Backend | None:
        """The backend of ``key``'s slot; None with no backends."""
        if not self._count:
            return None
        if type(key) is not bytes:
            key = to_key(key)
        return self._table[xxh3_64(key) % self._size]

    def iter(self, key: Key) -> Iterator[Backend]:
        """The distinct backends met walking the table from ``key``'s slot, then again."""
        if not self._count:
            return iter(())
        return _walk(self._backends, self._owners, self.slot(key))

    def rebuilt(self, backends: tuple[Backend, ...], change: Change) -> MaglevSelector:
        """The selector for ``backends``, which ``change`` made from this set. The
        permutations of the backends that stay are kept; the table is filled anew, as every
        slot's owner may depend on every backend."""
        size = self._size
        offsets = splice(self._offsets, change, lambda b: _offset(b, size))
        skips = splice(self._skips, change, lambda b: _skip(b, size))
        return MaglevSelector(backends, size, permutations=(offsets, skips))

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<MaglevSelector backends={self._count} table_size={self._size}>"


def _walk(backends: tuple[Backend, ...], owners: array[int], start: int) -> Iterator[Backend]:
    count = len(backends)
    seen = bytearray(count)
    order: list[Backend] = []
    for slot in chain(range(start, len(owners)), range(start)):
        i = owners[slot]
        if not seen[i]:
            seen[i] = 1
            backend = backends[i]
            order.append(backend)
            yield backend
            if len(order) == count:
                break
    # Every backend owns at least one slot, so the walk above met them all.
    yield from cycle(order)


class Maglev:
    """Maglev hashing: an O(1) lookup in a prime-size table, near-perfect spread by weight.

    ``table_size`` must be a prime no smaller than the total weight (after dividing the weights
    by their common divisor); at over 100 times the total weight every backend's share is within
    1% of its fair share. A backend leaving moves its own keys and, unlike a ring or
    :class:`Rendezvous`, a few others; a larger table moves fewer.
    """

    def __init__(self, table_size: int = DEFAULT_TABLE_SIZE) -> None:
        self.table_size = check_table_size(table_size)

    @buildmethod
    def build(self, backends: Iterable[Backend | str]) -> MaglevSelector:
        """Build the table over ``backends`` (sorted and de-duplicated first)."""
        return MaglevSelector(prepare_backends(backends), self.table_size)

    def rebuild(
        self,
        previous: Selector | None,
        backends: tuple[Backend, ...],
        change: Change | None = None,
    ) -> MaglevSelector:
        """The table over ``backends`` (sorted and de-duplicated), as ``build`` makes it. The
        fill still visits every slot (each slot's owner may depend on every backend: about
        40 ms for the default 65,537 slots), but the backends that stay are not hashed
        again."""
        if type(previous) is not MaglevSelector or previous.table_size != self.table_size:
            return MaglevSelector(backends, self.table_size)
        if change is None:
            change = changes(previous.backends, backends)
        if not small(change, len(backends)):
            return MaglevSelector(backends, self.table_size)
        return previous.rebuilt(backends, change)

    def __repr__(self) -> str:
        return f"Maglev(table_size={self.table_size})"
