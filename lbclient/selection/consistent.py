"""Consistent hashing on a ketama ring that routes every key as nginx's ``hash ... consistent``.

The ring, for each backend in sorted order:

* ``base = host + b"\\0" + port`` (host as nginx writes it: IPv4 dotted, IPv6 in brackets, a
  host name as written; the port in decimal);
* ``prev = 0``; ``weight * points_per_weight`` times: ``h = crc32(base + le32(prev))``, add the
  point ``(h, backend)``, ``prev = h``.

Points are sorted by hash; of several points with one hash the first (in backend order) stays.
A key goes to the first point whose hash is ``>= crc32(key)``, wrapping past the end to the
first point; its fallbacks are the following points along the ring.

The ring is kept in arrays (:class:`~lbclient.selection._ring.Ring`: from 65,536 points on, 2
bytes per point for the hash's low 16 bits, its top 16 in a bucket index, and 2 for its owner
up to 65,536 backends; 160 points per backend take about 640 bytes). A build makes a step of
every backend's chain at a time and sorts the points in runs merged by ranges of values, never
holding all of them as Python ints. A backend's points depend on that backend alone, so when the
set changes, :meth:`Consistent.rebuild` takes out the points of the backends that left and
merges in those of the backends that joined, and keeps the rest.
"""

from __future__ import annotations

import itertools
import math
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from typing import Final

from lbclient._load import Load, Total
from lbclient.backend import Backend
from lbclient.selection._ring import _POINT_LIMIT, Ring, _member, ketama_points, ketama_steps
from lbclient.selection.base import (
    Change,
    Key,
    Selector,
    _weights_of,
    buildmethod,
    changes,
    prepare_backends,
    to_key,
)

__all__ = ["DEFAULT_POINTS_PER_WEIGHT", "Consistent", "ConsistentSelector"]

#: nginx's number of ring points per unit of weight.
DEFAULT_POINTS_PER_WEIGHT: Final = 160
_crc32 = zlib.crc32


class ConsistentSelector:
    """A built ketama ring over a fixed, sorted set of backends."""

    __slots__ = (
        "_backends",
        "_count",
        "_lows",
        "_mask",
        "_members",
        "_options",
        "_owners",
        "_ring",
        "_shift",
        "_starts",
        "_weight",
    )

    def __init__(
        self,
        backends: tuple[Backend, ...],
        points_per_weight: int,
        ipv6_brackets: bool,
        *,
        ring: Ring | None = None,
        weight: int | None = None,
    ) -> None:
        self._backends = backends
        self._options = (points_per_weight, ipv6_brackets)
        #: The total weight of the backends.
        self._weight = sum(_weights_of(backends)) if weight is None else weight
        total = self._weight * points_per_weight
        if total > _POINT_LIMIT:
            raise ValueError(
                f"the ring would have {total} points (limit {_POINT_LIMIT}); "
                "lower the weights or points_per_weight"
            )
        if ring is None:
            ring = Ring.from_steps(
                backends,
                ketama_steps(backends, points_per_weight, ipv6_brackets),
                total,
                last_wins=False,
            )
        self._ring = ring
        self._lows = ring.lows
        self._mask = ring.mask
        self._owners = ring.owners
        self._members = ring.members
        self._starts = ring.starts
        self._shift = ring.shift
        self._count = len(ring.lows)

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The backends in sorted order."""
        return self._backends

    @property
    def ring_size(self) -> int:
        """The number of distinct points on the ring."""
        return self._count

    def points(self) -> list[tuple[int, Backend]]:
        """The ring as ``(hash, backend)`` pairs in ring order."""
        return self._ring.points()

    def point_index(self, key: Key) -> int:
        """The index of the ring point ``key`` lands on (0 on an empty ring)."""
        if type(key) is not bytes:
            key = to_key(key)
        return self._locate(_crc32(key))

    def _locate(self, h: int) -> int:
        """Index of the first point with hash >= h, wrapping to 0."""
        bucket = h >> self._shift
        starts = self._starts
        i = bisect_left(self._lows, h & self._mask, starts[bucket], starts[bucket + 1])
        return 0 if i == self._count else i

    def first(self, key: Key) -> Backend | None:
        """The backend ``key`` lands on; None with no backends."""
        if type(key) is not bytes:
            key = to_key(key)
        h = _crc32(key)
        bucket = h >> self._shift
        starts = self._starts
        i = bisect_left(self._lows, h & self._mask, starts[bucket], starts[bucket + 1])
        try:
            return self._members[self._owners[i if i < self._count else 0]]
        except IndexError:  # no points: no backends
            return None

    def iter(self, key: Key) -> Iterator[Backend]:
        """The backend of each ring point from ``key``'s point on, wrapping, without end."""
        if not self._count:
            return iter(())
        return _walk(self._members, self._owners, self.point_index(key))

    def rebuilt(self, backends: tuple[Backend, ...], change: Change) -> ConsistentSelector:
        """This ring's selector for ``backends``, which ``change`` made from this set: only the
        points of the backends that left or joined are touched."""
        points_per_weight, ipv6_brackets = self._options
        weight = (
            self._weight
            - sum(b.weight for b in change.removed)
            + sum(b.weight for b in change.added)
        )
        ring = None
        if weight * points_per_weight <= _POINT_LIMIT:
            ring = self._ring.rebuild(
                [(b, ketama_points(b, points_per_weight, ipv6_brackets)) for b in change.removed],
                [(b, ketama_points(b, points_per_weight, ipv6_brackets)) for b in change.added],
            )
        return self._again(backends, ring, weight)

    def _again(
        self, backends: tuple[Backend, ...], ring: Ring | None, weight: int
    ) -> ConsistentSelector:
        points_per_weight, ipv6_brackets = self._options
        return ConsistentSelector(
            backends, points_per_weight, ipv6_brackets, ring=ring, weight=weight
        )

    def __len__(self) -> int:
        return len(self._backends)

    def __repr__(self) -> str:
        return f"<ConsistentSelector backends={len(self._backends)} points={self._count}>"


