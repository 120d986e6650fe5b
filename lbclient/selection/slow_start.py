"""Slow start, as Envoy's ``slow_start_config``: a backend that joins the set, or returns from
an ejection, ramps from a minimum share to its full weight over a window.

A value: the algorithms that accept it (``RoundRobin``, ``Random``, ``SmoothRoundRobin``,
``LeastRequest``, ``PeakEWMA``) carry it, and the balancer applies it, with its injected
clock, when it chooses a backend: a ramping backend the algorithm picked is taken with the
probability :meth:`SlowStart.factor` gives, otherwise the next candidate is. Backends of the set
the balancer was made with do not ramp; the key-based algorithms never do (a ramp would move
keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SlowStart", "slow_start_of"]


@dataclass(frozen=True)
class SlowStart:
    """How a new or returning backend ramps up.

    * ``window``: seconds from joining (or returning) to full weight.
    * ``aggression``: the ramp's shape; the share at ``t`` is ``(t / window) ** (1 /
      aggression)``: 1.0 is linear, above 1 ramps faster early (1.0).
    * ``min_weight_percent``: the share, in percent of full weight, it has at least (10.0).
    """

    window: float
    aggression: float = 1.0
    min_weight_percent: float = 10.0

    def __post_init__(self) -> None:
        for name, low in (("window", 0.0), ("aggression", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= low:
                raise ValueError(f"{name} must be a finite number > {low:g}, got {value!r}")
        percent = self.min_weight_percent
        if isinstance(percent, bool) or not isinstance(percent, (int, float)):
            raise TypeError(f"min_weight_percent must be a number, got {percent!r}")
        if not 0 <= percent <= 100:
            raise ValueError(f"min_weight_percent must be in 0..100, got {percent!r}")

    def factor(self, age: float) -> float:
        """The share of its full weight a backend has ``age`` seconds after joining."""
        if age >= self.window:
            return 1.0
        ramp = float((max(age, 0.0) / self.window) ** (1.0 / self.aggression))
        return max(self.min_weight_percent / 100.0, ramp)


def slow_start_of(value: object) -> SlowStart | None:
    """``value`` as a SlowStart: None, a SlowStart, or a window in seconds."""
    if value is None or isinstance(value, SlowStart):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return SlowStart(float(value))
    raise TypeError(f"slow_start must be a SlowStart, a number of seconds or None, got {value!r}")
