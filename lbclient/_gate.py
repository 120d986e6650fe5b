"""Admission into a backend's connections: at most ``limit`` attempts inside at once (httpx's
``max_connections``), each holding a numbered place (a slot: a connection), the rest waiting in
a first-in, first-out queue with an O(1) hand-off when one leaves.

A connection pool that is handed more requests than it keeps connections wakes and scans all
its waiters on every release, and opens and drops connections beyond its keep-alive limit; under
a thousand concurrent requests its throughput collapses. Queued here instead, a waiting request
costs nothing until its turn, and is handed the place (and the slot, its connection still open)
of the attempt that leaves. A slot given back with nobody waiting is kept (its connection idle)
while fewer than ``keep`` are (httpx's ``max_keepalive_connections``); beyond, the one who gave
it back is told to close its connection. Kept slots are handed out again latest first, so the
connections used last, still warm, are used again and the others may expire.

What lives here: :class:`AsyncGate` (asyncio or trio, one event loop). A wait respects its
timeout (raising TimeoutError) and cancellation; a place handed to a waiter that gave up is
passed on; closing the gate turns every waiter away at once (:class:`GateClosed`), and every
later comer. What may not: anything about HTTP.
"""

from __future__ import annotations

import sys
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

    __slots__ = (
        "_closed",
        "_cold",
        "_free",
        "_keep",
        "_opened",
        "_unkept",
        "_waiters",
        "active",
        "limit",
    )

    def __init__(self, limit: int | None, keep: int | None = None) -> None:
        """At most ``limit`` inside at once, at most ``keep`` slots kept while free (None:
        no limit)."""
        if limit is not None and limit < 1:
            raise ValueError(f"a gate needs a limit of at least 1, got {limit!r}")
        if keep is not None and keep < 0:
            raise ValueError(f"a gate keeps at least 0 slots, got {keep!r}")
        self.limit = sys.maxsize if limit is None else limit
        self._keep = sys.maxsize if keep is None else keep
        #: Attempts inside (admitted, not yet left).
        self.active = 0
        #: Slots given back and kept (their connections idle), the latest last.
        self._free: list[int] = []
        #: Slots given back whose connections were closed; handed out after the kept ones.
        self._cold: list[int] = []
        #: Slots below ``_opened`` in neither list are taken.
        self._opened = 0
        self._waiters: deque[_Turn] = deque()
        self._closed = False
        #: Slots a waiter was handed as it gave up, passed on and not kept: their connections
        #: are to be closed by whoever takes them (:meth:`take_unkept`).
        self._unkept: list[int] = []

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
            if self._cold:
                return self._cold.pop()
            self._opened += 1
            return self._opened - 1
        turn = _Turn()
        self._waiters.append(turn)
        try:
            with anyio.fail_after(timeout):
                await turn.event.wait()
        except BaseException:
            if turn.slot is not None:  # handed over just as this waiter gave up: pass it on
                if not self.leave(turn.slot):  # not kept: its connection is to be closed, by
                    self._unkept.append(turn.slot)  # the caller (nothing may wait here)
            elif turn in self._waiters:
                self._waiters.remove(turn)
            raise
        if turn.slot is None:  # woken by close()
            raise GateClosed
        return turn.slot

    def take_unkept(self) -> list[int]:
        """The slots a waiter that gave up passed on and that were not kept (their connections
        to be closed), taken: each is given once."""
        unkept, self._unkept = self._unkept, []
        return unkept

    def close(self) -> None:
        """Hand out no place any more: every waiter, and every later comer, gets GateClosed."""
        self._closed = True
        waiters, self._waiters = self._waiters, deque()
        for turn in waiters:
            turn.event.set()

    def leave(self, slot: int) -> bool:
        """Give the place and its ``slot`` up: to the first waiter, if any. False when the
        slot is not kept (``keep`` are already free): its connection is to be closed."""
        if self._waiters:
            turn = self._waiters.popleft()
            turn.slot = slot  # the place passes on; ``active`` stays
            turn.event.set()
            return True
        if self.active > 0:
            self.active -= 1
            if len(self._free) >= self._keep:
                self._cold.append(slot)
                return False
            self._free.append(slot)
        return True
