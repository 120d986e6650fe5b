"""Per-backend health: the state, and the passive policy that moves it.

The model is Pingora's: a backend starts healthy and enabled; each observation that disagrees
with its current health adds one to a counter, each one that agrees resets it, and when the
counter reaches the threshold for that direction the health flips. ``ready`` is healthy and
enabled.

One addition, as nginx's ``fail_timeout``: a backend made unhealthy becomes eligible again
``cooldown`` seconds later. The next observation then decides: a success counts toward
recovery, a failure starts a new cool-down. Time is a number passed in by the caller, so every
rule here is a pure function of its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["HealthPolicy", "HealthState"]


@dataclass(frozen=True)
class HealthState:
    """The health of one backend at one moment. Immutable: a change makes a new state."""

    #: False once ``consecutive_failures`` failures in a row were observed.
    healthy: bool = True
    #: False when switched off by hand (:meth:`LoadBalancer.set_enabled`).
    enabled: bool = True
    #: Observations in a row that disagree with ``healthy``.
    consecutive: int = 0
    #: While unhealthy: the clock value from which the backend is eligible again.
    retry_at: float = 0.0

    def ready(self, now: float) -> bool:
        """Whether the backend may be chosen at clock value ``now``."""
        return self.enabled and (self.healthy or now >= self.retry_at)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class HealthPolicy:
    """How passive reports move a backend's health. Immutable; every rule is pure."""

    #: Failures in a row that make a healthy backend unhealthy.
    consecutive_failures: int = 1
    #: Successes in a row that make an unhealthy backend healthy again.
    consecutive_successes: int = 1
    #: Seconds after which an unhealthy backend is eligible again (nginx's ``fail_timeout``).
    cooldown: float = 10.0

    def __post_init__(self) -> None:
        _positive_int("consecutive_failures", self.consecutive_failures)
        _positive_int("consecutive_successes", self.consecutive_successes)
        cooldown = self.cooldown
        if isinstance(cooldown, bool) or not isinstance(cooldown, (int, float)):
            raise TypeError(
                f"cooldown must be a number of seconds, got {cooldown!r} "
                f"({type(cooldown).__name__})"
            )
        if not math.isfinite(cooldown) or cooldown < 0:
            raise ValueError(f"cooldown must be a finite number >= 0, got {cooldown!r}")

    def observe(self, state: HealthState, ok: bool, now: float) -> HealthState:
        """The state after observing one outcome (``ok``) at clock value ``now``."""
        if ok == state.healthy:
            if not ok and now >= state.retry_at:
                # The first request after the cool-down failed: wait another cool-down.
                return replace(state, consecutive=0, retry_at=now + self.cooldown)
            return state if state.consecutive == 0 else replace(state, consecutive=0)
        count = state.consecutive + 1
        threshold = self.consecutive_successes if ok else self.consecutive_failures
        if count < threshold:
            return replace(state, consecutive=count)
        if ok:
            return replace(state, healthy=True, consecutive=0, retry_at=0.0)
        return replace(state, healthy=False, consecutive=0, retry_at=now + self.cooldown)
