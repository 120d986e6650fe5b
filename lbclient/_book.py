"""The health book: where a balancer keeps and changes its backends' health.

What lives here: one cell per backend holding its immutable :class:`HealthState`; the set-wide
counts of one backend set (a :class:`Tally`: disabled, unhealthy, ejected, impaired, panic),
which hears of every change it counts (:meth:`Tally.restate`, for what a view derives from
the backends' availability);
:class:`HealthBook`, through which every change goes (under one lock), applying the rules of
:mod:`lbclient.health`, the ejection limit and panic mode, and delivering ``on_change`` calls in
the order of the changes; and the wording of each change, as pure functions.

What may not: I/O, threads, a clock of its own (the balancer's injected clock is passed in),
selection. Arrows run one way: balancer -> health book -> health rules.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from lbclient._load import Load
from lbclient.backend import Backend
from lbclient.health import (
    BackendHealth,
    HealthPolicy,
    HealthSnapshot,
    HealthState,
    Outcome,
    WatchState,
)

__all__ = ["Cell", "HealthBook", "OnChange", "Tally"]

logger = logging.getLogger("lbclient")

OnChange = Callable[[Backend, bool], object]


class Cell:
    """Holds one backend's current HealthState; replaced by writers in one assignment."""

    __slots__ = ("state",)

    def __init__(self, state: HealthState) -> None:
        self.state = state


def _sound(state: HealthState) -> bool:
    return state.healthy and state.enabled


def _counts(cells: Iterable[Cell]) -> tuple[int, int, int, int]:
    """(disabled, unhealthy, ejected, impaired) over ``cells``: see :class:`Tally`."""
    disabled = unhealthy = ejected = 0
    for cell in cells:
        state = cell.state
        if not state.enabled:
            disabled += 1
        elif not state.healthy:
            unhealthy += 1
            ejected += state.ejected
    # A backend is impaired when it is disabled or, enabled, not healthy.
    return disabled, unhealthy, ejected, disabled + unhealthy


class Tally:
    """The cells of one backend set and its set-wide counts. The counts change after
    construction only under the book's lock; readers read them without it. The balancer's
    view of a backend set is a Tally with the backends and their selector added.

    ``previous``, when given, is the tally of the set this one replaces, read under the book's
    lock: its counts are carried over and adjusted for the cells of the backends that ``left``
    and ``joined`` alone, so that a refresh of a large set costs what changed, not a recount of
    every cell. (A cell that leaves with one backend object and joins with an equal one is in
    both and cancels out.)
    """

    __slots__ = ("cells", "disabled", "ejected", "impaired", "panic", "unhealthy")

    disabled: int
    unhealthy: int
    ejected: int
    impaired: int

    def __init__(
        self,
        cells: dict[Backend, Cell],
        policy: HealthPolicy,
        previous: Tally | None = None,
        left: Iterable[Cell] = (),
        joined: Iterable[Cell] = (),
    ) -> None:
        self.cells = cells
        if previous is None:
            counts = _counts(cells.values())
        else:
            gone, came = _counts(left), _counts(joined)
            counts = (
                previous.disabled - gone[0] + came[0],
                previous.unhealthy - gone[1] + came[1],
                previous.ejected - gone[2] + came[2],
                previous.impaired - gone[3] + came[3],
            )
        #: Backends switched off by hand.
        self.disabled = counts[0]
        #: Enabled backends that are not healthy.
        self.unhealthy = counts[1]
        #: Enabled backends passively ejected: the ejection limit counts these (a backend
        #: switched off by hand never gets its probe, so it must not hold a place).
        self.ejected = counts[2]
        #: Backends not (healthy and enabled). Zero lets select skip health altogether.
        self.impaired = counts[3]
        self.panic = policy.panics(self.healthy, self.enabled)

    @property
    def enabled(self) -> int:
        """Backends not switched off by hand."""
        return len(self.cells) - self.disabled

    @property
    def healthy(self) -> int:
        """Enabled backends that are healthy."""
        return self.enabled - self.unhealthy

    def restate(
        self, backend: Backend, before: HealthState, after: HealthState, flipped: bool
    ) -> None:
        """Told, under the book's lock, that ``backend``'s state went from ``before`` to
        ``after`` (the counts and panic mode already updated; ``flipped``: panic mode flipped
        with it). Nothing here; a view keeps what it derives from availability current."""

    def store(self, cell: Cell, after: HealthState, policy: HealthPolicy) -> bool:
        """Put ``after`` in ``cell`` and update the counts; return whether panic mode flipped."""
        before = cell.state
        cell.state = after
        self.disabled += before.enabled - after.enabled
        self.unhealthy += (after.enabled and not after.healthy) - (
            before.enabled and not before.healthy
        )
        self.ejected += (after.ejected and after.enabled) - (before.ejected and before.enabled)
        self.impaired += _sound(before) - _sound(after)
        panic = policy.panics(self.healthy, self.enabled)
        flipped = panic != self.panic
        self.panic = panic
        return flipped


