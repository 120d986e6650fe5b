"""The ketama ring of :mod:`lbclient.selection.consistent` (and of libketama's continuum), kept
in compact arrays.

What lives here: the points of nginx's ring, one backend's (:func:`ketama_points`) or every
backend's a step of their chains at a time (:func:`ketama_steps`), and :class:`Ring`: the
points' values, less the top bits a bucket index over them holds, in one array (2 bytes a point
from 65,536 points on), their owners in another (2 bytes each up to 65,536 backends), and the
index; :meth:`Ring.from_steps` sorts points given in any order with no list of them all (packed
in one array of 64-bit words, a point is a Python int only while its run of some thousands or
its range of some ten thousands is sorted); :meth:`Ring.rebuild` takes out the points of the
backends that left and merges in those of the backends that joined, keeping the rest. What may
not: choosing a backend for a key (the selectors' job), or any I/O.
"""

from __future__ import annotations

import functools
import struct
import sys
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate, chain, compress, repeat
from operator import add
from typing import Final

from lbclient.backend import Backend

__all__ = ["Ring", "ketama_points", "ketama_steps"]

_NODE_BITS: Final = 24  # up to 16,777,216 backends in a ring
_POINT_LIMIT: Final = 1 << 28
#: The most bits of a point's value the bucket index covers: 65,537 bucket starts at most.
#: With all 16, a point keeps only its value's low 16 bits (the bucket gives the rest).
_INDEX_BITS: Final = 16
#: Array type codes: 16, 32 and 64 bits unsigned.
_U16: Final = "H"
_U32: Final = "I" if array("I").itemsize == 4 else "L"
_U64: Final = "Q"
_SMALL_SLOTS: Final = 1 << 16  # slots in 16 bits
#: Bucket starts kept in a list (reading one makes no int) up to this many, in an array above.
_LISTED: Final = (1 << 12) + 1
_LOW16: Final = 0xFFFF
_FULL: Final = 0xFFFFFFFF
#: A build sorts points packed as ``value << 32 | slot`` in one 64-bit word. Where the value and
#: the slot sit among the word's 32-bit halves, and their low 16 bits among its 16-bit
#: quarters, in this machine's byte order.
_VALUE32, _SLOT32 = (1, 0) if sys.byteorder == "little" else (0, 1)
_VALUE16, _SLOT16 = (2, 0) if sys.byteorder == "little" else (1, 3)
#: A build sorts the points as they come in runs of at least this many, then merges the runs.
_RUN: Final = 8192
_le32 = struct.Struct("<I").pack
_ZERO32: Final = bytes(4)
_field = struct.Struct("=I").pack  # one 32-bit field in this machine's byte order
_BIAS: Final = 1 << 31


def _host_text(backend: Backend, ipv6_brackets: bool) -> str:
    host = backend.host
    if ipv6_brackets or not host.startswith("["):
        return host
    return host[1:-1]  # Pingora's form: IPv6 without brackets


def _base(backend: Backend, ipv6_brackets: bool) -> int:
    """The crc32 of ``host + "\\0" + port``, where each of the backend's chains starts."""
    return zlib.crc32(f"{_host_text(backend, ipv6_brackets)}\0{backend.port}".encode())


def ketama_points(backend: Backend, points_per_weight: int, ipv6_brackets: bool) -> list[int]:
    """``backend``'s ring points in chain order: ``weight * points_per_weight`` crc32 values."""
    crc = zlib.crc32
    base = _base(backend, ipv6_brackets)
    points: list[int] = []
    append = points.append
    prev = 0
    for _ in range(backend.weight * points_per_weight):
        prev = crc(_le32(prev), base)
        append(prev)
    return points


