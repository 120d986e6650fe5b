"""Rendezvous hashing (highest random weight; Thaler and Ravishankar, 1998), weighted by the
logarithmic method (Schindelhauer and Schomaker, 2005).

For a key and each backend, in sorted order:

* ``seed = xxh3_64(address)`` (the address as UTF-8; computed once per build);
* ``h = xxh3_64(key, seed=seed)``, an unsigned 64-bit value;
* ``u = (h + 1/2) / 2**64``, uniform in (0, 1), never 0 or 1;
* ``score = -weight / ln(u)``.

The first pick is the backend with the highest score; the fallback order is the ranking by
score, highest first, ties in sorted backend order; once every backend has come up, the ranking
repeats. When a backend leaves, only the keys it had move; when one joins, only the keys it
takes.

With all weights equal the score grows with ``h``, so the ranking is by ``h`` itself, exactly,
with no floating point. With weights that differ the score is computed in double precision from
the top 52 bits of ``h``, ``u = ((h >> 12) + 0.5) * 2**-52`` (exact, and strictly inside
(0, 1)), as ``weight / -math.log(u)``; two backends whose computed scores are equal rank in
sorted order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from itertools import cycle, repeat
from typing import Final

import xxhash

from lbclient.backend import Backend
from lbclient.hashing import xxh3_64
from lbclient.selection.base import (
    Change,
    Key,
    Selector,
    _same_weight,
    _small,
    _splice,
    _weights_of,
    buildmethod,
    changes,
    prepare_backends,
    to_key,
)

__all__ = ["Rendezvous", "RendezvousSelector"]

_seeded = xxhash.xxh3_64_intdigest
_log = math.log
#: 2**-52: scales the top 52 bits of a hash into (0, 1).
_UNIT: Final = 2.0**-52


def backend_seed(backend: Backend) -> int:
    """The seed of ``backend``'s hashes: ``xxh3_64`` of its address as UTF-8."""
    return xxh3_64(backend.address.encode("utf-8"))


def weighted_score(h: int, weight: int) -> float:
    """``-weight / ln(u)`` in double precision, ``u = ((h >> 12) + 0.5) * 2**-52``."""
    return weight / -_log(((h >> 12) + 0.5) * _UNIT)


class RendezvousSelector:
    """Weighted rendezvous hashing over a fixed, sorted set of backends. Immutable.

    A pick hashes the key once per backend: O(backends) per pick, no table.
    """

    __slots__ = ("_backends", "_count", "_equal", "_seeds", "_weights")

    def __init__(
        self, backends: tuple[Backend, ...], *, seeds: Sequence[int] | None = None
    ) -> None:
        self._backends = backends
        self._count = len(backends)
        #: Each backend's seed (``seeds``, when given, must be theirs, in order).
        self._seeds = tuple(map(backend_seed, backends) if seeds is None else seeds)
        self._weights = tuple(_weights_of(backends))
        self._equal = not backends or _same_weight(self._weights) > 0

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The backends in sorted order."""
        return self._backends

    def hashes(self, key: Key) -> list[int]:
        """``h`` for ``key`` and each backend, in sorted backend order."""
        if type(key) is not bytes:
            key = to_key(key)
        return list(map(_seeded, repeat(key, self._count), self._seeds))

    def scores(self, key: Key) -> list[float]:
        """Each backend's score for ``key`` (double precision), in sorted backend order."""
        return list(map(weighted_score, self.hashes(key), self._weights))

    def _values(self, key: Key) -> Sequence[float]:
        """What the ranking compares: ``h`` with equal weights, else the score."""
        hashes = self.hashes(key)
        if self._equal:
            return hashes
        log = _log
        unit = _UNIT
        weights = self._weights
        # weighted_score of each backend, inline
        return [w / -log(((h >> 12) + 0.5) * unit) for h, w in zip(hashes, weights, strict=True)]

    def first(self, key: Key) -> Backend | None:
        """The backend with the highest score for ``key``; None with no backends."""
        if not self._count:
            return None
        values = self._values(key)
        return self._backends[values.index(max(values))]  # the first of equal ones

    def ranking(self, key: Key) -> list[Backend]:
        """Every backend, highest score for ``key`` first, ties in sorted order."""
        values = self._values(key)
        order = sorted(range(self._count), key=lambda i: (-values[i], i))
        backends = self._backends
        return [backends[i] for i in order]

    def iter(self, key: Key) -> Iterator[Backend]:
        """The ranking for ``key``, repeated without end (empty with no backends)."""
        if not self._count:
            return iter(())
        return cycle(self.ranking(key))

    def rebuilt(self, backends: tuple[Backend, ...], change: Change) -> RendezvousSelector:
        """The selector for ``backends``, which ``change`` made from this set: the seeds of
        the backends that stay are kept, those of the joining ones computed."""
        return RendezvousSelector(backends, seeds=_splice(self._seeds, change, backend_seed))

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<RendezvousSelector backends={self._count}>"


class Rendezvous:
    """Weighted rendezvous (highest random weight) hashing.

    The fewest keys move when the backend set changes (only those of the backend that leaves,
    or those the new one takes), the spread follows the weights, and the fallback order is a
    full ranking of the backends per key. A pick costs one hash per backend.
    """

    #: Whether the key decides the picks: a subset would break key agreement across clients.
    keyed = True

    @buildmethod
    def build(self, backends: Iterable[Backend | str]) -> RendezvousSelector:
        """Build a selector over ``backends`` (sorted and de-duplicated first)."""
        return RendezvousSelector(prepare_backends(backends))

    def rebuild(
        self,
        previous: Selector | None,
        backends: tuple[Backend, ...],
        change: Change | None = None,
    ) -> RendezvousSelector:
        """The selector over ``backends`` (sorted and de-duplicated), as ``build`` makes it,
        hashing only the addresses of the backends that joined ``previous``'s set."""
        if type(previous) is not RendezvousSelector:
            return RendezvousSelector(backends)
        if change is None:
            change = changes(previous.backends, backends)
        if not _small(change, len(backends)):
            return RendezvousSelector(backends)
        return previous.rebuilt(backends, change)

    def __repr__(self) -> str:
        return "Rendezvous()"
