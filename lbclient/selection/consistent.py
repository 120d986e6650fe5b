"""Consistent hashing on a ketama ring that routes every key as nginx's ``hash ... consistent``.

The ring, for each backend in sorted order:

* ``base = host + b"\\0" + port`` (host as nginx writes it: IPv4 dotted, IPv6 in brackets, a
  host name as written; the port in decimal);
* ``prev = 0``; ``weight * points_per_weight`` times: ``h = crc32(base + le32(prev))``, add the
  point ``(h, backend)``, ``prev = h``.

Points are sorted by hash; of several points with one hash the first (in backend order) stays.
A key goes to the first point whose hash is ``>= crc32(key)``, wrapping past the end to the
first point; its fallbacks are the following points along the ring.

The ring is kept in arrays (:class:`Ring`: 4 bytes per point for the hash, 2 for its owner up
to 65,536 backends; 160 points per backend take about 1 KB). A backend's points depend on that
backend alone, so when the set changes, :meth:`Consistent.rebuild` takes out the points of the
backends that left and merges in those of the backends that joined, and keeps the rest.
"""

from __future__ import annotations

import itertools
import math
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import accumulate, compress, count, islice, repeat
from operator import add, and_, eq, lshift, or_, rshift
from typing import Final

from lbclient._load import Load, Total
from lbclient.backend import Backend
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

__all__ = ["DEFAULT_POINTS_PER_WEIGHT", "Consistent", "ConsistentSelector", "Ring"]

#: nginx's number of ring points per unit of weight.
DEFAULT_POINTS_PER_WEIGHT: Final = 160

_NODE_BITS: Final = 24  # backend index bits in a packed point: up to 16,777,216 backends
_NODE_MASK: Final = (1 << _NODE_BITS) - 1
_POINT_LIMIT: Final = 1 << 28
#: The most bits of a point the bucket index looks at: 16,385 bucket starts at most, so that
#: an update shifts them cheaply.
_INDEX_BITS: Final = 14
#: Array type codes: 32-bit point values; slot numbers up to 65,536 backends, and beyond.
_POINT: Final = "I" if array("I").itemsize >= 4 else "L"
_SMALL_SLOT: Final = "H"
_SLOT: Final = _POINT
_SMALL_SLOTS: Final = 1 << 16


def _host_text(backend: Backend, ipv6_brackets: bool) -> str:
    host = backend.host
    if ipv6_brackets or not host.startswith("["):
        return host
    return host[1:-1]  # Pingora's form: IPv6 without brackets


def ketama_points(backend: Backend, points_per_weight: int, ipv6_brackets: bool) -> list[int]:
    """``backend``'s ring points in chain order: ``weight * points_per_weight`` crc32 values."""
    crc = zlib.crc32
    base = crc(f"{_host_text(backend, ipv6_brackets)}\0{backend.port}".encode())
    points: list[int] = []
    append = points.append
    prev = 0
    for _ in range(backend.weight * points_per_weight):
        prev = crc(prev.to_bytes(4, "little"), base)
        append(prev)
    return points


def _index_bits(points: int) -> int:
    return max(1, min(_INDEX_BITS, points.bit_length() - 1))


