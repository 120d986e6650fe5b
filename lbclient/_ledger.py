"""The retry budget's account: :class:`Ledger`, one per transport or adapter.

What lives here: the live count of one transport's or adapter's requests, retries, hedges and
exhaustions, and the retry budget's sliding window over them (Finagle's and Envoy's retry
budgets: a ratio of requests plus a reserve per second). What may not: deciding whether a
request retries (the plan asks :meth:`Ledger.can_spend` and :meth:`Ledger.spend`), or a
clock of its own (every method takes ``now``).
"""

from __future__ import annotations

import math
import threading
from typing import Any

from lbclient.retry import RetryBudget, RetryStats

__all__ = ["Ledger"]


class Ledger:
    """The live account of one transport's or adapter's retries: totals, and the retry
    budget's window of requests and retries, in slots of a tenth of the window. The window
    holds the ten slots before the current one as well, so nothing leaves it sooner than
    ``window`` seconds after it happened. Every update is a few additions under a lock never
    held across I/O."""

    __slots__ = (
        "_epochs",
        "_lock",
        "_requests",
        "_spent",
        "_width",
        "budget",
        "exhaustions",
        "hedge_wins",
        "hedges",
        "requests",
        "retries",
    )

    SLOTS = 11  # the current slot and ten whole ones before it

    def __init__(self, budget: RetryBudget | None) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._width = (budget.window if budget is not None else 10.0) / (self.SLOTS - 1)
        self._epochs = [-1] * self.SLOTS
        self._requests = [0] * self.SLOTS
        self._spent = [0] * self.SLOTS
        self.requests = self.retries = self.hedges = self.hedge_wins = self.exhaustions = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"budget": self.budget}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["budget"])  # type: ignore[misc]

    def _slot(self, now: float) -> int:
        """Under the lock: the slot of ``now``, emptied if it last held an older period."""
        epoch = int(now // self._width)
        slot = epoch % self.SLOTS
        if self._epochs[slot] != epoch:
            self._epochs[slot] = epoch
            self._requests[slot] = 0
            self._spent[slot] = 0
        return slot

    def _balance(self, now: float) -> float:
        budget = self.budget
        if budget is None:
            return math.inf
        oldest = int(now // self._width) - self.SLOTS + 1
        requests = spent = 0
        for epoch, n, used in zip(self._epochs, self._requests, self._spent, strict=True):
            if epoch >= oldest:
                requests += n
                spent += used
        return budget.ratio * requests + budget.min_per_second * budget.window - spent

    def deposit(self, now: float) -> None:
        """One request started."""
        epoch = int(now // self._width)
        slot = epoch % self.SLOTS
        with self._lock:  # as _slot, inline: this runs once per request
            self.requests += 1
            if self._epochs[slot] != epoch:
                self._epochs[slot] = epoch
                self._requests[slot] = 0
                self._spent[slot] = 0
            self._requests[slot] += 1

    def can_spend(self, now: float) -> bool:
        """Whether one more retry fits the budget now."""
        return self._balance(now) >= 1

    def refused(self) -> None:
        """A retry was not sent because the budget was empty."""
        with self._lock:
            self.exhaustions += 1

    def spend(self, now: float, hedge: bool = False) -> bool:
        """Take one retry (or hedge) from the budget; False (an exhaustion) if none is left."""
        with self._lock:
            slot = self._slot(now)
            if self._balance(now) < 1:
                self.exhaustions += 1
                return False
            self._spent[slot] += 1
            self.retries += 1
            if hedge:
                self.hedges += 1
            return True

    def won(self) -> None:
        """A hedge's response won its race."""
        with self._lock:
            self.hedge_wins += 1

    def stats(self, now: float) -> RetryStats:
        with self._lock:
            balance = self._balance(now)
            oldest = int(now // self._width) - self.SLOTS + 1
            spent = sum(
                used
                for epoch, used in zip(self._epochs, self._spent, strict=True)
                if epoch >= oldest
            )
            return RetryStats(
                requests=self.requests,
                retries=self.retries,
                hedges=self.hedges,
                hedge_wins=self.hedge_wins,
                exhaustions=self.exhaustions,
                budget_remaining=None if self.budget is None else max(0.0, balance),
                budget_spent=spent,
            )
