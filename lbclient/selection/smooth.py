"""Smooth weighted round robin, as nginx's ``upstream`` does it without ``hash``.

Every backend has a current weight, 0 at first. Each pick adds every backend's weight to its
current weight, takes the backend with the largest current weight (ties: the first in sorted
order) and subtracts the total weight from the winner's. Weights ``{a: 5, b: 1, c: 1}`` give
``a a b a c a a``, not ``a a a a a b c``: heavy backends are spread out rather than bunched.

Over every ``total_weight`` consecutive picks each backend is taken exactly ``weight`` times and
the current weights are back at 0, so the sequence repeats with that period.

The key is ignored. The current weights are shared by every request on one selector: a pick
takes a lock for a few arithmetic steps (no I/O) so that concurrent picks are neither lost nor
counted twice. Fallbacks read the current weights without moving them.

With backends down, the picks go to the others alone, as nginx skips a peer that is ``down`` or
failed: a selector over the available backends (:meth:`SmoothSelector.among`), which starts
each weight's turns where the selector picking before it had got to, so that a change of health
does not send the next turns back to the first backends in sorted order.
"""

from __future__ import annotations

import itertools
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping

from lbclient.backend import Backend
from lbclient.selection.base import (
    Change,
    Key,
    Selector,
    _same_weight,
    _weights_of,
    buildmethod,
    prepare_backends,
    to_key,
)
from lbclient.selection.slow_start import SlowStart, slow_start_of

__all__ = ["SmoothRoundRobin", "SmoothSelector"]


#: One weight class: (weight, number of backends, their indexes in sorted order, the place
#: in those indexes whose turn comes first).
_Class = tuple[int, int, tuple[int, ...], int]

#: What a pick changes: (picks taken in the current period, the picks of each weight class in
#: it, the classes they count in).
_State = tuple[int, tuple[int, ...], tuple[_Class, ...]]


