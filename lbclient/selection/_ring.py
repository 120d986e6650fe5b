"""The ketama ring of :mod:`lbclient.selection.consistent` (and of libketama's continuum), kept
in compact arrays.

What lives here: :func:`ketama_points` (nginx's points of one backend) and :class:`Ring`: the
points' hashes in one array of 32-bit values, their owners in another (2 bytes each up to
65,536 backends), and a bucket index over the top bits of the hash; :meth:`Ring.rebuild` takes
out the points of the backends that left and merges in those of the backends that joined,
keeping the rest. What may not: choosing a backend for a key (the selectors' job), or any I/O.
"""

from __future__ import annotations

import zlib
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import accumulate, compress, count, islice, repeat
from operator import add, and_, eq, lshift, or_, rshift
from typing import Final

from lbclient.backend import Backend

__all__ = ["Ring", "ketama_points"]

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
