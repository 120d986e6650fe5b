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
from collections.abc import Iterable, Iterator
from itertools import chain, cycle
from typing import Final

import xxhash

from lbclient.backend import Backend
from lbclient.hashing import xxh3_64
from lbclient.selection.base import Key, buildmethod, prepare_backends, to_key

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


def _fill(backends: tuple[Backend, ...], size: int) -> array[int]:
    """The owner (index into ``backends``) of every slot of the table."""
    divisor = math.gcd(*(b.weight for b in backends))
    turns = [i for i, b in enumerate(backends) for _ in range(b.weight // divisor)]
    if size < len(turns):
        raise ValueError(
            f"Maglev table_size {size} is smaller than the total weight {len(turns)} of the "
            f"{len(backends)} backends (weights divided by their common divisor {divisor}); "
            "give a prime table_size at least 100 times the total weight for a 1% balance, "
            "or lower the weights"
        )
    place: list[int] = []
    skips: list[int] = []
    for backend in backends:
        offset, skip = permutation_start(backend.address, size)
        place.append(offset)
        skips.append(skip)
    owners = array("l", [-1]) * size
    left = size
    while left:
        for i in turns:
            slot = place[i]
            skip = skips[i]
            while owners[slot] >= 0:
                slot += skip
                if slot >= size:
                    slot -= size
            owners[slot] = i
            slot += skip
            place[i] = slot - size if slot >= size else slot
            left -= 1
            if not left:
                break
    return owners


class MaglevSelector:
    """A built Maglev lookup table over a fixed, sorted set of backends. Immutable."""

    __slots__ = ("_backends", "_count", "_owners", "_size", "_table")

    def __init__(self, backends: tuple[Backend, ...], table_size: int) -> None:
        self._backends = backends
        self._count = len(backends)
        self._size = table_size
        if backends:
            self._owners = _fill(backends, table_size)
            self._table = tuple(backends[i] for i in self._owners)
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

    def __repr__(self) -> str:
        return f"Maglev(table_size={self.table_size})"
