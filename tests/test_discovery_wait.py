"""A discovery that does not answer: how long a first request (and everything else) waits.

A plain discovery function that blocks runs on a thread of its own (a ``Lane``); the source's
``timeout`` fails its lookup, and nothing waits for the call beyond that: not a first request
(which waits at most the smaller of the source's timeout and its own), not the other threads'
first requests, not ``close()``, not ``asyncio.run()``. The function here blocks until the test
releases it (at the latest after 10 s), and tells when it has returned: a test asserts that a
request, a close or a loop ended while the function had not returned, never a duration.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import requests
from conftest import FakeWire

from lbclient import AsyncLBTransport, LBAdapter, LBTransport, LoadBalancer, NoBackendAvailable
from lbclient._background import THREAD_NAME, Busy, Lane
from lbclient._config import first_wait
from lbclient.discovery import Function
from lbclient.retry import RetryPolicy
from lbclient.testing import TestServer

pytestmark = pytest.mark.timeout(60)

#: The longest the function blocks when the test does not release it.
STUCK = 10.0


class Blocking:
    """A discovery function that blocks until :attr:`release` is set (STUCK seconds at most),
    then answers ``address``; :attr:`returned` is set once it has returned."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.release = threading.Event()
        self.entered = threading.Event()
        self.returned = threading.Event()
        self.calls = 0

    def __call__(self) -> list[str]:
        self.calls += 1
        self.entered.set()
        try:
            self.release.wait(STUCK)
            return [self.address]
        finally:
            self.returned.set()

    def __repr__(self) -> str:
        return "Blocking()"


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.005)


def call_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"{THREAD_NAME}-worker_call"]


@pytest.fixture
def server() -> Iterator[TestServer]:
    with TestServer(name="found") as found:
        yield found


@pytest.fixture
def blocking(server: TestServer) -> Iterator[Blocking]:
    fn = Blocking(server.address)
    try:
        yield fn
    finally:
        fn.release.set()
        wait_until(lambda: not call_threads(), "the function's thread to end")


NOT_ANSWERED = r"it has no backends: discovery Function\(Blocking\(\)\) has not answered within"


# -- the first request waits at most its own time ----------------------------------------------


def test_first_requests_wait_their_own_timeout_not_the_function(blocking: Blocking) -> None:
    lb = LoadBalancer(discovery=Function(blocking, timeout=5), refresh=3600)
    transport = LBTransport(lb)
    errors: list[BaseException] = []
    with httpx.Client(transport=transport, base_url="http://users", timeout=0.3) as client:

        def first() -> None:
            try:
                client.get("/")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=first) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not blocking.returned.is_set()  # none of them waited for the function
        assert len(errors) == 4
        for error in errors:
            assert isinstance(error, NoBackendAvailable)
            assert isinstance(error, httpx.ConnectError)
            assert str(error).startswith("no backend available for GET http://users/: ")
        messages = {str(e) for e in errors}
        assert any(f"{NOT_ANSWERED.replace(chr(92), '')} 0.3 s" in m for m in messages), messages

        # Once the function answers, requests go to what it found; it was called once.
        blocking.release.set()
        wait_until(lambda: len(lb) == 1, "the first answer")
        assert client.get("/").json()["server"] == "found"
    assert blocking.calls == 1


def test_the_source_timeout_bounds_a_request_that_would_wait_longer(blocking: Blocking) -> None:
    lb = LoadBalancer(discovery=Function(blocking, timeout=0.3), refresh=3600)
    with httpx.Client(transport=LBTransport(lb), base_url="http://users", timeout=30) as client:
        with pytest.raises(NoBackendAvailable, match=r"(within 0\.3 s)"):
            client.get("/")
        assert not blocking.returned.is_set()
        wait_until(lambda: lb.snapshot().discovery_failures >= 1, "the lookup to time out")
        with pytest.raises(NoBackendAvailable) as caught:
            client.get("/")
        assert str(caught.value) == (
            "no backend available for GET http://users/: it has no backends: discovery "
            "failed: TimeoutError: Function(Blocking()) did not return within 0.3 s"
        )
        # Looked up again (1 s later) while the call still runs: refused, not called again.
        wait_until(
            lambda: "has not returned from its call" in (lb.snapshot().discovery_error or ""),
            "a lookup refused while the call runs",
        )
        assert blocking.calls == 1
        blocking.release.set()
        wait_until(lambda: len(lb) == 1, "an answer once the function has returned")
        assert client.get("/").json()["server"] == "found"


