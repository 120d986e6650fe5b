"""Per-backend health: the state, and the rules that move it. Pure: time is passed in.

Two sources feed one state per backend:

* **Passive outlier detection**, from the outcomes of real requests. Connection-level failures
  (refused, reset, timed out) and 5xx responses are counted in separate streaks, each with its
  own threshold, or in one streak when :attr:`HealthPolicy.combine_failures` is set. A success
  ends both streaks; a 5xx response ends the connection-failure streak (the connection worked).
  When a streak reaches its threshold the backend is *ejected* for ``base_ejection_time`` times
  the number of times it has been ejected, capped at ``max_ejection_time``. When that time is up,
  one request is let through as a probe: a success restores the backend, a failure ejects it
  again, for longer. The multiplier goes down by one for every ``base_ejection_time`` a backend
  stays healthy.
* **Active checks** (:mod:`lbclient.checks`), with Pingora's counter model: results that
  disagree with the current verdict are counted, results that agree reset the count, and the
  verdict flips when the count reaches the threshold for that direction. A backend whose checks
  fail is down until they pass again; a passing check also ends a passive ejection.

How many backends may be ejected at once and when health is ignored altogether (panic mode)
depends on the whole set; the balancer's health book decides that and passes the answer in.
:class:`HealthSnapshot` is what :meth:`~lbclient.LoadBalancer.snapshot` returns.

Part of the core: pure values and rules, time passed in; no I/O, no lock, no thread.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from lbclient.backend import Backend
from lbclient.reports import LoadReport
from lbclient.zones import ZonePlan

__all__ = [
    "BackendHealth",
    "HealthPolicy",
    "HealthSnapshot",
    "HealthState",
    "Outcome",
    "WatchState",
]


class Outcome(enum.Enum):
    """What one request told us about its backend."""

    #: A response that is not a failure (and, for a streamed body, the body read to its end).
    SUCCESS = "success"
    #: A connection-level failure: refused, reset, timed out, closed mid-response.
    CONNECTION_FAILURE = "connection failure"
    #: A response whose status counts as a server failure (5xx by default).
    SERVER_ERROR = "server error"


@dataclass(frozen=True)
class HealthState:
    """The health of one backend at one moment. Immutable: a change makes a new state."""

    #: False when switched off by hand (:meth:`LoadBalancer.set_enabled`).
    enabled: bool = True
    #: Connection-level failures in a row (with ``combine_failures``: failures of both kinds).
    consecutive_failures: int = 0
    #: 5xx responses in a row (unused with ``combine_failures``).
    consecutive_5xx: int = 0
    #: How many times the backend has been ejected, less the decay since its last restoration.
    ejections: int = 0
    #: While passively ejected: the clock value at which a probe may be sent. None otherwise.
    ejected_until: float | None = None
    #: While a probe is out: the clock value after which another request may probe instead.
    probe_until: float | None = None
    #: The clock value of the last restoration (for the decay of ``ejections``).
    restored_at: float = 0.0
    #: The active checks' verdict: True up, False down, None before any verdict (or no checks).
    checked: bool | None = None
    #: Active check results in a row that disagree with ``checked`` (None counts as up).
    check_streak: int = 0

    @property
    def ejected(self) -> bool:
        """Whether the backend is passively ejected (its probe may be due)."""
        return self.ejected_until is not None

    @property
    def healthy(self) -> bool:
        """Neither ejected nor failing its active checks. Says nothing of ``enabled``."""
        return self.ejected_until is None and self.checked is not False

    def probe_due(self, now: float) -> bool:
        """Whether the backend is ejected, its ejection is over and no probe is out."""
        until = self.ejected_until
        return (
            until is not None
            and now >= until
            and (self.probe_until is None or now >= self.probe_until)
            and self.checked is not False
        )

    def ready(self, now: float) -> bool:
        """Whether the backend may take a request at clock value ``now`` (panic mode aside):
        enabled, and healthy or due for its probe."""
        return self.enabled and (self.healthy or self.probe_due(now))


def _threshold(name: str, value: object, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _number(name: str, value: object, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or not low <= value <= high:
        bounds = f"between {low:g} and {high:g}" if math.isfinite(high) else f">= {low:g}"
        raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}")
    return float(value)


def status_set(name: str, value: Iterable[int]) -> frozenset[int]:
    """``value`` as a frozenset of HTTP status codes; a clear error naming ``name`` otherwise."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a collection of status codes, got {value!r}")
    try:
        statuses = frozenset(value)
    except TypeError:
        raise TypeError(f"{name} must be a collection of status codes, got {value!r}") from None
    for status in statuses:
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError(f"{name} must hold HTTP status codes 100..599, got {status!r}")
    return statuses


