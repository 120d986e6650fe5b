"""Live load per backend: requests in flight, the latency estimate and the failure penalty, with
plain values, then fed by real requests."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading

import httpx
import pytest
import requests
from conftest import NO_EJECTION
from hypothesis import given
from hypothesis import strategies as st

from lbclient import AsyncLBTransport, Backend, LBAdapter, LBTransport, LoadBalancer
from lbclient._load import FAILURE_PENALTY, Load, decayed
from lbclient.testing import Exchange, TestServer


def test_in_flight_loses_no_update_under_threads() -> None:
    load = Load()

    def work() -> None:
        for _ in range(10_000):
            load.begin()
            load.end()

    threads = [threading.Thread(target=work) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert load.in_flight == 0


@given(st.lists(st.booleans(), max_size=200))
def test_in_flight_is_never_negative(steps: list[bool]) -> None:
    load = Load()
    expected = 0
    for begin in steps:
        if begin:
            load.begin()
            expected += 1
        else:
            load.end()
            expected = max(0, expected - 1)
        assert load.in_flight == expected >= 0


def test_the_estimate_jumps_to_a_peak_and_decays_towards_recent_latencies() -> None:
    load = Load()
    assert load.estimate_at(0.0, 10.0) is None
    load.observe(0.0, 0.010, False, tau=10.0)
    assert load.estimate == pytest.approx(0.010)
    load.observe(1.0, 0.500, False, tau=10.0)  # a new peak: taken at once
    assert load.estimate == pytest.approx(0.500)
    load.observe(11.0, 0.010, False, tau=10.0)  # ten seconds later: mostly the recent value
    weight = math.exp(-1.0)
    assert load.estimate == pytest.approx(0.5 * weight + 0.010 * (1 - weight))
    assert load.estimate_at(21.0, 10.0) == pytest.approx(load.estimate * math.exp(-1.0))


def test_a_failure_penalty_decays_and_retry_after_holds_it() -> None:
    load = Load()
    load.observe(0.0, 0.001, True, tau=10.0)
    assert load.penalty_at(0.0, 10.0) == FAILURE_PENALTY
    assert load.penalty_at(10.0, 10.0) == pytest.approx(FAILURE_PENALTY * math.exp(-1.0))
    held = Load()
    held.observe(0.0, 0.001, True, tau=10.0, hold=30.0)
    assert held.penalty_at(29.0, 10.0) == FAILURE_PENALTY
    assert held.penalty_at(40.0, 10.0) == pytest.approx(FAILURE_PENALTY * math.exp(-1.0))
    assert decayed(1.0, 5.0, 0.0) == 0.0


def test_load_survives_update_for_backends_that_stay() -> None:
    lb = LoadBalancer(["10.0.0.1:80", "10.0.0.2:80"])
    stays = Backend("10.0.0.1:80")
    load = lb.begin(stays)
    assert load is not None
    lb.update(["10.0.0.1:80", "10.0.0.3:80"])
    assert lb.load(stays) is load
    assert lb.load("10.0.0.1:80").in_flight == 1
    assert lb.load("10.0.0.3:80").in_flight == 0
    entry = next(b for b in lb.snapshot().backends if b.backend == stays)
    assert entry.in_flight == 1
    assert lb.begin(Backend("10.0.0.2:80")) is None  # gone


def test_a_streamed_body_is_in_flight_until_it_is_read() -> None:
    with TestServer() as server:
        lb = LoadBalancer([server.address])
        with httpx.Client(transport=LBTransport(lb)) as client:
            with client.stream("POST", "http://users/", content=b"x") as response:
                assert lb.load(server.address).in_flight == 1
                response.read()
            assert lb.load(server.address).in_flight == 0
            client.get("http://users/")  # buffered inside the attempt
            assert lb.load(server.address).in_flight == 0
        entry = lb.snapshot().backends[0]
        assert entry.latency is not None
        assert entry.latency > 0
        assert entry.penalty == 0


def test_failures_and_cancelled_attempts_leave_nothing_in_flight() -> None:
    release = threading.Event()
    release.set()  # the busy backend answers at once, until the cancellation below

    def slow(exchange: Exchange) -> bool:
        release.wait(5)
        return exchange.respond()

    with TestServer("close") as closing, TestServer("slow", behaviours={"slow": slow}) as busy:
        lb = LoadBalancer([closing.address, busy.address], health=NO_EJECTION)
        with (
            httpx.Client(transport=LBTransport([closing.address], max_attempts=2)) as client,
            pytest.raises(httpx.RemoteProtocolError),
        ):
            client.get("http://users/")
        with requests.Session() as session:
            session.mount("http://users/", LBAdapter(lb, max_attempts=1))
            for _ in range(4):
                with contextlib.suppress(requests.ConnectionError):
                    session.get("http://users/", timeout=5)
        assert lb.load(closing.address).in_flight == 0
        assert lb.load(closing.address).penalty > 0
        assert lb.load(busy.address).in_flight == 0

        async def cancelled() -> None:
            release.clear()
            transport = AsyncLBTransport([busy.address])
            async with httpx.AsyncClient(transport=transport) as client:
                task = asyncio.ensure_future(client.get("http://users/"))
                while transport.balancer.load(busy.address).in_flight == 0:
                    await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert transport.balancer.load(busy.address).in_flight == 0
            release.set()

        asyncio.run(cancelled())
