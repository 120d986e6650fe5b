"""Load-aware selection: Envoy's least request and Finagle's peak EWMA, by the power of two
choices over each backend's live load (:mod:`lbclient._load`, fed by the attempt loop).

Both ignore the key. The first pick samples ``choices`` distinct backends at random and takes
the one with the lower load (least request) or cost (peak EWMA); the fallback order for retries
is every other backend, best first, as the load stands when the walk is made. A backend's
failures add a decaying penalty (held at least as long as a ``Retry-After`` asked), so a backend
that fails fast does not look fast.

Selectors read the load without locking; they see it once the balancer attaches it (before a
selector is ever used). Built without a balancer, every backend looks idle.
"""

from __future__ import annotations

import bisect
import itertools
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Final

from lbclient._load import Load
from lbclient.backend import Backend
from lbclient.selection.base import (
    Change,
    Key,
    Selector,
    _same_weight,
    _weights_of,
    buildmethod,
    prepare_backends,
)
from lbclient.selection.slow_start import SlowStart, slow_start_of

__all__ = ["LeastRequest", "LoadAwareSelector", "PeakEWMA"]

#: The cost of each request in flight to a backend never measured: far above any latency, so
#: an unmeasured backend is tried while idle and does not take everything once busy.
UNMEASURED: Final = 1e6

_IDLE: Final = Load()