class BoundedSelector(ConsistentSelector):
    """A ketama ring with bounded loads (Mirrokni, Thorup and Zadimoghaddam): no backend takes
    a new request while it holds ``ceil(balance_factor x (in flight + 1) x its weight share)``
    requests or more; the key goes on along the ring to the first backend with room. The
    fallback order for retries stays the ring walk."""

    __slots__ = ("_factor", "_loads", "_total")

    def __init__(
        self,
        backends: tuple[Backend, ...],
        points_per_weight: int,
        ipv6_brackets: bool,
        balance_factor: float,
        *,
        ring: Ring | None = None,
        weight: int | None = None,
    ) -> None:
        super().__init__(backends, points_per_weight, ipv6_brackets, ring=ring, weight=weight)
        self._factor = balance_factor
        self._loads: Mapping[Backend, Load] = {}
        self._total = Total()

    def attach(self, loads: Mapping[Backend, Load], clock: object, total: Total) -> None:
        """Read the balancer's live load: each backend's, and the total in flight."""
        self._loads = loads
        self._total = total

    def capacity(self, backend: Backend) -> int:
        """How many requests ``backend`` may hold before the next one moves on."""
        share = backend.weight / (self._weight or 1)
        wanted = self._factor * (self._total.in_flight + 1) * share
        return max(1, math.ceil(wanted - 1e-9))

    def first(self, key: Key) -> Backend | None:
        """The first backend along the ring from ``key``'s point that has room."""
        if not self._count:
            return None
        if type(key) is not bytes:
            key = to_key(key)
        loads = self._loads
        start = self._locate(_crc32(key))
        seen: set[Backend] = set()
        for backend in itertools.islice(_walk(self._members, self._owners, start), self._count):
            if backend in seen:
                continue
            load = loads.get(backend)
            if load is None or load.in_flight < self.capacity(backend):
                return backend
            seen.add(backend)
            if len(seen) == len(self._backends):
                break
        return _member(self._members, self._owners[start])  # every backend is full

    def iter(self, key: Key) -> Iterator[Backend]:
        """The bounded first pick, then the ring walk from ``key``'s point."""
        first = self.first(key)
        if first is None:
            return iter(())
        return itertools.chain((first,), _walk(self._members, self._owners, self.point_index(key)))

    def _again(
        self, backends: tuple[Backend, ...], ring: Ring | None, weight: int
    ) -> ConsistentSelector:
        points_per_weight, ipv6_brackets = self._options
        return BoundedSelector(
            backends, points_per_weight, ipv6_brackets, self._factor, ring=ring, weight=weight
        )


