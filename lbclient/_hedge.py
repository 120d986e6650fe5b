"""The hedged loop: attempts that race, for the async transport.

What lives here: :func:`hedged`. After ``hedge_after`` seconds without a response head, the
next candidate gets the request too; the first head that is not a status to retry wins, the
others are cancelled (their connections closed, never returned to a pool mid-response), and
any response that arrived too late is closed. Failures are retried as in the plain loop, when
no attempt is in flight any more. Every outcome is recorded by the loop's attempt step, every
backend and retry taken through the plan's ``take``.

What may not: tenacity (racing attempts are not a sequence of retries), a rule of its own, or
an HTTP client.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import anyio
import anyio.abc

from lbclient._plan import EXHAUSTED, RequestPlan
from lbclient._wire import AsyncWire, closed_after_failure, final, send_async
from lbclient.backend import Backend
from lbclient.errors import TransportClosed

__all__ = ["hedged"]

_R = TypeVar("_R")

#: What an attempt task hands the loop: its backend, its (status, response), or its error.
_Outcome = tuple[Backend, "tuple[int, Any] | None", "Exception | None"]


async def hedged(plan: RequestPlan, first: Backend, wire: AsyncWire[_R]) -> _R:
    """Race attempts for one hedged request, starting with ``first``."""
    hedge_after = plan.policy.hedge_after
    assert hedge_after is not None
    counted = False  # an empty budget that kept a hedge back, once per request
    sender, receiver = anyio.create_memory_object_stream[_Outcome](math.inf)
    in_flight: list[Backend] = []  # one entry per attempt racing (a backend may have two)
    spare: _R | None = None  # a response with a status to retry, returned if nothing better
    last_error: Exception | None = None

    async def attempt(backend: Backend, pause: float) -> None:
        if pause > 0:
            try:
                await anyio.sleep(pause)
            except BaseException:  # cancelled while waiting: it lost the race
                plan.abandon(backend)
                raise
        try:
            seen = await send_async(plan, wire, backend)
        except Exception as error:
            sender.send_nowait((backend, None, error))
        else:
            sender.send_nowait((backend, seen, None))

    def launch(group: anyio.abc.TaskGroup, backend: Backend, pause: float = 0.0) -> None:
        in_flight.append(backend)
        group.start_soon(attempt, backend, pause)

    winner: _R | None = None
    closed: Exception | None = None  # the transport's closed error kept the next attempt back
    try:
        async with anyio.create_task_group() as group:
            launch(group, first)
            while in_flight:
                outcome: _Outcome | None = None
                refusal = plan.hedge_refusal()
                if not refusal or (refusal == EXHAUSTED and not counted):
                    with anyio.move_on_after(hedge_after):
                        outcome = await receiver.receive()
                    if outcome is None:  # no head yet: hedge, if the plan takes one
                        refusal = plan.hedge_refusal()
                        if not refusal or refusal == EXHAUSTED:
                            hedge = plan.take(hedge=True)  # spends, or counts an exhaustion
                            if hedge is not None:
                                launch(group, hedge, plan.pause)
                            elif plan.stopped == EXHAUSTED:
                                counted = True
                        continue
                else:
                    outcome = await receiver.receive()
                backend, seen, error = outcome
                in_flight.remove(backend)
                if error is not None:
                    if not any(a.error is error for a in plan.attempts):
                        if isinstance(error, TransportClosed):
                            if in_flight:  # a hedge the close kept back: those in flight
                                continue  # decide
                            closed = error  # raised below, out of the task group
                            group.cancel_scope.cancel()
                            break
                        raise error  # not a failure of the attempt: it propagates as it is
                    last_error = error
                else:
                    assert seen is not None
                    status, response = seen
                    if not plan.retries_status(status):
                        winner = response
                        if backend != first and plan.ledger is not None:
                            plan.ledger.won()
                        group.cancel_scope.cancel()
                        break
                    if spare is not None:
                        await wire.discard(spare)
                    spare = response
                    if in_flight:  # others race on, one may wait for its connection: closed,
                        await wire.discard(spare)  # as the failover closes a retried one
                        spare = None
                last = next(a for a in reversed(plan.attempts) if a.backend == backend)
                if not in_flight:
                    following = plan.take() if plan.may_retry(last) else None
                    if following is not None:
                        if spare is not None:  # closed first, as the failover does: it may
                            await wire.discard(spare)  # hold the connection the next needs
                            spare = None
                        launch(group, following, plan.pause)
    except BaseException:
        # Cancelled from outside (or failed) with a response in hand: none may keep its
        # connection, whose slot would be lost to the backend's limit for good.
        with anyio.CancelScope(shield=True):
            for kept in (winner, spare):
                if kept is not None:
                    await wire.discard(kept)
        raise
    finally:
        sender.close()
        with anyio.CancelScope(shield=True):  # every late response closed, cancelled or not
            async for _backend, late, _error in receiver:
                if late is not None and late[1] is not winner:
                    await wire.discard(late[1])
        receiver.close()
    if closed is not None:
        if spare is not None:
            with anyio.CancelScope(shield=True):
                await wire.discard(spare)
        closed_after_failure(plan, wire, closed)
        raise closed
    if winner is not None:
        if spare is not None:
            with anyio.CancelScope(shield=True):
                await wire.discard(spare)
        return winner
    if spare is not None:
        return spare
    assert last_error is not None
    raise final(plan, wire, last_error) from last_error
