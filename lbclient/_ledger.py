"""The retry budgets' account: :class:`Ledger`, one per transport or adapter.

What lives here: the live count of one transport's or adapter's requests, retries, requeues,
hedges and exhaustions, and two sliding windows (Finagle's and Envoy's retry budgets: a ratio of
requests plus a reserve per second), one for retries and one for hedges, so that hedging never
takes what failover needs (as Finagle's backup requests have a budget of their own). A retry of
an attempt that never reached a server (a refused connection, a connect timeout, a full pool of
that backend's) is a *requeue*: it adds no load to any server, so it spends from neither window;
``max_attempts`` bounds it per request. What may not: deciding whether a request retries (the
plan asks :meth:`Ledger.can_spend` and :meth:`Ledger.spend`), or a clock of its own (every
method takes ``now``).
"""

from __future__ import annotations

import threading
from typing import Any

from lbclient.retry import RetryBudget, RetryStats

__all__ = ["Ledger"]

#: Slots of one window: the current one and ten whole ones before it.
SLOTS = 11


class _Window:
    """One budget's window of requests and spending, in slots of a tenth of the window. The
    window holds the ten slots before the current one as well, so nothing leaves it sooner than
    ``window`` seconds after it happened. Changed under the ledger's lock."""

    __slots__ = ("budget", "epochs", "requests", "spent", "width")

    def __init__(self, budget: RetryBudget) -> None:
        self.budget = budget
        self.width = budget.window / (SLOTS - 1)
        self.epochs = [-1] * SLOTS
        self.requests = [0] * SLOTS
        self.spent = [0] * SLOTS

    def slot(self, now: float) -> int:
        """The slot of ``now``, emptied if it last held an older period."""
        epoch = int(now // self.width)
        slot = epoch % SLOTS
        if self.epochs[slot] != epoch:
            self.epochs[slot] = epoch
            self.requests[slot] = 0
            self.spent[slot] = 0
        return slot

    def totals(self, now: float) -> tuple[int, int]:
        """(requests, spent) within the window at ``now``."""
        oldest = int(now // self.width) - SLOTS + 1
        requests = spent = 0
        for epoch, n, used in zip(self.epochs, self.requests, self.spent, strict=True):
            if epoch >= oldest:
                requests += n
                spent += used
        return requests, spent

    def balance(self, now: float) -> float:
        budget = self.budget
        requests, spent = self.totals(now)
        return budget.ratio * requests + budget.min_per_second * budget.window - spent


class Ledger:
    """The live account of one transport's or adapter's retries and hedges. Every update is a
    few additions under a lock never held across I/O."""

    __slots__ = (
        "_hedging",
        "_lock",
        "_retrying",
        "_windows",
        "budget",
        "exhaustions",
        "hedge_budget",
        "hedge_wins",
        "hedges",
        "requests",
        "requeues",
        "retries",
    )

    def __init__(self, budget: RetryBudget | None, hedge_budget: RetryBudget | None = None) -> None:
        self.budget = budget
        self.hedge_budget = hedge_budget
        self._lock = threading.Lock()
        self._retrying = None if budget is None else _Window(budget)
        self._hedging = None if hedge_budget is None else _Window(hedge_budget)
        #: The windows there are, for deposits.
        self._windows = tuple(w for w in (self._retrying, self._hedging) if w is not None)
        self.requests = self.retries = self.requeues = 0
        self.hedges = self.hedge_wins = self.exhaustions = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"budget": self.budget, "hedge_budget": self.hedge_budget}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["budget"], state.get("hedge_budget"))  # type: ignore[misc]

    def _window(self, hedge: bool) -> _Window | None:
        return self._hedging if hedge else self._retrying

    def deposit(self, now: float) -> None:
        """One request started."""
        windows = self._windows
        with self._lock:  # as _Window.slot, inline: this runs once per request
            self.requests += 1
            for window in windows:
                epoch = int(now // window.width)
                slot = epoch % SLOTS
                if window.epochs[slot] != epoch:
                    window.epochs[slot] = epoch
                    window.requests[slot] = 0
                    window.spent[slot] = 0
                window.requests[slot] += 1

    def can_spend(self, now: float, hedge: bool = False) -> bool:
        """Whether one more retry (or hedge) fits its budget now."""
        window = self._window(hedge)
        if window is None:
            return True
        with self._lock:
            return window.balance(now) >= 1

    def spend(self, now: float, hedge: bool = False, requeue: bool = False) -> bool:
        """Take one retry (or hedge) from its budget; False (an exhaustion) if none is left. A
        ``requeue`` (the attempt before it never reached a server) is counted and free."""
        window = None if requeue else self._window(hedge)
        with self._lock:
            if window is not None:
                slot = window.slot(now)
                if window.balance(now) < 1:
                    self.exhaustions += 1
                    return False
                window.spent[slot] += 1
            self.retries += 1
            if requeue:
                self.requeues += 1
            if hedge:
                self.hedges += 1
            return True

    def won(self) -> None:
        """A hedge's response won its race."""
        with self._lock:
            self.hedge_wins += 1

    def stats(self, now: float) -> RetryStats:
        with self._lock:
            remaining, spent = _state(self._retrying, now)
            hedge_remaining, hedge_spent = _state(self._hedging, now)
            return RetryStats(
                requests=self.requests,
                retries=self.retries,
                hedges=self.hedges,
                hedge_wins=self.hedge_wins,
                exhaustions=self.exhaustions,
                budget_remaining=remaining,
                budget_spent=spent,
                requeues=self.requeues,
                hedge_budget_remaining=hedge_remaining,
                hedge_budget_spent=hedge_spent,
            )


def _state(window: _Window | None, now: float) -> tuple[float | None, int]:
    """(what is left, what was spent) of ``window`` at ``now``: (None, 0) without a budget."""
    if window is None:
        return None, 0
    return max(0.0, window.balance(now)), window.totals(now)[1]
