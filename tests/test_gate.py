"""Admission into a backend's connections (lbclient._gate) and the async transport's queue:
places and slots, first-in first-out hand-off, timeouts and cancellation, under asyncio and
trio; and through AsyncLBTransport against real servers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import httpx
import pytest
from conftest import busy_and_idle

from lbclient import AsyncLBTransport
from lbclient._gate import AsyncGate
from lbclient.testing import TestServer

pytestmark = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])


async def settle() -> None:
    """Let every task that can run do so until it waits (a few turns of the event loop)."""
    for _ in range(10):
        await anyio.lowlevel.checkpoint()


@pytest.mark.anyio
async def test_places_are_slots_handed_first_in_first_out(anyio_backend: str) -> None:
    gate = AsyncGate(2)
    assert [await gate.enter(None), await gate.enter(None)] == [0, 1]
    got: list[tuple[str, int]] = []

    async def waiter(name: str) -> None:
        got.append((name, await gate.enter(None)))

    async with anyio.create_task_group() as tg:
        for name in "abc":
            tg.start_soon(waiter, name)
            await settle()
        assert gate.active == 2
        assert got == []
        gate.leave(1)
        await settle()
        assert got == [("a", 1)]
        gate.leave(0)
        gate.leave(1)
    # Handed in queue order (b, then c); woken tasks may run in any order (trio shuffles).
    assert dict(got) == {"a": 1, "b": 0, "c": 1}
    assert gate.active == 2  # the places passed on; nobody left since
    gate.leave(0)
    gate.leave(1)
    assert gate.active == 0
    # Given back 0 then 1: the latest (1, its connection still warm) is handed out first.
    assert [await gate.enter(None), await gate.enter(None)] == [1, 0]


@pytest.mark.anyio
async def test_a_wait_that_times_out_leaves_the_queue(anyio_backend: str) -> None:
    gate = AsyncGate(1)
    slot = await gate.enter(None)
    with pytest.raises(TimeoutError):
        await gate.enter(0.05)
    gate.leave(slot)  # nobody waits any more: the place is free again
    assert gate.active == 0
    assert await gate.enter(0.05) == slot


@pytest.mark.anyio
async def test_a_place_handed_to_a_cancelled_waiter_is_passed_on(anyio_backend: str) -> None:
    gate = AsyncGate(1)
    held = await gate.enter(None)
    got: list[tuple[str, int]] = []
    doomed_scope = anyio.CancelScope()

    async def doomed() -> None:
        with doomed_scope:
            got.append(("doomed", await gate.enter(None)))

    async def patient() -> None:
        got.append(("patient", await gate.enter(None)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(doomed)
        await settle()
        tg.start_soon(patient)
        await settle()
        # The first in line is cancelled, and handed the place before it has run again.
        doomed_scope.cancel()
        gate.leave(held)
    assert got == [("patient", held)]
    assert gate.active == 1


async def handed_as_it_gives_up(
    enter: Callable[[float | None], Awaitable[int]], give_back: Callable[[], object]
) -> object:
    """A waiter (``enter``) cancelled, then handed the place (``give_back``, whose result is
    returned) before it has run again."""
    doomed_scope = anyio.CancelScope()

    async def doomed() -> None:
        with doomed_scope:
            await enter(None)

    async with anyio.create_task_group() as tg:
        tg.start_soon(doomed)
        await settle()
        doomed_scope.cancel()
        given = give_back()
    return given


@pytest.mark.anyio
async def test_a_slot_a_cancelled_waiter_passes_on_unkept_is_to_be_closed(
    anyio_backend: str,
) -> None:
    gate = AsyncGate(1, keep=0)
    held = await gate.enter(None)
    # handed to the waiter, which has not run yet
    assert await handed_as_it_gives_up(gate.enter, lambda: gate.leave(held)) is True
    # It gave up and passed the slot on; nobody waits and none is kept: its connection is to
    # be closed, by whoever takes it, once.
    assert gate.active == 0
    assert gate.take_unkept() == [held]
    assert gate.take_unkept() == []


@pytest.mark.anyio
async def test_the_pools_close_the_connection_a_cancelled_waiter_passed_on_unkept(
    anyio_backend: str,
) -> None:
    from lbclient._pools import AsyncPools

    options = {"http2": False, "max_connections": 1, "max_keepalive_connections": 0}
    pools = AsyncPools(options)
    held = await pools.enter(None)
    pool = pools.pool(held)
    # passed on open, to the waiter
    assert await handed_as_it_gives_up(pools.enter, lambda: pools.give_back(held)) is None
    assert pools.gate.active == 0
    assert held not in pools._pools  # closed (its pool taken out), not left open and idle
    assert pools.pool(held) is not pool
    await pools.aclose()


def test_a_limit_below_one_is_refused(anyio_backend: str) -> None:
    with pytest.raises(ValueError, match="0"):
        AsyncGate(0)


@pytest.mark.anyio
async def test_slots_beyond_keep_are_given_back_cold(anyio_backend: str) -> None:
    gate = AsyncGate(None, keep=1)  # no limit on places; one slot kept while free
    slots = [await gate.enter(0) for _ in range(3)]
    assert slots == [0, 1, 2]
    assert gate.leave(0) is True  # kept: its connection stays, idle
    assert gate.leave(1) is False  # one is kept already: its connection is to be closed
    assert gate.leave(2) is False
    assert gate.active == 0
    # The kept slot first (its connection warm), then the cold ones, then new numbers.
    assert [await gate.enter(0) for _ in range(4)] == [0, 2, 1, 3]


@pytest.mark.anyio
async def test_a_slot_handed_to_a_waiter_is_never_cold(anyio_backend: str) -> None:
    gate = AsyncGate(1, keep=0)
    slot = await gate.enter(None)
    got: list[int] = []

    async def waiter() -> None:
        got.append(await gate.enter(None))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await settle()
        assert gate.leave(slot) is True  # passed on with its connection open
    assert got == [slot]
    assert gate.leave(slot) is False  # nobody waits, none kept: close it


# -- through the transport ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_many_tasks_share_the_kept_connections(anyio_backend: str) -> None:
    with TestServer() as server:
        transport = AsyncLBTransport(
            [server.address], limits=httpx.Limits(max_connections=10, max_keepalive_connections=4)
        )
        async with httpx.AsyncClient(transport=transport) as client:
            statuses: list[int] = []

            async def get() -> None:
                statuses.append((await client.get("http://users/")).status_code)

            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(get)
            (pools,) = transport._pools.values()
            assert len(pools.connections) <= 4  # kept idle: max_keepalive_connections
        assert statuses == [200] * 200
        assert len(server.requests) == 200
        assert len({r.connection for r in server.requests}) <= 10  # max_connections


@pytest.mark.anyio
async def test_a_queued_request_that_times_out_fails_over_as_never_sent(
    anyio_backend: str,
) -> None:
    with busy_and_idle() as (busy, idle, lb, key, release):
        transport = AsyncLBTransport(lb, key=lambda r: key, limits=httpx.Limits(max_connections=1))
        timeout = httpx.Timeout(10.0, pool=0.2)
        async with (
            httpx.AsyncClient(transport=transport, timeout=timeout) as client,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(client.get, "http://users/hold")
            while not busy.requests:
                await anyio.sleep(0.01)
            # The busy backend's one place is taken: the POST waits in its queue, times out
            # there, and, never sent, goes to the idle backend.
            response = await client.post("http://users/x", content=b"body")
            release.set()
        assert response.json()["server"] == "idle"
        assert [r.target for r in busy.requests] == ["/hold"]
        assert idle.count() == 1
