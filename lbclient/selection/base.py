"""What every selection algorithm shares: the protocols, key coercion, backend preparation, the
unique-candidate iterator, and how a selection that follows weights is restricted to the
backends available."""

from __future__ import annotations

import types
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from itertools import chain, compress, repeat
from operator import and_, attrgetter, eq, is_not, ne, not_, or_, truth
from typing import Any, Final, Generic, Protocol, TypeVar, cast, runtime_checkable

from lbclient.backend import Backend

__all__ = [
    "Algorithm",
    "AlgorithmLike",
    "Change",
    "Key",
    "Rebuildable",
    "Selector",
    "UniqueIterator",
    "among",
    "buildmethod",
    "changes",
    "check_max_iterations",
    "fallbacks_after",
    "prepare_backends",
    "prepare_update",
    "resolve_algorithm",
    "to_key",
    "without",
]

#: Up to this many backends leaving and joining, a new set is made from the previous one by
#: deleting and inserting them (and selectors splice their per-backend data); beyond it, sorted
#: afresh.
_SPLICE_LIMIT: Final = 64

_T = TypeVar("_T")
_weight = attrgetter("weight")
_address = attrgetter("address")
_metadata = attrgetter("metadata")
#: Stands for "no known backend" where one is looked up: no address string stands for it.
_UNKNOWN: Final = Backend("0.0.0.0:1", 2)
#: Up to this many items that are not known objects are looked at one by one.
_ONE_BY_ONE: Final = 32

#: A selection key: bytes as they are, or text encoded as UTF-8.
Key = bytes | str


def to_key(key: object) -> bytes:
    """Return the bytes of a selection key, or raise TypeError naming the bad value."""
    if type(key) is bytes:
        return key
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise TypeError(f"selection key must be bytes or str, got {key!r} ({type(key).__name__})")


