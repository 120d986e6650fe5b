"""Keeping a balancer's backends current from a source: the rules of a refresh, and its job.

What lives here: the rules of a refresh as plain values (:func:`clamp_ttl`,
:func:`retry_delay`, :class:`Progress` for failures, backoff, partial answers and the
empty-answer rule, each given the time as ``now``; :class:`Priorities` for priority groups);
and :class:`RefreshJob`, what a source binds itself
into for a balancer: its first lookup (done before the balancer's first start returns) and its
rounds on the balancer's runner (a lookup when due, a look at the health of priority groups
between), each handing the answer to the balancer's public :meth:`update` and its counts to
``report_discovery``.

What may not: the balancer's internals (the job reads ``backends``, ``snapshot()`` and the
``health_check`` setting, and calls ``update()`` and ``report_discovery()``; the balancer
imports nothing from here), threads or tasks of its own (the runner's), starting or stopping
(the services layer's).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio

from lbclient._background import Every
from lbclient.backend import Backend
from lbclient.discovery.base import ServiceDiscovery, as_discovered, positive

if TYPE_CHECKING:
    from lbclient.balancer import LoadBalancer
    from lbclient.discovery.base import Discovered

__all__ = [
    "OVERRUN",
    "RETRY_FIRST",
    "Priorities",
    "Progress",
    "RefreshJob",
    "clamp_ttl",
    "groups_of",
    "retry_delay",
]

logger = logging.getLogger("lbclient")

#: Seconds before the first retry of a failed (or empty) lookup; doubled for each next one, up
#: to the refresh interval.
RETRY_FIRST: Final = 1.0

#: A lookup still running at this many times its ``timeout``, and a second, is cancelled. A
#: source keeps its timeout itself where it can (DNS does, give or take dnspython's pauses
#: between retries) and then fails with its own error, which says why; this catches one that
#: hangs.
OVERRUN: Final = 2.0

#: The job's two kinds of work: a lookup (with probes), or probes and a look at health only.
REFRESH: Final = "refresh"
RECHECK: Final = "recheck"


# -- the rules, as plain values --------------------------------------------------------------


def clamp_ttl(ttl: float, min_ttl: float, max_ttl: float) -> float:
    """``ttl`` seconds, at least ``min_ttl`` and at most ``max_ttl``."""
    return min(max(ttl, min_ttl), max_ttl)


def retry_delay(attempt: int, interval: float, first: float = RETRY_FIRST) -> float:
    """Seconds before lookup number ``attempt`` after a failed (or empty) one: ``first``,
    doubled for each further attempt, never more than ``interval``."""
    if attempt < 1:
        return interval
    return min(interval, first * 2.0 ** min(attempt - 1, 60))


class Progress:
    """What the lookups of one source came to, and what the next answer or failure means:
    whether to take the answer, and how long to wait. Plain values: no clock (the time is
    given as ``now``), no I/O.

    The empty-answer rule: an answer with no backends is taken (emptying the set) only once
    such answers have come ``empty_after`` times in a row and ``empty_for`` seconds have passed
    since the first of them; until then the last set stays, and the next lookup comes sooner
    (backing off, and no later than when ``empty_for`` is up). Failed lookups in between
    neither count nor reset it. An answer with no backends in which a part of the lookup
    failed (:attr:`Discovered.failed <lbclient.discovery.Discovered.failed>`) is a failed
    lookup: it cannot say that there are none.
    """

    def __init__(self, empty_after: int, empty_for: float = 0.0) -> None:
        self.empty_after = empty_after
        self.empty_for = empty_for
        #: Answers received (empty ones included).
        self.refreshes = 0
        #: Lookups that failed, in all.
        self.failures = 0
        #: Lookups that failed since the last answer.
        self.failed = 0
        #: Answers in a row with no backends (failed lookups in between do not count).
        self.empty = 0
        #: When the first of those answers came (None while there is none).
        self.empty_since: float | None = None
        #: Why the latest lookup failed; None once an answer arrives.
        self.error: str | None = None
        #: Parts that failed in answers otherwise taken, counted by part (DNS: "A", "AAAA").
        self.parts: dict[str, int] = {}
        #: What failed in the latest answer, when a part of it did; None once one is whole.
        self.partial: str | None = None

    def answer(
        self,
        backends: int,
        interval: float,
        now: float,
        failed: Sequence[tuple[str, str]] = (),
    ) -> tuple[bool, float]:
        """An answer with ``backends`` backends, normally good for ``interval`` seconds, that
        came at ``now`` with the parts ``failed`` missing: return whether to take it, and the
        seconds until the next lookup."""
        if failed and not backends:
            why = "; ".join(text for _part, text in failed)
            return False, self.failure(
                f"no backends found, and part of the lookup failed: {why}", interval
            )
        self.refreshes += 1
        self.failed = 0
        self.error = None
        for part, _text in failed:
            self.parts[part] = self.parts.get(part, 0) + 1
        self.partial = "; ".join(text for _part, text in failed) or None
        if backends:
            self.empty = 0
            self.empty_since = None
            return True, interval
        self.empty += 1
        if self.empty_since is None:
            self.empty_since = now
        left = self.empty_for - (now - self.empty_since)
        if self.empty >= self.empty_after and left <= 0:
            return True, interval
        delay = retry_delay(self.empty, interval)
        return False, min(delay, left) if left > 0 else delay

    def failure(self, error: str, interval: float) -> float:
        """A failed lookup (``error`` says why); return the seconds until the next one, backing
        off up to ``interval``."""
        self.failures += 1
        self.failed += 1
        self.error = error
        return retry_delay(self.failed, interval)


def priority_of(backend: Backend) -> int | None:
    """The ``"priority"`` in ``backend``'s metadata, if it is an int."""
    value = backend.metadata.get("priority")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def groups_of(backends: Iterable[Backend]) -> dict[int, tuple[Backend, ...]]:
    """``backends`` by priority, lowest first (no priority counts as 0)."""
    groups: dict[int, list[Backend]] = {}
    for backend in backends:
        groups.setdefault(priority_of(backend) or 0, []).append(backend)
    return {p: tuple(groups[p]) for p in sorted(groups)}