@dataclass(frozen=True)
class HealthPolicy:
    """How outcomes and checks move a backend's health. Immutable; every rule is pure.

    The defaults follow Envoy's outlier detection: 5 failures in a row eject a backend for
    30 s x the number of its ejections, at most 300 s; at most 10% of the backends (but always
    at least one) are ejected at once; below 50% healthy backends, health is ignored.
    """

    #: Connection-level failures in a row that eject a backend; None never ejects for them.
    consecutive_failures: int | None = 5
    #: 5xx responses in a row that eject a backend; None never ejects for them.
    consecutive_5xx: int | None = 5
    #: Count both kinds in one streak, against ``consecutive_failures``.
    combine_failures: bool = False
    #: Seconds of the first ejection; the n-th lasts n times as long. Also the time a probe
    #: that never reports back holds the backend, and the decay period of the multiplier.
    base_ejection_time: float = 30.0
    #: The longest ejection, in seconds (``base_ejection_time`` if that is longer).
    max_ejection_time: float = 300.0
    #: The share of backends, in percent, that may be ejected at once (at least one always may).
    max_ejection_percent: float = 10.0
    #: Below this percentage of healthy backends, health is ignored (panic mode); 0 turns it off.
    panic_threshold: float = 50.0
    #: Response statuses that count as server errors (toward ``consecutive_5xx``), for every
    #: transport and adapter sharing the balancer (500..599).
    failure_statuses: Collection[int] = frozenset(range(500, 600))

    def __post_init__(self) -> None:
        _threshold("consecutive_failures", self.consecutive_failures, optional=True)
        _threshold("consecutive_5xx", self.consecutive_5xx, optional=True)
        if not isinstance(self.combine_failures, bool):
            raise TypeError(f"combine_failures must be a bool, got {self.combine_failures!r}")
        if self.combine_failures and self.consecutive_failures is None:
            raise ValueError("combine_failures needs consecutive_failures, got None")
        _number("base_ejection_time", self.base_ejection_time, 0.0)
        _number("max_ejection_time", self.max_ejection_time, 0.0)
        _number("max_ejection_percent", self.max_ejection_percent, 0.0, 100.0)
        _number("panic_threshold", self.panic_threshold, 0.0, 100.0)
        object.__setattr__(
            self, "failure_statuses", status_set("failure_statuses", self.failure_statuses)
        )

    # -- the set-wide rules ----------------------------------------------------------------

    def ejection_limit(self, backends: int) -> int:
        """How many of ``backends`` may be ejected at once: the percentage, at least one."""
        return max(1, math.floor(backends * self.max_ejection_percent / 100 + 1e-9))

    def panics(self, healthy: int, total: int) -> bool:
        """Whether ``healthy`` of ``total`` (enabled) backends is below the panic threshold."""
        return total > 0 and healthy * 100 < self.panic_threshold * total

    def ejection_time(self, ejections: int) -> float:
        """How long the ``ejections``-th ejection lasts, in seconds."""
        cap = max(self.max_ejection_time, self.base_ejection_time)
        return min(self.base_ejection_time * ejections, cap)

    # -- passive outcomes --------------------------------------------------------------------

    def observe(
        self, state: HealthState, outcome: Outcome, now: float, may_eject: bool = True
    ) -> HealthState:
        """The state after ``outcome`` of a request at clock value ``now``.

        ``may_eject`` is False when the ejection limit is reached: a streak that reaches its
        threshold then stays there, and the next failure tries again.

        While ejected, outcomes before the ejection is over are ignored (requests that were
        already under way); after it, the first outcome decides, whether or not it came from
        the request that took the probe.
        """
        ok = outcome is Outcome.SUCCESS
        if state.ejected_until is not None:
            if now < state.ejected_until:
                return state
            if ok:
                return self.restore(state, now)
            return self._eject(state, now)
        if ok:
            if state.consecutive_failures or state.consecutive_5xx:
                return replace(state, consecutive_failures=0, consecutive_5xx=0)
            return state
        if self.combine_failures or outcome is Outcome.CONNECTION_FAILURE:
            count = state.consecutive_failures + 1
            threshold = self.consecutive_failures
            state = replace(state, consecutive_failures=count)
        else:
            count = state.consecutive_5xx + 1
            threshold = self.consecutive_5xx
            state = replace(state, consecutive_failures=0, consecutive_5xx=count)
        if threshold is not None and count >= threshold and may_eject:
            return self._eject(state, now)
        return state

    def _eject(self, state: HealthState, now: float) -> HealthState:
        ejections = self.decayed(state, now) + 1
        return replace(
            state,
            consecutive_failures=0,
            consecutive_5xx=0,
            ejections=ejections,
            ejected_until=now + self.ejection_time(ejections),
            probe_until=None,
        )

    def decayed(self, state: HealthState, now: float) -> int:
        """``state.ejections`` less one for every ``base_ejection_time`` since restoration."""
        if state.ejections == 0 or state.ejected_until is not None:
            return state.ejections
        base = self.base_ejection_time
        periods = math.inf if base == 0 else (now - state.restored_at) // base
        return int(max(0, state.ejections - periods))

    def restore(self, state: HealthState, now: float) -> HealthState:
        """The state of an ejected backend taken back into service at ``now``."""
        if state.ejected_until is None:
            return state
        return replace(
            state,
            consecutive_failures=0,
            consecutive_5xx=0,
            ejected_until=None,
            probe_until=None,
            restored_at=now,
        )

    def claim_probe(self, state: HealthState, now: float) -> HealthState | None:
        """The state with the probe taken at ``now``, or None if no probe is due."""
        if not state.probe_due(now):
            return None
        return replace(state, probe_until=now + self.base_ejection_time)

    # -- active checks -------------------------------------------------------------------------

    @staticmethod
    def check(state: HealthState, ok: bool, successes: int, failures: int) -> HealthState:
        """The state after one active check result (``ok``).

        ``successes`` and ``failures`` are the check's thresholds for flipping its verdict up
        and down. Before the first verdict the backend counts as up, so the first pass gives the
        verdict up at once. A pass while the verdict is up ends a passive ejection (the caller
        passes the state through :meth:`restore` for that).
        """
        current = state.checked is not False
        if ok == current:
            if state.checked is None and ok:
                return replace(state, checked=True, check_streak=0)
            return state if state.check_streak == 0 else replace(state, check_streak=0)
        streak = state.check_streak + 1
        if streak < (successes if ok else failures):
            return replace(state, check_streak=streak)
        return replace(state, checked=ok, check_streak=0)


