"""The discovery interface, its answer, and the two simplest sources: a fixed set and a function.

A source says what the backends are now: :meth:`ServiceDiscovery.discover` (blocking) and
:meth:`ServiceDiscovery.adiscover` (on an event loop) return a :class:`Discovered`, the backends
with their weights and metadata, for how long the answer holds (a DNS TTL), and which parts of
the lookup failed while the rest answered (a DNS record type). Sources raise when they cannot
answer; the refresh that runs them keeps the last good set. Blocking work of the user's (a
:class:`Function`'s plain function, a source's own :meth:`~ServiceDiscovery.discover`) runs on
a :class:`~lbclient._background.Lane`: bounded by the source's ``timeout``, one call at a time.

Backends whose metadata holds an int ``"priority"`` form priority groups (DNS SRV records do):
the refresh gives the balancer the lowest group that can serve. See :mod:`lbclient.discovery`.

A source binds itself to a balancer (:meth:`ServiceDiscovery.bind`) into the refresh job of
:mod:`lbclient.discovery._refresh`; the services layer (:mod:`lbclient._services`, imported
here so that a balancer given a source always finds it) runs that job and starts and stops it.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lbclient._services  # noqa: F401  (installs the services layer: see the module's text)
from lbclient._background import Lane
from lbclient.backend import Backend, shown
from lbclient.selection.base import prepare_backends

if TYPE_CHECKING:
    from lbclient.balancer import LoadBalancer
    from lbclient.discovery._refresh import RefreshJob

__all__ = ["Discovered", "Function", "ServiceDiscovery", "Static"]


def positive(name: str, value: object, zero: bool = False) -> float:
    """``value`` as seconds, if it is a finite number > 0 (>= 0 with ``zero``); else an error
    naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {shown(value)}")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero):
        raise ValueError(
            f"{name} must be a finite number {'>=' if zero else '>'} 0, got {shown(value)}"
        )
    return seconds


def count(name: str, value: object) -> int:
    """``value`` if it is an int >= 1; else an error naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {shown(value)} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {shown(value)}")
    return value


@dataclass(frozen=True, init=False)
class Discovered:
    """One answer of a source: the backends (sorted, each address once), how long it holds,
    and the parts of the lookup that failed while the rest answered.

    ``backends`` may be given as ``Backend`` objects or ``"host:port"`` strings. ``failed``:
    ``(part, why)`` pairs of strings, ``part`` a short name counted in the balancer's snapshot
    and metrics (DNS: the record type, ``"AAAA"``), ``why`` what went wrong. An answer with
    failed parts and no backends proves nothing: the refresh takes it for a failed lookup.
    """

    backends: tuple[Backend, ...]
    #: Seconds until the next lookup (a DNS source: the records' TTL, clamped); None: the
    #: balancer's ``refresh`` interval.
    ttl: float | None = None
    #: The parts of the lookup that failed while the rest answered: ``(part, why)`` pairs.
    failed: tuple[tuple[str, str], ...] = ()

    def __init__(
        self,
        backends: Iterable[Backend | str],
        ttl: float | None = None,
        failed: Iterable[tuple[str, str]] = (),
    ) -> None:
        parts = tuple(failed)
        for part in parts:
            if (
                not isinstance(part, tuple)
                or len(part) != 2
                or not all(isinstance(text, str) and text for text in part)
            ):
                raise TypeError(
                    f"failed must hold (part, why) pairs of non-empty strings, got {shown(part)}"
                )
        object.__setattr__(self, "backends", prepare_backends(backends))
        object.__setattr__(self, "ttl", None if ttl is None else positive("ttl", ttl))
        object.__setattr__(self, "failed", parts)


#: What a function source may return: backends (``Backend`` or ``"host:port"``) or an answer.
Answer = Discovered | Iterable[Backend | str]


def as_discovered(value: object) -> Discovered:
    """A source's return value as an answer; TypeError for anything but backends or one."""
    if isinstance(value, Discovered):
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            "a discovery must return a Discovered or a list of backends "
            f"(Backend or 'host:port'), got {shown(value)}"
        )
    return Discovered(value)


