"""Admission into a backend's connection pool: at most ``limit`` attempts inside it, the rest
waiting in a first-in, first-out queue with an O(1) hand-off when one leaves.

A connection pool that is handed more requests than it keeps connections wakes and scans all
its waiters on every release, and opens and drops connections beyond its keep-alive limit; under
a thousand concurrent requests its throughput collapses. Queued here instead, a waiting request
costs nothing until its turn, and is handed the place of the attempt that leaves.

What lives here: :class:`AsyncGate` (asyncio or trio, one event loop) and :class:`Gate`
(threads). A wait respects its timeout (raising TimeoutError) and cancellation; a place handed
to a waiter that gave up is passed on. What may not: anything about HTTP.
"""

from __future__ import annotations

import threading
from collections import deque

import anyio

__all__ = ["AsyncGate", "Gate"]


class AsyncGate:
    """Admission for tasks of one event loop."""

    __slots__ = ("_waiters", "active", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Attempts inside (admitted, not yet left).
        self.active = 0
        self._waiters: deque[anyio.Event] = deque()

    async def enter(self, timeout: float | None) -> None:
        """Wait for a place, at most ``timeout`` seconds (None: no limit)."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        turn = anyio.Event()
        self._waiters.append(turn)
        try:
            with anyio.fail_after(timeout):
                await turn.wait()
        except BaseException:
            if turn.is_set():  # the place was handed over as this waiter gave up: pass it on
                self.leave()
            else:
                self._waiters.remove(turn)
            raise

    def leave(self) -> None:
        """Give the place up: to the first waiter, if any."""
        if self._waiters:
            self._waiters.popleft().set()  # the place passes on; ``active`` stays
        elif self.active > 0:
            self.active -= 1


class Gate:
    """Admission for threads."""

    __slots__ = ("_lock", "_waiters", "active", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()
        self._waiters: deque[threading.Event] = deque()

    def enter(self, timeout: float | None) -> None:
        """Wait for a place, at most ``timeout`` seconds (None: no limit)."""
        with self._lock:
            if self.active < self.limit and not self._waiters:
                self.active += 1
                return
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(timeout):
            return
        with self._lock:
            if not turn.is_set():
                self._waiters.remove(turn)
                raise TimeoutError("timed out waiting for a connection to the backend")
        return  # handed over just as the wait ran out: the place is ours

    def leave(self) -> None:
        """Give the place up: to the first waiter, if any."""
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()
            elif self.active > 0:
                self.active -= 1
