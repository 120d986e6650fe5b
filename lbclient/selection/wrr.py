"""Weighted round robin over the load the backends report: gRPC's ``weighted_round_robin``
(gRFC A58, with A114's metric names; Envoy's ``client_side_weighted_round_robin`` computes the
same weights).

Each backend's weight is ``qps / (utilization + eps / qps * error_utilization_penalty)`` from
the latest ORCA report it sent (:attr:`lbclient._load.Load.report`): ``qps`` is
``rps_fractional``, ``eps`` the errors per second, and ``utilization`` the largest of the
configured ``metric_names`` that is above 0 (A114), else ``application_utilization`` if above
0, else ``cpu_utilization``. A report whose qps or utilization is not above 0 gives no weight
and is ignored, as gRPC ignores it: the weight it had stays (until it expires).

A weight counts once the backend has reported for ``blackout_period`` seconds without a gap
(since ``non_empty_since``, the first report with a weight after none, or after the weight
expired); it lapses when the latest report with a weight is ``weight_expiration_period``
seconds old, and the blackout starts over with the next report. Backends without a usable
weight get the mean of the usable ones; with fewer than two usable weights every backend
weighs the same (plain round robin). A backend's failures (connection errors, 5xx, 429, as
the attempt loop records them) divide its weight by ``1 + penalty x the failure penalty``
(one fresh failure halves it; the penalty decays with time constant ``decay``), so a backend
that fails fast does not look fast.

Weights are recomputed at most every ``weight_update_period`` seconds, by the first pick after
the period has passed (no thread, no timer): it takes a small lock without waiting (a pick
that finds it taken goes on with the current schedule), computes, and swaps the new schedule
in with one assignment. Picks never wait: they follow gRPC's static stride scheduler, an array
of weights scaled to 16 bits and a shared sequence counter (``itertools.count``, which
advances in one C call, so concurrent picks never share a value) that starts at a random value
so that many clients do not move in step. Backend ``i`` is taken at sequence value ``s`` (with
``n`` backends) when ``(w_i * (s // n) + i * 32767) % 65535 >= 65535 - w_i``: over 65,535
rounds each backend is taken exactly ``w_i`` times, evenly spread. As gRPC does, weights are
capped at 10 times the mean (a pick looks at 10 backends on average at most) and raised to 1%
of it.

The key is ignored. The fallback order for retries is every other backend by weight, heaviest
first (with equal weights: the backends after the first pick in sorted order, round the set).
With backends unavailable (ejected, disabled, failing their checks), the picks go to the
available ones by their weights (:meth:`WeightedRoundRobinSelector.among`), with the same
counter and the same weight records.

What may not: I/O, threads, a clock other than the one the balancer attaches, a random source
other than the one given. Part of the core.
"""

from __future__ import annotations

import itertools
import math
import random as _random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final, NamedTuple

from lbclient._load import Load
from lbclient.backend import Backend
from lbclient.reports import FIELDS, LoadReport
from lbclient.selection.base import (
    Change,
    Key,
    Selector,
    buildmethod,
    prepare_backends,
    to_key,
)
from lbclient.selection.slow_start import SlowStart, slow_start_of

__all__ = ["WeightedRoundRobin", "WeightedRoundRobinSelector", "report_weight"]

#: The largest scaled weight of the stride scheduler (16 bits, as gRPC's).
MAX_WEIGHT: Final = 0xFFFF
#: Each backend's offset in the stride, times its index: half the largest weight.
_OFFSET: Final = MAX_WEIGHT // 2
#: Weights are capped at this many times the mean of the known ones...
MAX_RATIO: Final = 10.0
#: ... and raised to this share of it (gRPC's ``kMaxRatio``, ``kMinRatio``).
MIN_RATIO: Final = 0.01
#: The shortest ``weight_update_period`` (seconds); a shorter one is raised to it, as in A58.
MIN_UPDATE_PERIOD: Final = 0.1

_NAMED_PREFIX: Final = "named_metrics."
_INF: Final = math.inf


