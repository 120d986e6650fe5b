"""Live load per backend: requests in flight, a peak-sensitive latency estimate, a failure
penalty, and the latest load report the backend sent (:mod:`lbclient.reports`), fed by the
attempt loop (and by probes) and read by the load-aware algorithms.

What lives here: :class:`Load`, one per backend, carried across ``update()`` for backends that
stay. Writers (an attempt starting, its response head, its end) update it under its own small
lock; readers read plain attributes and never lock. The estimate and the penalty decay with
time, as pure functions of (value, elapsed, time constant): the clock is the balancer's,
passed in.

What may not: I/O, threads, a clock of its own, selection.
"""

from __future__ import annotations

import math
import threading
from typing import Final

from lbclient.reports import BadReport, LoadReport, parse, parse_prequal

__all__ = ["FAILURE_PENALTY", "Load", "Total", "decayed"]

#: What one failure adds to a backend's penalty (the algorithms give it a unit).
FAILURE_PENALTY: Final = 1.0


def decayed(value: float, elapsed: float, tau: float) -> float:
    """``value`` after ``elapsed`` seconds of exponential decay with time constant ``tau``."""
    if value == 0.0 or elapsed <= 0.0:
        return value
    if tau <= 0.0:
        return 0.0
    return value * math.exp(-elapsed / tau)


class Total:
    """Requests in flight over all the backends of one balancer (kept by their loads)."""

    __slots__ = ("in_flight", "lock")

    def __init__(self) -> None:
        self.in_flight = 0
        #: The one lock every load of the balancer updates under.
        self.lock = threading.Lock()


class Load:
    """One backend's load. ``in_flight`` is exact under threads and tasks; the estimate is a
    peak EWMA of response-head latencies (seconds), None before the first measurement."""

    __slots__ = (
        "_lock",
        "_total",
        "estimate",
        "in_flight",
        "joined",
        "penalty",
        "penalty_floor_until",
        "refused",
        "report",
        "reports",
        "stamp",
    )

    def __init__(self, joined: float = 0.0, total: Total | None = None) -> None:
        self._total = total = total or Total()
        self._lock = total.lock
        #: Attempts started and not yet ended (response body done, failed or cancelled).
        self.in_flight = 0
        #: The latency estimate (seconds) as of ``stamp``; None before any measurement.
        self.estimate: float | None = None
        #: The failure penalty as of ``stamp``.
        self.penalty = 0.0
        #: Until this clock value the penalty does not decay (a ``Retry-After``).
        self.penalty_floor_until = 0.0
        #: The clock value of the last update of ``estimate`` and ``penalty``.
        self.stamp = 0.0
        #: The clock value at which the backend joined the set (for slow start).
        self.joined = joined
        #: The latest load report the backend sent (None before the first).
        self.report: LoadReport | None = None
        #: Reports kept, and reports refused by why (``reason`` of
        #: :class:`~lbclient.reports.BadReport`, or ``"stale"``: older than the one kept).
        self.reports = 0
        self.refused: dict[str, int] = {}

    def begin(self) -> None:
        """An attempt started."""
        with self._lock:
            self.in_flight += 1
            self._total.in_flight += 1

    def end(self) -> None:
        """An attempt ended (never below zero, whatever the order of reports)."""
        with self._lock:
            if self.in_flight > 0:
                self.in_flight -= 1
                self._total.in_flight -= 1

    def observe(
        self,
        now: float,
        latency: float | None,
        failed: bool,
        tau: float,
        hold: float | None = None,
    ) -> None:
        """Record one response head (``latency`` seconds after the attempt started) or failure
        at clock value ``now``. The estimate jumps to a new peak at once and otherwise decays
        towards recent latencies with time constant ``tau``; a failure adds
        :data:`FAILURE_PENALTY` to a penalty that decays likewise, not before ``hold`` seconds
        from now (a ``Retry-After``)."""
        with self._lock:
            elapsed = now - self.stamp
            if latency is not None and latency >= 0.0:
                current = self.estimate
                if current is None or latency > current:
                    self.estimate = latency
                else:
                    weight = math.exp(-max(elapsed, 0.0) / tau) if tau > 0 else 0.0
                    self.estimate = current * weight + latency * (1.0 - weight)
            penalty = self.penalty_at(now, tau)
            if failed:
                penalty += FAILURE_PENALTY
            if hold is not None and hold > 0:
                self.penalty_floor_until = max(self.penalty_floor_until, now + hold)
            self.penalty = penalty
            self.stamp = now

    def read(
        self, header: str | bytes | None, rif: str | None, latency_us: str | None, now: float
    ) -> LoadReport | None:
        """Read a load report that arrived at clock value ``now``: the ``endpoint-load-metrics``
        ``header``, else Prequal's headers (``rif``, ``latency_us``), and keep it (see
        :meth:`reported`). A refused report is counted here, never raised; None then, or when
        none was given."""
        try:
            if header is not None:
                report = parse(header, now)
            elif rif is not None or latency_us is not None:
                report = parse_prequal(rif, latency_us, now)
            else:
                return None
        except BadReport as bad:
            self.refuse(bad.reason)
            return None
        return report if self.reported(report) else None

    def reported(self, report: LoadReport) -> bool:
        """Keep ``report`` as the latest, unless the one kept arrived later (then it is
        refused as stale). Whether it was kept."""
        with self._lock:
            kept = self.report
            if kept is not None and report.at < kept.at:
                self.refused["stale"] = self.refused.get("stale", 0) + 1
                return False
            self.report = report
            self.reports += 1
            return True

    def refuse(self, reason: str) -> None:
        """Count a report that was not used, by why."""
        with self._lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1

    def penalty_at(self, now: float, tau: float) -> float:
        """The penalty at clock value ``now``: held until ``penalty_floor_until``, then decaying."""
        penalty = self.penalty
        if penalty == 0.0:
            return 0.0
        start = max(self.stamp, self.penalty_floor_until)
        return decayed(penalty, now - start, tau)

    def estimate_at(self, now: float, tau: float) -> float | None:
        """The latency estimate at clock value ``now``, decayed since its last update (so a
        backend that was slow once is tried again), or None before any measurement."""
        estimate = self.estimate
        return None if estimate is None else decayed(estimate, now - self.stamp, tau)

    def __repr__(self) -> str:
        estimate = "-" if self.estimate is None else f"{self.estimate * 1000:.1f} ms"
        return f"<Load in_flight={self.in_flight} estimate={estimate} penalty={self.penalty:.2f}>"
