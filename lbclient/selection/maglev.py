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
from itertools import chain, cycle
from operator import itemgetter
from typing import Any, Final

from lbclient.backend import Backend
from lbclient.hashing import xxh3_64
from lbclient.selection._maglev_fill import fill as _fill
from lbclient.selection._maglev_fill import permutation_start
from lbclient.selection._maglev_log import MAX_CHANGES, FillLog, advance, record, recordable
from lbclient.selection.base import (
    Change,
    Key,
    Selector,
    _small,
    _splice,
    buildmethod,
    changes,
    prepare_backends,
    to_key,
)

__all__ = ["DEFAULT_TABLE_SIZE", "MAX_TABLE_SIZE", "Maglev", "MaglevSelector"]

#: The table size of the paper's section 5.3 and of Envoy: a prime.
DEFAULT_TABLE_SIZE: Final = 65_537

#: The largest table accepted: the table holds one reference per slot.
MAX_TABLE_SIZE: Final = 1 << 24


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
            f"table_size must be a prime number, got {value} (e.g. {DEFAULT_TABLE_SIZE} or 655373)"
        )
    return value


def _offset(backend: Backend, size: int) -> int:
    return permutation_start(backend.address, size)[0]


def _skip(backend: Backend, size: int) -> int:
    return permutation_start(backend.address, size)[1]


class MaglevSelector:
    """A built Maglev lookup table over a fixed, sorted set of backends. Immutable."""

    __slots__ = ("_backends", "_count", "_log", "_offsets", "_size", "_skips", "_table")

    def __init__(
        self,
        backends: tuple[Backend, ...],
        table_size: int,
        *,
        permutations: tuple[Sequence[int], Sequence[int]] | None = None,
        log: FillLog | None = None,
    ) -> None:
        self._backends = backends
        self._count = len(backends)
        self._size = table_size
        #: The fill with its record, kept once the set has changed: the next change replays
        #: only the turns it touches.
        self._log = log
        #: The backend of every slot: the table a first pick reads in one step.
        self._table: tuple[Backend, ...] = ()
        #: Each backend's permutation, its first slot and its step (the record has them).
        self._offsets = self._skips = array("L")
        if log is not None:
            self._table = log.table
            return
        if permutations is None:
            starts = [permutation_start(b.address, table_size) for b in backends]
            permutations = ([o for o, _ in starts], [k for _, k in starts])
        self._offsets = array("L", permutations[0])
        self._skips = array("L", permutations[1])
        if backends:
            owners = _fill(backends, table_size, self._offsets, self._skips)
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
        return _walk(self._table, self._count, self.slot(key))

    def rebuilt(self, backends: tuple[Backend, ...], change: Change | None) -> MaglevSelector:
        """The selector for ``backends``, which ``change`` made from this set (None: a change
        too large to splice), with the table a fill from scratch makes.

        A change of up to :data:`~lbclient.selection._maglev_log.MAX_CHANGES` backends to a
        set whose fill is worth a record (:func:`~lbclient.selection._maglev_log.recordable`:
        a large table, few turns per backend) makes one, kept by the new selector; the next
        such change replays only the turns it touches. Any other change fills the table anew
        (without a record), without hashing the backends that stay again."""
        size = self._size
        if not backends or change is None:
            return MaglevSelector(backends, size)
        log = self._log
        if log is not None:
            made = advance(log, backends, change)
            if made is not None:
                return MaglevSelector(backends, size, log=made)
            # Not to be replayed (see advance): filled afresh, and the next small change makes
            # a record again. The record knows the permutations of the backends that stay.
            return MaglevSelector(backends, size, permutations=_known(backends, log, size))
        offsets = _splice(self._offsets, change, lambda b: _offset(b, size))
        skips = _splice(self._skips, change, lambda b: _skip(b, size))
        if len(change) <= MAX_CHANGES and recordable(backends, size):
            starts = list(zip(offsets, skips, strict=True))
            return MaglevSelector(backends, size, log=record(backends, size, starts))
        return MaglevSelector(backends, size, permutations=(offsets, skips))

    def __len__(self) -> int:
        return self._count

    def __reduce__(self) -> tuple[Any, ...]:
        # The record knows its backends by id, which means nothing in another process: a copy
        # is filled afresh (the same table), without one.
        return (MaglevSelector, (self._backends, self._size))

    def __repr__(self) -> str:
        return f"<MaglevSelector backends={self._count} table_size={self._size}>"


def _known(backends: tuple[Backend, ...], log: FillLog, size: int) -> tuple[list[int], list[int]]:
    """The permutations of ``backends``: from ``log``'s lanes for those it has, else hashed."""
    offsets: list[int] = []
    skips: list[int] = []
    lanes = log.lanes
    for backend in backends:
        lane = lanes.get(id(backend))
        offset, skip = permutation_start(backend.address, size) if lane is None else lane[:2]
        offsets.append(offset)
        skips.append(skip)
    return offsets, skips


def _entries(backends: tuple[Backend, ...], owners: list[int]) -> tuple[Backend, ...]:
    """``backends[owner]`` for every owner, in one C call (a third of the time of a map over
    the slots)."""
    if len(owners) == 1:
        return (backends[owners[0]],)
    entries: tuple[Backend, ...] = itemgetter(*owners)(backends)
    return entries


def _walk(table: tuple[Backend, ...], count: int, start: int) -> Iterator[Backend]:
    seen: set[int] = set()
    order: list[Backend] = []
    for slot in chain(range(start, len(table)), range(start)):
        backend = table[slot]
        if id(backend) not in seen:
            seen.add(id(backend))
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

    #: Whether the key decides the picks: a subset would break key agreement across clients.
    keyed = True

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
        """The table over ``backends`` (sorted and de-duplicated), as ``build`` makes it.

        When the table is large (8,192 slots or more) and the backends take few turns each (16
        or fewer per unit of weight: 4,096 backends of one weight or more in the default 65,537
        slots), a change of up to 16 backends makes a record of the fill, kept by the new
        selector; each such change after it replays only the turns of the fill it touches, and
        the fill's last 1,024 turns: an ``update()`` of one backend out and one in at 10,000
        backends takes about 7 ms, five out and five in about 15 ms, against 25 ms for a fill.
        Making the record costs about six fills (once), and it keeps about 12 MB.
        Other changes fill the table afresh, without hashing the backends that stay again."""
        if type(previous) is not MaglevSelector or previous.table_size != self.table_size:
            return MaglevSelector(backends, self.table_size)
        if change is None:
            change = changes(previous.backends, backends)
        return previous.rebuilt(backends, change if _small(change, len(backends)) else None)

    def __repr__(self) -> str:
        return f"Maglev(table_size={self.table_size})"
