"""Failover through tenacity, the loop that records every outcome, and a plan whose questions
change nothing: with real servers on loopback where a client is involved, plain values where
the loop alone is."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import httpx
import pytest
import requests
import tenacity
from conftest import NO_EJECTION, FakeWire

import lbclient
from lbclient import (
    AsyncLBTransport,
    Hash,
    HealthPolicy,
    LBAdapter,
    LBTransport,
    LoadBalancer,
    RetryBudget,
    RetryPolicy,
)
from lbclient._ledger import Ledger
from lbclient._loop import drive_sync
from lbclient._observe import WatchedPlan
from lbclient._plan import Fault, RequestPlan
from lbclient.retry import Failure
from lbclient.testing import TestServer, closed_port

PACKAGE = Path(lbclient.__file__).parent


@pytest.fixture
def tenacity_objects(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every tenacity controller and retry state made while the test runs."""
    made: list[object] = []
    for cls in (tenacity.BaseRetrying, tenacity.RetryCallState):
        original = cls.__init__

        def counting(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> None:
            made.append(self)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting)
    return made


@pytest.fixture
def ok() -> Iterator[TestServer]:
    with TestServer(name="ok") as server:
        yield server


def first_pick(lb: LoadBalancer, address: str) -> str:
    """A key whose first pick in ``lb`` is ``address``."""
    return next(
        f"k{i}"
        for i in range(10_000)
        if lb.select(f"k{i}").address == address  # type: ignore[union-attr]
    )


def dead_then_ok(ok: TestServer) -> tuple[LoadBalancer, Callable[[object], str]]:
    """A balancer of a closed port and ``ok``, and a key function whose first pick is the
    closed port."""
    dead = f"127.0.0.1:{closed_port()}"
    lb = LoadBalancer([dead, ok.address], Hash, health=NO_EJECTION)
    key = first_pick(lb, dead)
    return lb, lambda request: key


# -- failover runs in tenacity; a first-attempt success touches none of it ----------------------


def test_a_failover_runs_in_a_tenacity_retrying_and_a_success_makes_none(
    ok: TestServer, tenacity_objects: list[object]
) -> None:
    with httpx.Client(transport=LBTransport([ok.address]), base_url="http://users") as client:
        for _ in range(5):
            assert client.get("/").status_code == 200
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter([ok.address]))
        assert session.get("http://users/").status_code == 200
    assert tenacity_objects == []  # the first attempt succeeded: no tenacity object at all
    lb, key = dead_then_ok(ok)
    with httpx.Client(transport=LBTransport(lb, key=key), base_url="http://users") as client:
        assert client.get("/").json()["server"] == "ok"
    assert [type(o) for o in tenacity_objects if isinstance(o, tenacity.BaseRetrying)] == [
        tenacity.Retrying
    ]
    tenacity_objects.clear()
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter(lb, key=key))
        assert session.get("http://users/").json()["server"] == "ok"
    assert [type(o) for o in tenacity_objects if isinstance(o, tenacity.BaseRetrying)] == [
        tenacity.Retrying
    ]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_failover_runs_in_an_async_retrying_on_asyncio_and_trio(
    ok: TestServer, tenacity_objects: list[object], backend: str
) -> None:
    dead = f"127.0.0.1:{closed_port()}"

    async def main() -> tuple[int, str]:
        # One dead backend and three attempts: the second and third revisit it, after a
        # backoff slept through anyio (trio has no asyncio.sleep).
        transport = AsyncLBTransport([dead], max_attempts=3, policy=None)
        async with httpx.AsyncClient(transport=transport, base_url="http://users") as client:
            with pytest.raises(httpx.ConnectError) as caught:
                await client.get("/")
        attempts = len(caught.value.attempts)  # type: ignore[attr-defined]
        lb, key = dead_then_ok(ok)
        async with httpx.AsyncClient(transport=AsyncLBTransport(lb, key=key)) as client:
            return attempts, (await client.get("http://users/")).json()["server"]

    assert anyio.run(main, backend=backend) == (3, "ok")
    controllers = [type(o) for o in tenacity_objects if isinstance(o, tenacity.BaseRetrying)]
    assert controllers == [tenacity.AsyncRetrying, tenacity.AsyncRetrying]


# -- a policy's own tenacity strategies compose, never override ---------------------------------


