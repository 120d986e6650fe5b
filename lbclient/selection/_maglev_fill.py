"""Maglev's fill: the turns that claim the table's slots, in three phases by density (the rules
are in :mod:`lbclient.selection.maglev`; :mod:`lbclient.selection._maglev_log` keeps a fill with
the record a change replays)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import cycle, islice, repeat
from operator import mod, mul, sub
from typing import Final

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
    "fill",
    "permutation_start",
    "pick_turns",
    "read_turns",
    "turns",
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
        along = list(map(mod, map(mul, map(sub, free, repeat(slot)), repeat(inverse)),
                         repeat(size)))
        j = along.index(min(along))
        slot = free[j]
        free[j] = free[-1]
        free.pop()
        owners[slot] = i
        place[i] = (slot + steps[i]) % size