class Priorities:
    """Which priority group serves (RFC 2782): the lowest one that can. Plain values.

    The group in use is ``active``. When every backend of it is down, the next higher group
    that is not known to be down takes over, and the group that failed is ``down`` until a
    probe of it succeeds; then the lowest such group takes over again. When every group is
    down, the group in use stays (the balancer's own rules, probes and panic mode, apply).
    """

    def __init__(self) -> None:
        #: The groups of the last answer taken, by priority, lowest first; None before one.
        self.groups: dict[int, tuple[Backend, ...]] | None = None
        self.active: int | None = None
        self.down: set[int] = set()

    def take(self, backends: Sequence[Backend]) -> None:
        """A new answer: regroup (groups that left are forgotten)."""
        self.groups = groups_of(backends)
        self.down &= set(self.groups)

    @property
    def several(self) -> bool:
        """Whether there is more than one group (so health decides which serves)."""
        return self.groups is not None and len(self.groups) > 1

    def choose(
        self, active_down: bool = False, recovered: Iterable[int] = ()
    ) -> tuple[tuple[Backend, ...] | None, str | None]:
        """The backends to serve (None before any answer) and, when the group in use changed
        because of health, a sentence saying so. ``active_down``: every backend of the group
        in use is down; ``recovered``: groups whose probe succeeded."""
        groups = self.groups
        if groups is None:
            return None, None
        self.down.difference_update(recovered)
        if not groups:
            self.active = None
            return (), None
        order = list(groups)
        note = None
        if self.active not in groups:
            self.active = next((p for p in order if p not in self.down), order[0])
        elif active_down and len(order) > 1:
            later = [p for p in order if p > self.active and p not in self.down]
            if later:
                note = (
                    f"every backend of priority {self.active} is down; "
                    f"priority {later[0]} takes over"
                )
                self.down.add(self.active)
                self.active = later[0]
        for p in order:
            if p >= self.active:
                break
            if p not in self.down:
                note = f"priority {p} is back; it takes over from priority {self.active}"
                self.active = p
                break
        return groups[self.active], note


# -- the job ----------------------------------------------------------------------------------


class _Probe(Protocol):
    async def acheck(self, backend: Backend) -> None: ...


