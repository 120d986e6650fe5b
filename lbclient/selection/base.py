"""What every selection algorithm shares: the protocols, key coercion, backend preparation and
the unique-candidate iterator."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from lbclient.backend import Backend

__all__ = [
    "Algorithm",
    "AlgorithmLike",
    "Key",
    "Selector",
    "UniqueIterator",
    "buildmethod",
    "check_max_iterations",
    "fallbacks_after",
    "prepare_backends",
    "resolve_algorithm",
    "to_key",
]

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

    It may also define ``iter_after(key, first)``: see :func:`fallbacks_after`.
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


class Algorithm(Protocol):
    """A selection algorithm: turns a set of backends into a :class:`Selector`."""

    def build(self, backends: Iterable[Backend | str]) -> Selector:
        """Build a selector over ``backends`` (sorted and de-duplicated first)."""
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
    if isinstance(backends, (str, bytes)):
        raise TypeError(
            f"backends must be a list of addresses or Backend objects, not a single "
            f"{type(backends).__name__} ({backends!r})"
        )
    try:
        items = list(backends)
    except TypeError:
        raise TypeError(
            f"backends must be an iterable of Backend or address strings, got {backends!r}"
        ) from None
    by_address: dict[str, Backend] = {}
    for item in items:
        backend = Backend.coerce(item)
        seen = by_address.get(backend.address)
        if seen is None:
            by_address[backend.address] = backend
        elif seen.weight != backend.weight:
            raise ValueError(
                f"backend {backend.address!r} is listed twice, with weights "
                f"{seen.weight} and {backend.weight}"
            )
    return tuple(sorted(by_address.values()))


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
