"""Admission into a backend's connections: at most ``limit`` attempts inside at once, each
holding a numbered place (a slot), the rest waiting in a first-in, first-out queue with an O(1)
hand-off when one leaves.

A connection pool that is handed more requests than it keeps connections wakes and scans all
its waiters on every release, and opens and drops connections beyond its keep-alive limit; under
a thousand concurrent requests its throughput collapses. Queued here instead, a waiting request
costs nothing until its turn, and is handed the place (and the slot) of the attempt that
leaves. Slots given back are handed out again latest first, so the connections used last,
still warm, are used again and the others may expire.

What lives here: :class:`AsyncGate` (asyncio or trio, one event loop). A wait respects its
timeout (raising TimeoutError) and cancellation; a place handed to a waiter that gave up is
passed on; closing the gate turns every waiter away at once (:class:`GateClosed`), and every
later comer. What may not: anything about HTTP.
"""

from __future__ import annotations

from collections import deque

import anyio

__all__ = ["AsyncGate", "GateClosed"]


class GateClosed(Exception):
    """The gate was closed: no place is handed out any more."""


class _Turn:
    """A waiter's place in the queue: its event, and the slot handed to it."""

    __slots__ = ("event", "slot")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.slot: int | None = None


class AsyncGate:
    """Admission for tasks of one event loop."""

    __slots__ = ("_closed", "_free", "_opened", "_waiters", "active", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a gate needs a limit of at least 1, got {limit!r}")
        self.limit = limit
        #: Attempts inside (admitted, not yet left).
        self.active = 0
        #: Slots given back, the latest last; slots below ``_opened`` not here are taken.
        self._free: list[int] = []
        self._opened = 0
        self._waiters: deque[_Turn] = deque()
        self._closed = False

    async def enter(self, timeout: float | None) -> int:
        """Wait for a place, at most ``timeout`` seconds (None: no limit); return its slot,
        a number below ``limit``, held by no one else until it is given back. GateClosed once
        the gate is closed, whether before or during the wait."""
        if self._closed:
            raise GateClosed
        if self.active < self.limit and not self._waiters:
            self.active += 1
            if self._free:
                return self._free.pop()
            self._opened += 1
            return self._opened - 1
        turn = _Turn()
        self._waiters.append(turn)
        try:
            with anyio.fail_after(timeout):
                await turn.event.wait()
        except BaseException:
            if turn.slot is not None:  # handed over just as this waiter gave up: pass it on
                self.leave(turn.slot)
            elif turn in self._waiters:
                self._waiters.remove(turn)
            raise
        if turn.slot is None:  # woken by close()
            raise GateClosed
        return turn.slot

    def close(self) -> None:
        """Hand out no place any more: every waiter, and every later comer, gets GateClosed."""
        self._closed = True
        waiters, self._waiters = self._waiters, deque()
        for turn in waiters:
            turn.event.set()

    def leave(self, slot: int) -> None:
        """Give the place and its ``slot`` up: to the first waiter, if any."""
        if self._waiters:
            turn = self._waiters.popleft()
            turn.slot = slot  # the place passes on; ``active`` stays
            turn.event.set()
        elif self.active > 0:
            self.active -= 1
            self._free.append(slot)