class HealthBook:
    """Every health change of one balancer goes through here, under :attr:`lock`.

    ``current()`` returns the tally of the current backend set; it is read under the lock, so a
    change is never counted in a set that an update has just replaced. ``on_change(backend,
    healthy)`` is called for every change of a backend's health (and for the first verdict of
    its active checks), in the order of the changes, outside the lock.
    """

    def __init__(
        self,
        policy: HealthPolicy,
        clock: Callable[[], float],
        on_change: OnChange | None,
        current: Callable[[], Tally],
    ) -> None:
        self.policy = policy
        self.clock = clock
        self._current = current
        #: Serialises writers; held briefly, never across a callback or I/O.
        self.lock = threading.Lock()
        self.on_change = on_change
        self._events: deque[tuple[Backend, bool]] = deque()
        self._delivering = threading.Lock()
        #: The parts of the discovery's answers that failed, counted by part, and what failed
        #: in its latest answer (see ``report_discovery``); replaced in one assignment.
        self.discovery_parts: tuple[Mapping[str, int], str | None] = ({}, None)
        #: A watched discovery's state (see ``report_discovery``); None for others.
        self.discovery_watch: WatchState | None = None

    @staticmethod
    def cells(backends: Iterable[Backend], old: Tally | None = None) -> dict[Backend, Cell]:
        """Cells for ``backends``: backends in ``old`` keep their cell (and health), new ones
        start healthy and enabled. Build the new tally under :attr:`lock` when ``old`` is in
        use, so no change to it is lost."""
        previous = {} if old is None else old.cells
        return {b: previous.get(b) or Cell(HealthState()) for b in backends}

    # -- changes ---------------------------------------------------------------------------

    def set_enabled(self, backend: Backend, enabled: bool) -> bool:
        """Switch ``backend`` on or off by hand; False if it is not in the current set."""
        with self.lock:
            tally = self._current()
            cell = tally.cells.get(backend)
            if cell is None:
                return False
            before = cell.state
            if before.enabled == enabled:
                return True
            after = replace(before, enabled=enabled)
            panic = tally.store(cell, after, self.policy)
            tally.restate(backend, before, after, panic)
        if panic:
            _log_panic(tally, self.policy)
        return True

    def observe(self, backend: Backend, outcome: Outcome) -> bool:
        """Record one request's outcome; return whether the backend's health flipped."""
        policy = self.policy
        with self.lock:
            tally = self._current()
            cell = tally.cells.get(backend)
            if cell is None:
                return False
            before = cell.state
            now = self.clock()
            may_eject = tally.ejected < policy.ejection_limit(len(tally.cells))
            after = policy.observe(before, outcome, now, may_eject)
            if after is before:
                return False
            panic = tally.store(cell, after, policy)
            tally.restate(backend, before, after, panic)
            flipped = self._queue(backend, before, after)
        text = report_text(backend.address, before, after, outcome, now, policy)
        if text is not None:
            _emit(text)
        if panic:
            _log_panic(tally, policy)
        self._deliver()
        return flipped

    def check(
        self,
        backend: Backend,
        ok: bool,
        detail: str,
        thresholds: tuple[int, int],
    ) -> bool:
        """Record one active check result; ``thresholds`` are (successes, failures) in a row
        that flip the verdict. Return whether the backend's health flipped."""
        policy = self.policy
        with self.lock:
            tally = self._current()
            cell = tally.cells.get(backend)
            if cell is None:
                return False
            before = cell.state
            after = policy.check(before, ok, *thresholds)
            if ok and after.checked and after.ejected:
                after = policy.restore(after, self.clock())
            if after is before:
                return False
            panic = tally.store(cell, after, policy)
            tally.restate(backend, before, after, panic)
            first = before.checked is None and after.checked is not None
            flipped = self._queue(backend, before, after, first)
        for text in check_texts(backend.address, before, after, ok, detail):
            _emit(text)
        if panic:
            _log_panic(tally, policy)
        self._deliver()
        return flipped

    def claim(self, tally: Tally, backend: Backend, now: float) -> bool:
        """Take the probe of ejected ``backend`` if it is due; return whether this caller got
        it. The counts do not change: a probing backend is still ejected and unhealthy."""
        with self.lock:
            cell = tally.cells[backend]
            before = cell.state
            after = self.policy.claim_probe(before, now)
            if after is None:
                return False
            cell.state = after
            tally.restate(backend, before, after, False)
            live = self._current()
            if live is not tally and live.cells.get(backend) is cell:  # an update came between
                live.restate(backend, before, after, False)
        logger.info("backend %s: ejection over, sending a probe request", backend.address)
        return True

    # -- reading ---------------------------------------------------------------------------

    def snapshot(
        self,
        backends: Iterable[Backend],
        tally: Tally,
        loads: Mapping[Backend, Load],
        decay: float,
        discovery: tuple[int, int, str | None, int | None] = (0, 0, None, None),
    ) -> HealthSnapshot:
        """Every backend's health and load, and whether panic mode is on, as of now;
        ``discovery`` is what the balancer's discovery last reported (refreshes, failures,
        error, priority); :attr:`discovery_parts` adds the parts that failed."""
        now = self.clock()
        panic = tally.panic
        items = []
        for backend in backends:
            s = tally.cells[backend].state
            until = s.ejected_until
            load = loads[backend]
            report = load.report
            items.append(
                BackendHealth(
                    backend=backend,
                    ready=s.enabled if panic else s.ready(now),
                    healthy=s.healthy,
                    enabled=s.enabled,
                    ejected=s.ejected,
                    ejected_until=until,
                    ejection_remaining=None if until is None else max(0.0, until - now),
                    probing=s.probe_until is not None and now < s.probe_until,
                    ejections=self.policy.decayed(s, now),
                    consecutive_failures=s.consecutive_failures,
                    consecutive_5xx=s.consecutive_5xx,
                    checked=s.checked,
                    in_flight=load.in_flight,
                    latency=load.estimate_at(now, decay),
                    penalty=load.penalty_at(now, decay),
                    report=report,
                    report_age=None if report is None else max(0.0, now - report.at),
                    reports=load.reports,
                    reports_refused=dict(load.refused),
                )
            )
        parts, partial = self.discovery_parts
        return HealthSnapshot(
            now, panic, tuple(items), *discovery, dict(parts), partial, self.discovery_watch
        )

    # -- on_change -------------------------------------------------------------------------

    def _queue(
        self, backend: Backend, before: HealthState, after: HealthState, first: bool = False
    ) -> bool:
        """Under the lock: queue the on_change call for a change, in the order of the changes.
        Return whether health flipped."""
        healthy = after.healthy
        flipped = healthy != before.healthy
        if (flipped or first) and self.on_change is not None:
            self._events.append((backend, healthy))
        return flipped

    def _deliver(self) -> None:
        """Call on_change for queued changes, in order, one thread at a time. A thread that
        finds another delivering leaves its events to it; a callback that changes health
        itself has its own event delivered after it returns."""
        callback = self.on_change
        events = self._events
        while events and callback is not None:
            if not self._delivering.acquire(blocking=False):
                return
            try:
                while events:
                    backend, healthy = events.popleft()
                    try:
                        callback(backend, healthy)
                    except Exception:
                        logger.exception(
                            "on_change callback failed for backend %s", backend.address
                        )
            finally:
                self._delivering.release()


