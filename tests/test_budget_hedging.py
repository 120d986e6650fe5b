"""The retry budget, Retry-After and hedged requests: the rules with plain values, then against
real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import email.utils
import math
import threading
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest
import requests
from conftest import NO_EJECTION, key_for

from lbclient import (
    AsyncLBTransport,
    Backend,
    Hash,
    LBAdapter,
    LBTransport,
    LoadBalancer,
    Random,
    RetryBudget,
    RetryPolicy,
    RoundRobin,
)
from lbclient._hedge import hedged
from lbclient._ledger import Ledger
from lbclient._plan import Fault, RequestPlan, retry_after_seconds
from lbclient.retry import Failure, RequestOptions
from lbclient.testing import Exchange, TestServer, closed_port

pytestmark = pytest.mark.timeout(120)

ADDRS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]


# -- the budget's account ----------------------------------------------------------------------


def test_budget_allows_ratio_of_requests_plus_a_reserve() -> None:
    ledger = Ledger(RetryBudget(ratio=0.5, min_per_second=1, window=10))
    for _ in range(20):
        ledger.deposit(0.0)
    # 0.5 x 20 requests + 1 x 10 s of reserve = 20 retries, then none.
    spent = sum(ledger.spend(1.0) for _ in range(25))
    assert spent == 20
    stats = ledger.stats(1.0)
    assert (stats.requests, stats.retries, stats.exhaustions) == (20, 20, 5)
    assert stats.budget_remaining == 0
    assert stats.budget_spent == 20
    assert not ledger.can_spend(1.0)


def test_budget_window_slides() -> None:
    ledger = Ledger(RetryBudget(ratio=0.0, min_per_second=1, window=10))
    assert sum(ledger.spend(0.0) for _ in range(15)) == 10
    assert not ledger.can_spend(5.0)
    assert not ledger.can_spend(10.5)  # nothing leaves sooner than a window after it
    # The spent retries leave the window once it has slid past them.
    assert ledger.can_spend(11.0)
    assert ledger.stats(11.0).budget_spent == 0


def test_no_budget_counts_but_never_refuses() -> None:
    ledger = Ledger(None)
    ledger.deposit(0.0)
    assert all(ledger.spend(0.0, hedge=True) for _ in range(100))
    stats = ledger.stats(0.0)
    assert (stats.retries, stats.hedges, stats.budget_remaining) == (100, 100, None)


def test_budget_is_thread_safe() -> None:
    ledger = Ledger(RetryBudget(ratio=1.0, min_per_second=0, window=1000))
    spent: list[int] = []

    def work() -> None:
        count = 0
        for _ in range(2_000):
            ledger.deposit(1.0)
            count += ledger.spend(1.0)
        spent.append(count)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = ledger.stats(1.0)
    assert stats.requests == 32_000
    assert stats.retries == sum(spent)
    assert stats.retries + stats.exhaustions == 32_000
    assert stats.retries <= stats.requests


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"ratio": -0.1}, ValueError),
        ({"min_per_second": "1"}, TypeError),
        ({"window": 0}, ValueError),
        ({"ratio": True}, TypeError),
    ],
)
def test_budget_validation(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        RetryBudget(**kwargs)  # type: ignore[arg-type]


def test_an_empty_budget_stops_the_retry_and_says_so() -> None:
    ledger = Ledger(RetryBudget(ratio=0, min_per_second=0, window=1))
    plan = RequestPlan(LoadBalancer(ADDRS, Hash), b"k", "GET", True, RetryPolicy(), ledger=ledger)
    first = plan.take()
    assert first is not None
    attempt = plan.failed(first, Fault(Failure.MAYBE_SENT), ConnectionError("reset"))
    assert plan.may_retry(attempt)  # a question: the budget is the taking step's to spend
    assert ledger.stats(0.0).exhaustions == 0
    assert plan.take() is None  # taking finds nothing to spend, and counts it
    assert ledger.stats(0.0).exhaustions == 1
    assert ledger.stats(0.0).retries == 0
    assert "the retry budget is exhausted" in plan.describe()


def test_a_retry_of_an_attempt_never_sent_spends_no_budget() -> None:
    ledger = Ledger(RetryBudget(ratio=0, min_per_second=0, window=1))  # nothing to spend
    plan = RequestPlan(LoadBalancer(ADDRS, Hash), b"k", "POST", True, RetryPolicy(), ledger=ledger)
    first = plan.take()
    assert first is not None
    plan.failed(first, Fault(Failure.NEVER_SENT), ConnectionError("refused"))
    assert plan.requeue
    assert plan.may_retry()
    assert plan.affordable()
    second = plan.take()  # a requeue: it added no load to any server
    assert second is not None
    assert second != first
    stats = ledger.stats(0.0)
    assert (stats.retries, stats.requeues, stats.exhaustions, stats.budget_spent) == (1, 1, 0, 0)
    plan.failed(second, Fault(Failure.MAYBE_SENT), ConnectionError("reset"))
    plan.may_retry()
    assert plan.take() is None  # a retry of a maybe-sent failure spends, and there is none
    assert ledger.stats(0.0).exhaustions == 1


# -- Retry-After -------------------------------------------------------------------------------


def test_retry_after_seconds_and_dates() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds("3", now) == 3.0
    assert retry_after_seconds(" 0 ", now) == 0.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert retry_after_seconds(date, now) == pytest.approx(7.0)
    assert retry_after_seconds(email.utils.formatdate(now - 60, usegmt=True), now) == 0.0
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds("-1", now) is None


def test_retry_after_sets_the_least_wait_and_must_fit() -> None:
    policy = RetryPolicy(retry_statuses={503}, deadline=10.0, retry_after_max=5.0)
    plan = RequestPlan(LoadBalancer(ADDRS, Hash), b"k", "GET", True, policy, clock=lambda: 0.0)
    first = plan.take()
    assert first is not None
    plan.responded(first, 503, "2")
    assert plan.retries_response
    assert plan.may_retry()
    assert plan.wait() >= 2.0
    long = RequestPlan(LoadBalancer(ADDRS, Hash), b"k", "GET", True, policy, clock=lambda: 0.0)
    first = long.take()
    assert first is not None
    long.responded(first, 503, "7")
    assert not long.may_retry()  # longer than retry_after_max: the 503 is returned
    assert "Retry-After of 7 s" in long.stopped
    tight = RequestPlan(
        LoadBalancer(ADDRS, Hash),
        b"k",
        "GET",
        True,
        RetryPolicy(retry_statuses={503}, deadline=3.0),
        clock=lambda: 0.0,
    )
    first = tight.take()
    assert first is not None
    tight.responded(first, 503, "3")
    assert not tight.may_retry()  # does not fit the deadline
    assert "deadline" in tight.stopped


def test_retry_after_is_waited_out_against_a_real_server() -> None:
    calls: list[float] = []

    def busy_once(exchange: Exchange) -> bool:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return exchange.respond(503, b"busy", {"Retry-After": "1"})
        return exchange.respond()

    with TestServer("busy", behaviours={"busy": busy_once}) as server:
        transport = LBTransport([server.address], retry_statuses={503})
        with httpx.Client(transport=transport) as client:
            assert client.get("http://users/").status_code == 200
    assert len(calls) == 2
    assert calls[1] - calls[0] >= 1.0  # the server asked for a second; lbclient's own clock


# -- the budget against real servers -----------------------------------------------------------


@pytest.fixture
def three_503() -> Iterator[list[TestServer]]:
    servers = [TestServer("status:503").start() for _ in range(3)]
    yield servers
    for server in servers:
        server.close()


@pytest.mark.slow
def test_budget_bounds_retries_when_every_backend_fails(three_503: list[TestServer]) -> None:
    lb = LoadBalancer([s.address for s in three_503], RoundRobin, health=NO_EJECTION)
    # The default budget's rule (20% of requests plus 10 retries a second), over a window of
    # one second rather than ten, so that a steady stream fills it in one second.
    window = 1.0
    budget = RetryBudget(ratio=0.2, min_per_second=10, window=window)
    transport = LBTransport(lb, retry_statuses={503}, max_attempts=3, budget=budget)
    requests_sent = 400
    with httpx.Client(transport=transport) as client:
        start = time.monotonic()
        for i in range(requests_sent):
            # A steady stream over a little under one window.
            pause = start + i * 0.0024 - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            assert client.get("http://users/").status_code == 503
        seconds = time.monotonic() - start
    attempts = sum(s.count() for s in three_503)
    # Each window (the ledger keeps a tenth more) allows 20% of its requests plus 10 a second;
    # the run spans ``windows`` of them, what was spent in one ageing out of the next.
    windows = math.ceil(seconds / window + 0.1)
    assert attempts <= requests_sent * (1 + 0.2 * windows) + 10 * window * windows
    assert attempts < requests_sent * 3  # without a budget, every request would try thrice
    stats = transport.stats()
    assert stats.requests == requests_sent
    assert stats.exhaustions > 0
    assert stats.retries == attempts - requests_sent


def test_an_exhausted_budget_shows_in_the_error_and_the_stats() -> None:
    budget = RetryBudget(ratio=0, min_per_second=0.1, window=10)  # one retry in 10 s
    with TestServer("close") as closing, TestServer("close") as other:
        transport = LBTransport([closing.address, other.address], budget=budget)
        with httpx.Client(transport=transport) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                client.get("http://users/")  # the one retry
            with pytest.raises(httpx.RemoteProtocolError, match="retry budget is exhausted"):
                client.get("http://users/")
        stats = transport.stats()
        assert stats.retries == 1
        assert stats.exhaustions == 2  # the first request's third attempt, the second's retry
    with TestServer("close") as closing, TestServer("close") as other:
        adapter = LBAdapter([closing.address, other.address], budget=budget)
        with requests.Session() as session:
            session.mount("http://users/", adapter)
            with pytest.raises(requests.ConnectionError):
                session.get("http://users/")
            with pytest.raises(requests.ConnectionError, match="retry budget is exhausted"):
                session.get("http://users/")
        assert adapter.stats().exhaustions == 2


# -- hedging -----------------------------------------------------------------------------------


def late(seconds: float) -> object:
    def answer(exchange: Exchange) -> bool:
        exchange.sleep(seconds)
        return exchange.respond()

    return answer


@pytest.fixture
def slow_and_fast() -> Iterator[tuple[TestServer, TestServer]]:
    with (
        TestServer("late", name="slow", behaviours={"late": late(0.3)}) as slow,
        TestServer(name="fast") as fast,
    ):
        yield slow, fast


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_first_head_wins_and_the_loser_is_closed(
    slow_and_fast: tuple[TestServer, TestServer], backend: str
) -> None:
    slow, fast = slow_and_fast
    lb = LoadBalancer([slow.address, fast.address], Hash, health=NO_EJECTION)
    key = key_for(lb, slow)
    transport = AsyncLBTransport(lb, key=lambda r: key, hedge_after=0.05)

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport) as client:
            response = await client.get("http://users/")
            # The loser's connection was closed, never returned to its pool.
            pools = [p for k, p in transport._pools.items() if k[1] == slow.address]
            assert all(not p.connections for p in pools)
            return response

    response = anyio.run(main, backend=backend)
    assert response.json()["server"] == "fast"
    assert (slow.count(), fast.count()) == (1, 1)
    stats = transport.stats()
    assert (stats.hedges, stats.hedge_wins, stats.retries) == (1, 1, 1)


def test_a_post_is_never_hedged(slow_and_fast: tuple[TestServer, TestServer]) -> None:
    slow, fast = slow_and_fast
    lb = LoadBalancer([slow.address, fast.address], Hash, health=NO_EJECTION)
    key = key_for(lb, slow)
    transport = AsyncLBTransport(lb, key=lambda r: key, hedge_after=0.05)

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport) as client:
            return await client.post("http://users/", content=b"once")

    assert asyncio.run(main()).json()["server"] == "slow"
    assert (slow.count(), fast.count()) == (1, 0)
    assert transport.stats().hedges == 0


def test_hedges_count_toward_max_attempts_and_the_budget(
    slow_and_fast: tuple[TestServer, TestServer],
) -> None:
    slow, fast = slow_and_fast
    lb = LoadBalancer([slow.address, fast.address], Hash, health=NO_EJECTION)
    key = key_for(lb, slow)
    single = AsyncLBTransport(lb, key=lambda r: key, hedge_after=0.05, max_attempts=1)
    broke = AsyncLBTransport(
        lb,
        key=lambda r: key,
        hedge_after=0.05,
        hedge_budget=RetryBudget(ratio=0, min_per_second=0),
    )

    async def main() -> list[str]:
        servers = []
        for transport in (single, broke):
            async with httpx.AsyncClient(transport=transport) as client:
                servers.append((await client.get("http://users/")).json()["server"])
        return servers

    assert asyncio.run(main()) == ["slow", "slow"]
    assert fast.count() == 0
    assert single.stats().hedges == 0
    assert broke.stats().exhaustions >= 1


def test_a_hedge_per_request_and_the_sync_clients_refuse_it(
    slow_and_fast: tuple[TestServer, TestServer],
) -> None:
    slow, fast = slow_and_fast
    lb = LoadBalancer([slow.address, fast.address], Hash, health=NO_EJECTION)
    key = key_for(lb, slow)
    transport = AsyncLBTransport(lb, key=lambda r: key)

    async def main() -> str:
        async with httpx.AsyncClient(transport=transport) as client:
            options = RequestOptions(hedge_after=0.05)
            response = await client.get("http://users/", extensions={"lbclient": options})
            return str(response.json()["server"])

    assert asyncio.run(main()) == "fast"
    with pytest.raises(ValueError, match="AsyncLBTransport"):
        LBTransport(["10.0.0.1:80"], hedge_after=0.05)
    with pytest.raises(ValueError, match="AsyncLBTransport"):
        LBAdapter(["10.0.0.1:80"], policy=RetryPolicy(hedge_after=0.05))
    with (
        httpx.Client(transport=LBTransport([fast.address])) as client,
        pytest.raises(ValueError, match="hedge_after"),
    ):
        client.get("http://users/", extensions={"lbclient": {"hedge_after": 0.05}})


def test_a_failed_first_attempt_is_retried_while_hedging() -> None:
    with TestServer("close", name="closing") as closing, TestServer(name="fast") as fast:
        lb = LoadBalancer([closing.address, fast.address], Hash, health=NO_EJECTION)
        key = key_for(lb, closing)
        transport = AsyncLBTransport(lb, key=lambda r: key, hedge_after=5.0)

        async def main() -> str:
            async with httpx.AsyncClient(transport=transport) as client:
                return str((await client.get("http://users/")).json()["server"])

        assert asyncio.run(main()) == "fast"
        assert transport.stats().hedges == 0
        assert transport.stats().retries == 1


class SlowWire:
    """A fake async wire: the first backend answers late, the others at once."""

    request = None
    method = "GET"
    url = "http://svc/"
    replayable = True
    timeouts = None
    options = None

    def __init__(self, slow: Backend) -> None:
        self.slow = slow
        self.discarded: list[str] = []
        self.cancelled: list[Backend] = []

    async def send(
        self, backend: Backend, timeouts: object, headers: object, buffer: int
    ) -> tuple[int, str, None]:
        try:
            if backend == self.slow:
                await anyio.sleep(10)
        except BaseException:
            self.cancelled.append(backend)
            raise
        return 200, f"from {backend.address}", None

    def header(self, response: str, name: str) -> None:
        return None

    def fault(self, error: Exception) -> Fault | None:
        return None

    async def discard(self, response: str) -> None:
        self.discarded.append(response)

    def final(self, error: Exception, summary: str) -> Exception:
        return error


def test_the_hedged_loop_cancels_the_slow_attempt() -> None:
    lb = LoadBalancer(ADDRS, Hash)
    plan = RequestPlan(lb, b"k", "GET", True, RetryPolicy(hedge_after=0.01), ledger=Ledger(None))
    first = plan.take()
    assert first is not None
    wire = SlowWire(first)
    result = asyncio.run(hedged(plan, first, wire))
    assert result != f"from {first.address}"
    assert wire.cancelled == [first]
    assert len(plan.attempts) == 1  # the cancelled attempt recorded nothing


# -- what a chaos run found ---------------------------------------------------------------------


def test_failover_past_refused_connections_works_under_the_default_budget() -> None:
    """Two live backends and two dead ports, all in rotation (the ejection cap keeps one dead
    one in): every GET whose first attempt was refused is sent on, under the default budget,
    because a refused connection reached no server."""
    with TestServer(name="a") as a, TestServer(name="b") as b:
        dead = [f"127.0.0.1:{closed_port()}" for _ in range(2)]
        transport = LBTransport([a.address, b.address, *dead], algorithm=Random)
        failed: list[BaseException] = []

        def worker(client: httpx.Client) -> None:
            for _ in range(150):
                try:
                    assert client.get("http://users/").status_code == 200
                except httpx.HTTPError as error:
                    failed.append(error)

        with httpx.Client(transport=transport) as client:
            threads = [threading.Thread(target=worker, args=(client,)) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        stats = transport.stats()
    assert failed == []
    assert stats.requeues > 100  # a quarter or more of the first attempts hit a dead port
    assert stats.budget_spent == 0  # none of them spent the budget
    assert stats.exhaustions == 0


def test_hedges_spend_their_own_budget_never_the_retries() -> None:
    def closing(exchange: Exchange) -> bool:
        return exchange.close()

    with (
        TestServer("late", name="slow", behaviours={"late": late(0.2)}) as slow,
        TestServer(name="fast") as fast,
        TestServer("closing", name="closing", behaviours={"closing": closing}) as closer,
    ):
        lb = LoadBalancer([slow.address, fast.address, closer.address], Hash, health=NO_EJECTION)
        to_slow, to_closer = key_for(lb, slow), key_for(lb, closer)
        stingy = RetryBudget(ratio=0, min_per_second=0.5, window=10)  # five of each, no more
        transport = AsyncLBTransport(
            lb,
            key=lambda r: r.headers["x-key"],
            hedge_after=0.02,
            budget=stingy,
            hedge_budget=stingy,
        )

        async def main() -> list[int]:
            async with httpx.AsyncClient(transport=transport) as client:
                # A burst of hedged GETs spends the whole hedge budget...
                for _ in range(8):
                    await client.get("http://users/", headers={"x-key": to_slow})
                # ...and failover still has its own: GETs whose first attempt fails are retried.
                return [
                    (await client.get("http://users/", headers={"x-key": to_closer})).status_code
                    for _ in range(5)
                ]

        assert asyncio.run(main()) == [200] * 5
    stats = transport.stats()
    assert stats.hedges == 5  # the hedge budget held five
    assert stats.budget_spent == 5  # the five retries, from the retries' own budget
    assert stats.hedge_budget_spent == 5


def test_every_hedged_attempt_ends_once_winner_loser_or_late_failure() -> None:
    def close_late(exchange: Exchange) -> bool:
        exchange.sleep(0.05)
        return exchange.close()

    with (
        TestServer("close_late", name="closer", behaviours={"close_late": close_late}) as closer,
        TestServer("late", name="answerer", behaviours={"late": late(0.05)}) as answerer,
    ):
        lb = LoadBalancer([closer.address, answerer.address], RoundRobin, health=NO_EJECTION)
        transport = AsyncLBTransport(lb, hedge_after=0.02, hedge_budget=None)

        async def main() -> None:
            async with httpx.AsyncClient(transport=transport) as client:

                async def task() -> None:
                    for _ in range(10):
                        assert (await client.get("http://users/")).status_code == 200

                async with anyio.create_task_group() as group:
                    for _ in range(10):
                        group.start_soon(task)

        asyncio.run(main())
        # Every attempt ended once: nothing is left in flight, on either backend...
        assert lb.load(closer.address).in_flight == 0
        assert lb.load(answerer.address).in_flight == 0
        # ...and the failures that came after their request's winner reached health and load.
        assert closer.count() > 0
        assert lb.load(closer.address).penalty > 0


def test_a_retry_after_header_of_any_text_is_a_response_or_a_retry() -> None:
    def odd(exchange: Exchange) -> bool:
        return exchange.respond(503, b"busy", {"Retry-After": exchange.arg or ""})

    for text in ("\u00b2", "\u00b9", "99999999999", "Fri, 31 Dec 9999 23:59:59 GMT", "soon"):
        with TestServer(f"odd:{text}", name="odd", behaviours={"odd": odd}) as server:
            lb = LoadBalancer([server.address], health=NO_EJECTION)
            with httpx.Client(transport=LBTransport(lb, retry_statuses={503})) as client:
                assert client.get("http://users/").status_code == 503
            with requests.Session() as session:
                session.mount("http://users/", LBAdapter(lb, retry_statuses={503}))
                assert session.get("http://users/").status_code == 503


def test_a_huge_retry_after_holds_the_penalty_no_longer_than_retry_after_max() -> None:
    now = [100.0]
    lb = LoadBalancer(ADDRS, Hash, clock=lambda: now[0])
    policy = RetryPolicy(retry_statuses={503}, retry_after_max=10.0)
    for header in ("99999999999", "Fri, 31 Dec 9999 23:59:59 GMT"):
        plan = RequestPlan(lb, b"k", "GET", True, policy, clock=lambda: now[0])
        first = plan.take()
        assert first is not None
        plan.responded(first, 503, header)
        assert not plan.may_retry()  # longer than retry_after_max: the 503 is returned
        assert lb.load(first).penalty_floor_until <= now[0] + 10.0
        plan.reporter(first)(True)