def _walk(members: tuple[Backend | None, ...], owners: array[int], start: int) -> Iterator[Backend]:
    size = len(owners)
    i = start
    while True:
        backend = members[owners[i]]
        assert backend is not None
        yield backend
        i += 1
        if i == size:
            i = 0


class Consistent:
    """Ketama consistent hashing, compatible with nginx's ``hash $key consistent``.

    * ``points_per_weight``: ring points per unit of weight (160, nginx's).
    * ``ipv6_brackets``: hash IPv6 hosts with brackets, as nginx does; False hashes them
      without, as Pingora's ketama does (True).
    * ``balance_factor``: consistent hashing with bounded loads: a backend holding
      ``ceil(balance_factor x mean)`` requests in flight (by weight) passes new keys on along
      the ring, e.g. 1.25 (None: exactly nginx's routing, whatever the load).
    """

    #: Whether the key decides the picks: a subset would break key agreement across clients.
    keyed = True

    def __init__(
        self,
        points_per_weight: int = DEFAULT_POINTS_PER_WEIGHT,
        *,
        ipv6_brackets: bool = True,
        balance_factor: float | None = None,
    ) -> None:
        if isinstance(points_per_weight, bool) or not isinstance(points_per_weight, int):
            raise TypeError(
                f"points_per_weight must be an int, got {points_per_weight!r} "
                f"({type(points_per_weight).__name__})"
            )
        if points_per_weight < 1:
            raise ValueError(f"points_per_weight must be >= 1, got {points_per_weight}")
        if not isinstance(ipv6_brackets, bool):
            raise TypeError(f"ipv6_brackets must be a bool, got {ipv6_brackets!r}")
        if balance_factor is not None:
            if isinstance(balance_factor, bool) or not isinstance(balance_factor, (int, float)):
                raise TypeError(f"balance_factor must be a number or None, got {balance_factor!r}")
            if not math.isfinite(balance_factor) or balance_factor < 1:
                raise ValueError(
                    f"balance_factor must be a finite number >= 1, got {balance_factor!r}"
                )
        self.points_per_weight = points_per_weight
        self.ipv6_brackets = ipv6_brackets
        self.balance_factor = balance_factor

    @buildmethod
    def build(self, backends: Iterable[Backend | str]) -> ConsistentSelector:
        """Build the ring over ``backends`` (sorted and de-duplicated first)."""
        return self._build(prepare_backends(backends))

    def _build(self, backends: tuple[Backend, ...]) -> ConsistentSelector:
        if self.balance_factor is not None:
            return BoundedSelector(
                backends, self.points_per_weight, self.ipv6_brackets, float(self.balance_factor)
            )
        return ConsistentSelector(backends, self.points_per_weight, self.ipv6_brackets)

    def rebuild(
        self,
        previous: Selector | None,
        backends: tuple[Backend, ...],
        change: Change | None = None,
    ) -> ConsistentSelector:
        """The ring over ``backends`` (sorted and de-duplicated) from ``previous``, a ring this
        algorithm built: the points of the backends that left are taken out, those of the
        backends that joined merged in, and the rest kept as it is. Every key routes as on
        ``build(backends)``. A ring with other options, or a change of more than an eighth of
        the backends, is built afresh."""
        kind = ConsistentSelector if self.balance_factor is None else BoundedSelector
        if (
            type(previous) is not kind
            or not isinstance(previous, ConsistentSelector)
            or previous._options != (self.points_per_weight, self.ipv6_brackets)
            or (
                isinstance(previous, BoundedSelector)
                and previous._factor != float(self.balance_factor or 0.0)
            )
        ):
            return self._build(backends)
        if change is None:
            change = changes(previous.backends, backends)
        if len(change) > len(backends) // 8:
            return self._build(backends)
        return previous.rebuilt(backends, change)

    def __repr__(self) -> str:
        bound = "" if self.balance_factor is None else f", balance_factor={self.balance_factor:g}"
        return (
            f"Consistent(points_per_weight={self.points_per_weight}, "
            f"ipv6_brackets={self.ipv6_brackets}{bound})"
        )
