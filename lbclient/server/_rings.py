"""The pure-Python tracker's latency rings: the latest latencies of the requests that found one
number in flight, the nearest fresh ring to a number, and a median (the compiled counter keeps
its own, by the same rules: see lbclient/server/_counting.c).

What lives here: the rings and the two reads of them. What may not: counting, clocks, locks.
"""

from __future__ import annotations

import math

__all__ = ["Ring", "median", "nearest"]


class Ring:
    """The latest ``size`` latencies of the requests that found one number in flight, and when
    the newest came (never: minus infinity)."""

    __slots__ = ("last", "next", "samples", "size")

    def __init__(self, size: int) -> None:
        self.samples: list[float] = []
        self.size = size
        self.next = 0  # where the next sample goes once the ring is full
        self.last = -math.inf


def nearest(found: list[Ring], key: int, oldest: float) -> Ring | None:
    """Of the rings with latencies whose newest came at ``oldest`` or later, the one of the
    nearest number found below ``key``, else the nearest above (None: no such ring)."""
    for number in range(min(key, len(found)) - 1, -1, -1):
        ring = found[number]
        if ring.last >= oldest and ring.samples:
            return ring
    for number in range(key + 1, len(found)):
        ring = found[number]
        if ring.last >= oldest and ring.samples:
            return ring
    return None


def median(samples: list[float]) -> float:
    """The median of ``samples`` (sorted in place; 0 for none)."""
    samples.sort()
    count = len(samples)
    if count == 0:
        return 0.0
    if count % 2:
        return samples[count // 2]
    return (samples[count // 2 - 1] + samples[count // 2]) / 2