@runtime_checkable
class Selector(Protocol):
    """A built selection over a fixed, sorted set of backends.

    It may also define ``iter_after(key, first)``: see :func:`fallbacks_after`; and
    ``among(available, current)``: see :func:`among`.
    """

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The backends in sorted order."""
        ...

    def iter(self, key: Key) -> Iterator[Backend]:
        """Backends for ``key`` in preference order, without end (empty only with no backends)."""
        ...

    def first(self, key: Key) -> Backend | None:
        """The first item of ``iter(key)``, computed without building the iterator."""
        ...


def fallbacks_after(selector: Selector, key: bytes, first: Backend) -> Iterator[Backend]:
    """The selection order for ``key`` once ``first`` was taken as its first pick elsewhere.

    The selector's own ``iter_after(key, first)`` if it has one (a selector whose first pick
    draws from shared state should, so as to draw nothing more); else ``iter(key)``, whose first
    pick is ``first`` again when the selector is deterministic. ``first`` may still come up in
    either: skip it with ``UniqueIterator(..., exclude=(first,))``.
    """
    own = getattr(selector, "iter_after", None)
    if own is None:
        return selector.iter(key)
    order: Iterator[Backend] = own(key, first)
    return order


def among(
    selector: Selector, available: tuple[Backend, ...], current: Selector | None = None
) -> Selector | None:
    """The same selection among ``available`` (some of ``selector``'s backends, sorted), for a
    selection whose picks follow the weights and ignore the key (round robin, random, smooth):
    with some backends unavailable, the others share every pick by their weights.

    The selector's own ``among(available, current)`` if it has one: it shares ``selector``'s
    shared state (a round robin counter, a random source), carries over what it can of
    ``current``'s (the selector that picked until now: ``selector``, one it made, or None for a
    fresh start) and is ``selector`` itself when ``available`` is all of its backends. None,
    from a selector without one or with one that returns None, when the selection keeps its
    own fallback order instead (a key's owner, then the ring's next point or the table's next
    entry: their contract).
    """
    own = getattr(selector, "among", None)
    if own is None:
        return None
    restricted: Selector | None = own(available, current)
    return restricted


def without(backends: tuple[Backend, ...], out: Collection[Backend]) -> tuple[Backend, ...]:
    """The sorted ``backends`` less those equal to one in ``out`` (a set), in order.

    A few are found by binary search and the rest copied in slices, so that taking one
    backend out of a large set costs a copy, not a Python loop over the set; many, by
    identity first (the objects of ``backends`` themselves, as a view's are), in C.
    """
    if not out:
        return backends
    count = len(backends)
    if len(out) * 16 > count:
        ids = set(map(id, out))
        kept = tuple(compress(backends, map(not_, map(ids.__contains__, map(id, backends)))))
        if len(kept) == count - len(out):
            return kept
        return tuple(b for b in backends if b not in out)  # equal objects, not the same ones
    places: list[int] = []
    for backend in out:
        i = bisect_left(backends, backend)
        if i < count and backends[i] == backend:
            places.append(i)
        elif backend in backends:  # an order that disagrees with equality: look it up
            places.append(backends.index(backend))
    places.sort()
    parts: list[tuple[Backend, ...]] = []
    start = 0
    for i in places:
        parts.append(backends[start:i])
        start = i + 1
    parts.append(backends[start:])
    return tuple(chain.from_iterable(parts))


class Algorithm(Protocol):
    """A selection algorithm: turns a set of backends into a :class:`Selector`.

    It may also be :class:`Rebuildable`: then a balancer whose set changes asks it for the new
    selector from the previous one.
    """

    def build(self, backends: Iterable[Backend | str]) -> Selector:
        """Build a selector over ``backends`` (sorted and de-duplicated first)."""
        ...


class Change:
    """How one sorted backend set became the next: the backends that left it and those that
    joined, each with its index in its own set, in sorted order.

    A backend stays only as the same object. An equal backend that is another object (other
    metadata) leaves and joins, so that a selector always answers with the new set's objects.
    """

    __slots__ = ("added", "added_at", "removed", "removed_at")

    def __init__(
        self,
        removed: Sequence[Backend],
        removed_at: Sequence[int],
        added: Sequence[Backend],
        added_at: Sequence[int],
    ) -> None:
        #: The backends that left, in sorted order, and their indexes in the previous set.
        self.removed = tuple(removed)
        self.removed_at = tuple(removed_at)
        #: The backends that joined, in sorted order, and their indexes in the new set.
        self.added = tuple(added)
        self.added_at = tuple(added_at)

    def __len__(self) -> int:
        """How many backends left or joined."""
        return len(self.removed) + len(self.added)

    def __repr__(self) -> str:
        return f"<Change removed={len(self.removed)} added={len(self.added)}>"


@runtime_checkable
class Rebuildable(Protocol):
    """An algorithm that makes the selector of a changed set from the previous selector, at the
    cost of what changed rather than of the whole set."""

    def rebuild(
        self,
        previous: Selector | None,
        backends: tuple[Backend, ...],
        change: Change | None = None,
    ) -> Selector:
        """The selector over ``backends`` (sorted and de-duplicated, as from
        :func:`prepare_backends`), routing every key exactly as ``build(backends)`` would.

        ``previous`` is a selector this algorithm built (anything else, or None, makes a full
        build, without preparing ``backends`` again); ``change`` says how its set became
        ``backends`` (None: worked out here).
        """
        ...


#: What an ``algorithm=`` argument accepts: an instance, or a class whose defaults will do.
AlgorithmLike = Algorithm | type

_A = TypeVar("_A")
_S = TypeVar("_S")


class buildmethod(Generic[_A, _S]):
    """A method that also works on the class, where it binds to a default-constructed instance.

    So ``RoundRobin.build(backends)`` and ``RoundRobin().build(backends)`` both work.
    """

    def __init__(self, func: Callable[[_A, Iterable[Backend | str]], _S]) -> None:
        self._func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj: _A | None, owner: type[_A]) -> Callable[[Iterable[Backend | str]], _S]:
        bound: Callable[[Iterable[Backend | str]], _S] = types.MethodType(
            self._func, obj if obj is not None else owner()
        )
        return bound


def resolve_algorithm(algorithm: object) -> Algorithm:
    """Return an algorithm instance for ``algorithm`` (an instance, or a class to instantiate)."""
    candidate: Any = algorithm
    if isinstance(algorithm, type):
        try:
            candidate = algorithm()
        except TypeError as exc:
            raise TypeError(
                f"algorithm class {algorithm.__name__} cannot be made without arguments: {exc}"
            ) from None
    if not callable(getattr(candidate, "build", None)):
        raise TypeError(
            f"algorithm must be a selection algorithm such as RoundRobin or Consistent(), "
            f"got {algorithm!r}"
        )
    result: Algorithm = candidate
    return result


def prepare_backends(backends: Iterable[Backend | str]) -> tuple[Backend, ...]:
    """Coerce, de-duplicate and sort ``backends``.

    An address listed twice with the same weight is kept once; listed with two different
    weights it is ambiguous and raises ValueError naming the address.
    """
    items = _listed(backends)
    if all(map(isinstance, items, repeat(Backend))):
        known = cast("list[Backend]", items)
        if len(dict(zip(map(_address, known), known, strict=True))) == len(known):
            return tuple(sorted(known))  # no address twice
    by_address: dict[str, Backend] = {}
    for item in items:
        backend = Backend.coerce(item)
        seen = by_address.get(backend.address)
        if seen is None:
            by_address[backend.address] = backend
        elif seen.weight != backend.weight:
            raise _listed_twice(seen, backend)
    return tuple(sorted(by_address.values()))


def _listed_twice(seen: Backend, backend: Backend) -> ValueError:
    return ValueError(
        f"backend {backend.address!r} is listed twice, with weights "
        f"{seen.weight} and {backend.weight}"
    )


def prepare_update(
    backends: Iterable[Backend | str],
    previous: tuple[Backend, ...],
    known: Mapping[str, Backend],
) -> tuple[tuple[Backend, ...], Change]:
    """:func:`prepare_backends` for a set that replaces ``previous`` (sorted, as prepared),
    whose backends ``known`` maps by address; and the :class:`Change` from one to the other.

    A backend equal to one of ``previous`` with the same metadata (an address string for a
    backend of weight 1 without metadata) is taken as that very object, so the backends that
    stay are the same objects. With no change, ``previous`` itself is returned. With few
    changes the new set is ``previous`` with the leaving backends deleted and the joining ones
    inserted, without sorting the whole set again.
    """
    items = _listed(backends)
    lookup = known.get
    chosen, keys, odd = _known_objects(items, known)
    if not odd and len(keys) == len(known) == len(previous) == len(set(keys)):
        return previous, Change((), (), (), ())  # the same objects, none twice
    # The known backends no item stands for: those left once every item's address is taken.
    # dict.copy clones in C even a dict with deletions (an updated set's), where dict(d)
    # would insert every entry again.
    remaining = known.copy() if isinstance(known, dict) else dict(known)
    # Counted from the sizes: counting the Nones in a list of backends would call
    # Backend.__eq__ once per backend.
    deque(map(remaining.pop, keys, repeat(None)), maxlen=0)
    missed = len(keys) - (len(known) - len(remaining))
    new = [keys[i] for i in odd if keys[i] not in known]
    if missed == len(new) == len(set(new)):  # no address listed twice
        unique = chosen
        joined = [b for b in map(chosen.__getitem__, odd) if lookup(b.address) is not b]
        left = list(remaining.values())
    else:  # an address listed twice: the first stays, unless the weights disagree
        by_address: dict[str, Backend] = {}
        for backend in chosen:
            seen = by_address.setdefault(backend.address, backend)
            if seen.weight != backend.weight:
                raise _listed_twice(seen, backend)
        unique = list(by_address.values())
        joined = [b for b in unique if lookup(b.address) is not b]
        left = [b for b in map(lookup, known.keys() - by_address.keys()) if b is not None]
    left += [b for b in map(lookup, (b.address for b in joined)) if b is not None]
    if not joined and not left and len(unique) == len(previous):
        return previous, Change((), (), (), ())
    if len(joined) + len(left) > max(_SPLICE_LIMIT, len(previous) // 64):
        prepared = tuple(sorted(unique))
        return prepared, changes(previous, prepared)
    left.sort()
    removed_at = [_index(previous, b) for b in left]
    order = list(previous)
    for i in reversed(removed_at):
        del order[i]
    joined.sort()
    added_at: list[int] = []
    for backend in joined:
        i = bisect_left(order, backend)
        order.insert(i, backend)
        added_at.append(i)
    return tuple(order), Change(left, removed_at, joined, added_at)


def _listed(backends: Iterable[Backend | str]) -> list[Backend | str]:
    if isinstance(backends, (str, bytes)):
        raise TypeError(
            f"backends must be a list of addresses or Backend objects, not a single "
            f"{type(backends).__name__} ({backends!r})"
        )
    try:
        return list(backends)
    except TypeError:
        raise TypeError(
            f"backends must be an iterable of Backend or address strings, got {backends!r}"
        ) from None


def _known_objects(
    items: list[Backend | str], known: Mapping[str, Backend]
) -> tuple[list[Backend], list[str], list[int]]:
    """The backend of each item, the known object wherever one stands for it; their
    addresses; and the indexes of the items no known object stood for at first sight."""
    count = len(items)
    found: list[Backend]
    keys: list[str]
    if all(map(isinstance, items, repeat(Backend))):
        backends = cast("list[Backend]", items)
        keys = list(map(_address, backends))
        found = list(map(known.get, keys, repeat(_UNKNOWN)))
        odd = list(compress(range(count), map(is_not, found, backends)))
        if len(odd) > _ONE_BY_ONE:
            # Equal objects, made afresh (say, by a discovery): the known ones stand for those
            # with the same metadata, found in a few passes rather than one by one.
            looked_up = map(is_not, found, repeat(_UNKNOWN))
            weighs = map(eq, map(_weight, found), map(_weight, backends))
            alike = map(eq, map(_metadata, found), map(_metadata, backends))
            same = map(and_, map(and_, looked_up, weighs), alike)
            odd = list(compress(range(count), map(not_, same)))
    else:
        # A string stands for the known backend of that address with weight 1, no metadata.
        keys = cast("list[str]", list(items))
        try:
            found = list(map(known.get, keys, repeat(_UNKNOWN)))
        except TypeError:  # unhashable items, refused below
            found = [_UNKNOWN] * count
        heavy = map(ne, map(_weight, found), repeat(1))
        odd = list(compress(range(count), map(or_, heavy, map(truth, map(_metadata, found)))))
    lookup = known.get
    for i in odd:
        backend = found[i] = _reuse(Backend.coerce(items[i]), lookup)
        keys[i] = backend.address
    return found, keys, odd


def _reuse(backend: Backend, lookup: Callable[[str], Backend | None]) -> Backend:
    """The known backend at ``backend``'s address if it is equal and has the same metadata."""
    known = lookup(backend.address)
    if (
        known is not None
        and known is not backend
        and known.weight == backend.weight
        and (known.metadata is backend.metadata or known.metadata == backend.metadata)
    ):
        return known
    return backend


def _index(backends: Sequence[Backend], backend: Backend) -> int:
    """The index of the object ``backend`` in the sorted ``backends``."""
    i = bisect_left(backends, backend)
    if i < len(backends) and backends[i] is backend:
        return i
    return next(j for j, b in enumerate(backends) if b is backend)


def changes(old: Sequence[Backend], new: Sequence[Backend]) -> Change:
    """The :class:`Change` from the sorted set ``old`` to the sorted set ``new``, backends
    compared as objects."""
    before = dict(zip(map(id, old), range(len(old)), strict=True))
    after = dict(zip(map(id, new), range(len(new)), strict=True))
    removed_at = sorted(map(before.__getitem__, before.keys() - after.keys()))
    added_at = sorted(map(after.__getitem__, after.keys() - before.keys()))
    return Change([old[i] for i in removed_at], removed_at, [new[i] for i in added_at], added_at)


def _splice(values: Sequence[_T], change: Change, make: Callable[[Backend], _T]) -> list[_T]:
    """``values`` (one per backend of the previous set, in its order) for the new set: the
    leaving backends' values deleted, ``make(backend)`` inserted for each joining one."""
    out = list(values)
    for i in reversed(change.removed_at):
        del out[i]
    for i, backend in zip(change.added_at, change.added, strict=True):
        out.insert(i, make(backend))
    return out


def _weights_of(backends: Iterable[Backend]) -> list[int]:
    """The weights of ``backends``, in order."""
    return list(map(_weight, backends))


def _same_weight(weights: Sequence[int]) -> int:
    """The weight every backend has, or 0 if they differ (or there are none)."""
    if not weights:
        return 0
    first = weights[0]
    return first if weights.count(first) == len(weights) else 0


def _small(change: Change, count: int) -> bool:
    """Whether ``change`` is small enough, in a set of ``count`` backends, for a selector to
    splice its per-backend data rather than compute it all again."""
    return len(change) <= max(_SPLICE_LIMIT, count // 64)


class UniqueIterator(Iterator[Backend]):
    """Yields the distinct backends of ``source``, pulling at most ``max_iterations`` items.

    Every item pulled counts, duplicates included, and the limit is checked after pulling,
    as Pingora's ``UniqueIterator`` does: ``max_iterations=0`` yields nothing. Backends in
    ``exclude`` are never yielded: they count as seen from the start.
    """

    __slots__ = ("_max", "_seen", "_source", "_steps")

    def __init__(
        self, source: Iterable[Backend], max_iterations: int, exclude: Iterable[Backend] = ()
    ) -> None:
        self._source = iter(source)
        self._max = max_iterations
        self._steps = 0
        self._seen: set[Backend] = set(exclude)

    @property
    def seen(self) -> frozenset[Backend]:
        """The backends yielded so far, and those excluded."""
        return frozenset(self._seen)

    def __iter__(self) -> UniqueIterator:
        return self

    def __next__(self) -> Backend:
        seen = self._seen
        for item in self._source:
            if self._steps >= self._max:
                break
            self._steps += 1
            if item not in seen:
                seen.add(item)
                return item
        raise StopIteration


def check_max_iterations(value: object) -> int:
    """Return ``value`` if it is a valid ``max_iterations``, else raise naming the value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_iterations must be an int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"max_iterations must be >= 0, got {value}")
    return value