def ketama_steps(
    backends: Sequence[Backend], points_per_weight: int, ipv6_brackets: bool
) -> Iterator[tuple[array[int], array[int]]]:
    """The points of every backend's chain, a step at a time: ``(values, slots)``, the k-th
    point of each backend with more than k, and its position in ``backends``. The same points
    as :func:`ketama_points`, each chain's step made for all backends in one pass."""
    lengths = [b.weight * points_per_weight for b in backends]
    slots = array(_U32, range(len(backends)))
    bases = [_base(b, ipv6_brackets) for b in backends]
    values = array(_U32, [0]) * len(backends)
    ends = set(lengths)
    crc = zlib.crc32
    for step in range(max(lengths, default=0)):
        if step in ends:  # the chains of this length are done
            more = [lengths[slot] > step for slot in slots]
            slots = array(_U32, compress(slots, more))
            bases = list(compress(bases, more))
            values = array(_U32, compress(values, more))
        values = array(_U32, map(crc, map(_le32, values), bases))
        yield values, slots


def _index_bits(points: int) -> int:
    return max(1, min(_INDEX_BITS, points.bit_length() - 1))


def _packed(values: array[int], slots: array[int]) -> array[int]:
    """``value << 32 | slot`` of each point, in 64-bit words."""
    words = array(_U64, [0]) * len(values)
    with memoryview(words) as whole, whole.cast("B") as raw, raw.cast(_U32) as halves:
        halves[_VALUE32::2] = values
        halves[_SLOT32::2] = slots
    return words


def _sorted_runs(
    chunks: Iterable[tuple[array[int], array[int]]], size: int
) -> tuple[array[int], list[int]]:
    """The points of ``chunks`` packed in one array of 64-bit words (made for ``size``), in
    sorted runs of at least :data:`_RUN` points but the last, and the bounds of the runs."""
    words = array(_U64, [0]) * size
    bounds = [0]
    pending: list[array[int]] = []

    def sort_pending() -> None:
        start = bounds[-1]
        run = array(_U64, sorted(chain.from_iterable(pending)))
        words[start : start + len(run)] = run
        bounds.append(start + len(run))
        pending.clear()

    waiting = 0
    for values, slots in chunks:
        pending.append(_packed(values, slots))
        waiting += len(values)
        if waiting >= _RUN:
            sort_pending()
            waiting = 0
    if waiting:
        sort_pending()
    del words[bounds[-1] :]
    return words, bounds


