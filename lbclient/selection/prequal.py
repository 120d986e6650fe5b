"""Prequal (Wydrowski, Kleinberg, Rumble, Archer, NSDI 2024, "Load is not what you should
balance"): the hot-cold lexicographic rule over a pool of recent load reports.

Each backend's report (:class:`~lbclient.reports.LoadReport`) gives its requests in flight
(RIF: ``named_metrics.rif`` of ORCA's ``endpoint-load-metrics``, or ``x-prequal-rif``) and its
latency estimate (``named_metrics.latency_ms``, or ``x-prequal-latency-us``). Reports enter a
pool of at most ``pool_size`` entries, one per backend (a newer report of a backend replaces its
entry), whether a probe brought them or an ordinary response did: the balancer tells the
selector of every report it keeps (:meth:`PrequalSelector.reported`). A report without a RIF is
not pooled.

A pick, while the pool holds at least two entries (none older than ``max_age``):

* ``threshold`` = the ``q_rif`` quantile (nearest rank) of the last :data:`RIF_WINDOW` RIFs
  reported; an entry is cold when its RIF <= threshold, hot otherwise;
* any cold entry: the cold one with the lowest latency (a report without latency ranks last),
  an idle one (RIF 0) before any other: a server whose latency is the median of all its
  recent requests cannot bring it down while idle (it gets none), so ranked by it an idle
  server that was once slower would stay unused (the paper's servers, and
  :mod:`lbclient.server`, estimate latency per RIF, which this rule agrees with);
  all hot: the one with the lowest RIF;
* the entry picked spends one use of its reuse budget (``reuse``) and leaves when it has none,
  and its RIF counts one more (the request just sent joins those the backend reported, so an
  entry used again turns hot instead of drawing every request); then one more entry leaves,
  alternately the oldest and the worst (the one the rule would pick last), unless that would
  leave fewer than two (so a pool fed slowly, by responses alone, keeps a choice);
* with no probes (``r_probe=0``) the pool holds only the backends this client calls, so a pick
  also explores: one backend outside the pool, drawn at random, takes the request instead when
  peak EWMA's cost prefers it to the rule's pick, unless its last report, within
  :data:`HOT_MEMORY` max ages, was hot. Without it the pool would keep the first backends that
  answered and never learn of the others (measured on a simulated clock, four backends of four
  slots and 12 callers: p50 16 ms against 5.7 ms).

With fewer than two entries, the pick is peak EWMA's (:class:`~lbclient.PeakEWMA`) power of
two choices, over the live load the balancer attaches (of the two drawn, one whose probe found
it hot within half of ``max_age`` loses to one not): a backend that never reported, or a
pool too thin to compare, falls back to peak EWMA's cost. The fallback order for retries is the
pool's entries by the rule, then every other backend by peak EWMA's cost; walking it spends
nothing.

Probes are decided here and sent elsewhere (the transports, through the balancer's
:meth:`~lbclient.LoadBalancer.probe_targets`): :meth:`PrequalSelector.probes_for_request` says
which backends to probe for one request, ``r_probe`` per request on average by a deterministic
accumulator (0.5: one probe every other request), drawn at random without replacement among the
backends that may be chosen. A backend drawn that answered a request with a report (one with a
RIF), or whose latest probe found it hot (its RIF above the threshold), within the last half of
``max_age`` is not probed (that probe is not sent, not owed): its responses keep the pool fed,
or it is the backend to avoid and another probe would only say so again. So servers that report
on every response are probed little where the client calls each of them often (a small set, a
busy client), a backend the client avoids about twice per ``max_age`` rather than on most
requests, and the rest as designed: a probe costs a Python client about what a request does (on
a simulated clock, four backends with one hidden-loaded: probes from 0.71 to under 0.01 a
request, the latencies as they were; ``python -m lbclient.cli.bench.fleet_model``).

Thread safety: a pick changes the pool, so the pool, the window and the accumulator are changed
under one small lock of the selector (held for a few microseconds, never around I/O); a pick
always returns one of the selector's backends, or None when it has none.
"""

from __future__ import annotations

import bisect
import math
import random as _random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final

