"""The discovery interface, its answer, and the two simplest sources: a fixed set and a function.

A source says what the backends are now: :meth:`ServiceDiscovery.discover` (blocking) and
:meth:`ServiceDiscovery.adiscover` (on an event loop) return a :class:`Discovered`, the backends
with their weights and metadata, and for how long the answer holds (a DNS TTL). Sources raise
when they cannot answer; the refresh that runs them keeps the last good set.

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
from lbclient.backend import Backend
from lbclient.selection.base import prepare_backends

if TYPE_CHECKING:
    from lbclient.balancer import LoadBalancer
    from lbclient.discovery._refresh import RefreshJob

__all__ = ["Discovered", "Function", "ServiceDiscovery", "Static"]


def positive(name: str, value: object) -> float:
    """``value`` as seconds, if it is a finite number > 0; else an error naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def count(name: str, value: object) -> int:
    """``value`` if it is an int >= 1; else an error naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True, init=False)
class Discovered:
    """One answer of a source: the backends (sorted, each address once) and how long it holds.

    ``backends`` may be given as ``Backend`` objects or ``"host:port"`` strings.
    """

    backends: tuple[Backend, ...]
    #: Seconds until the next lookup (a DNS source: the records' TTL, clamped); None: the
    #: balancer's ``refresh`` interval.
    ttl: float | None = None

    def __init__(self, backends: Iterable[Backend | str], ttl: float | None = None) -> None:
        object.__setattr__(self, "backends", prepare_backends(backends))
        object.__setattr__(self, "ttl", None if ttl is None else positive("ttl", ttl))


#: What a function source may return: backends (``Backend`` or ``"host:port"``) or an answer.
Answer = Discovered | Iterable[Backend | str]


def as_discovered(value: object) -> Discovered:
    """A source's return value as an answer; TypeError for anything but backends or one."""
    if isinstance(value, Discovered):
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            "a discovery must return a Discovered or a list of backends "
            f"(Backend or 'host:port'), got {value!r}"
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

    * ``empty_after``: answers in a row with no backends that it takes to empty the set; until
      then the last set stays (3). Failed lookups in between neither count nor reset it.
    * ``timeout``: seconds one lookup may take (5.0). A source keeps it itself where it can
      (DNS does) and fails with its own error; a lookup still running at twice that and a
      second is cancelled (a blocking :meth:`discover` on a worker thread is left to end).
    * ``failover_interval``: with priority groups, seconds between looks at the health of the
      group in use, and between probes of groups that failed (1.0).
    """

    #: Seconds between lookups when an answer has no ``ttl`` (``LoadBalancer(refresh=...)``
    #: overrides it).
    refresh: float = 30.0
    empty_after: int = 3
    timeout: float = 5.0
    failover_interval: float = 1.0

    def __init__(
        self,
        *,
        empty_after: int = 3,
        timeout: float = 5.0,
        failover_interval: float = 1.0,
    ) -> None:
        self.empty_after = count("empty_after", empty_after)
        self.timeout = positive("timeout", timeout)
        self.failover_interval = positive("failover_interval", failover_interval)

    def discover(self) -> Discovered:
        """The backends now, blocking; raises when it cannot say."""
        raise NotImplementedError

    async def adiscover(self) -> Discovered:
        """The backends now, on the running event loop (by default: :meth:`discover` on a
        worker thread)."""
        return await asyncio.to_thread(self.discover)

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
    thread's). A plain function runs on a worker thread (of the runner's small pool), so it may
    block (an HTTP call to a registry), within the source's ``timeout``.
    """

    def __init__(self, fn: Callable[[], Answer | Awaitable[Answer]], **options: Any) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable with no arguments, got {fn!r}")
        super().__init__(**options)
        self.fn = fn

    def discover(self) -> Discovered:
        value = self.fn()
        if inspect.isawaitable(value):
            value = asyncio.run(_wait(value))
        return as_discovered(value)

    async def adiscover(self) -> Discovered:
        if inspect.iscoroutinefunction(self.fn):
            value = await self.fn()
        else:
            value = await asyncio.to_thread(self.fn)
            if inspect.isawaitable(value):
                value = await value
        return as_discovered(value)

    def __repr__(self) -> str:
        return f"Function({getattr(self.fn, '__qualname__', None) or self.fn!r})"


async def _wait(value: Awaitable[Answer]) -> Answer:
    return await value
