"""The port through which a balancer's users start and stop what runs beside it, the methods
that forward to it (:class:`Running`, a base of :class:`~lbclient.LoadBalancer`), and the error
for a setting of it that is not one. Kept apart from :mod:`lbclient.balancer`, which re-exports
them; the services layer implements the port.

What may not: I/O, threads, any import of the checks, discovery or services. Part of the core.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

__all__ = ["Lifecycle", "Running", "bad_setting"]

R = TypeVar("R", bound="Running")


class Lifecycle(Protocol):
    """The port through which a balancer's users start and stop what runs beside it (its
    discovery and active checks): started by the first user, stopped by the last, every start
    paired with its stop. The balancer only forwards :meth:`LoadBalancer.start` and the rest to
    it; lbclient's services layer implements it."""

    def start(self) -> None: ...

    async def astart(self) -> None: ...

    def stop(self) -> None: ...

    async def astop(self) -> None: ...


def bad_setting(name: str, value: object) -> TypeError:
    """The error for a ``health_check`` or ``discovery`` setting that is not one."""
    if name == "health_check":
        return TypeError(f"health_check must be a TcpCheck, an HttpCheck or None, got {value!r}")
    return TypeError(
        "discovery must be a source of lbclient.discovery (Static, DNS, File, or Function(fn) "
        f"around a function of your own) or None, got {value!r}"
    )


class Running:
    """What a balancer's users call to start and stop what runs beside it: forwarded to its
    :class:`Lifecycle` (``_services``; None when nothing runs beside it)."""

    _services: Lifecycle | None = None

    def start(self: R) -> R:
        """Start what runs beside the balancer (its discovery, then its active checks), if
        anything: the discovery is looked up before this returns, the rest runs on a thread.

        Every :meth:`start` needs its :meth:`close`: it runs until the last user closes.
        Returns the balancer.
        """
        if self._services is not None:
            self._services.start()
        return self

    async def astart(self: R) -> R:
        """:meth:`start` for async code: tasks of the running asyncio loop (a thread on
        another async library). Pair with :meth:`aclose`."""
        if self._services is not None:
            await self._services.astart()
        return self

    def close(self) -> None:
        """Stop what runs beside the balancer once every :meth:`start` was closed. When this
        returns, nothing of it runs (an asyncio task is cancelled; prefer :meth:`aclose`
        there)."""
        if self._services is not None:
            self._services.stop()

    async def aclose(self) -> None:
        """:meth:`close` for async code, awaiting the end of what ran."""
        if self._services is not None:
            await self._services.astop()

    def __enter__(self: R) -> R:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    async def __aenter__(self: R) -> R:
        return await self.astart()

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()