class SmoothSelector:
    """Smooth weighted round robin over a fixed, sorted set of backends.

    Backends of equal weight take turns among themselves in sorted order, so a pick costs
    O(distinct weights), not O(backends). Picks are safe across threads.

    ``turns`` maps a weight to the backend whose turn among the backends of that weight comes
    next (as another selector stood, see :meth:`turns`): their turns start there (at the first
    backend after it in sorted order if it is not one of them). None: from the first.
    ``weight``: every backend's weight, when known (0: read from them).
    """

    __slots__ = ("_backends", "_classes", "_count", "_lock", "_step", "_taken", "_total")

    def __init__(
        self,
        backends: tuple[Backend, ...],
        turns: Mapping[int, Backend] | None = None,
        weight: int = 0,
    ) -> None:
        self._backends = backends
        self._count = count = len(backends)
        members: dict[int, list[int]] = {}
        if weight:  # known to be every backend's: nothing to read
            weights: list[int] = []
            self._total = weight * count
        else:
            weights = _weights_of(backends)
            self._total = sum(weights)
            weight = _same_weight(weights)
        if weight and count:
            members[weight] = list(range(count))
        else:
            for index, each in enumerate(weights):
                members.setdefault(each, []).append(index)
        self._classes: tuple[_Class, ...] = tuple(
            (weight, len(indexes), tuple(indexes), 0) for weight, indexes in members.items()
        )
        if turns:
            self._classes = self._started(turns)
        self._lock = threading.Lock()
        self._step = 0  # picks taken in the current period (0 <= step < total weight)
        self._taken = [0] * len(self._classes)  # of those, the picks of each weight class

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The backends in sorted order."""
        return self._backends

    @property
    def total_weight(self) -> int:
        """The sum of the weights: the length of one period of the sequence."""
        return self._total

    def first(self, key: Key) -> Backend | None:
        """The next backend in the smooth sequence (``key`` is ignored); None with no backends.

        Each call is one pick from the shared state.
        """
        if type(key) is not bytes:
            to_key(key)  # a bad key is an error here as with every algorithm
        if not self._count:
            return None
        with self._lock:
            return self._backends[self._pick()]

    def iter(self, key: Key) -> Iterator[Backend]:
        """One pick (``key`` is ignored), then the other backends as fallbacks, without end.

        The fallbacks are every other backend once, in the order the next pick would rank them
        at the moment of this pick (see :meth:`iter_after`); then the same cycle again, this
        pick included. Only the first item takes a pick from the shared state, when it is
        pulled.
        """
        if type(key) is not bytes:
            to_key(key)
        if not self._count:
            return iter(())
        return self._walk()

    def iter_after(self, key: Key, first: Backend) -> Iterator[Backend]:
        """Fallbacks once ``first`` was taken as a first pick elsewhere, without end.

        Every backend other than ``first``, by the value the next pick would give it (current
        weight plus weight, largest first, ties in sorted order), read at this call; then
        ``first`` if it is one of the backends; then that cycle again. The shared state is not
        moved. When no other request picked since ``first``, the first fallback is the backend
        nginx would retry with.
        """
        if type(key) is not bytes:
            to_key(key)
        if not self._count:
            return iter(())
        order = self._ranking(self._state())
        others = [i for i in order if self._backends[i] != first]
        if len(others) < len(order):
            others.append(next(i for i in order if self._backends[i] == first))
        return _cycle(self._backends, others)

    def current_weights(self) -> tuple[int, ...]:
        """Each backend's current weight, in sorted order (they sum to 0)."""
        return self._currents(self._state())

    def turns(self) -> dict[int, Backend]:
        """For each weight, the backend whose turn among the backends of that weight is next."""
        with self._lock:
            taken = tuple(self._taken)
            classes = self._classes
        backends = self._backends
        return {
            weight: backends[indexes[(start + picks) % size]]
            for (weight, size, indexes, start), picks in zip(classes, taken, strict=True)
        }

    def among(
        self, available: tuple[Backend, ...], current: Selector | None = None
    ) -> SmoothSelector:
        """The smooth selection among ``available`` (some of the backends, sorted), each
        weight's turns going on from where ``current`` (the selector that picked until now)
        had got to; the current weights start at 0, as nginx's would over the peers that are
        up. With every backend available, this selector itself, its turns moved on to
        ``current``'s if that is another one."""
        turns = current.turns() if isinstance(current, SmoothSelector) else None
        if len(available) != self._count:
            classes = self._classes
            same = classes[0][0] if len(classes) == 1 else 0  # one weight here: so among them
            return SmoothSelector(available, turns, same)
        if turns is not None and current is not self:
            with self._lock:
                self._classes = self._started(turns)
                self._step = 0
                self._taken = [0] * len(self._classes)
        return self

    def _started(self, turns: Mapping[int, Backend]) -> tuple[_Class, ...]:
        """The weight classes, each starting its turns at the backend ``turns`` names."""
        backends = self._backends
        classes = []
        for weight, size, indexes, _ in self._classes:
            start = 0
            after = turns.get(weight)
            if after is not None:
                start = bisect_left(indexes, after, key=backends.__getitem__) % size
            classes.append((weight, size, indexes, start))
        return tuple(classes)

    def _state(self) -> _State:
        with self._lock:
            return self._step, tuple(self._taken), self._classes

    def _pick(self) -> int:
        """Take one pick and return the winner's index; the caller holds the lock."""
        total = self._total
        step = self._step + 1
        taken = self._taken
        best_class = 0
        best_value = -total  # below every current weight
        best_index = self._count
        for c, (weight, size, indexes, start) in enumerate(self._classes):
            picks = taken[c]
            # The current weight, after this pick's addition, of the class member whose turn
            # it is: the largest in its class, and the first in sorted order among equals.
            value = step * weight - total * (picks // size)
            if value >= best_value:
                index = indexes[(start + picks) % size]
                if value > best_value or index < best_index:
                    best_class, best_value, best_index = c, value, index
        taken[best_class] += 1
        if step == total:  # a whole period: every current weight is back at 0
            self._step = 0
            taken[:] = [0] * len(taken)
        else:
            self._step = step
        return best_index

    def _currents(self, state: _State) -> tuple[int, ...]:
        step, taken, classes = state
        total = self._total
        currents = [0] * self._count
        for (weight, size, indexes, start), picks in zip(classes, taken, strict=True):
            rounds, position = divmod(picks, size)
            for place, index in enumerate(indexes):
                wins = rounds + 1 if (place - start) % size < position else rounds
                currents[index] = step * weight - total * wins
        return tuple(currents)

    def _ranking(self, state: _State) -> list[int]:
        """Backend indexes by the value the next pick would give them, largest first."""
        currents = self._currents(state)
        backends = self._backends
        return sorted(range(self._count), key=lambda i: (-(currents[i] + backends[i].weight), i))

    def _walk(self) -> Iterator[Backend]:
        with self._lock:
            index = self._pick()
            state = self._step, tuple(self._taken), self._classes
        backends = self._backends
        yield backends[index]
        order = [i for i in self._ranking(state) if i != index]
        order.append(index)
        yield from _cycle(backends, order)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<SmoothSelector backends={self._count} total_weight={self._total}>"


def _cycle(backends: tuple[Backend, ...], order: list[int]) -> Iterator[Backend]:
    return itertools.cycle([backends[i] for i in order])


class SmoothRoundRobin:
    """nginx's smooth weighted round robin, the default of an ``upstream`` without ``hash``.

    Each pick adds every backend's weight to its current weight, takes the largest (ties: the
    first in sorted order) and subtracts the total weight from it, so over ``total_weight``
    consecutive picks every backend is chosen exactly ``weight`` times, evenly spread. With the
    backends written in sorted order in nginx's ``upstream``, the sequence is nginx's, pick for
    pick (one worker, no failures).

    The key is ignored. The current weights are shared by all requests, safe across threads,
    and start at 0 at every build: ``LoadBalancer.update()`` with a changed set starts the
    sequence over, as an nginx reload does. Fallbacks take no pick: they are the other
    backends by the value the next pick would give them (:meth:`SmoothSelector.iter_after`).
    Failures do not lower a backend's weight here; health is the balancer's. With backends
    unavailable (ejected, disabled, failing their checks), the picks are the smooth sequence
    over the available ones, as nginx's over the peers that are up.

    * ``slow_start``: a :class:`~lbclient.selection.slow_start.SlowStart` (or a window in
      seconds) for backends that join or return from an ejection (None: none).
    """

    #: Whether the key decides the picks (no: it may select within a subset).
    keyed = False

    def __init__(self, *, slow_start: SlowStart | float | None = None) -> None:
        self.slow_start = slow_start_of(slow_start)

    @buildmethod
    def build(self, backends: Iterable[Backend | str]) -> SmoothSelector:
        """Build a selector over ``backends`` (sorted and de-duplicated first)."""
        return SmoothSelector(prepare_backends(backends))

    def rebuild(
        self,
        previous: Selector | None,
        backends: tuple[Backend, ...],
        change: Change | None = None,
    ) -> SmoothSelector:
        """The selector over ``backends`` (sorted and de-duplicated), as ``build`` makes it:
        the current weights start at 0, as an nginx reload starts them."""
        return SmoothSelector(backends)

    def __repr__(self) -> str:
        return "SmoothRoundRobin()"
