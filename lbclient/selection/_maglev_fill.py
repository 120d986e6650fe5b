"""Maglev's fill: the turns that claim the table's slots, in three phases by density, and the
order of those turns (:class:`Rounds`: who takes the fill's turn of a given number). The rules
are in :mod:`lbclient.selection.maglev`; :mod:`lbclient.selection._maglev_log` keeps a fill with
the record a change replays."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from itertools import accumulate, cycle, islice, repeat
from operator import mod, mul, sub
from typing import Final, TypeAlias

import xxhash

from lbclient.backend import Backend
from lbclient.selection.base import _same_weight, _weights_of

__all__ = [
    "DENSE_SHARE",
    "OFFSET_SEED",
    "SKIP_SEED",
    "STRETCH",
    "TAIL",
    "Cells",
    "Rounds",
    "Turn",
    "fill",
    "permutation_start",
    "pick_turns",
    "read_turns",
    "turn_of",
    "turns",
    "turns_before",
    "walk_turns",
]

#: A backend's value by its index: a list for the whole set, or a dict for the few backends
#: that take the turns at hand.
Cells = list[int] | dict[int, int]

#: Seeds of the two backend hashes (xxHash XXH3-64 of the address).
OFFSET_SEED: Final = 0
SKIP_SEED: Final = 1

_seeded = xxhash.xxh3_64_intdigest


def permutation_start(address: str, table_size: int) -> tuple[int, int]:
    """The ``(offset, skip)`` of the permutation of the backend at ``address``."""
    data = address.encode("utf-8")
    offset = _seeded(data, OFFSET_SEED) % table_size
    skip = _seeded(data, SKIP_SEED) % (table_size - 1) + 1
    return offset, skip


#: The fill runs in three phases, each the cheapest way to find a turn's slot at its density.
#: A turn walks its permutation slot by slot until no more than this share (1/16) of the slots
#: are free: up to there a walk takes 16 steps at most on average (``size / free``).
DENSE_SHARE: Final = 16
#: Then a turn reads this many steps of its permutation at once, as one strided slice of that
#: many copies of the table (the ``i``-th step from ``slot`` is byte ``slot + i * skip``).
STRETCH: Final = 32
#: The last turns of the fill: each finds its slot among the few free ones, as the one fewest
#: steps along its permutation.
TAIL: Final = 64


def turns(backends: tuple[Backend, ...], size: int) -> Sequence[int]:
    """One round of turns: each backend's index, its weight (divided by the weights' greatest
    common divisor) times in a row, in sorted order."""
    weights = _weights_of(backends)
    divisor = math.gcd(*weights)
    if _same_weight(weights):
        order: Sequence[int] = range(len(backends))  # one turn each per round
    else:
        order = [i for i, w in enumerate(weights) for _ in range(w // divisor)]
    if size < len(order):
        raise ValueError(
            f"Maglev table_size {size} is smaller than the total weight {len(order)} of the "
            f"{len(backends)} backends (weights divided by their common divisor {divisor}); "
            "give a prime table_size at least 100 times the total weight for a 1% balance, "
            "or lower the weights"
        )
    return order


def fill(
    backends: tuple[Backend, ...],
    size: int,
    offsets: Sequence[int],
    skips: Sequence[int],
    *,
    dense: int | None = None,
    tail: int = TAIL,
) -> list[int]:
    """The owner (index into ``backends``) of every slot of the table, given each backend's
    permutation ``(offsets[i], skips[i])``.

    Every turn claims exactly one slot, so the fill is ``size`` turns, taken from the rounds in
    order; they are split into three phases by the free slots left (``dense``: when that many
    are left, None: a sixteenth of the table; ``tail``: the last turns), each finding the same
    slot a walk would, at a cost that suits its density. Walking alone, most of the time of a
    table nearly full goes into steps over taken slots (about ``size * ln(size)`` of them).
    """
    order = cycle(turns(backends, size))
    place = list(offsets)
    steps = list(skips)
    owners = [-1] * size
    tail = min(tail, size)
    dense = min(size, max(size // DENSE_SHARE if dense is None else dense, tail))
    taken = walk_turns(islice(order, size - dense), place, steps, owners)
    taken = read_turns(islice(order, dense - tail), place, steps, owners, taken)
    pick_turns(islice(order, tail), place, steps, owners, taken)
    return owners


def walk_turns(
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


def read_turns(
    turns: Iterable[int],
    place: Cells,
    steps: Cells,
    owners: Cells,
    taken: bytes | bytearray,
    stretch: int = STRETCH,
) -> bytearray:
    """Dense phase: each turn reads :data:`STRETCH` steps of its permutation in one strided
    slice of as many copies of ``taken`` (no step wraps past the end of the copies) and finds
    the first free one in C, instead of a Python step per taken slot. A claim marks its slot
    in every copy, with one strided assignment. Returns which slots are taken."""
    size = len(taken)
    copies = bytearray(taken) * stretch
    marks = b"\x01" * stretch
    end = len(copies)
    for i in turns:
        slot = place[i]
        skip = steps[i]
        seen = copies[slot : slot + stretch * skip : skip]
        j = seen.find(0)
        while j < 0:  # all taken: read on from where this stretch ended
            slot = (slot + len(seen) * skip) % size
            seen = copies[slot : slot + stretch * skip : skip]
            j = seen.find(0)
        slot = (slot + j * skip) % size
        copies[slot:end:size] = marks
        owners[slot] = i
        place[i] = (slot + skip) % size
    return copies[:size]


def pick_turns(
    turns: Iterable[int],
    place: Cells,
    steps: Cells,
    owners: Cells,
    taken: bytes | bytearray,
) -> None:
    """Last phase: with few slots free, each turn takes the free slot the fewest steps along
    its permutation (steps = (slot - place) / skip modulo the prime size), computed over the
    free slots rather than walked to."""
    size = len(taken)
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
        along = list(
            map(mod, map(mul, map(sub, free, repeat(slot)), repeat(inverse)), repeat(size))
        )
        j = along.index(min(along))
        slot = free[j]
        free[j] = free[-1]
        free.pop()
        owners[slot] = i
        place[i] = (slot + steps[i]) % size


# -- the order of the turns --------------------------------------------------------------------

#: A turn's place in the fill: its round, its backend's sort order, its place in the round's
#: run of that backend's turns.
Turn: TypeAlias = "tuple[int, tuple[int, int | str, int, int], int]"


def turn_of(backend: Backend, number: int, divisor: int) -> Turn:
    """The place in the fill of ``backend``'s turn ``number`` (counted from 0)."""
    run = backend.weight // divisor
    if run == 1:
        return (number, backend._order, 0)
    rnd, within = divmod(number, run)
    return (rnd, backend._order, within)