from lbclient._load import Load
from lbclient.backend import Backend
from lbclient.reports import LoadReport
from lbclient.selection.base import Change, Key, Selector, buildmethod, prepare_backends
from lbclient.selection.loadaware import UNMEASURED, _positive

__all__ = ["HOT_MEMORY", "RIF_WINDOW", "Prequal", "PrequalSelector"]

#: How many recent RIFs the hot-cold threshold is the quantile of.
RIF_WINDOW: Final = 64
#: The largest default reuse budget (``reuse=None`` with ``r_probe=0``, or a tiny rate).
MAX_REUSE: Final = 16
#: Seconds: the time constant of the peak EWMA fallback.
DECAY: Final = 10.0
#: With no probes, how many ``max_age`` a backend's last hot report keeps it from being
#: explored (afterwards peak EWMA's cost alone decides, and a request refreshes the report).
HOT_MEMORY: Final = 5.0

_IDLE: Final = Load()


def default_reuse(r_probe: float) -> int:
    """The reuse budget derived from the probe rate: each request spends one use and removes
    one entry, so ``r_probe`` new entries per request must bring two uses: ``ceil(2 / r_probe)``,
    between 1 and :data:`MAX_REUSE` (which ``r_probe=0`` gets)."""
    if r_probe <= 0:
        return MAX_REUSE
    return max(1, min(MAX_REUSE, math.ceil(2.0 / r_probe)))


class Prequal:
    """Prequal's hot-cold lexicographic rule over a pool of probed and reported load.

    * ``r_probe``: probes per request, on average (3.0, the paper's); fractional values send
      one every ``1 / r_probe`` requests; 0: no probes (the servers report on every response).
    * ``pool_size``: the most entries the pool holds (16).
    * ``max_age``: seconds an entry is used for (1.0).
    * ``q_rif``: the RIF quantile above which a backend is hot (0.84, the paper's; prequal-rs
      uses 0.6, which it found herds less at high load: lower it when most backends run hot).
    * ``reuse``: how many picks one entry serves at most (None: :func:`default_reuse` of
      ``r_probe``: 1 at the default rate).
    * ``probe_path``: the path probes ask, ``GET`` (``/.lbclient/load``, what
      :mod:`lbclient.server` answers).
    * ``probe_timeout``: seconds a probe may take (1.0); a slower one is dropped and counted.
    * ``random``: returns a float in [0, 1): draws the probes' backends and the fallback's
      choices (``random.random``); inject a seeded one to make them repeatable.
    """

    #: Whether the key decides the picks (no: it may select within a subset).
    keyed = False

    #: The transports ask every backend for a load report by default.
    load_reports = True
    #: The time constant of the live load's estimate (the fallback's).
    decay = DECAY

    def __init__(
        self,
        r_probe: float = 3.0,
        *,
        pool_size: int = 16,
        max_age: float = 1.0,
        q_rif: float = 0.84,
        reuse: int | None = None,
        probe_path: str = "/.lbclient/load",
        probe_timeout: float = 1.0,
        random: Callable[[], float] | None = None,
    ) -> None:
        self.r_probe = _positive("r_probe", r_probe, zero=True)
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 2:
            raise ValueError(f"pool_size must be an int >= 2, got {pool_size!r}")
        self.pool_size = pool_size
        self.max_age = _positive("max_age", max_age)
        q = _positive("q_rif", q_rif)
        if q > 1.0:
            raise ValueError(f"q_rif must be in (0, 1], got {q_rif!r}")
        self.q_rif = q
        if reuse is not None and (
            isinstance(reuse, bool) or not isinstance(reuse, int) or reuse < 1
        ):
            raise ValueError(f"reuse must be an int >= 1 or None, got {reuse!r}")
        self.reuse = default_reuse(self.r_probe) if reuse is None else reuse
        if not isinstance(probe_path, str) or not probe_path.startswith("/"):
            raise ValueError(f"probe_path must be a path starting with '/', got {probe_path!r}")
        self.probe_path = probe_path
        self.probe_timeout = _positive("probe_timeout", probe_timeout)
        if random is not None and not callable(random):
            raise TypeError(f"random must be callable, got {random!r}")
        self.random = random

    @buildmethod
    def build(self, backends: Iterable[Backend | str]) -> PrequalSelector:
        """Build a selector over ``backends`` (sorted and de-duplicated first)."""
        return PrequalSelector(prepare_backends(backends), self)

    def rebuild(
        self,
        previous: Selector | None,
        backends: tuple[Backend, ...],
        change: Change | None = None,
    ) -> PrequalSelector:
        """The selector over ``backends``; the pool's entries of backends that stay, the RIF
        window and the probe accumulator carry over from ``previous``."""
        selector = PrequalSelector(backends, self)
        if isinstance(previous, PrequalSelector):
            selector.carry(previous)
        return selector

    def __repr__(self) -> str:
        return (
            f"Prequal(r_probe={self.r_probe:g}, pool_size={self.pool_size}, "
            f"max_age={self.max_age:g}, q_rif={self.q_rif:g}, reuse={self.reuse})"
        )