@dataclass(frozen=True)
class _Result:
    found: Discovered | None = None
    error: str | None = None
    recovered: frozenset[int] = frozenset()


def describe(error: BaseException) -> str:
    """A short text for a failed lookup."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class RefreshJob:
    """Looks a source up when due, probes failed priority groups, and updates the balancer.

    ``refresh``: seconds between lookups of answers without a TTL (None: the source's own).
    """

    name = "lbclient-discovery"

    def __init__(
        self,
        source: ServiceDiscovery,
        balancer: LoadBalancer,
        refresh: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.balancer = balancer
        self.refresh = positive("refresh", source.refresh if refresh is None else refresh)
        self.timeout = float(source.timeout)
        #: Monotonic seconds: when lookups are due, and how long empty answers have held.
        self.clock = clock
        self.progress = Progress(source.empty_after, float(getattr(source, "empty_for", 0.0)))
        self.priorities = Priorities()
        self._lock = threading.Lock()
        #: The refresh interval of the last answer with backends.
        self._interval = self.refresh
        #: The monotonic time of the next lookup.
        self._due = -math.inf
        #: Whether the answers carry priorities (so the snapshot shows the group in use).
        self._prioritised = False
        self._tcp: _Probe | None = None

    # -- on the runner -------------------------------------------------------------------

    def jobs(self) -> tuple[Every]:
        """The rounds, on the balancer's runner."""
        limit = self.timeout * OVERRUN + 1.0
        return (Every(self.name, self.round, lambda: self.interval, limit),)

    async def prepare(self) -> None:
        """The first lookup, before the balancer's first start returns."""
        await self.lookup()

    async def round(self) -> None:
        """A lookup when one is due; between lookups, with priority groups, a look at the
        health of the group in use and probes of the groups that failed."""
        if self.clock() >= self._due:
            await self.lookup()
        elif self.priorities.several or self.priorities.down:
            await self.recheck()

    async def lookup(self) -> None:
        """Look the source up now (probing failed groups), and take the answer."""
        self._take(await self._work(REFRESH))

    async def recheck(self) -> None:
        """Probe failed groups and look at the health of the group in use, now."""
        self._take(await self._work(RECHECK))

    # -- timing --------------------------------------------------------------------------

    @property
    def interval(self) -> float:
        """Seconds until the next round: the next lookup, or sooner the next look at health."""
        left = max(0.0, self._due - self.clock())
        if self.priorities.several or self.priorities.down:
            return min(left, self.source.failover_interval)
        return left

    @interval.setter
    def interval(self, seconds: float) -> None:
        """Make the next lookup due in ``seconds``."""
        self._due = self.clock() + seconds

    # -- work ----------------------------------------------------------------------------

    async def _work(self, item: str) -> _Result:
        found = error = None
        if item == REFRESH:
            limit = self.timeout * OVERRUN + 1.0
            try:
                # In this task (no task of its own): cancelling the round cancels the lookup.
                with anyio.fail_after(limit):
                    outcome = await self._ask()
            except TimeoutError:  # the limit's own: the source's is in the outcome
                error = f"timed out after {limit:g} s"
            else:
                if isinstance(outcome, Exception):
                    error = describe(outcome)
                else:
                    found = outcome
        suspects = self._suspects()
        ups = await asyncio.gather(*(self._up(group) for _p, group in suspects))
        recovered = frozenset(p for (p, _group), up in zip(suspects, ups, strict=True) if up)
        return _Result(found, error, recovered)

    async def _ask(self) -> Discovered | Exception:
        """The source's answer, or what it raised (a TimeoutError of its own among them)."""
        try:
            return as_discovered(await self.source.adiscover())
        except Exception as exc:
            return exc

    def _suspects(self) -> list[tuple[int, tuple[Backend, ...]]]:
        """The groups that failed, to probe."""
        with self._lock:
            groups = self.priorities.groups or {}
            return [(p, groups[p]) for p in sorted(self.priorities.down) if p in groups]

    def _probe(self) -> _Probe:
        """The balancer's active check, if it has one; a TCP connect otherwise."""
        check: Any = self.balancer.health_check
        if callable(getattr(check, "acheck", None)):
            probe: _Probe = check
            return probe
        if self._tcp is None:
            from lbclient.checks import TcpCheck

            self._tcp = TcpCheck(timeout=self.timeout)
        return self._tcp

    async def _up(self, group: tuple[Backend, ...]) -> bool:
        probe = self._probe()

        async def one(backend: Backend) -> bool:
            try:
                await probe.acheck(backend)
            except Exception:
                return False
            return True

        return any(await asyncio.gather(*(one(b) for b in group)))

    # -- results -------------------------------------------------------------------------

    def _take(self, result: _Result) -> None:
        with self._lock:
            self._take_locked(result)

    def _take_locked(self, result: _Result) -> None:
        progress = self.progress
        now = self.clock()
        kept = len(self.balancer.backends)
        found = result.found
        if result.error is not None:
            delay = progress.failure(result.error, self._interval)
            self._due = now + delay
            self._log_failure(kept, delay)
        elif found is not None:
            interval = self.refresh if found.ttl is None else found.ttl
            failed = progress.failed
            take, delay = progress.answer(len(found.backends), interval, now, found.failed)
            self._due = now + delay
            if progress.failed > failed:  # no backends while a part failed: a failed lookup
                self._log_failure(kept, delay)
            else:
                self._answered(found, interval, take, failed, kept, now)
        self._serve(result.recovered)

    def _log_failure(self, kept: int, delay: float) -> None:
        logger.warning(
            "discovery %r: lookup failed (%d in a row): %s; keeping the last %d backends, "
            "next lookup in %.3g s",
            self.source,
            self.progress.failed,
            self.progress.error,
            kept,
            delay,
        )

    def _answered(
        self, found: Discovered, interval: float, take: bool, failed: int, kept: int, now: float
    ) -> None:
        """An answer came (``failed`` lookups had failed before it): take it, or say why not."""
        source, progress = self.source, self.progress
        if found.backends:
            self._interval = interval
        if failed:
            logger.info("discovery %r: answering again after %d failed lookups", source, failed)
        if progress.partial is not None:
            logger.warning(
                "discovery %r: part of the lookup failed; using the %d backends found: %s",
                source,
                len(found.backends),
                progress.partial,
            )
        if take:
            self.priorities.take(found.backends)
            self._prioritised = any(priority_of(b) is not None for b in found.backends)
            if not found.backends:
                logger.warning(
                    "discovery %r found no backends %d times in a row: the set is empty",
                    source,
                    progress.empty,
                )
        else:
            since = now if progress.empty_since is None else progress.empty_since
            logger.warning(
                "discovery %r found no backends (%d in a row over %.3g s; the set empties after "
                "%d over %.3g s); keeping the last %d",
                source,
                progress.empty,
                now - since,
                progress.empty_after,
                progress.empty_for,
                kept,
            )

    def _serve(self, recovered: frozenset[int]) -> None:
        """Give the balancer the group that serves, and report how the discovery fares."""
        source, progress, priorities = self.source, self.progress, self.priorities
        active_down = priorities.several and self._active_down()
        backends, note = priorities.choose(active_down, recovered)
        if note is not None:
            logger.warning("discovery %r: %s", source, note)
        if backends is not None:
            before = set(self.balancer.backends)
            if self.balancer.update(backends):
                after = set(backends)
                logger.info(
                    "discovery %r: %d backends (%d added, %d removed)",
                    source,
                    len(after),
                    len(after - before),
                    len(before - after),
                )
        self.balancer.report_discovery(
            refreshes=progress.refreshes,
            failures=progress.failures,
            error=progress.error,
            priority=priorities.active if self._prioritised else None,
            part_failures=progress.parts,
            partial=progress.partial,
        )

    def _active_down(self) -> bool:
        """Whether every enabled backend of the group in use is ejected or failing its checks
        (panic mode aside), as the balancer's snapshot shows. Backends switched off by hand
        are left out; a group switched off whole is not down."""
        groups, active = self.priorities.groups, self.priorities.active
        if groups is None or active is None:
            return False
        group = set(groups.get(active, ()))
        seen = [h for h in self.balancer.snapshot().backends if h.backend in group and h.enabled]
        return bool(seen) and not any(h.healthy for h in seen)
