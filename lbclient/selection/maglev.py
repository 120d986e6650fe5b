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
from itertools import chain, cycle, islice, repeat
from operator import itemgetter, mod, mul, sub
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


#: The fill runs in three phases, each the cheapest way to find a turn's slot at its density.
#: A turn walks its permutation slot by slot until no more than this share (1/16) of the slots
#: are free: up to there a walk takes 16 steps at most on average (``size / free``).
_DENSE_SHARE: Final = 16
#: Then a turn reads this many steps of its permutation at once, as one strided slice of that
#: many copies of the table (the ``i``-th step from ``slot`` is byte ``slot + i * skip``).
_STRETCH: Final = 32
#: The last turns of the fill: each finds its slot among the few free ones, as the one fewest
#: steps along its permutation.
_TAIL: Final = 64


def _turns(backends: tuple[Backend, ...], size: int) -> Sequence[int]:
    """One round of turns: each backend's index, its weight (divided by the weights' greatest
    common divisor) times in a row, in sorted order."""
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
    return turns


def _fill(
    backends: tuple[Backend, ...],
    size: int,
    offsets: Sequence[int],
    skips: Sequence[int],
    *,
    dense: int | None = None,
    tail: int = _TAIL,
) -> list[int]:
    """The owner (index into ``backends``) of every slot of the table, given each backend's
    permutation ``(offsets[i], skips[i])``.

    Every turn claims exactly one slot, so the fill is ``size`` turns, taken from the rounds in
    order; they are split into three phases by the free slots left (``dense``: when that many
    are left, None: a sixteenth of the table; ``tail``: the last turns), each finding the same
    slot a walk would, at a cost that suits its density. Walking alone, most of the time of a
    table nearly full goes into steps over taken slots (about ``size * ln(size)`` of them).
    """
    order = cycle(_turns(backends, size))
    place = list(offsets)
    steps = list(skips)
    owners = [-1] * size
    tail = min(tail, size)
    dense = min(size, max(size // _DENSE_SHARE if dense is None else dense, tail))
    taken = _walk_turns(islice(order, size - dense), place, steps, owners)
    taken = _read_turns(islice(order, dense - tail), place, steps, owners, taken)
    _pick_turns(islice(order, tail), place, steps, owners, taken)
    return owners


def _walk_turns(
    turns: Iterable[int], place: list[int], steps: list[int], owners: list[int]
) -> bytearray:
    """Sparse phase: each turn walks its permutation to its first free slot. Returns which
    slots are taken."""
    size = len(owners)
    taken = bytearray(size)
    for i in turns:
        slot = place[i]
        skip = steps[i]
        while taken[slot]:
            slot += skip
            if slot >= size:
                slot -= size
        taken[slot] = 1
        owners[slot] = i
        slot += skip
        place[i] = slot - size if slot >= size else slot
    return taken


def _read_turns(
    turns: Iterable[int],
    place: list[int],
    steps: list[int],
    owners: list[int],
    taken: bytearray,
) -> bytearray:
    """Dense phase: each turn reads :data:`_STRETCH` steps of its permutation in one strided
    slice of as many copies of ``taken`` (no step wraps past the end of the copies) and finds
    the first free one in C, instead of a Python step per taken slot. A claim marks its slot
    in every copy, with one strided assignment. Returns which slots are taken."""
    size = len(owners)
    copies = taken * _STRETCH
    marks = b"\x01" * _STRETCH
    end = len(copies)
    for i in turns:
        slot = place[i]
        skip = steps[i]
        seen = copies[slot : slot + _STRETCH * skip : skip]
        j = seen.find(0)
        while j < 0:  # all taken: read on from where this stretch ended
            slot = (slot + len(seen) * skip) % size
            seen = copies[slot : slot + _STRETCH * skip : skip]
            j = seen.find(0)
        slot = (slot + j * skip) % size
        copies[slot:end:size] = marks
        owners[slot] = i
        place[i] = (slot + skip) % size
    return copies[:size]


def _pick_turns(
    turns: Iterable[int],
    place: list[int],
    steps: list[int],
    owners: list[int],
    taken: bytearray,
) -> None:
    """Last phase: with few slots free, each turn takes the free slot the fewest steps along
    its permutation (steps = (slot - place) / skip modulo the prime size), computed over the
    free slots rather than walked to."""
    size = len(owners)
    free: list[int] = []
    at = taken.find(0)
    while at >= 0:
        free.append(at)
        at = taken.find(0, at + 1)
    inverses: dict[int, int] = {}
    for i in turns:
        slot = place[i]
        inverse = inverses.get(i)
        if inverse is None:
            inverse = inverses[i] = pow(steps[i], -1, size)
        along = list(map(mod, map(mul, map(sub, free, repeat(slot)), repeat(inverse)),
                         repeat(size)))
        j = along.index(min(along))
        slot = free[j]
        free[j] = free[-1]
        free.pop()
        owners[slot] = i
        place[i] = (slot + steps[i]) % size


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
        #: The owner of every slot (its index in ``backends``), and the backend itself: the
        #: table a first pick reads in one step.
        self._owners: list[int] = []
        self._table: tuple[Backend, ...] = ()
        if backends:
            self._owners = owners = _fill(backends, table_size, self._offsets, self._skips)
            self._table = _entries(backends, owners)

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


def _entries(backends: tuple[Backend, ...], owners: list[int]) -> tuple[Backend, ...]:
    """``backends[owner]`` for every owner, in one C call (a third of the time of a map over
    the slots)."""
    if len(owners) == 1:
        return (backends[owners[0]],)
    entries: tuple[Backend, ...] = itemgetter(*owners)(backends)
    return entries


def _walk(backends: tuple[Backend, ...], owners: list[int], start: int) -> Iterator[Backend]:
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
        fill is made afresh, as a change of one backend may move the claims of every turn after
        its first: its cost is the table's, not the set's (about 20 ms for the default 65,537
        slots, whatever the number of backends); the backends that stay are not hashed
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