class Ring:
    """Points on a 32-bit ring, each owned by one backend, kept in compact arrays. Immutable.

    The distinct point values, ascending, are split by their top ``32 - shift`` bits into
    buckets: ``starts[b]`` is the index of the first point of bucket ``b`` (``starts[-1]`` the
    number of points; a list up to 4,097 buckets, an array above). ``lows`` holds each point's
    value less those bits (``value & mask``: with a 16-bit index, the low 16 bits; below that,
    the whole value) and ``owners`` the slot of the point's backend in ``members``. Of several
    backends with a point of one value the first in sorted order owns it (the last, with
    ``last_wins``); the others are kept in ``shadow`` (value -> their slots), so that the point
    passes to the next of them when its owner leaves.

    Slots are stable: a backend keeps its slot while it stays, so a change rewrites the
    entries of the points it touches and nothing else.
    """

    __slots__ = (
        "free",
        "last_wins",
        "lows",
        "mask",
        "members",
        "owners",
        "shadow",
        "shift",
        "starts",
    )

    def __init__(
        self,
        members: tuple[Backend | None, ...],
        lows: array[int],
        owners: array[int],
        starts: array[int] | list[int],
        shift: int,
        shadow: dict[int, tuple[int, ...]],
        last_wins: bool,
        free: tuple[int, ...] = (),
    ) -> None:
        self.members = members
        self.lows = lows
        self.owners = owners
        self.starts = starts
        self.shift = shift
        self.mask = _LOW16 if shift == 16 else _FULL
        self.shadow = shadow
        self.last_wins = last_wins
        #: Slots of ``members`` that hold no backend (None), taken first by joining backends.
        self.free = free

    @classmethod
    def build(
        cls, backends: Sequence[Backend], points: Iterable[Sequence[int]], last_wins: bool
    ) -> Ring:
        """The ring of ``backends`` (sorted), given each one's points in the same order."""
        lists = [array(_U32, values) for values in points]
        chunks = ((v, array(_U32, [slot]) * len(v)) for slot, v in enumerate(lists))
        return cls.from_steps(backends, chunks, sum(map(len, lists)), last_wins)

    @classmethod
    def from_steps(
        cls,
        backends: Sequence[Backend],
        chunks: Iterable[tuple[array[int], array[int]]],
        size: int,
        last_wins: bool,
    ) -> Ring:
        """The ring of ``backends`` (sorted), given their points as ``(values, slots)`` array
        pairs in any order (a slot is a position in ``backends``), about ``size`` in all."""
        if len(backends) > 1 << _NODE_BITS:
            raise ValueError(
                f"a ring holds up to {1 << _NODE_BITS:,} backends, got {len(backends):,}"
            )
        words, bounds = _sorted_runs(chunks, size)
        total = len(words)
        shift = 32 - _index_bits(total)
        lows = array(_U16 if shift == 16 else _U32, [0]) * total
        owners = array(_U16 if len(backends) <= _SMALL_SLOTS else _U32, [0]) * total
        index, repeats = _merged(words, bounds, shift, lows, owners)
        del words
        starts = index.tolist() if len(index) <= _LISTED else index
        ring = cls(tuple(backends), lows, owners, starts, shift, {}, last_wins)
        return ring._dropping(repeats) if repeats else ring

    def _dropping(self, repeats: list[int]) -> Ring:
        """This ring (just built) without the points at ``repeats`` (ascending), each of
        which has the value of the point before it: of each run of one value the first
        (last, with ``last_wins``) stays, and the others' owners are kept in ``shadow``."""
        owners = self.owners
        shadow: dict[int, tuple[int, ...]] = {}
        dropped: list[tuple[int, int, int, int]] = []
        i = 0
        while i < len(repeats):
            j = i
            while j + 1 < len(repeats) and repeats[j + 1] == repeats[j] + 1:
                j += 1
            first, last = repeats[i] - 1, repeats[j]
            keep = last if self.last_wins else first
            value = self._value(first)
            winner = owners[keep]
            others = tuple(sorted(set(owners[first : last + 1]) - {winner}))
            if others:
                shadow[value] = others
            dropped += [(p, _DELETE, value, 0) for p in range(first, last + 1) if p != keep]
            i = j + 1
        lows, owners = _edited(self.lows, owners, dropped, self.mask)
        starts = _shifted(self.starts, self.shift, dropped)
        return Ring(self.members, lows, owners, starts, self.shift, shadow, self.last_wins)

    def __len__(self) -> int:
        return len(self.lows)

    def _value(self, i: int) -> int:
        """The value of the point at index ``i``."""
        bucket = bisect_right(self.starts, i) - 1
        return bucket << self.shift | self.lows[i]

    def _at(self, h: int) -> tuple[int, bool]:
        """The index of the first point whose value is ``>= h`` (``len(self)`` if none), and
        whether that point's value is ``h``."""
        bucket = h >> self.shift
        starts = self.starts
        end = starts[bucket + 1]
        low = h & self.mask
        i = bisect_left(self.lows, low, starts[bucket], end)
        return i, i < end and self.lows[i] == low

    def _find(self, h: int) -> int:
        """The index of the first point whose value is ``>= h`` (``len(self)`` if none)."""
        return self._at(h)[0]

    def values(self) -> list[int]:
        """The points' values in ring order."""
        shift, lows, starts = self.shift, self.lows, self.starts
        out: list[int] = []
        for bucket in range(len(starts) - 1):
            top = bucket << shift
            out += [top | low for low in lows[starts[bucket] : starts[bucket + 1]]]
        return out

    def _slot_of(self, backend: Backend, points: Sequence[int]) -> int | None:
        """The slot of ``backend``, found through one of its points where it can be."""
        members, owners = self.members, self.owners
        for h in points:
            i, present = self._at(h)
            if present and members[owners[i]] is backend:
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
            self.owners.typecode == _U16 and len(members) > _SMALL_SLOTS
        ):
            return None
        owners = self.owners
        shadow = dict(self.shadow)
        pick = max if self.last_wins else min

        def order(slot: int) -> Backend:
            return _member(members, slot)

        edits: list[tuple[int, int, int, int]] = []  # (index, what, value, slot)
        for h in lost.keys() | gained.keys():
            i, present = self._at(h)
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
        grown = len(self) + sum(1 if e[1] == _INSERT else -1 for e in edits if e[1] != _REPLACE)
        if abs(_index_bits(grown) - (32 - self.shift)) > 1:
            return None  # the bucket index no longer fits the ring's size
        new_lows, new_owners = _edited(self.lows, owners, edits, self.mask)
        trimmed = len(members)
        while trimmed and members[trimmed - 1] is None:
            trimmed -= 1
        return Ring(
            tuple(members[:trimmed]),
            new_lows,
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
        pairs = zip(self.values(), self.owners, strict=True)
        return [(h, _member(members, slot)) for h, slot in pairs]


def _member(members: Sequence[Backend | None], slot: int) -> Backend:
    backend = members[slot]
    assert backend is not None
    return backend


def _merged(
    words: array[int], bounds: list[int], shift: int, lows: array[int], owners: array[int]
) -> tuple[array[int], list[int]]:
    """Merge the sorted runs of ``words`` (packed points; ``bounds`` gives the runs) into
    ``lows`` and ``owners``: by value and, within one value, by slot. One range of values at a
    time (of about 65,536 points), its points made Python ints only while it is sorted.
    Returns the bucket starts of the ring's index (``32 - shift`` bits) and the indexes whose
    value repeats the one before (ascending)."""
    ranges = (len(words) >> 16).bit_length()
    per_range = 1 << (32 - shift - ranges)  # buckets of the index in one range
    starts = array(_U32, [0]) * ((1 << (32 - shift)) + 1)
    cursors, ends = bounds[:-1], bounds[1:]
    low16 = lows.typecode == _U16
    small = owners.typecode == _U16
    repeats: list[int] = []
    at = 0
    with memoryview(lows) as lows_out, memoryview(owners) as owners_out:
        for r in range(1 << ranges):
            limit = (r + 1) << (64 - ranges)  # the range's packed points are below
            parts = []
            for k, (cursor, end) in enumerate(zip(cursors, ends, strict=True)):
                cut = bisect_left(words, limit, cursor, end)
                parts.append(words[cursor:cut])
                cursors[k] = cut
            run = array(_U64, sorted(chain.from_iterable(parts)))
            del parts
            first = r * per_range
            tops = [b << shift << 32 for b in range(first, first + per_range)]
            starts[first : first + per_range] = array(
                _U32, map(add, repeat(at), map(bisect_left, repeat(run), tops))
            )
            end = at + len(run)
            with (
                memoryview(run) as whole,
                whole.cast("B") as raw,
                raw.cast(_U32) as halves,
                raw.cast(_U16) as quarters,
            ):
                values = halves[_VALUE32::2]
                lows_out[at:end] = quarters[_VALUE16::4] if low16 else values
                owners_out[at:end] = quarters[_SLOT16::4] if small else halves[_SLOT32::2]
                repeats += _repeats(values, at)
                values.release()
            at = end
    starts[-1] = at
    return starts, repeats


def _repeats(values: memoryview, first: int) -> list[int]:
    """The indexes (from ``first``) of the ``values`` (32-bit, ascending) equal to the one
    before. The values are read as 32-bit fields of one integer, XORed with the same shifted
    by a field: a field of the result is zero where a value equals the next one, and the search
    for four zero bytes at a field's start is made on bytes (a hit elsewhere is passed over)."""
    size = len(values)
    if size < 2:
        return []
    fields = int.from_bytes(values, "little")  # any byte order: equal fields stay equal
    diffs = (fields ^ (fields >> 32)).to_bytes(4 * size, "little")
    out: list[int] = []
    end = 4 * (size - 1)  # the last field has no value after it
    hit = diffs.find(_ZERO32, 0, end + 3)
    while 0 <= hit < end:
        if hit % 4 == 0:
            out.append(first + hit // 4 + 1)
        hit = diffs.find(_ZERO32, hit + 1, end + 3)
    return out


#: What an edit of the arrays does at its index: insert a point before it, give the point
#: there another owner, or delete the point there. Sorted edits insert before they replace.
_INSERT: Final = 0
_REPLACE: Final = 1
_DELETE: Final = 2


def _edited(
    lows: array[int], owners: array[int], edits: Sequence[tuple[int, int, int, int]], mask: int
) -> tuple[array[int], array[int]]:
    """New arrays with the sorted ``edits`` ``(index, what, value, slot)`` made (a value kept
    as ``value & mask``); the points between edits are copied as bytes."""
    if not edits:
        return lows, owners
    size = len(lows) + sum(1 if e[1] == _INSERT else -1 for e in edits if e[1] != _REPLACE)
    new_lows = array(lows.typecode, [0]) * size
    new_owners = array(owners.typecode, [0]) * size
    lsize, osize = lows.itemsize, owners.itemsize
    with (
        memoryview(lows) as lview,
        memoryview(owners) as oview,
        memoryview(new_lows) as new_lview,
        memoryview(new_owners) as new_oview,
        lview.cast("B") as src_l,
        oview.cast("B") as src_o,
        new_lview.cast("B") as dst_l,
        new_oview.cast("B") as dst_o,
    ):
        done = 0  # points of the old arrays copied or edited
        out = 0  # points of the new arrays written
        for i, what, h, slot in edits:
            if i > done:
                end = out + i - done
                dst_l[out * lsize : end * lsize] = src_l[done * lsize : i * lsize]
                dst_o[out * osize : end * osize] = src_o[done * osize : i * osize]
                out, done = end, i
            if what != _DELETE:
                new_lows[out] = h & mask
                new_owners[out] = slot
                out += 1
            if what != _INSERT:
                done = i + 1
        dst_l[out * lsize :] = src_l[done * lsize :]
        dst_o[out * osize :] = src_o[done * osize :]
    return new_lows, new_owners


def _shifted(
    starts: array[int] | list[int], shift: int, edits: Sequence[tuple[int, int, int, int]]
) -> array[int] | list[int]:
    """``starts`` after the ``edits``: each insert moves the start of every bucket past its
    value's bucket by one, each delete by minus one.

    In an array, all starts move in one addition: the starts are read as the 32-bit fields of
    one integer, and so are the moves (plus 2**31 each, so that none is negative; the sum of
    those 2**31 is taken off after). No field carries into the next, as every start stays under
    2**28."""
    moves: dict[int, int] = {}
    for _, what, h, _ in edits:
        if what != _REPLACE:
            bucket = (h >> shift) + 1
            moves[bucket] = moves.get(bucket, 0) + (1 if what == _INSERT else -1)
    if isinstance(starts, list):
        steps = [0] * len(starts)
        for bucket, move in moves.items():
            steps[bucket] = move
        return list(map(add, starts, accumulate(steps)))
    pieces: list[bytes] = []
    run = at = 0
    for bucket in sorted(moves):
        pieces.append(_field(_BIAS + run) * (bucket - at))
        run += moves[bucket]
        at = bucket
    pieces.append(_field(_BIAS + run) * (len(starts) - at))
    order = sys.byteorder
    moved = int.from_bytes(starts, order) + int.from_bytes(b"".join(pieces), order)
    moved -= _biases(len(starts))
    return array(starts.typecode, moved.to_bytes(4 * len(starts), order))


@functools.lru_cache(maxsize=4)
def _biases(fields: int) -> int:
    """``fields`` 32-bit fields of :data:`_BIAS` each, as one integer."""
    return int.from_bytes(_field(_BIAS) * fields, sys.byteorder)