# -- what a snapshot shows -----------------------------------------------------------------


@dataclass(frozen=True)
class BackendHealth:
    """One backend's health as :meth:`~lbclient.LoadBalancer.snapshot` saw it."""

    backend: Backend
    #: Whether it may take a request now (panic mode included).
    ready: bool
    #: Neither ejected nor failing its active checks.
    healthy: bool
    enabled: bool
    #: Passively ejected (possibly due for its probe).
    ejected: bool
    #: Clock value at which the ejection ends (a probe may go), or None.
    ejected_until: float | None
    #: Seconds until then (0 when the probe is due), or None when not ejected.
    ejection_remaining: float | None
    #: Whether a probe request is out.
    probing: bool
    #: Times ejected (after decay), the multiplier of the next ejection time.
    ejections: int
    consecutive_failures: int
    consecutive_5xx: int
    #: The active checks' verdict: True up, False down, None not checked (yet).
    checked: bool | None
    #: Attempts in flight (started, and neither done nor failed).
    in_flight: int = 0
    #: The peak-sensitive latency estimate of response heads, in seconds (None: unmeasured).
    latency: float | None = None
    #: The failure penalty the load-aware algorithms add to this backend's cost.
    penalty: float = 0.0
    #: The latest load report the backend sent (None: none yet), and its age in seconds.
    report: LoadReport | None = None
    report_age: float | None = None
    #: Reports kept, and reports refused by why (see :class:`~lbclient.reports.BadReport`).
    reports: int = 0
    reports_refused: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class WatchState:
    """How a watched discovery (etcd, Kubernetes: told of each change over a stream) fares, as
    its job last reported it: a plain value in :attr:`HealthSnapshot.discovery_watch`."""

    #: Whether the stream is open now (the last good set is served meanwhile either way).
    connected: bool = False
    #: The store's version of the set last seen (etcd: the revision; Kubernetes: the resource
    #: version), from which a new stream resumes; None before the first listing.
    revision: str | None = None
    #: The store's address in use (the latest tried while none answers).
    endpoint: str | None = None
    #: Streams opened after the first (each resuming from :attr:`revision`).
    reconnects: int = 0
    #: Listings of the whole set: the first, and each after the store said the revision is gone
    #: (etcd: compacted; Kubernetes: 410 Gone).
    relists: int = 0
    #: Changes the stream delivered.
    events: int = 0
    #: Values skipped as bad (not JSON, no address, a bad weight), and stream lines that were
    #: garbage.
    skipped: int = 0
    #: Why the latest connection failed or the stream broke; None once a listing or stream is
    #: good again.
    error: str | None = None