def test_a_users_stop_wait_and_hooks_compose_and_are_called() -> None:
    dead = [f"127.0.0.1:{closed_port()}" for _ in range(4)]
    waited: list[int] = []
    seen_after: list[int] = []
    seen_before_sleep: list[tuple[int, float]] = []

    def wait(state: tenacity.RetryCallState) -> float:
        waited.append(state.attempt_number)
        return 0.001

    policy = RetryPolicy(
        max_attempts=5,
        stop=tenacity.stop_after_attempt(2),  # the user's stop ends it sooner than ours
        wait=wait,
        after=lambda state: seen_after.append(state.attempt_number),
        before_sleep=lambda state: seen_before_sleep.append(
            (state.attempt_number, state.upcoming_sleep)
        ),
    )
    transport = LBTransport(LoadBalancer(dead, Hash, health=NO_EJECTION), policy=policy)
    with httpx.Client(transport=transport) as client, pytest.raises(httpx.ConnectError) as caught:
        client.get("http://users/")
    attempts = caught.value.attempts  # type: ignore[attr-defined]
    assert len(attempts) == 2  # attempt numbers count the request's first attempt as 1
    assert waited == [1, 2]  # asked before each possible retry (drawn once each)
    assert seen_after == [1, 2]
    assert seen_before_sleep == [(1, 0.001)]  # the longer of lbclient's (0) and the user's
    assert "stop_after_attempt" in str(caught.value)  # the final error says who stopped it


def test_a_users_retry_strategy_narrows_lbclients_and_never_widens_it() -> None:
    resets = [TestServer("close", name=f"closing{i}").start() for i in range(2)]
    try:
        addresses = [s.address for s in resets]
        forever = RetryPolicy(
            max_attempts=10,
            retry=tenacity.retry_always,  # would retry anything
            stop=tenacity.stop_never,
            wait=tenacity.wait_none(),
        )
        with (
            httpx.Client(transport=LBTransport(addresses, policy=forever)) as client,
            pytest.raises(httpx.RemoteProtocolError),
        ):
            client.post("http://users/", content=b"pay once")
        with requests.Session() as session:
            session.mount("http://users/", LBAdapter(addresses, policy=forever))
            with pytest.raises(requests.ConnectionError):
                session.post("http://users/", data=b"pay once")
        # The POST may have reached the server: sent once each time, whatever the user said.
        assert sum(s.count("POST") for s in resets) == 2
        # A user's retry that refuses: a GET lbclient would retry is not.
        never = RetryPolicy(retry=tenacity.retry_if_exception_type(httpx.ConnectError))
        with (
            httpx.Client(transport=LBTransport(addresses, policy=never)) as client,
            pytest.raises(httpx.RemoteProtocolError) as caught,
        ):
            client.get("http://users/")
        assert len(caught.value.attempts) == 1  # type: ignore[attr-defined]
        assert sum(s.count("GET") for s in resets) == 1
        assert "retry_if_exception_type" in str(caught.value)
    finally:
        for s in resets:
            s.close()