def turns_before(backend: Backend, bound: Turn, divisor: int) -> int:
    """How many of ``backend``'s turns come before the turn at ``bound``."""
    run = backend.weight // divisor
    rnd, order, within = bound
    if backend._order < order:
        return (rnd + 1) * run
    if backend._order == order:
        return rnd * run + within
    return rnd * run


class Rounds:
    """The order of the turns of one sorted set: who takes the fill's turn of a given number."""

    __slots__ = ("backends", "divisor", "starts", "width")

    def __init__(self, backends: tuple[Backend, ...], divisor: int, weights: Sequence[int]):
        """``weights``: those of ``backends``, or empty when they are known to be the same."""
        self.backends = backends
        self.divisor = divisor
        #: Where each backend's run starts in a round (and the round's length last), or None
        #: when every backend has one turn a round.
        self.starts: list[int] | None = None
        self.width = len(backends)
        if weights and not _same_weight(weights):
            self.starts = list(accumulate((w // divisor for w in weights), initial=0))
            self.width = self.starts[-1]

    def taker(self, number: int) -> tuple[int, int]:
        """The index of the backend that takes the fill's turn ``number``, and which of that
        backend's turns it is."""
        rnd, rest = divmod(number, self.width)
        starts = self.starts
        if starts is None:
            return rest, rnd
        i = bisect_right(starts, rest) - 1
        return i, rnd * (starts[i + 1] - starts[i]) + rest - starts[i]

    def place(self, number: int) -> Turn:
        """The place of the fill's turn ``number``."""
        i, mine = self.taker(number)
        return turn_of(self.backends[i], mine, self.divisor)

    def takers(self, start: int, stop: int) -> list[int]:
        """The indexes of the backends that take the turns ``start`` to ``stop - 1``."""
        if self.starts is None:
            width = self.width
            return [number % width for number in range(start, stop)]
        return [self.taker(number)[0] for number in range(start, stop)]