def _choices(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 2:
        raise ValueError(f"{name} must be >= 2, got {value}")
    return value


def _positive(name: str, value: object, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not (value >= 0 if zero else value > 0) or value != value or value == float("inf"):
        raise ValueError(
            f"{name} must be a finite number {'>= 0' if zero else '> 0'}, got {value!r}"
        )
    return float(value)


def _draws(source: Callable[[], float] | None) -> Callable[[], float]:
    """The random source given (a callable returning a float in [0, 1)), or ``random.random``."""
    if source is None:
        return random.random
    if not callable(source):
        raise TypeError(f"random must be callable or None, got {source!r}")
    return source


class LoadAwareSelector:
    """A built load-aware selection over a fixed, sorted set of backends."""

    __slots__ = (
        "_backends",
        "_clock",
        "_cumulative",
        "_draw",
        "_loads",
        "_score",
        "_uniform",
        "_weights",
    )

    def __init__(
        self,
        backends: tuple[Backend, ...],
        score: Callable[[Backend, Load, float], float],
        draw: Callable[[], float] | None = None,
    ) -> None:
        self._backends = backends
        self._score = score
        self._draw: Callable[[], float] = random.random if draw is None else draw
        self._weights = _weights_of(backends)
        self._uniform = len(backends) <= 1 or _same_weight(self._weights) > 0
        self._cumulative = list(itertools.accumulate(self._weights))
        self._loads: Mapping[Backend, Load] = {}
        self._clock: Callable[[], float] = time.monotonic

    def attach(
        self, loads: Mapping[Backend, Load], clock: Callable[[], float], total: object = None
    ) -> None:
        """Read load from ``loads`` (the balancer's live cells) at ``clock`` time."""
        self._loads = loads
        self._clock = clock

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The backends in sorted order."""
        return self._backends

    def _sample(self, count: int) -> Sequence[int]:
        """``count`` distinct backend positions, drawn by weight."""
        n = len(self._backends)
        if count >= n:
            return range(n)
        draw = self._draw
        if self._uniform:
            if count == 2:  # the common case
                first = min(int(draw() * n), n - 1)
                second = min(int(draw() * (n - 1)), n - 2)
                return (first, second + (second >= first))
            positions = list(range(n))  # the first ``count`` of a partial shuffle
            for i in range(count):
                j = min(i + int(draw() * (n - i)), n - 1)
                positions[i], positions[j] = positions[j], positions[i]
            return positions[:count]
        picked: list[int] = []
        total = self._cumulative[-1]
        while len(picked) < count:
            position = bisect.bisect_right(self._cumulative, draw() * total)
            position = min(position, n - 1)
            if position not in picked:
                picked.append(position)
        return picked

    def score(self, backend: Backend, now: float) -> float:
        """``backend``'s score at clock value ``now``: lower is better."""
        return self._score(backend, self._loads.get(backend, _IDLE), now)

    def first(self, key: Key = b"", choices: int = 2) -> Backend | None:
        """The best of ``choices`` backends sampled by weight; the key is ignored."""
        backends = self._backends
        if len(backends) <= 1:
            return backends[0] if backends else None
        now = self._clock()
        best: Backend | None = None
        best_score = 0.0
        for position in self._sample(choices):
            backend = backends[position]
            score = self.score(backend, now)
            if best is None or score < best_score:
                best, best_score = backend, score
        return best

    def ranked(self, exclude: Backend | None = None) -> list[Backend]:
        """Every backend but ``exclude``, best first, as the load stands now."""
        now = self._clock()
        rest = [b for b in self._backends if b != exclude]
        return sorted(rest, key=lambda b: self.score(b, now))

    def iter(self, key: Key = b"") -> Iterator[Backend]:
        """The first pick, then every other backend, best first."""
        first = self.first(key)
        if first is None:
            return iter(())
        return itertools.chain((first,), _later(self.ranked, first))

    def iter_after(self, key: Key, first: Backend) -> Iterator[Backend]:
        """The fallback order after a first pick taken elsewhere: the others, best first."""
        return iter(self.ranked(first))

    def __len__(self) -> int:
        return len(self._backends)


class LeastRequest:
    """Envoy's least request: of ``choices`` backends sampled at random (by weight), the one
    with the fewest requests in flight, a failure penalty counting as requests in flight.
    With unequal weights the comparison is ``weight / (in_flight + 1) ** bias``.

    * ``choices``: how many backends are compared per pick (2).
    * ``bias``: how strongly requests in flight count against weight, with unequal weights
      (1.0).
    * ``decay``: seconds, the time constant of the failure penalty (10.0).
    * ``slow_start``: a :class:`~lbclient.selection.slow_start.SlowStart` (or a window in
      seconds) for backends that join or return from an ejection (None: none).
    * ``random``: returns a float in [0, 1); the draws of the backends compared
      (``random.random``); inject a seeded one (``random.Random(7).random``) to make the picks
      repeatable.
    """

    #: Whether the key decides the picks (no: it may select within a subset).
    keyed = False

    def __init__(
        self,
        choices: int = 2,
        *,
        bias: float = 1.0,
        decay: float = 10.0,
        slow_start: SlowStart | float | None = None,
        random: Callable[[], float] | None = None,
    ) -> None:
        self.choices = _choices("choices", choices)
        self.bias = _positive("bias", bias, zero=True)
        self.decay = _positive("decay", decay)
        self.slow_start = slow_start_of(slow_start)
        self.random = _draws(random)

    def _score(self, uniform: bool) -> Callable[[Backend, Load, float], float]:
        decay, bias = self.decay, self.bias

        def requests(backend: Backend, load: Load, now: float) -> float:
            return load.in_flight + load.penalty_at(now, decay)

        def weighted(backend: Backend, load: Load, now: float) -> float:
            busy = load.in_flight + load.penalty_at(now, decay) + 1.0
            return -(backend.weight / float(busy**bias))

        return requests if uniform else weighted

    @buildmethod
    def build(self, backends: Iterable[Backend | str]) -> LoadAwareSelector:
        """Build a selector over ``backends`` (sorted and de-duplicated first)."""
        return self.rebuild(None, prepare_backends(backends))

    def rebuild(
        self,
        previous: Selector | None,
        backends: tuple[Backend, ...],
        change: Change | None = None,
    ) -> LoadAwareSelector:
        """The selector over ``backends`` (sorted and de-duplicated), as ``build`` makes it;
        the load it reads is the balancer's, carried over for the backends that stay."""
        uniform = len(backends) <= 1 or _same_weight(_weights_of(backends)) > 0
        return _Chooser(backends, self._score(uniform), self.choices, self.random)

    def __repr__(self) -> str:
        return f"LeastRequest(choices={self.choices}, bias={self.bias:g}, decay={self.decay:g})"


class PeakEWMA:
    """Finagle's and Linkerd's peak EWMA: of ``choices`` backends sampled at random (by
    weight), the one of lower cost = (latency estimate + penalty) x (requests in flight + 1),
    divided by the backend's weight. The estimate jumps to a new peak at once and decays
    towards recent latencies with time constant ``decay``; a backend not yet measured is tried
    when idle; each failure adds ``penalty`` seconds to its latency, decaying likewise.

    * ``decay``: seconds, the time constant of the estimate and of the penalty (10.0).
    * ``choices``: how many backends are compared per pick (2).
    * ``penalty``: seconds of latency one failure adds (1.0).
    * ``slow_start``: as for :class:`LeastRequest` (None).
    * ``random``: as for :class:`LeastRequest` (``random.random``).
    """

    #: Whether the key decides the picks (no: it may select within a subset).
    keyed = False

    def __init__(
        self,
        decay: float = 10.0,
        *,
        choices: int = 2,
        penalty: float = 1.0,
        slow_start: SlowStart | float | None = None,
        random: Callable[[], float] | None = None,
    ) -> None:
        self.decay = _positive("decay", decay)
        self.choices = _choices("choices", choices)
        self.penalty = _positive("penalty", penalty, zero=True)
        self.slow_start = slow_start_of(slow_start)
        self.random = _draws(random)

    def _cost(self, backend: Backend, load: Load, now: float) -> float:
        in_flight = load.in_flight
        extra = load.penalty_at(now, self.decay) * self.penalty
        estimate = load.estimate_at(now, self.decay)
        if estimate is None:
            cost = extra if in_flight == 0 else UNMEASURED * in_flight + extra
        else:
            cost = (estimate + extra) * (in_flight + 1)
        return cost / backend.weight

    @buildmethod
    def build(self, backends: Iterable[Backend | str]) -> LoadAwareSelector:
        """Build a selector over ``backends`` (sorted and de-duplicated first)."""
        return _Chooser(prepare_backends(backends), self._cost, self.choices, self.random)

    def rebuild(
        self,
        previous: Selector | None,
        backends: tuple[Backend, ...],
        change: Change | None = None,
    ) -> LoadAwareSelector:
        """The selector over ``backends`` (sorted and de-duplicated), as ``build`` makes it;
        the load it reads is the balancer's, carried over for the backends that stay."""
        return _Chooser(backends, self._cost, self.choices, self.random)

    def __repr__(self) -> str:
        return f"PeakEWMA(decay={self.decay:g}, choices={self.choices}, penalty={self.penalty:g})"


def _later(rank: Callable[[Backend], list[Backend]], first: Backend) -> Iterator[Backend]:
    """The ranking after ``first``, computed only if a fallback is asked for."""
    yield from rank(first)


class _Chooser(LoadAwareSelector):
    """A load-aware selector with its algorithm's number of choices."""

    __slots__ = ("_count",)

    def __init__(
        self,
        backends: tuple[Backend, ...],
        score: Callable[[Backend, Load, float], float],
        choices: int,
        draw: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(backends, score, draw)
        self._count = choices

    def first(self, key: Key = b"", choices: int | None = None) -> Backend | None:
        return super().first(key, self._count if choices is None else choices)
