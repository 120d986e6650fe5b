"""Consistent hashing on a ketama ring that routes every key as nginx's ``hash ... consistent``.

The ring, for each backend in sorted order:

* ``base = host + b"\\0" + port`` (host as nginx writes it: IPv4 dotted, IPv6 in brackets, a
  host name as written; the port in decimal);
* ``prev = 0``; ``weight * points_per_weight`` times: ``h = crc32(base + le32(prev))``, add the
  point ``(h, backend)``, ``prev = h``.

Points are sorted by hash; of several points with one hash the first (in backend order) stays.
A key goes to the first point whose hash is ``>= crc32(key)``, wrapping past the end to the
first point; its fallbacks are the following points along the ring.
"""

from __future__ import annotations

import itertools
import math
import zlib
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from typing import Final

from lbclient._load import Load, Total
from lbclient.backend import Backend
from lbclient.selection.base import Key, buildmethod, prepare_backends, to_key

__all__ = ["DEFAULT_POINTS_PER_WEIGHT", "Consistent", "ConsistentSelector"]

#: nginx's number of ring points per unit of weight.
DEFAULT_POINTS_PER_WEIGHT: Final = 160

_NODE_BITS: Final = 24  # backend index bits in a packed point: up to 16,777,216 backends
_NODE_MASK: Final = (1 << _NODE_BITS) - 1
_POINT_LIMIT: Final = 1 << 28


def _host_text(backend: Backend, ipv6_brackets: bool) -> str:
    host = backend.host
    if ipv6_brackets or not host.startswith("["):
        return host
    return host[1:-1]  # Pingora's form: IPv6 without brackets


class ConsistentSelector:
    """A built ketama ring over a fixed, sorted set of backends."""

    __slots__ = ("_backends", "_count", "_hashes", "_owners", "_shift", "_starts")

    def __init__(
        self, backends: tuple[Backend, ...], points_per_weight: int, ipv6_brackets: bool
    ) -> None:
        self._backends = backends
        total = sum(b.weight for b in backends) * points_per_weight
        if total > _POINT_LIMIT:
            raise ValueError(
                f"the ring would have {total} points (limit {_POINT_LIMIT}); "
                "lower the weights or points_per_weight"
            )
        crc = zlib.crc32
        packed: list[int] = []
        append = packed.append
        for node, backend in enumerate(backends):
            base = crc(f"{_host_text(backend, ipv6_brackets)}\0{backend.port}".encode())
            prev = 0
            for _ in range(backend.weight * points_per_weight):
                prev = crc(prev.to_bytes(4, "little"), base)
                # hash in the high bits, backend index in the low bits: sorting the ints sorts
                # by hash and, within one hash, by backend order.
                append((prev << _NODE_BITS) | node)
        packed.sort()
        hashes: list[int] = []
        owners: list[Backend] = []
        last = -1
        for point in packed:
            h = point >> _NODE_BITS
            if h != last:
                hashes.append(h)
                owners.append(backends[point & _NODE_MASK])
                last = h
        self._hashes = hashes
        self._owners = tuple(owners)
        self._count = count = len(hashes)
        # A bucket index over the top bits of the hash: _starts[b] is the first point whose
        # hash >> shift >= b, so a lookup searches only the few points of one bucket.
        bits = max(1, min(16, count.bit_length() - 1))
        self._shift = shift = 32 - bits
        starts = [count] * ((1 << bits) + 1)
        for i in range(count - 1, -1, -1):
            starts[hashes[i] >> shift] = i
        for b in range(len(starts) - 2, -1, -1):
            if starts[b] > starts[b + 1]:
                starts[b] = starts[b + 1]
        self._starts = starts

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
        return list(zip(self._hashes, self._owners, strict=True))

    def point_index(self, key: Key) -> int:
        """The index of the ring point ``key`` lands on (0 on an empty ring)."""
        if type(key) is not bytes:
            key = to_key(key)
        return self._locate(zlib.crc32(key))

    def _locate(self, h: int) -> int:
        """Index of the first point with hash >= h, wrapping to 0."""
        bucket = h >> self._shift
        starts = self._starts
        i = bisect_left(self._hashes, h, starts[bucket], starts[bucket + 1])
        return 0 if i == self._count else i

    def first(self, key: Key) -> Backend | None:
        """The backend ``key`` lands on; None with no backends."""
        if not self._count:
            return None
        if type(key) is not bytes:
            key = to_key(key)
        h = zlib.crc32(key)
        bucket = h >> self._shift
        starts = self._starts
        i = bisect_left(self._hashes, h, starts[bucket], starts[bucket + 1])
        return self._owners[0 if i == self._count else i]

    def iter(self, key: Key) -> Iterator[Backend]:
        """The backend of each ring point from ``key``'s point on, wrapping, without end."""
        if not self._count:
            return iter(())
        return _walk(self._owners, self.point_index(key))

    def __len__(self) -> int:
        return len(self._backends)

    def __repr__(self) -> str:
        return f"<ConsistentSelector backends={len(self._backends)} points={self._count}>"