# -- the wording of each change: pure ---------------------------------------------------------

#: A log record to make: (level, format, arguments).
LogText = tuple[int, str, tuple[object, ...]]


def _emit(text: LogText) -> None:
    level, message, args = text
    logger.log(level, message, *args)


def _times(count: int, what: str) -> str:
    return f"1 {what}" if count == 1 else f"{count} {what}s in a row"


def report_text(
    address: str,
    before: HealthState,
    after: HealthState,
    outcome: Outcome,
    now: float,
    policy: HealthPolicy,
) -> LogText | None:
    """The log record for a change a request's outcome made, or None if it needs none."""
    if after.ejected_until is not None and after.ejected_until != before.ejected_until:
        if before.ejected:
            why = "its probe request failed"
        elif outcome is Outcome.SERVER_ERROR and not policy.combine_failures:
            why = _times(before.consecutive_5xx + 1, "server error")
        else:
            why = _times(before.consecutive_failures + 1, "failure")
        return (
            logging.WARNING,
            "backend %s ejected for %g s after %s (ejection %d)",
            (address, after.ejected_until - now, why, after.ejections),
        )
    if before.ejected and not after.ejected:
        return (logging.INFO, "backend %s restored: its probe request succeeded", (address,))
    return None


def check_texts(
    address: str, before: HealthState, after: HealthState, ok: bool, detail: str
) -> list[LogText]:
    """The log records for a change an active check result made."""
    texts: list[LogText] = []
    if after.checked != before.checked:
        if after.checked:
            texts.append((logging.INFO, "backend %s passes its health check", (address,)))
        else:
            texts.append(
                (logging.WARNING, "backend %s fails its health check: %s", (address, detail))
            )
    elif not ok:
        texts.append((logging.DEBUG, "backend %s health check failed: %s", (address, detail)))
    if before.ejected and not after.ejected:
        texts.append((logging.INFO, "backend %s restored: its health check passed", (address,)))
    return texts


def panic_text(tally: Tally, policy: HealthPolicy) -> LogText:
    """The log record for panic mode turning on or off."""
    if tally.panic:
        return (
            logging.WARNING,
            "panic mode on: %d of %d backends healthy, below %g%%; ignoring health",
            (tally.healthy, tally.enabled, policy.panic_threshold),
        )
    return (
        logging.INFO,
        "panic mode off: %d of %d backends healthy",
        (tally.healthy, tally.enabled),
    )


def _log_panic(tally: Tally, policy: HealthPolicy) -> None:
    _emit(panic_text(tally, policy))
