"""The attempt loop: the first attempt, then failover or the hedged race.

What lives here: :func:`run_sync` and :func:`run_async`, which every adapter calls once per
request with its :class:`~lbclient._wire.Wire`. They start the request's plan (through the
adapter's configuration), send the first attempt and record what it saw; a request whose first
attempt succeeds touches nothing more. When that attempt failed and the plan may retry, the
remaining attempts run in a tenacity ``Retrying`` (``AsyncRetrying`` for the async transport)
made of the plan's answers (:mod:`lbclient._failover`); a hedged request runs its own race of
attempts (:mod:`lbclient._hedge`).

What may not: an HTTP client (the wire translates), a health or retry rule (the plan's), or
the balancer (the plan talks to it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import AsyncRetrying, Retrying

from lbclient._failover import Failover, asleep, sleep
from lbclient._hedge import hedged
from lbclient._plan import RequestPlan
from lbclient._wire import (
    AsyncWire,
    Wire,
    closed_after_failure,
    final,
    recorded,
    send_async,
    send_sync,
)
from lbclient.backend import Backend

if TYPE_CHECKING:
    from lbclient._config import AdapterConfig

__all__ = ["drive_async", "drive_sync", "run_async", "run_sync"]

_R = TypeVar("_R")


def run_sync(config: AdapterConfig[Any], wire: Wire[_R]) -> _R:
    """One request through ``config``'s balancer: its plan, the first attempt, and failover.

    Returns the last response (a retried status included, when no retry is left), or raises
    the wire's final error for the last failure.
    """
    if config.services_pending:
        config.start_services(wire)
    plan, first = config.start(wire)
    if config.probes is not None:
        # The client's per-request TLS settings, where it has them (requests' verify, cert).
        config.probes.launch(config.services, wire.url, getattr(wire, "probe_tls", None))
    watch = plan.watch
    if watch is None:
        return drive_sync(plan, first, wire)
    try:
        result = drive_sync(plan, first, wire)
    except BaseException as error:
        watch.ended(plan, None, error)  # type: ignore[arg-type]
        raise
    watch.ended(plan, result, None)  # type: ignore[arg-type]
    return result


async def run_async(config: AdapterConfig[Any], wire: AsyncWire[_R]) -> _R:
    """The async twin of :func:`run_sync` (asyncio or trio); hedges when the plan says so."""
    if config.services_pending:
        await config.astart_services(wire)
    plan, first = config.start(wire)
    if config.probes is not None:
        config.probes.alaunch(config.services, wire.url)
    watch = plan.watch
    if watch is None:
        return await drive_async(plan, first, wire)
    try:
        result = await drive_async(plan, first, wire)
    except BaseException as error:
        watch.ended(plan, None, error)  # type: ignore[arg-type]
        raise
    watch.ended(plan, result, None)  # type: ignore[arg-type]
    return result


def drive_sync(plan: RequestPlan, first: Backend, wire: Wire[_R]) -> _R:
    """Send the request to ``first``; if that fails and the plan may retry, fail over through
    a tenacity ``Retrying``."""
    try:
        status, response = send_sync(plan, wire, first)
    except Exception as error:
        failover = _after_failure(plan, wire, error)
    else:
        if not _retried(plan, status):
            return response
        failover = Failover(plan, wire, response, None)
    try:
        return Retrying(sleep=sleep, **failover.strategies())(failover.attempt)
    except Exception as error:
        _fail(plan, wire, error)
        raise


async def drive_async(plan: RequestPlan, first: Backend, wire: AsyncWire[_R]) -> _R:
    """The async twin of :func:`drive_sync`, or the hedged loop for a hedged request."""
    if plan.hedging:
        return await hedged(plan, first, wire)
    try:
        status, response = await send_async(plan, wire, first)
    except Exception as error:
        failover = _after_failure(plan, wire, error)
    else:
        if not _retried(plan, status):
            return response
        failover = Failover(plan, wire, response, None)
    try:
        return await AsyncRetrying(sleep=asleep, **failover.strategies())(failover.aattempt)
    except Exception as error:
        _fail(plan, wire, error)
        raise


def _retried(plan: RequestPlan, status: int) -> bool:
    """Whether the first attempt's response, of ``status``, is followed by another attempt."""
    return plan.retries_status(status) and plan.may_retry()


def _after_failure(
    plan: RequestPlan, wire: Wire[_R] | AsyncWire[_R], error: Exception
) -> Failover[_R]:
    """After the first attempt raised ``error``: the failover, if the plan may retry; else the
    final error is raised (or ``error`` itself, when it is not a failure of the attempt)."""
    if not recorded(plan, error):
        raise error
    if not plan.may_retry():
        raise final(plan, wire, error) from error
    return Failover(plan, wire, None, error)


def _fail(plan: RequestPlan, wire: Wire[Any] | AsyncWire[Any], error: Exception) -> None:
    """After the last attempt raised ``error``: raise the final error if it is a failure the
    plan recorded, or the last failure's if the attempt could not start because the adapter
    was closed (the caller re-raises anything else as it is)."""
    if recorded(plan, error):
        raise final(plan, wire, error) from error
    closed_after_failure(plan, wire, error)