class BoundedSelector(ConsistentSelector):
    """A ketama ring with bounded loads (Mirrokni, Thorup and Zadimoghaddam): no backend takes
    a new request while it holds ``ceil(balance_factor x (in flight + 1) x its weight share)``
    requests or more; the key goes on along the ring to the first backend with room. The
    fallback order for retries stays the ring walk."""

    __slots__ = ("_factor", "_loads", "_shares", "_total")

    def __init__(
        self,
        backends: tuple[Backend, ...],
        points_per_weight: int,
        ipv6_brackets: bool,
        balance_factor: float,
    ) -> None:
        super().__init__(backends, points_per_weight, ipv6_brackets)
        self._factor = balance_factor
        total_weight = sum(b.weight for b in backends) or 1
        self._shares = {b: b.weight / total_weight for b in backends}
        self._loads: Mapping[Backend, Load] = {}
        self._total = Total()

    def attach(self, loads: Mapping[Backend, Load], clock: object, total: Total) -> None:
        """Read the balancer's live load: each backend's, and the total in flight."""
        self._loads = loads
        self._total = total

    def capacity(self, backend: Backend) -> int:
        """How many requests ``backend`` may hold before the next one moves on."""
        wanted = self._factor * (self._total.in_flight + 1) * self._shares[backend]
        return max(1, math.ceil(wanted - 1e-9))

    def first(self, key: Key) -> Backend | None:
        """The first backend along the ring from ``key``'s point that has room."""
        if not self._count:
            return None
        if type(key) is not bytes:
            key = to_key(key)
        loads = self._loads
        start = self._locate(zlib.crc32(key))
        owners = self._owners
        seen: set[Backend] = set()
        for step in range(self._count):
            backend = owners[(start + step) % self._count]
            if backend in seen:
                continue
            load = loads.get(backend)
            if load is None or load.in_flight < self.capacity(backend):
                return backend
            seen.add(backend)
            if len(seen) == len(self._backends):
                break
        return owners[start]  # every backend is full (cannot happen with a factor >= 1)

    def iter(self, key: Key) -> Iterator[Backend]:
        """The bounded first pick, then the ring walk from ``key``'s point."""
        first = self.first(key)
        if first is None:
            return iter(())
        return itertools.chain((first,), _walk(self._owners, self.point_index(key)))


def _walk(owners: tuple[Backend, ...], start: int) -> Iterator[Backend]:
    count = len(owners)
    i = start
    while True:
        yield owners[i]
        i += 1
        if i == count:
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
                raise ValueError(f"balance_factor must be a finite number >= 1, got "
                                 f"{balance_factor!r}")
        self.points_per_weight = points_per_weight
        self.ipv6_brackets = ipv6_brackets
        self.balance_factor = balance_factor

    @buildmethod
    def build(self, backends: Iterable[Backend | str]) -> ConsistentSelector:
        """Build the ring over ``backends`` (sorted and de-duplicated first)."""
        if self.balance_factor is not None:
            return BoundedSelector(
                prepare_backends(backends),
                self.points_per_weight,
                self.ipv6_brackets,
                float(self.balance_factor),
            )
        return ConsistentSelector(
            prepare_backends(backends), self.points_per_weight, self.ipv6_brackets
        )

    def __repr__(self) -> str:
        bound = "" if self.balance_factor is None else f", balance_factor={self.balance_factor:g}"
        return (
            f"Consistent(points_per_weight={self.points_per_weight}, "
            f"ipv6_brackets={self.ipv6_brackets}{bound})"
        )