def _seconds(name: str, value: object, zero: bool = True) -> float:
    """``value`` as a finite number of seconds (>= 0, or > 0), or raise naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number) or not (number >= 0.0 if zero else number > 0.0):
        raise ValueError(
            f"{name} must be a finite number {'>= 0' if zero else '> 0'}, got {value!r}"
        )
    return number


def _metric_names(value: object) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"metric_names must be a list of ORCA names such as "
            f"('named_metrics.kv_cache_usage_perc',), got {value!r}"
        )
    names = tuple(value)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"metric_names must hold strings, got {name!r} ({type(name).__name__})")
        named = name.startswith(_NAMED_PREFIX) and len(name) > len(_NAMED_PREFIX)
        if not named and name not in FIELDS:
            raise ValueError(
                f"metric_names: {name!r} is not an ORCA field (one of {', '.join(FIELDS)}) "
                f"or a named metric ('named_metrics.<name>')"
            )
    return names


def _positive_or_none(value: float | None) -> float:
    """``value`` if it is a number above 0 (not NaN), else 0."""
    return value if value is not None and value > 0.0 else 0.0  # NaN > 0 is False


def report_weight(
    report: LoadReport, metric_names: tuple[str, ...] = (), error_utilization_penalty: float = 1.0
) -> float:
    """A58's weight of one report: ``qps / (utilization + eps / qps * penalty)``, or 0 when
    the report gives none (qps or utilization missing, NaN or not above 0).

    ``utilization`` is the largest of ``metric_names`` above 0 (A114), else
    ``application_utilization`` if above 0, else ``cpu_utilization``."""
    qps = _positive_or_none(report.rps_fractional)
    if qps == 0.0:
        return 0.0
    utilization = 0.0
    for name in metric_names:
        value = _positive_or_none(report.get(name))
        if value > utilization:
            utilization = value
    if utilization == 0.0:
        utilization = _positive_or_none(report.application_utilization)
    if utilization == 0.0:
        utilization = _positive_or_none(report.cpu_utilization)
    if utilization == 0.0:
        return 0.0
    eps = _positive_or_none(report.eps)
    penalty = eps / qps * error_utilization_penalty if error_utilization_penalty > 0 else 0.0
    weight = qps / (utilization + penalty)
    return weight if math.isfinite(weight) and weight > 0.0 else 0.0


class _Record:
    """What one backend's reports told so far (changed only under the shared lock)."""

    __slots__ = ("report", "since", "updated", "weight")

    def __init__(self) -> None:
        #: The latest report looked at (a new object is a new report).
        self.report: LoadReport | None = None
        #: When the current run of reports with a weight began (inf: none running).
        self.since = _INF
        #: When the latest report with a weight arrived (-inf: never).
        self.updated = -_INF
        #: The weight of that report.
        self.weight = 0.0


class _Shared:
    """What the selectors of one backend set share: the balancer's loads and clock, each
    backend's record, the lock a recompute takes, and the sequence counter."""

    __slots__ = ("clock", "loads", "lock", "next", "records")

    def __init__(self, records: dict[Backend, _Record], start: int) -> None:
        self.loads: Mapping[Backend, Load] = {}
        self.clock: Callable[[], float] = time.monotonic
        self.records = records
        self.lock = threading.Lock()
        self.next = itertools.count(start).__next__


class _Schedule(NamedTuple):
    """One computed schedule (immutable, swapped in whole)."""

    #: The scaled weights of the stride scheduler; None: every backend weighs the same.
    stride: tuple[int, ...] | None
    #: The weights the picks follow, by backend (unscaled; 1.0 each in round robin).
    weights: tuple[float, ...]
    #: The A58 weight of each backend that counts now (0: none yet, in blackout, expired).
    reported: tuple[float, ...]
    #: Backend indexes by weight, heaviest first, ties in sorted order.
    order: tuple[int, ...]


def _stride(weights: list[float]) -> tuple[int, ...]:
    """gRPC's scaled weights of positive ``weights``: capped at MAX_RATIO x their mean,
    scaled so that the largest is MAX_WEIGHT, and at least MIN_RATIO x the mean (and 1)."""
    mean = sum(weights) / len(weights)
    top = min(max(weights), MAX_RATIO * mean)
    scale = MAX_WEIGHT / top
    lowest = max(1, round(mean * scale * MIN_RATIO))
    return tuple(max(lowest, min(MAX_WEIGHT, round(min(w, top) * scale))) for w in weights)


