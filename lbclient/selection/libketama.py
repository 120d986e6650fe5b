"""Consistent hashing on libketama's md5 continuum, the ring memcached clients share (libketama,
and Python's ``uhashring.HashRing(..., hash_fn="ketama")``).

Not :class:`~lbclient.selection.consistent.Consistent`: that ring is nginx's (crc32 points,
160 per unit of weight, chained from ``host\\0port``), and the two route every key differently.

The continuum, for ``n`` backends in sorted order with total weight ``W``:

* a backend's server string is its address as lbclient writes it, ``host:port`` (IPv4 dotted
  decimal, IPv6 in brackets in RFC 5952 form, a host name as given): the memcached clients that
  share the ring must list their servers with the same text;
* a backend of weight ``w`` gets ``ks = floor(40 * n * w / W)`` md5 digests, of the strings
  ``f"{server}-{k}"`` for ``k`` in ``0..ks-1``; each 16-byte digest gives four points, its bytes
  0-3, 4-7, 8-11 and 12-15 read as little-endian unsigned 32-bit integers. Equal weights give
  160 points each; a backend whose share of the weight is under ``1 / (40 * n)`` gets none, and
  is then never a pick of the ring;
* a key's hash is bytes 0-3 of the md5 digest of the key, little-endian (``str`` keys as
  UTF-8, as uhashring hashes them; it hashes a ``bytes`` key's repr, so share ``str`` keys with
  it). The key goes to the first point after its hash, wrapping past the end to the first
  point; its fallbacks are the backends of the following points along the ring.

``variant`` picks the rules where implementations of this ring disagree:

* ``"uhashring"`` (the default) routes every key as uhashring does: ``ks`` is computed exactly
  in integers; a key goes to the first point *greater than* its hash; of several backends with a
  point of the same value, the last in sorted order owns it (give uhashring its nodes in
  lbclient's sorted order, as uhashring's own collisions go to the node it was given last);
* ``"libketama"`` follows libketama's C code: ``ks`` is computed in single precision,
  ``floorf((float)w / (float)W * 40.0 * (float)n)``, which for some weights is one digest fewer
  than the exact value; a key goes to the first point *at or after* its hash (a key hashing
  exactly onto a point goes to that point's backend); the C code leaves the owner of a shared
  point to its sort, and here the first backend in sorted order owns it.

The continuum is kept in arrays, as :class:`~lbclient.selection._ring.Ring`. When the set
changes and the backends that stay keep their numbers of digests (always, with equal weights),
:meth:`LibKetama.rebuild` only takes out and merges in the points of the backends that left or
joined; otherwise the continuum is built anew.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import operator
import struct
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain, compress, repeat
from typing import Final, Protocol

from lbclient.backend import Backend
from lbclient.selection._ring import _U32, Ring
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

__all__ = ["DIGESTS_PER_SERVER", "VARIANTS", "LibKetama", "LibKetamaSelector"]

#: libketama's md5 digests per server at equal weights (four points each).
DIGESTS_PER_SERVER: Final = 40

#: The values of ``variant``: whose rules the ring follows where implementations disagree.
VARIANTS: Final = ("uhashring", "libketama")

_NODE_BITS: Final = 24  # backend index bits in a packed point
_NODE_MASK: Final = (1 << _NODE_BITS) - 1
_four_points = struct.Struct("<4I").unpack
_first_point = struct.Struct("<I").unpack_from
_single = struct.Struct("<f")


class _Digest(Protocol):
    def digest(self) -> bytes: ...


def _md5_function() -> Callable[[bytes], _Digest]:
    """CPython's own md5 where present (faster on short keys than OpenSSL's), else hashlib's."""
    try:
        own: Callable[[bytes], _Digest] = importlib.import_module("_md5").md5
    except (ImportError, AttributeError):
        return _hashlib_md5
    return own


def _hashlib_md5(data: bytes) -> _Digest:
    return hashlib.md5(data, usedforsecurity=False)


_md5 = _md5_function()
_digest = operator.methodcaller("digest")


def _float32(value: float) -> float:
    """``value`` rounded to single precision (to nearest, ties to even)."""
    result: float = _single.unpack(_single.pack(value))[0]
    return result


def digests_exact(weight: int, total: int, servers: int) -> int:
    """``floor(40 * servers * weight / total)``, in integers (uhashring's count)."""
    return DIGESTS_PER_SERVER * servers * weight // total