def test_a_request_proceeds_on_the_set_it_has(server: TestServer) -> None:
    with TestServer(name="given") as given:
        fn = Blocking(server.address)
        lb = LoadBalancer([given.address], discovery=Function(fn), refresh=3600)
        try:
            with httpx.Client(transport=LBTransport(lb), base_url="http://users", timeout=0.3) as c:
                assert c.get("/").json()["server"] == "given"  # the backends it was given
                assert not fn.returned.is_set()
        finally:
            fn.release.set()
            wait_until(lambda: not call_threads(), "the function's thread to end")


def test_requests_adapter_waits_its_connect_timeout(blocking: Blocking) -> None:
    lb = LoadBalancer(discovery=Function(blocking, timeout=5), refresh=3600)
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter(lb))
        with pytest.raises(requests.ConnectionError, match=NOT_ANSWERED + r" 0\.2 s"):
            session.get("http://users/", timeout=(0.2, 30))
        assert not blocking.returned.is_set()


def test_async_first_request_and_asyncio_run_do_not_wait_for_the_function(
    blocking: Blocking,
) -> None:
    async def main() -> str:
        lb = LoadBalancer(discovery=Function(blocking, timeout=5), refresh=3600)
        transport = AsyncLBTransport(lb)
        async with httpx.AsyncClient(transport=transport, base_url="http://users") as client:
            with pytest.raises(NoBackendAvailable) as caught:
                await client.get("/", timeout=0.3)
        return str(caught.value)

    message = asyncio.run(main())
    assert not blocking.returned.is_set()  # asyncio.run() returned before the function did
    assert "has not answered within 0.3 s" in message


def test_close_does_not_wait_for_the_function(blocking: Blocking) -> None:
    lb = LoadBalancer(discovery=Function(blocking, timeout=0.3), refresh=3600)
    with lb:  # start() returns within the source's timeout
        assert blocking.entered.is_set()
        assert not blocking.returned.is_set()
        assert len(lb) == 0
    assert not blocking.returned.is_set()  # close() returned while the call still runs
    assert [t.name for t in threading.enumerate() if t.name == THREAD_NAME] == []


# -- what a request may wait, and the lane -----------------------------------------------------


def test_first_wait_is_the_smallest_of_connect_pool_and_deadline() -> None:
    policy = RetryPolicy()
    httpx_like = {"connect": 2.0, "read": 9.0, "write": 9.0, "pool": 5.0}
    assert first_wait(FakeWire(timeouts=httpx_like), policy) == 2.0
    assert first_wait(FakeWire(timeouts={**httpx_like, "pool": 1.5}), policy) == 1.5
    assert first_wait(FakeWire(timeouts=httpx_like), RetryPolicy(deadline=0.5)) == 0.5
    assert first_wait(FakeWire(timeouts={"connect": None, "read": 3.0}), policy) is None
    assert first_wait(FakeWire(), policy) is None
    assert first_wait(FakeWire(), RetryPolicy(deadline=4)) == 4.0


def test_a_lane_times_out_refuses_while_busy_and_leaves_no_thread() -> None:
    lane = Lane()
    release = threading.Event()

    def stuck() -> str:
        release.wait(STUCK)
        return "late"

    async def main() -> None:
        with pytest.raises(TimeoutError, match=r"^stuck\(\) did not return within 0\.05 s$"):
            await lane.run(stuck, 0.05, "stuck()")
        with pytest.raises(Busy, match=r"^stuck\(\) has not returned from its call of "):
            await lane.run(lambda: "next", 5.0, "stuck()")
        release.set()
        await asyncio.to_thread(lambda: wait_until(lambda: not call_threads(), "the call"))
        assert await lane.run(lambda: "next", 5.0, "fn") == "next"
        with pytest.raises(ZeroDivisionError):
            await lane.run(lambda: 1 // 0, 5.0, "fn")

    try:
        asyncio.run(main())
    finally:
        release.set()
    assert call_threads() == []