class WeightedRoundRobinSelector:
    """Weighted round robin by reported load over a fixed, sorted set of backends (see the
    module's account). Picks are safe across threads and never wait."""

    __slots__ = ("_backends", "_count", "_due", "_options", "_schedule", "_shared")

    def __init__(
        self, backends: tuple[Backend, ...], options: WeightedRoundRobin, shared: _Shared
    ) -> None:
        self._backends = backends
        self._count = count = len(backends)
        self._options = options
        self._shared = shared
        order = tuple(range(count))
        self._schedule = _Schedule(None, (1.0,) * count, (0.0,) * count, order)
        #: The clock value from which the next pick recomputes the schedule.
        self._due = -_INF

    def attach(
        self, loads: Mapping[Backend, Load], clock: Callable[[], float], total: object = None
    ) -> None:
        """Read load and reports from ``loads`` (the balancer's live cells) at ``clock``
        time; the next pick recomputes the weights."""
        shared = self._shared
        shared.loads = loads
        shared.clock = clock
        self._due = -_INF

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The backends in sorted order."""
        return self._backends

    def first(self, key: Key = b"") -> Backend | None:
        """The next backend by weight (``key`` is ignored); None with no backends."""
        if type(key) is not bytes:
            to_key(key)  # a bad key is an error here as with every algorithm
        count = self._count
        if not count:
            return None
        if self._shared.clock() >= self._due:
            self._refresh()
        stride = self._schedule.stride
        sequence = self._shared.next
        if stride is None:
            return self._backends[sequence() % count]
        while True:
            value = sequence()
            index = value % count
            weight = stride[index]
            if (weight * (value // count) + index * _OFFSET) % MAX_WEIGHT >= MAX_WEIGHT - weight:
                return self._backends[index]

    def iter(self, key: Key = b"") -> Iterator[Backend]:
        """One pick (``key`` is ignored), then every other backend once, in the fallback
        order (see :meth:`iter_after`)."""
        first = self.first(key)
        if first is None:
            return iter(())
        return itertools.chain((first,), _later(self, first))

    def iter_after(self, key: Key, first: Backend) -> Iterator[Backend]:
        """The fallbacks once ``first`` was taken elsewhere: every other backend, heaviest
        first; with equal weights, those after ``first`` in sorted order, round the set. The
        sequence counter is not moved."""
        if type(key) is not bytes:
            to_key(key)
        backends = self._backends
        schedule = self._schedule
        if schedule.stride is None:
            # Round robin: go on from first's place, as RoundRobin's fallbacks do.
            start = next((i + 1 for i, b in enumerate(backends) if b == first), 0)
            rotated = backends[start:] + backends[:start]
            return (b for b in rotated if b != first)
        return (backends[i] for i in schedule.order if backends[i] != first)

    def among(
        self, available: tuple[Backend, ...], current: Selector | None = None
    ) -> WeightedRoundRobinSelector:
        """The same selection among ``available`` (some of the backends, sorted): by their
        weights, with the same sequence counter and weight records; this selector itself when
        they are all of its backends. ``current`` is not needed: the shared state is shared."""
        if len(available) == self._count:
            return self
        return WeightedRoundRobinSelector(available, self._options, self._shared)

    def weights(self) -> dict[Backend, float]:
        """The weights the picks follow now, by backend: the reported weights that count,
        the mean of them for the others, divided by the failure penalty; 1.0 each in plain
        round robin."""
        self._refresh_if_due()
        return dict(zip(self._backends, self._schedule.weights, strict=True))

    def reported_weights(self) -> dict[Backend, float]:
        """The A58 weight of each backend that counts now (0: no report with a weight yet,
        in its blackout, or expired)."""
        self._refresh_if_due()
        return dict(zip(self._backends, self._schedule.reported, strict=True))

    @property
    def round_robin(self) -> bool:
        """Whether the picks are plain round robin now (fewer than two usable weights, or all
        equal)."""
        self._refresh_if_due()
        return self._schedule.stride is None

    def _refresh_if_due(self) -> None:
        if self._count and self._shared.clock() >= self._due:
            self._refresh()

    def _refresh(self) -> None:
        """Recompute the schedule, unless another thread is at it (then keep the current)."""
        shared = self._shared
        lock = shared.lock
        if not lock.acquire(blocking=False):
            return
        try:
            now = shared.clock()
            if now < self._due:
                return  # another thread recomputed it meanwhile
            self._schedule = self._compute(now)
            self._due = now + self._options.weight_update_period
        finally:
            lock.release()

    def _compute(self, now: float) -> _Schedule:
        """The schedule at clock value ``now``; the caller holds the shared lock."""
        options = self._options
        names = options.metric_names
        factor = options.error_utilization_penalty
        blackout = options.blackout_period
        expiration = options.weight_expiration_period
        decay, penalty = options.decay, options.penalty
        shared = self._shared
        loads, records = shared.loads, shared.records
        reported: list[float] = []
        penalties: list[float] = []
        for backend in self._backends:
            load = loads.get(backend)
            if load is None:
                reported.append(0.0)
                penalties.append(1.0)
                continue
            record = records.get(backend)
            report = load.report
            if report is not None and (record is None or record.report is not report):
                if record is None:
                    record = records[backend] = _Record()
                record.report = report
                weight = report_weight(report, names, factor)
                if weight > 0.0:
                    at = report.at
                    if at - record.updated >= expiration:
                        record.since = _INF  # the weight had lapsed: blackout again
                    if record.since == _INF:
                        record.since = at
                    record.weight = weight
                    record.updated = max(record.updated, at)
            usable = 0.0
            if record is not None and record.updated > -_INF:
                if now - record.updated >= expiration:
                    record.since = _INF
                elif not (blackout > 0.0 and now - record.since < blackout):
                    usable = record.weight
            reported.append(usable)
            failed = load.penalty_at(now, decay) * penalty if penalty > 0.0 else 0.0
            penalties.append(1.0 / (1.0 + failed) if failed > 0.0 else 1.0)
        known = [w for w in reported if w > 0.0]
        if len(known) >= 2:
            mean = sum(known) / len(known)
            base = [w if w > 0.0 else mean for w in reported]
        else:
            base = [1.0] * len(reported)
        weights = [w * p for w, p in zip(base, penalties, strict=True)]
        count = len(weights)
        if count < 2 or weights.count(weights[0]) == count:
            return _Schedule(None, tuple(weights), tuple(reported), tuple(range(count)))
        order = tuple(sorted(range(count), key=lambda i: -weights[i]))
        return _Schedule(_stride(weights), tuple(weights), tuple(reported), order)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<WeightedRoundRobinSelector backends={self._count}>"


def _later(selector: WeightedRoundRobinSelector, first: Backend) -> Iterator[Backend]:
    """The fallbacks after ``first``, worked out only if one is asked for."""
    yield from selector.iter_after(b"", first)


class WeightedRoundRobin:
    """gRPC's weighted round robin (A58, A114): picks follow weights computed from the load
    reports the backends send, ``qps / (utilization + eps / qps * error_utilization_penalty)``
    (see :mod:`lbclient.selection.wrr`). Until two backends have weights, plain round robin.

    * ``blackout_period``: seconds a backend must have reported before its weight counts,
      and again after its weight expired (10.0; 0: at once).
    * ``weight_expiration_period``: seconds after its latest report with a weight that a
      backend's weight lapses (180.0).
    * ``weight_update_period``: seconds between recomputations of the weights (1.0); below
      0.1 it is raised to 0.1, as A58 says.
    * ``error_utilization_penalty``: how much the error rate ``eps / qps`` adds to the
      utilization (1.0; 0: errors do not count).
    * ``metric_names``: ORCA names (``"named_metrics.kv_cache_usage_perc"``,
      ``"mem_utilization"``) whose largest value above 0 is the utilization, before
      ``application_utilization`` and ``cpu_utilization`` (A114; ``()``).
    * ``decay``: seconds, the time constant of the failure penalty (10.0).
    * ``penalty``: how much the failure penalty divides the weight by: ``1 + penalty x
      failures`` (1.0; 0: failures do not count).
    * ``random``: returns a float in [0, 1): where each build starts its sequence counter,
      so that clients do not move in step (``random.random``; inject ``Random(7).random`` for
      repeatable picks).
    * ``slow_start``: a :class:`~lbclient.selection.slow_start.SlowStart` (or a window in
      seconds) for backends that join or return from an ejection (None: none).

    A58's ``enable_oob_load_report`` and ``oob_reporting_period`` do not apply: the weights
    come from the reports responses carry (``load_reports`` tells a transport to ask for
    them).
    """

    #: Whether the key decides the picks (no: it may select within a subset).
    keyed = False

    #: A transport that sees this asks each backend for a load report with every request.
    load_reports: Final = True

    def __init__(
        self,
        *,
        blackout_period: float = 10.0,
        weight_expiration_period: float = 180.0,
        weight_update_period: float = 1.0,
        error_utilization_penalty: float = 1.0,
        metric_names: Iterable[str] = (),
        decay: float = 10.0,
        penalty: float = 1.0,
        random: Callable[[], float] | None = None,
        slow_start: SlowStart | float | None = None,
    ) -> None:
        self.blackout_period = _seconds("blackout_period", blackout_period)
        self.weight_expiration_period = _seconds(
            "weight_expiration_period", weight_expiration_period, zero=False
        )
        self.weight_update_period = max(
            MIN_UPDATE_PERIOD, _seconds("weight_update_period", weight_update_period)
        )
        self.error_utilization_penalty = _seconds(
            "error_utilization_penalty", error_utilization_penalty
        )
        self.metric_names = _metric_names(metric_names)
        self.decay = _seconds("decay", decay, zero=False)
        self.penalty = _seconds("penalty", penalty)
        if random is not None and not callable(random):
            raise TypeError(f"random must be callable or None, got {random!r}")
        self.random: Callable[[], float] = _random.random if random is None else random
        self.slow_start = slow_start_of(slow_start)

    def weight(self, report: LoadReport) -> float:
        """The weight ``report`` gives (0: none), with this algorithm's metric names and
        error penalty."""
        return report_weight(report, self.metric_names, self.error_utilization_penalty)

    def _start(self) -> int:
        """Where a new sequence counter starts: drawn from ``random``."""
        draw = self.random()
        if not 0.0 <= draw < 1.0:  # NaN too: a bad source must not break the picks
            draw = 0.0
        return int(draw * 2**32)

    @buildmethod
    def build(self, backends: Iterable[Backend | str]) -> WeightedRoundRobinSelector:
        """Build a selector over ``backends`` (sorted and de-duplicated first)."""
        return self.rebuild(None, prepare_backends(backends))

    def rebuild(
        self,
        previous: Selector | None,
        backends: tuple[Backend, ...],
        change: Change | None = None,
    ) -> WeightedRoundRobinSelector:
        """The selector over ``backends`` (sorted and de-duplicated), as ``build`` makes it,
        with a new sequence counter; what the backends that stay reported (their weights,
        blackout and expiry) is carried over from ``previous``."""
        records: dict[Backend, _Record] = {}
        if isinstance(previous, WeightedRoundRobinSelector):
            known = previous._shared.records
            if change is not None and len(change.removed) < len(known):
                records = known.copy()
                for backend in change.removed:
                    records.pop(backend, None)
            else:
                records = {b: known[b] for b in backends if b in known}
        shared = _Shared(records, self._start())
        if isinstance(previous, WeightedRoundRobinSelector):
            shared.loads = previous._shared.loads
            shared.clock = previous._shared.clock
        return WeightedRoundRobinSelector(backends, self, shared)

    def __repr__(self) -> str:
        names = f", metric_names={self.metric_names!r}" if self.metric_names else ""
        return (
            f"WeightedRoundRobin(blackout_period={self.blackout_period:g}, "
            f"weight_expiration_period={self.weight_expiration_period:g}, "
            f"weight_update_period={self.weight_update_period:g}, "
            f"error_utilization_penalty={self.error_utilization_penalty:g}{names})"
        )