def digests_single(weight: int, total: int, servers: int) -> int:
    """The same count as libketama's C code computes it, in single precision."""
    share = _float32(weight / _float32(float(total)))
    return math.floor(_float32(share * 40.0 * float(servers)))


def key_hash(key: bytes) -> int:
    """A key's place on the continuum: md5 bytes 0-3, little-endian."""
    point: int = _first_point(_md5(key).digest())[0]
    return point


def server_steps(
    servers: Sequence[str], digests: Sequence[int]
) -> Iterator[tuple[array[int], array[int]]]:
    """The points of every server, a digest at a time: ``(values, slots)``, the four points of
    the k-th digest of each server with more than k (``digests`` gives each one's number), and
    the position of each point's server in ``servers``. The same points as
    :func:`server_points`, each digest made for all servers in one pass."""
    slots = array(_U32, range(len(servers)))
    names = [f"{server}-" for server in servers]
    fours = _fourfold(slots)
    ends = set(digests)
    for k in range(max(digests, default=0)):
        if k in ends:  # the servers with this many digests are done
            more = [digests[slot] > k for slot in slots]
            slots = array(_U32, compress(slots, more))
            names = list(compress(names, more))
            fours = _fourfold(slots)
        made = map(_md5, map(str.encode, map(operator.add, names, repeat(str(k)))))
        values = array(_U32)
        values.frombytes(b"".join(map(_digest, made)))
        if sys.byteorder != "little":
            values.byteswap()  # md5 points read little-endian
        yield values, fours


def _fourfold(slots: array[int]) -> array[int]:
    """Each of ``slots`` four times in a row: the slots of a digest's four points."""
    return array(_U32, chain.from_iterable(zip(slots, slots, slots, slots, strict=True)))


def server_points(server: str, digests: int) -> list[int]:
    """The points of ``server`` with ``digests`` md5 digests, in digest order."""
    points: list[int] = []
    for k in range(digests):
        points.extend(_four_points(_md5(f"{server}-{k}".encode()).digest()))
    return points