class _Entry:
    """One pooled report: the backend, its RIF and latency, when it came, uses left."""

    __slots__ = ("at", "backend", "latency", "rif", "uses")

    def __init__(self, backend: Backend, rif: float, latency: float, at: float, uses: int) -> None:
        self.backend = backend
        self.rif = rif
        self.latency = latency
        self.at = at
        self.uses = uses


class PrequalSelector:
    """A built Prequal selection over a fixed, sorted set of backends (see the module)."""

    def __init__(self, backends: tuple[Backend, ...], algorithm: Prequal) -> None:
        self._backends = backends
        self._members = frozenset(backends)
        self._algorithm = algorithm
        self._random: Callable[[], float] = algorithm.random or _random.random
        self._loads: Mapping[Backend, Load] = {}
        self._clock: Callable[[], float] = time.monotonic
        self._lock = threading.Lock()
        #: The pool, by backend, in arrival order (the oldest first).
        self._pool: dict[Backend, _Entry] = {}
        #: When each backend last answered a request with a report (not a probe).
        self._answered: dict[Backend, float] = {}
        #: When a probe last found each backend hot (only while its latest probe did).
        self._hot: dict[Backend, float] = {}
        self._window: deque[float] = deque(maxlen=RIF_WINDOW)
        #: The same RIFs in order, kept beside it (the quantile is then one index).
        self._ordered: list[float] = []
        #: Probes owed: ``r_probe`` is added per request, whole probes are taken out.
        self._credit = 0.0
        #: Whether the next removal takes the oldest entry (else the worst).
        self._oldest_next = True

    def attach(
        self, loads: Mapping[Backend, Load], clock: Callable[[], float], total: object = None
    ) -> None:
        """Read the live load (for the fallback) from ``loads`` at ``clock`` time."""
        self._loads = loads
        self._clock = clock

    def carry(self, previous: PrequalSelector) -> None:
        """Take over ``previous``'s pool and answers (its backends still in this set), window
        and credit."""
        with previous._lock:
            members = self._members
            # The entries are copied, for this set's own objects (a backend whose metadata
            # changed is a new object, equal to the old): picks return this set's backends,
            # and the previous selector's picks no longer touch these entries.
            mine = {b: b for b in self._backends}
            self._pool = {
                mine[b]: _Entry(mine[b], e.rif, e.latency, e.at, e.uses)
                for b, e in previous._pool.items()
                if b in members
            }
            self._answered = {b: t for b, t in previous._answered.items() if b in members}
            self._hot = {b: t for b, t in previous._hot.items() if b in members}
            self._window = deque(previous._window, maxlen=RIF_WINDOW)
            self._ordered = sorted(self._window)
            self._credit = previous._credit
            self._oldest_next = previous._oldest_next

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The backends in sorted order."""
        return self._backends

    def __len__(self) -> int:
        return len(self._backends)

    # -- what feeds the pool --------------------------------------------------------------

    def reported(self, backend: Backend, report: LoadReport, probe: bool = False) -> None:
        """A report of ``backend`` was kept (a ``probe``'s or a response's): pool it, if it has
        a RIF and the backend is one of this set."""
        rif = report.rif
        if rif is None or backend not in self._members:
            return
        if not probe:
            self._answered[backend] = report.at
        latency = math.inf if report.latency is None else report.latency
        algorithm = self._algorithm
        with self._lock:
            if probe:  # found hot: probing it again soon would only say so again
                if rif > self.threshold():
                    self._hot[backend] = report.at
                else:
                    self._hot.pop(backend, None)
            pool = self._pool
            pool.pop(backend, None)  # a newer report replaces it, at the young end
            while len(pool) >= algorithm.pool_size:
                del pool[next(iter(pool))]
            pool[backend] = _Entry(backend, rif, latency, report.at, algorithm.reuse)
            window, ordered = self._window, self._ordered
            if len(window) == RIF_WINDOW:
                del ordered[bisect.bisect_left(ordered, window[0])]
            window.append(rif)
            bisect.insort(ordered, rif)

    def threshold(self) -> float:
        """The RIF at or below which an entry is cold: the ``q_rif`` quantile (nearest rank)
        of the recent RIFs (infinite before any)."""
        window = self._ordered
        if not window:
            return math.inf
        rank = math.ceil(self._algorithm.q_rif * len(window))
        return window[min(max(rank, 1), len(window)) - 1]

    def _fresh(self, now: float) -> list[_Entry]:
        """The pool's entries, oldest first, those older than ``max_age`` dropped (lock held)."""
        pool = self._pool
        limit = self._algorithm.max_age
        for backend in [b for b, e in pool.items() if now - e.at > limit]:
            del pool[backend]
        return list(pool.values())

    @staticmethod
    def _rank(threshold: float) -> Callable[[_Entry], tuple[int, float, float]]:
        """The rule's order (best first): idle (RIF 0), then cold by latency, then hot by
        RIF."""

        def rank(entry: _Entry) -> tuple[int, float, float]:
            rif = entry.rif
            if rif <= threshold:
                return (0, entry.latency if rif > 0.0 else -1.0, rif)
            return (1, rif, entry.latency)

        return rank

    # -- picking ----------------------------------------------------------------------------

    def first(self, key: Key = b"") -> Backend | None:
        """The rule's pick from the pool (spending one use and removing one entry), or peak
        EWMA's with fewer than two entries; the key is ignored."""
        backends = self._backends
        if len(backends) <= 1:
            return backends[0] if backends else None
        now = self._clock()
        with self._lock:
            entries = self._fresh(now)
            if len(entries) >= 2:
                threshold = self.threshold()
                rank = self._rank(threshold)
                best = min(entries, key=rank)
                pool = self._pool
                if self._algorithm.r_probe <= 0.0 and len(pool) < len(backends):
                    other = self._explore(best.backend, threshold, now)
                    if other is not None:
                        return other
                best.uses -= 1
                best.rif += 1.0  # this request joins the requests the backend reported
                if best.uses <= 0:
                    del pool[best.backend]
                if len(pool) > 2:
                    rest = list(pool.values())
                    gone = rest[0] if self._oldest_next else max(rest, key=rank)
                    del pool[gone.backend]
                    self._oldest_next = not self._oldest_next
                return best.backend
        return self._fallback(now)

    def _explore(self, best: Backend, threshold: float, now: float) -> Backend | None:
        """With no probes: a backend outside the pool, drawn at random, if peak EWMA's cost
        prefers it to the rule's pick ``best`` and its last report (within
        :data:`HOT_MEMORY` max ages) was not hot; else None (lock held)."""
        backends, pool = self._backends, self._pool
        n = len(backends)
        for _ in range(2):  # two draws: most of a small set may be pooled
            other = backends[min(int(self._random() * n), n - 1)]
            if other not in pool:
                break
        else:
            return None
        last = self._loads.get(other, _IDLE).report
        if (
            last is not None
            and last.rif is not None
            and last.rif > threshold
            and now - last.at <= HOT_MEMORY * self._algorithm.max_age
        ):
            return None
        return other if self.cost(other, now) < self.cost(best, now) else None

    def cost(self, backend: Backend, now: float) -> float:
        """Peak EWMA's cost of ``backend`` at clock value ``now`` (lower is better)."""
        load = self._loads.get(backend, _IDLE)
        in_flight = load.in_flight
        extra = load.penalty_at(now, DECAY)
        estimate = load.estimate_at(now, DECAY)
        if estimate is None:
            cost = extra if in_flight == 0 else UNMEASURED * in_flight + extra
        else:
            cost = (estimate + extra) * (in_flight + 1)
        return cost / backend.weight

    def _fallback(self, now: float) -> Backend:
        """Peak EWMA's power of two choices, drawn from the injected random source."""
        backends = self._backends
        n = len(backends)
        draw = self._random
        first = min(int(draw() * n), n - 1)
        second = min(int(draw() * (n - 1)), n - 2)
        second += second >= first
        a, b = backends[first], backends[second]
        hot, since, never = self._hot.get, now - self._algorithm.max_age / 2, -math.inf
        a_hot, b_hot = hot(a, never) >= since, hot(b, never) >= since
        if a_hot != b_hot:  # one a probe found hot lately: the other
            return a if b_hot else b
        return b if self.cost(b, now) < self.cost(a, now) else a

    def ranked(self, exclude: Backend | None = None) -> list[Backend]:
        """Every backend but ``exclude``: the pool's by the rule, then the rest by peak EWMA's
        cost; spends nothing."""
        now = self._clock()
        with self._lock:
            entries = [e for e in self._pool.values() if now - e.at <= self._algorithm.max_age]
            threshold = self.threshold()
        pooled = [e.backend for e in sorted(entries, key=self._rank(threshold))]
        seen = set(pooled)
        rest = sorted((b for b in self._backends if b not in seen), key=lambda b: self.cost(b, now))
        return [b for b in (*pooled, *rest) if b != exclude]

    def iter(self, key: Key = b"") -> Iterator[Backend]:
        """The first pick, then every other backend in :meth:`ranked` order."""
        first = self.first(key)
        if first is None:
            return iter(())
        return _then(first, self.ranked)

    def iter_after(self, key: Key, first: Backend) -> Iterator[Backend]:
        """The fallback order after a first pick taken elsewhere."""
        return iter(self.ranked(first))

    # -- probes -----------------------------------------------------------------------------

    def probes_for_request(self, ready: Callable[[Backend], bool] | None = None) -> list[Backend]:
        """The backends to probe for one request: ``r_probe`` on average (the whole probes
        owed so far), drawn at random without replacement among those ``ready`` accepts (all
        with None), less those heard from within half of ``max_age``: that answered a request
        with a report, or whose probe found them hot. Such a draw is not sent and not owed,
        and ``ready`` is not asked of it. Probes owed and not sent for want of ready backends
        are forgiven."""
        rate = self._algorithm.r_probe
        if rate <= 0.0 or not self._backends:
            return []
        with self._lock:
            credit = self._credit + rate
            count = int(credit + 1e-9)
            self._credit = max(credit - count, 0.0)
        if count == 0:
            return []
        answered, hot = self._answered.get, self._hot.get
        since = self._clock() - self._algorithm.max_age / 2
        never = -math.inf
        # A lazy Fisher-Yates shuffle: draws cost O(count), and ``ready`` is asked of the drawn
        # backends only (of all of them only when few are ready).
        backends = self._backends
        n = len(backends)
        last = n - 1
        draw = self._random
        moved: dict[int, int] = {}
        drawn: list[Backend] = []
        for i in range(n):
            j = i + int(draw() * (n - i))
            if j > last:  # a float a hair under 1 may round up
                j = last
            position = moved.get(j, j)
            moved[j] = moved.get(i, i)
            backend = backends[position]
            if answered(backend, never) >= since or hot(backend, never) >= since:
                count -= 1  # heard from lately: no probe would tell more
            elif ready is None or ready(backend):
                drawn.append(backend)
            else:
                continue
            if len(drawn) >= count:
                break
        return drawn

    def pool(self) -> list[tuple[Backend, float, float, float, int]]:
        """The pool as it stands: (backend, RIF, latency, at, uses left), oldest first."""
        with self._lock:
            return [(e.backend, e.rif, e.latency, e.at, e.uses) for e in self._pool.values()]


def _then(first: Backend, rank: Callable[[Backend], list[Backend]]) -> Iterator[Backend]:
    yield first
    yield from rank(first)
