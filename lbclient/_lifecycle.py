"""The port through which a balancer's users start and stop what runs beside it, and the error
for a setting of it that is not one. Kept apart from :mod:`lbclient.balancer`, which re-exports
both; the services layer implements the port.

What may not: I/O, threads, any import of the checks, discovery or services. Part of the core.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Lifecycle", "bad_setting"]


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