@dataclass(frozen=True)
class HealthSnapshot:
    """The health of every backend at one moment, whether panic mode is on, and how the
    balancer's discovery fares (zeros and None without one)."""

    #: The clock value of the snapshot.
    at: float
    #: True when fewer backends than the panic threshold are healthy: health is ignored.
    panic: bool
    backends: tuple[BackendHealth, ...]
    #: Answers the discovery gave, empty ones included.
    discovery_refreshes: int = 0
    #: Lookups that failed (the last good set was kept).
    discovery_failures: int = 0
    #: Why the latest lookup failed; None once one succeeds.
    discovery_error: str | None = None
    #: The priority group in use, when the discovery gives priorities (DNS SRV).
    discovery_priority: int | None = None
    #: Parts of answers that failed while the rest answered and was used, counted by part
    #: (DNS: by record type, ``{"AAAA": 3}``; each SRV target's query counts).
    discovery_part_failures: Mapping[str, int] = field(default_factory=dict)
    #: What failed in the latest answer, when a part of it did; None once an answer is whole.
    discovery_partial: str | None = None
    #: A watched discovery's state (connected, revision, reconnects...); None for others.
    discovery_watch: WatchState | None = None
    #: With a :class:`~lbclient.Subset`: the subset regardless of health, and the members
    #: selection uses now (replacements for unavailable ones included); None without one.
    #: Panic mode is then the subset's.
    subset: tuple[Backend, ...] | None = None
    members: tuple[Backend, ...] | None = None
    #: With a ``zone``: the zone plan over the backends selection uses (None without one).
    zones: ZonePlan | None = None

    @property
    def ready(self) -> int:
        """How many backends may take a request."""
        return sum(b.ready for b in self.backends)

    def __str__(self) -> str:
        lines = [f"panic mode: {'ON' if self.panic else 'off'}"]
        for b in self.backends:
            if not b.enabled:
                state = "disabled"
            elif b.ejected:
                state = f"ejected ({b.ejection_remaining:.1f} s left, #{b.ejections})"
            elif b.checked is False:
                state = "failing checks"
            else:
                state = "healthy"
            lines.append(
                f"{b.backend.address:<24} {'ready' if b.ready else 'not ready':<9} {state}"
            )
        if self.discovery_refreshes or self.discovery_failures:
            line = (
                f"discovery: {self.discovery_refreshes} answers, "
                f"{self.discovery_failures} failed lookups"
            )
            parts = self.discovery_part_failures
            if parts:
                line += ", failed parts: " + ", ".join(f"{p} {n}" for p, n in sorted(parts.items()))
            if self.discovery_priority is not None:
                line += f", priority {self.discovery_priority} in use"
            if self.discovery_error is not None:
                line += f"; latest: {self.discovery_error}"
            elif self.discovery_partial is not None:
                line += f"; latest answer lacks: {self.discovery_partial}"
            lines.append(line)
        watch = self.discovery_watch
        if watch is not None:
            lines.append(
                f"watch: {'connected' if watch.connected else 'not connected'}"
                f"{f' to {watch.endpoint}' if watch.endpoint else ''}, revision {watch.revision},"
                f" {watch.events} changes, {watch.reconnects} reconnects, {watch.relists} "
                f"listings, {watch.skipped} skipped"
                + (f"; latest: {watch.error}" if watch.error else "")
            )
        return "\n".join(lines)
