"""The process's CPU utilization, from ``os.times()``: a ready-made ``cpu_utilization`` metric.

What lives here: :class:`CpuUtilization` and its factory :func:`cpu_utilization`. What may
not: a thread of its own (it measures when it is read), HTTP.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, Final

__all__ = ["CpuUtilization", "available_cpus", "cpu_utilization"]

#: Seconds a measurement spans at least; reads in between return the last one.
INTERVAL: Final = 1.0


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system says, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return max(os.cpu_count() or 1, 1)


def _busy(times: Any) -> float:
    return float(times.user + times.system)


class CpuUtilization:
    """The CPU time this process spent (user + system, ``os.times()``) over the wall time
    between two measurements, divided by ``cpus`` (by default the CPUs the process may run
    on), clamped to [0, 1]: 1 is every CPU it may use kept busy by it. A Python process that
    holds the GIL most of the time tops out near ``1 / cpus``; give ``cpus=1`` to read it as a
    share of one CPU instead. Each worker process of a server measures itself only.

    A read measures anew once ``interval`` seconds have passed since the last measurement (the
    first spans the time since the object was made) and returns the last measurement before
    then (0 until the first interval has passed), so reading it on every request costs a
    clock read. ``clock`` and ``times`` are injectable for tests. Thread-safe.
    """

    def __init__(
        self,
        *,
        cpus: float | None = None,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        times: Callable[[], Any] = os.times,
    ) -> None:
        cpus = available_cpus() if cpus is None else cpus
        if not cpus > 0:
            raise ValueError(f"cpus must be > 0, got {cpus!r}")
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval!r}")
        self._cpus = float(cpus)
        self._interval = float(interval)
        self._clock = clock
        self._times = times
        self._lock = threading.Lock()
        self._wall = clock()
        self._busy = _busy(times())
        self._value = 0.0

    @property
    def cpus(self) -> float:
        """What the CPU time is divided by."""
        return self._cpus

    def __call__(self) -> float:
        """The latest measurement, measuring anew if ``interval`` has passed."""
        now = self._clock()
        if now - self._wall < self._interval or not self._lock.acquire(blocking=False):
            return self._value
        try:
            if now - self._wall >= self._interval:  # not measured by another thread meanwhile
                busy = _busy(self._times())
                share = (busy - self._busy) / (now - self._wall) / self._cpus
                self._value = min(max(share, 0.0), 1.0)
                self._wall, self._busy = now, busy
            return self._value
        finally:
            self._lock.release()

    def __repr__(self) -> str:
        return f"CpuUtilization(cpus={self._cpus:g}, interval={self._interval:g})"


def cpu_utilization(
    *,
    cpus: float | None = None,
    interval: float = INTERVAL,
    clock: Callable[[], float] = time.monotonic,
    times: Callable[[], Any] = os.times,
) -> CpuUtilization:
    """A :class:`CpuUtilization` metric, for ``cpu_utilization=`` of the middlewares."""
    return CpuUtilization(cpus=cpus, interval=interval, clock=clock, times=times)