class LibKetamaSelector:
    """A built libketama continuum over a fixed, sorted set of backends. Immutable."""

    __slots__ = (
        "_backends",
        "_count",
        "_lows",
        "_mask",
        "_members",
        "_owners",
        "_ring",
        "_search",
        "_shift",
        "_starts",
        "_variant",
        "_weights",
    )

    def __init__(
        self,
        backends: tuple[Backend, ...],
        variant: str,
        *,
        ring: Ring | None = None,
        weights: Counter[int] | None = None,
    ) -> None:
        self._backends = backends
        self._variant = variant
        servers = len(backends)
        if servers > _NODE_MASK + 1:
            raise ValueError(
                f"a continuum holds up to {_NODE_MASK + 1:,} backends, got {servers:,}"
            )
        #: How many backends have each weight.
        self._weights = Counter(_weights_of(backends)) if weights is None else weights
        if ring is None:
            digests = list(map(self._digests(servers, self._total()), _weights_of(backends)))
            ring = Ring.from_steps(
                backends,
                server_steps([b.address for b in backends], digests),
                4 * sum(digests),
                last_wins=variant == "uhashring",
            )
        self._ring = ring
        self._lows = ring.lows
        self._mask = ring.mask
        self._owners = ring.owners
        self._members = ring.members
        self._starts = ring.starts
        self._shift = ring.shift
        self._count = len(ring.lows)
        self._search: Callable[[array[int], int, int, int], int] = (
            bisect_right if variant == "uhashring" else bisect_left
        )

    def _total(self) -> int:
        return sum(weight * n for weight, n in self._weights.items())

    def _digests(self, servers: int, total: int) -> Callable[[int], int]:
        """The number of digests of a backend by its weight, in a set of ``servers`` backends
        of total weight ``total``."""
        count_digests = digests_exact if self._variant == "uhashring" else digests_single

        def digests(weight: int) -> int:
            return count_digests(weight, total, servers)

        return digests

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The backends in sorted order."""
        return self._backends

    @property
    def variant(self) -> str:
        """Whose rules the ring follows: ``"uhashring"`` or ``"libketama"``."""
        return self._variant

    @property
    def ring_size(self) -> int:
        """The number of distinct points on the continuum."""
        return self._count

    def points(self) -> list[tuple[int, Backend]]:
        """The continuum as ``(point, backend)`` pairs in ring order."""
        return self._ring.points()

    def point_index(self, key: Key) -> int:
        """The index of the point ``key`` goes to (0 on an empty ring)."""
        if type(key) is not bytes:
            key = to_key(key)
        return self._locate(_first_point(_md5(key).digest())[0])

    def _locate(self, h: int) -> int:
        """Index of the point a key hashing to ``h`` goes to, wrapping to 0."""
        bucket = h >> self._shift
        starts = self._starts
        i = self._search(self._lows, h & self._mask, starts[bucket], starts[bucket + 1])
        return 0 if i == self._count else i

    def first(self, key: Key) -> Backend | None:
        """The backend ``key`` goes to; None with no backends."""
        if type(key) is not bytes:
            key = to_key(key)
        h: int = _first_point(_md5(key).digest())[0]
        bucket = h >> self._shift
        starts = self._starts
        i = self._search(self._lows, h & self._mask, starts[bucket], starts[bucket + 1])
        try:
            return self._members[self._owners[i if i < self._count else 0]]
        except IndexError:  # no points: no backends
            return None

    def iter(self, key: Key) -> Iterator[Backend]:
        """The backend of each point from ``key``'s point on, wrapping, without end."""
        if not self._count:
            return iter(())
        return _walk(self._members, self._owners, self.point_index(key))

    def rebuilt(self, backends: tuple[Backend, ...], change: Change) -> LibKetamaSelector:
        """The selector for ``backends``, which ``change`` made from this set: the points of
        the backends that left or joined are taken out or merged in. When the change alters
        the number of digests of a weight that backends staying have (the number of backends
        or the total weight changed, and their share with it), the continuum is built anew."""
        weights = Counter(self._weights)
        weights.subtract(_weights_of(change.removed))
        staying = +weights
        weights.update(_weights_of(change.added))
        weights = +weights
        before = self._digests(len(self._backends), self._total())
        after = self._digests(len(backends), sum(w * n for w, n in weights.items()))
        ring = None
        if all(before(weight) == after(weight) for weight in staying):
            ring = self._ring.rebuild(
                [(b, server_points(b.address, before(b.weight))) for b in change.removed],
                [(b, server_points(b.address, after(b.weight))) for b in change.added],
            )
        return LibKetamaSelector(backends, self._variant, ring=ring, weights=weights)

    def __len__(self) -> int:
        return len(self._backends)

    def __repr__(self) -> str:
        return (
            f"<LibKetamaSelector backends={len(self._backends)} points={self._count} "
            f"variant={self._variant!r}>"
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


class LibKetama:
    """Ketama consistent hashing on libketama's md5 continuum, as memcached clients route keys.

    For sharing sticky routing with memcached-style clients: ``variant="uhashring"`` (the
    default) routes every key as ``uhashring.HashRing(nodes, hash_fn="ketama")`` does with the
    backends' addresses as node names and their weights as node weights;
    ``variant="libketama"`` follows libketama's C code where the two differ (see the module).
    For nginx's ``hash ... consistent`` ring use :class:`~lbclient.Consistent` instead.
    """

    #: Whether the key decides the picks: a subset would break key agreement across clients.
    keyed = True

    def __init__(self, variant: str = "uhashring") -> None:
        if not isinstance(variant, str):
            raise TypeError(f"variant must be a str, got {variant!r} ({type(variant).__name__})")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
        self.variant = variant

    @buildmethod
    def build(self, backends: Iterable[Backend | str]) -> LibKetamaSelector:
        """Build the continuum over ``backends`` (sorted and de-duplicated first)."""
        return LibKetamaSelector(prepare_backends(backends), self.variant)

    def rebuild(
        self,
        previous: Selector | None,
        backends: tuple[Backend, ...],
        change: Change | None = None,
    ) -> LibKetamaSelector:
        """The continuum over ``backends`` (sorted and de-duplicated) from ``previous``, a
        continuum of this variant: only the points of the backends that left or joined change,
        while the other backends' numbers of digests stay (always, with equal weights). Every
        key routes as on ``build(backends)``."""
        if type(previous) is not LibKetamaSelector or previous.variant != self.variant:
            return LibKetamaSelector(backends, self.variant)
        if change is None:
            change = changes(previous.backends, backends)
        if len(change) > len(backends) // 8:
            return LibKetamaSelector(backends, self.variant)
        return previous.rebuilt(backends, change)

    def __repr__(self) -> str:
        return f"LibKetama(variant={self.variant!r})"