class Ring:
    """Points on a 32-bit ring, each owned by one backend, kept in compact arrays. Immutable.

    ``hashes`` holds the distinct point values in ascending order and ``owners`` the slot of
    each point's backend in ``members``. Of several backends with a point of one value the
    first in sorted order owns it (the last, with ``last_wins``); the others are kept in
    ``shadow`` (value -> their slots), so that the point passes to the next of them when its
    owner leaves. ``starts`` is a bucket index over the top bits of the values: ``starts[b]``
    is the index of the first point whose value ``>> shift`` is at least ``b``.

    Slots are stable: a backend keeps its slot while it stays, so a change rewrites the
    entries of the points it touches and nothing else.
    """

    __slots__ = ("free", "hashes", "last_wins", "members", "owners", "shadow", "shift", "starts")

    def __init__(
        self,
        members: tuple[Backend | None, ...],
        hashes: array[int],
        owners: array[int],
        starts: list[int],
        shift: int,
        shadow: dict[int, tuple[int, ...]],
        last_wins: bool,
        free: tuple[int, ...] = (),
    ) -> None:
        self.members = members
        self.hashes = hashes
        self.owners = owners
        self.starts = starts
        self.shift = shift
        self.shadow = shadow
        self.last_wins = last_wins
        #: Slots of ``members`` that hold no backend (None), taken first by joining backends.
        self.free = free

    @classmethod
    def build(
        cls, backends: Sequence[Backend], points: Iterable[Sequence[int]], last_wins: bool
    ) -> Ring:
        """The ring of ``backends`` (sorted), given each one's points in the same order."""
        if len(backends) > _NODE_MASK + 1:
            raise ValueError(
                f"a ring holds up to {_NODE_MASK + 1:,} backends, got {len(backends):,}"
            )
        lists = list(points)
        shift = 32 - _index_bits(sum(map(len, lists)))
        # Each point goes to the bucket of its top bits, packed as value << 24 | backend index:
        # sorting a bucket sorts by value and, within one value, by backend order. A bucket is
        # an array, so the ints sorted are made afresh, next to each other in memory.
        buckets = [array("Q") for _ in range(1 << (32 - shift))]
        for node, values in enumerate(lists):
            packed = map(or_, map(lshift, values, repeat(_NODE_BITS)), repeat(node))
            for bucket, point in zip(map(rshift, values, repeat(shift)), packed, strict=True):
                buckets[bucket].append(point)
        del lists
        hashes = array(_POINT)
        owners = array(_SMALL_SLOT if len(backends) <= _SMALL_SLOTS else _SLOT)
        starts = [0]
        for bucket_points in buckets:
            if bucket_points:
                ordered = sorted(bucket_points)
                hashes.extend(map(rshift, ordered, repeat(_NODE_BITS)))
                owners.extend(map(and_, ordered, repeat(_NODE_MASK)))
            starts.append(len(hashes))
        del buckets
        shadow: dict[int, tuple[int, ...]] = {}
        # Indexes whose value repeats the one before: runs of one value, owners ascending.
        repeats = list(compress(count(1), map(eq, islice(hashes, 1, None), hashes)))
        if repeats:
            dropped: list[tuple[int, int, int, int]] = []
            i = 0
            while i < len(repeats):
                j = i
                while j + 1 < len(repeats) and repeats[j + 1] == repeats[j] + 1:
                    j += 1
                first, last = repeats[i] - 1, repeats[j]
                keep = last if last_wins else first
                winner = owners[keep]
                others = tuple(sorted(set(owners[first : last + 1]) - {winner}))
                if others:
                    shadow[hashes[first]] = others
                dropped += [(p, _DELETE, hashes[p], 0) for p in range(first, last + 1) if p != keep]
                i = j + 1
            starts = _shifted(starts, shift, dropped)
            hashes, owners = _edited(hashes, owners, dropped)
        return cls(tuple(backends), hashes, owners, starts, shift, shadow, last_wins)

    def __len__(self) -> int:
        return len(self.hashes)

    def _find(self, h: int) -> int:
        """The index of the first point whose value is ``>= h`` (``len(self)`` if none)."""
        bucket = h >> self.shift
        starts = self.starts
        return bisect_left(self.hashes, h, starts[bucket], starts[bucket + 1])

    def _slot_of(self, backend: Backend, points: Sequence[int]) -> int | None:
        """The slot of ``backend``, found through one of its points where it can be."""
        members, hashes, owners = self.members, self.hashes, self.owners
        size = len(hashes)
        for h in points:
            i = self._find(h)
            if i < size and hashes[i] == h and members[owners[i]] is backend:
                return owners[i]
            for slot in self.shadow.get(h, ()):
                if members[slot] is backend:
                    return slot
        ids = list(map(id, members))
        try:
            return ids.index(id(backend))
        except ValueError:
            return None

    def rebuild(
        self,
        removed: Sequence[tuple[Backend, Sequence[int]]],
        added: Sequence[tuple[Backend, Sequence[int]]],
    ) -> Ring | None:
        """This ring without the ``removed`` backends' points and with the ``added`` ones',
        each given with its points; None when it cannot be made from this ring (a full build
        is due)."""
        members = list(self.members)
        free = list(self.free)
        lost: dict[int, list[int]] = {}
        for backend, points in removed:
            slot = self._slot_of(backend, points)
            if slot is None:
                return None
            for h in dict.fromkeys(points):
                lost.setdefault(h, []).append(slot)
            members[slot] = None
            free.append(slot)
        gained: dict[int, list[int]] = {}
        for backend, points in added:
            if free:
                slot = free.pop()
                members[slot] = backend
            else:
                slot = len(members)
                members.append(backend)
            for h in dict.fromkeys(points):
                gained.setdefault(h, []).append(slot)
        live = len(members) - len(free)
        if len(members) > 2 * live + 64 or (
            self.owners.typecode == _SMALL_SLOT and len(members) > _SMALL_SLOTS
        ):
            return None
        hashes, owners = self.hashes, self.owners
        size = len(hashes)
        shadow = dict(self.shadow)
        pick = max if self.last_wins else min

        def order(slot: int) -> Backend:
            return _member(members, slot)

        edits: list[tuple[int, int, int, int]] = []  # (index, what, value, slot)
        starts, shift = self.starts, self.shift
        for h in lost.keys() | gained.keys():
            bucket = h >> shift
            i = bisect_left(hashes, h, starts[bucket], starts[bucket + 1])
            present = i < size and hashes[i] == h
            held = [owners[i]] if present else []
            if shadow:
                held += shadow.pop(h, ())
            for slot in lost.get(h, ()):
                if slot not in held:
                    return None  # not this ring's point: no incremental answer
                held.remove(slot)
            held += gained.get(h, ())
            if not held:
                if present:
                    edits.append((i, _DELETE, h, 0))
                continue
            if len(held) == 1:
                winner = held[0]
            else:
                winner = pick(held, key=order)
                shadow[h] = tuple(sorted(set(held) - {winner}))
            if not present:
                edits.append((i, _INSERT, h, winner))
            elif owners[i] != winner:
                edits.append((i, _REPLACE, h, winner))
        edits.sort()
        grown = size + sum(1 if e[1] == _INSERT else -1 for e in edits if e[1] != _REPLACE)
        if abs(_index_bits(grown) - (32 - self.shift)) > 1:
            return None  # the bucket index no longer fits the ring's size
        new_hashes, new_owners = _edited(hashes, owners, edits)
        trimmed = len(members)
        while trimmed and members[trimmed - 1] is None:
            trimmed -= 1
        return Ring(
            tuple(members[:trimmed]),
            new_hashes,
            new_owners,
            _shifted(self.starts, self.shift, edits),
            self.shift,
            shadow,
            self.last_wins,
            tuple(sorted((slot for slot in free if slot < trimmed), reverse=True)),
        )

    def points(self) -> list[tuple[int, Backend]]:
        """The ring as ``(value, backend)`` pairs in ring order."""
        members = self.members
        pairs = zip(self.hashes, self.owners, strict=True)
        return [(h, _member(members, slot)) for h, slot in pairs]