class ServiceDiscovery:
    """Where a balancer's backends come from (Pingora's ``ServiceDiscovery``).

    Give one to ``LoadBalancer(discovery=...)``: once the balancer is started (``with
    balancer:``, ``async with balancer:``), it is looked up once before ``start()`` returns,
    then again every ``refresh`` seconds (or as the answer's ``ttl`` says) on the balancer's
    runner (a thread, or a task of the running asyncio loop), replacing the balancer's backend
    set with what was found. Backends that stay keep their health and load.

    A source of your own subclasses this and implements :meth:`discover` (and, when it can
    wait without blocking, :meth:`adiscover`). Options every source has:

    * ``empty_after``, ``empty_for``: an answer with no backends empties the set only once
      such answers have come ``empty_after`` times in a row (3) over at least ``empty_for``
      seconds from the first of them (10.0); until then the last set stays, and the source
      is asked again sooner. So a file emptied for a moment (an editor's save, a tool that
      truncates then writes) or a name missing for one TTL takes no traffic down. Failed
      lookups in between neither count nor reset them. ``empty_for=0``: the count alone.
    * ``timeout``: seconds one lookup may take (5.0). A source keeps it itself (DNS does, a
      :class:`Function` does) and fails with its own error; a blocking :meth:`discover` of
      your own runs on a thread of its own and is waited for that long, then left to end
      (it is not called again until it has). A lookup still running at twice the timeout and
      a second is cancelled. A first request waits for the first answer at most this long
      (and at most its own timeout).
    * ``failover_interval``: with priority groups, seconds between looks at the health of the
      group in use, and between probes of groups that failed (1.0).
    """

    #: Seconds between lookups when an answer has no ``ttl`` (``LoadBalancer(refresh=...)``
    #: overrides it).
    refresh: float = 30.0
    empty_after: int = 3
    empty_for: float = 10.0
    timeout: float = 5.0
    failover_interval: float = 1.0

    def __init__(
        self,
        *,
        empty_after: int = 3,
        empty_for: float = 10.0,
        timeout: float = 5.0,
        failover_interval: float = 1.0,
    ) -> None:
        self.empty_after = count("empty_after", empty_after)
        self.empty_for = positive("empty_for", empty_for, zero=True)
        self.timeout = positive("timeout", timeout)
        self.failover_interval = positive("failover_interval", failover_interval)

    def discover(self) -> Discovered:
        """The backends now, blocking; raises when it cannot say."""
        raise NotImplementedError

    async def adiscover(self) -> Discovered:
        """The backends now, on the running event loop (by default: :meth:`discover` on a
        thread of its own, within the source's ``timeout``)."""
        return await lane_of(self).run(self.discover, self.timeout, repr(self))

    def bind(self, balancer: LoadBalancer, refresh: float | None = None) -> RefreshJob:
        """The job that keeps ``balancer``'s backends current from this source.
        ``refresh``: seconds between lookups of answers without a TTL (None: the source's
        own, :attr:`refresh`). The services layer calls this once per balancer and runs the
        job while the balancer has users."""
        from lbclient.discovery._refresh import RefreshJob

        return RefreshJob(self, balancer, refresh)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Static(ServiceDiscovery):
    """A fixed set of backends (Pingora's ``Static``): the answer never changes."""

    def __init__(self, backends: Iterable[Backend | str], **options: Any) -> None:
        super().__init__(**options)
        self._found = Discovered(backends)

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The backends, sorted."""
        return self._found.backends

    def discover(self) -> Discovered:
        return self._found

    async def adiscover(self) -> Discovered:
        return self._found

    def __repr__(self) -> str:
        return f"Static({[b.address for b in self._found.backends]!r})"


class Function(ServiceDiscovery):
    """Backends from a function of your own, called with no arguments on every refresh.

    ``fn`` returns backends (``Backend`` objects or ``"host:port"`` strings) or a
    :class:`Discovered`; it raises when it cannot say. It may be an ``async def``: it is awaited
    on the event loop the balancer's runner uses (an asyncio user's own, or the runner
    thread's), and cancelled at the source's ``timeout``. A plain function runs on a thread of
    its own, so it may block (an HTTP call to a registry): past the ``timeout`` the lookup fails
    and the call is left to end by itself (no request waits for it, and ``close()`` or
    ``asyncio.run()`` only a tenth of a second), and the function is not called again until
    it has.
    """

    def __init__(self, fn: Callable[[], Answer | Awaitable[Answer]], **options: Any) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable with no arguments, got {shown(fn)}")
        super().__init__(**options)
        self.fn = fn
        self._lane = Lane()

    def discover(self) -> Discovered:
        value = self.fn()
        if inspect.isawaitable(value):
            value = asyncio.run(_wait(value))
        return as_discovered(value)

    async def adiscover(self) -> Discovered:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        if inspect.iscoroutinefunction(self.fn):
            value: object = self.fn()
        else:
            value = await self._lane.run(self.fn, self.timeout, repr(self))
        if inspect.isawaitable(value):
            try:
                value = await asyncio.wait_for(_wait(value), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise TimeoutError(f"{self!r} did not answer within {self.timeout:g} s") from None
        return as_discovered(value)

    def __repr__(self) -> str:
        return f"Function({getattr(self.fn, '__qualname__', None) or self.fn!r})"


async def _wait(value: Awaitable[Any]) -> Any:
    return await value


def lane_of(source: ServiceDiscovery) -> Lane:
    """The lane on which ``source``'s blocking :meth:`~ServiceDiscovery.discover` runs (made on
    first use: a source of your own need not call ``super().__init__()``)."""
    lane = getattr(source, "_lane", None)
    if not isinstance(lane, Lane):
        lane = Lane()
        source._lane = lane  # type: ignore[attr-defined]
    return lane