def test_before_sleep_log_logs_each_revisit(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.failover")
    dead = f"127.0.0.1:{closed_port()}"
    policy = RetryPolicy(
        max_attempts=3, backoff=0.001, before_sleep=tenacity.before_sleep_log(log, logging.INFO)
    )
    with (
        caplog.at_level(logging.INFO, logger="test.failover"),
        httpx.Client(transport=LBTransport([dead], policy=policy)) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.get("http://users/")
    lines = [r.getMessage() for r in caplog.records if r.name == "test.failover"]
    assert len(lines) == 2  # attempts 2 and 3 revisit the one backend
    assert all("ConnectError" in line and "Retrying" in line for line in lines)


def test_a_users_stop_after_delay_counts_from_the_request_start(ok: TestServer) -> None:
    hang = TestServer("hang", name="hang").start()
    try:
        lb = LoadBalancer([hang.address, ok.address], Hash, health=NO_EJECTION)
        key = first_pick(lb, hang.address)
        policy = RetryPolicy(stop=tenacity.stop_after_delay(0.05), attempt_timeout=0.2)
        transport = LBTransport(lb, key=lambda r: key, policy=policy)
        # The first attempt alone takes 0.2 s: by the user's clock the request is out of time.
        with httpx.Client(transport=transport) as client, pytest.raises(httpx.ReadTimeout):
            client.get("http://users/")
        assert ok.count() == 0
    finally:
        hang.close()


# -- the loop records every outcome ---------------------------------------------------------


def test_the_loop_records_what_a_silent_wire_saw() -> None:
    lb = LoadBalancer(
        ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"],
        Hash,
        health=HealthPolicy(consecutive_5xx=1, consecutive_failures=2),
    )
    policy = RetryPolicy(retry_statuses={503}, max_attempts=3)
    plan = RequestPlan(lb, b"k", "GET", True, policy)
    first = plan.take()
    assert first is not None
    wire = FakeWire([Fault(Failure.NEVER_SENT)], [503, 200])  # sends nothing, records nothing
    assert drive_sync(plan, first, wire).startswith("200 from ")
    refused, failing, answered = wire.seen
    # Health: a connection failure counted, a 503 ejected (consecutive_5xx=1), a 200 fine.
    assert lb.health(refused).consecutive_failures == 1
    assert lb.health(failing).ejected
    assert lb.health(answered).consecutive_failures == 0
    # Load: every attempt is out of flight, and the responses fed the latency estimate.
    assert all(lb.load(b).in_flight == 0 for b in wire.seen)
    assert lb.load(answered).estimate is not None
    assert [a.status for a in plan.attempts] == [None, 503, 200]


# -- deciding is pure ----------------------------------------------------------------------------


class Told:
    """A watch that records every call made to it."""

    steps = True
    propagates = True

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        def record(*args: object) -> None:
            self.calls.append(name)

        return record


def test_the_plans_questions_leave_the_ledger_and_the_watch_untouched() -> None:
    now = [0.0]
    lb = LoadBalancer(
        ["10.0.0.1:80", "10.0.0.2:80"],
        Hash,
        health=HealthPolicy(consecutive_failures=1, base_ejection_time=1, panic_threshold=0),
        clock=lambda: now[0],
    )
    empty = RetryBudget(ratio=0, min_per_second=0, window=1)
    ledger = Ledger(empty, empty)  # nothing to spend, for retries nor hedges
    plan = WatchedPlan(
        lb,
        b"k",
        "GET",
        True,
        RetryPolicy(hedge_after=0.1, deadline=5),
        clock=lambda: now[0],
        ledger=ledger,
    )
    watch = Told()
    plan.watch, plan.faults, plan.latest = watch, None, None  # type: ignore[assignment]
    first = plan.take()
    assert first is not None
    other = next(b for b in lb.backends if b != first)
    lb.report(other, False)  # ejected for 1 s; after it, its probe is due
    now[0] = 2.0
    plan.failed(first, Fault(Failure.MAYBE_SENT), ConnectionError("reset"))
    watch.calls.clear()
    before = ledger.stats(now[0])
    for _ in range(3):
        plan.may_retry()
        plan.refusal()
        plan.hedge_refusal()
        plan.wait()
        plan.remaining()
        plan.buffer_limit()
        plan.timeouts({"read": 10.0}, other)
        plan.retries_maybe_sent()
        plan.describe()
    assert ledger.stats(now[0]) == before  # nothing spent, no exhaustion counted
    assert watch.calls == []  # no observer told
    assert not lb.snapshot().backends[lb.backends.index(other)].probing  # no probe claimed
    assert plan.hedge_refusal() == "the retry budget is exhausted"
    assert plan.take() is None  # taking is the step that counts, and tells
    assert ledger.stats(now[0]).exhaustions == 1
    assert watch.calls == ["refused"]


# -- the adapters cross into the loop at most four times for a buffered GET ---------------------


ADAPTERS = {str(PACKAGE / "httpx_transport.py"), str(PACKAGE / "requests_adapter.py")}
LOOP = {
    str(PACKAGE / name)
    for name in (
        "_loop.py",
        "_wire.py",
        "_failover.py",
        "_hedge.py",
        "_config.py",
        "_plan.py",
        "_observe.py",
        "_ledger.py",
    )
}


class Crossings:
    """Python calls between an adapter module and the loop's modules while it is on (a
    coroutine's resumption is not a new call: each frame counts once)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._frames: list[FrameType] = []  # kept alive, so that no id is reused

    def _profile(self, frame: FrameType, event: str, arg: object) -> None:
        if event != "call" or frame.f_back is None or any(f is frame for f in self._frames):
            return
        callee, caller = frame.f_code.co_filename, frame.f_back.f_code.co_filename
        if (caller in ADAPTERS and callee in LOOP) or (caller in LOOP and callee in ADAPTERS):
            self._frames.append(frame)
            self.seen.append(frame.f_code.co_name)

    def __enter__(self) -> Crossings:
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)


def test_a_buffered_get_crosses_between_adapter_and_loop_at_most_four_times(
    ok: TestServer,
) -> None:
    with httpx.Client(transport=LBTransport([ok.address]), base_url="http://users") as client:
        client.get("/")  # the pool and the served host, settled
        with Crossings() as crossed:
            client.get("/")
    assert 0 < len(crossed.seen) <= 4, crossed.seen
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter([ok.address]))
        session.get("http://users/")
        with Crossings() as crossed:
            session.get("http://users/")
    assert 0 < len(crossed.seen) <= 4, crossed.seen

    async def main() -> list[str]:
        async with httpx.AsyncClient(transport=AsyncLBTransport([ok.address])) as client:
            await client.get("http://users/")
            with Crossings() as crossed:
                await client.get("http://users/")
            return crossed.seen

    seen = asyncio.run(main())
    assert 0 < len(seen) <= 4, seen