def _member(members: Sequence[Backend | None], slot: int) -> Backend:
    backend = members[slot]
    assert backend is not None
    return backend


#: What an edit of the arrays does at its index: insert a point before it, give the point
#: there another owner, or delete the point there. Sorted edits insert before they replace.
_INSERT: Final = 0
_REPLACE: Final = 1
_DELETE: Final = 2


def _edited(
    hashes: array[int], owners: array[int], edits: Sequence[tuple[int, int, int, int]]
) -> tuple[array[int], array[int]]:
    """New arrays with the sorted ``edits`` ``(index, what, value, slot)`` made; the points
    between edits are copied as bytes."""
    if not edits:
        return hashes, owners
    size = len(hashes) + sum(1 if e[1] == _INSERT else -1 for e in edits if e[1] != _REPLACE)
    new_hashes = array(hashes.typecode, [0]) * size
    new_owners = array(owners.typecode, [0]) * size
    hsize, osize = hashes.itemsize, owners.itemsize
    with (
        memoryview(hashes) as hview,
        memoryview(owners) as oview,
        memoryview(new_hashes) as new_hview,
        memoryview(new_owners) as new_oview,
    ):
        src_h, src_o = hview.cast("B"), oview.cast("B")
        dst_h, dst_o = new_hview.cast("B"), new_oview.cast("B")
        done = 0  # points of the old arrays copied or edited
        out = 0  # points of the new arrays written
        for i, what, h, slot in edits:
            if i > done:
                end = out + i - done
                dst_h[out * hsize : end * hsize] = src_h[done * hsize : i * hsize]
                dst_o[out * osize : end * osize] = src_o[done * osize : i * osize]
                out, done = end, i
            if what != _DELETE:
                new_hashes[out] = h
                new_owners[out] = slot
                out += 1
            if what != _INSERT:
                done = i + 1
        dst_h[out * hsize :] = src_h[done * hsize :]
        dst_o[out * osize :] = src_o[done * osize :]
        for view in (src_h, src_o, dst_h, dst_o):
            view.release()
    return new_hashes, new_owners


def _shifted(
    starts: list[int], shift: int, edits: Sequence[tuple[int, int, int, int]]
) -> list[int]:
    """``starts`` after the ``edits``: each insert moves the start of every bucket past its
    value's bucket by one, each delete by minus one."""
    moves = [0] * len(starts)
    for _, what, h, _ in edits:
        if what != _REPLACE:
            moves[(h >> shift) + 1] += 1 if what == _INSERT else -1
    return list(map(add, starts, accumulate(moves)))


class ConsistentSelector:
    """A built ketama ring over a fixed, sorted set of backends."""

    __slots__ = (
        "_backends", "_count", "_hashes", "_members", "_options", "_owners", "_ring", "_shift",
        "_starts", "_weight",
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
            ring = Ring.build(
                backends,
                (ketama_points(b, points_per_weight, ipv6_brackets) for b in backends),
                last_wins=False,
            )
        self._ring = ring
        self._hashes = ring.hashes
        self._owners = ring.owners
        self._members = ring.members
        self._starts = ring.starts
        self._shift = ring.shift
        self._count = len(ring.hashes)

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
        return self._members[self._owners[0 if i == self._count else i]]

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
        start = self._locate(zlib.crc32(key))
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


def _walk(
    members: tuple[Backend | None, ...], owners: array[int], start: int
) -> Iterator[Backend]:
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
            or (isinstance(previous, BoundedSelector)
                and previous._factor != float(self.balance_factor or 0.0))
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
