"""One runner per balancer: its jobs (rounds and watches), its fixed threads, and the services
layer that starts and stops it, with real sockets on 127.0.0.1.

No test here waits for a length of time or asserts one: they wait for things to happen (rounds
counted, events set), bounded only so that a broken test cannot hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from lbclient import Backend, LoadBalancer, TcpCheck
from lbclient._background import (
    THREAD_NAME,
    THREADS,
    WORKERS,
    Every,
    TaskRunner,
    ThreadRunner,
    Watch,
)
from lbclient._services import Services, services_of
from lbclient.discovery import Function

pytestmark = pytest.mark.timeout(60)

ROUNDS = 20


def eventually(condition: Callable[[], bool], within: float = 20.0) -> None:
    """Wait for ``condition``; the bound only keeps a broken test from hanging."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


async def aeventually(condition: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def runner_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


class Acceptor:
    """Listening sockets on 127.0.0.1 whose connections one thread of its own accepts and
    closes: a TCP check of them passes, and no thread comes or goes per connection."""

    def __init__(self, count: int) -> None:
        self.listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
        self.addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in self.listeners]
        self._wake, self._woken = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="test-acceptor", daemon=True)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            for listener in self.listeners:
                selector.register(listener, selectors.EVENT_READ)
            selector.register(self._woken, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._woken:
                        return
                    conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    conn.close()

    def __enter__(self) -> Acceptor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._wake.send(b"x")
        self._thread.join()
        for sock in [*self.listeners, self._wake, self._woken]:
            sock.close()


class Census:
    """Counts the threads started since it was made, each time it is asked (from a check or a
    lookup: while the runner works)."""

    def __init__(self) -> None:
        self.before = set(threading.enumerate())
        self.counts: list[int] = []
        self.names: set[str] = set()
        self._lock = threading.Lock()

    def new(self) -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in self.before]

    def take(self) -> None:
        new = self.new()
        with self._lock:
            self.counts.append(len(new))
            self.names.update(t.name for t in new)


class CountingCheck(TcpCheck):
    """A TCP check that takes a census at each check and counts checks per backend."""

    def __init__(self, census: Census) -> None:
        super().__init__(interval=0.005, timeout=2.0)
        self.census = census
        self.done: dict[Backend, int] = {}

    async def acheck(self, backend: Backend) -> None:
        self.census.take()
        await super().acheck(backend)
        self.done[backend] = self.done.get(backend, 0) + 1

    def rounds(self) -> int:
        return min(self.done.values(), default=0)


# -- (a) a fixed number of threads ------------------------------------------------------------


def test_checks_and_discovery_run_on_at_most_the_runners_threads_and_none_after_close() -> None:
    with Acceptor(2) as acceptor:
        census = Census()
        lookups = [0]

        def lookup() -> list[str]:  # blocking: it runs on the runner's pool
            census.take()
            lookups[0] += 1
            return acceptor.addresses

        check = CountingCheck(census)
        lb = LoadBalancer(discovery=Function(lookup), refresh=0.005, health_check=check)
        with lb:
            eventually(lambda: check.rounds() >= ROUNDS and lookups[0] >= ROUNDS)
            census.take()
            assert sorted(b.address for b in lb.backends) == sorted(acceptor.addresses)
            assert all(h.checked for h in lb.snapshot().backends)
        assert census.new() == []  # close() returned: not one thread left
    assert len(census.counts) > 3 * ROUNDS
    assert max(census.counts) <= THREADS
    assert {name.split("_")[0] for name in census.names} <= {THREAD_NAME, f"{THREAD_NAME}-worker"}


def test_an_asyncio_user_gets_tasks_and_no_thread() -> None:
    async def main() -> Census:
        with Acceptor(2) as acceptor:
            census = Census()
            lookups = [0]

            async def lookup() -> list[str]:
                census.take()
                lookups[0] += 1
                return acceptor.addresses

            check = CountingCheck(census)
            lb = LoadBalancer(discovery=Function(lookup), refresh=0.005, health_check=check)
            async with lb:
                names = {t.get_name() for t in asyncio.all_tasks()}
                assert {"lbclient-health", "lbclient-discovery"} <= names
                await aeventually(lambda: check.rounds() >= ROUNDS and lookups[0] >= ROUNDS)
            assert not {"lbclient-health", "lbclient-discovery"} & {
                t.get_name() for t in asyncio.all_tasks()
            }
            return census

    census = asyncio.run(main())
    assert max(census.counts) == 0


def test_blocking_work_never_takes_more_than_the_pool() -> None:
    census = Census()
    meet = threading.Barrier(WORKERS, timeout=20)  # the pool's threads, all busy at once
    rounds = [0]

    def work() -> None:
        census.take()
        with contextlib.suppress(threading.BrokenBarrierError):
            meet.wait()

    async def round_() -> None:
        await asyncio.gather(*(asyncio.to_thread(work) for _ in range(3 * WORKERS)))
        rounds[0] += 1

    runner = ThreadRunner()
    runner.spawn(Every("busy", round_, lambda: 0.0))
    eventually(lambda: rounds[0] >= 3)
    meet.abort()  # stop() waits for the work in flight: let the pool's threads go
    runner.stop()
    assert max(census.counts) == THREADS  # the loop's thread and a full pool, no more
    assert census.new() == []


# -- (b) the two kinds of job ------------------------------------------------------------------


KINDS = ["thread", "task"]


async def _watch_until_stopped(kind: str) -> None:
    started = threading.Event()
    outcome: list[str] = []
    ticks = [0]

    async def watch() -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # a watched stream that tells of no change
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        outcome.append("returned")

    async def tick() -> None:
        ticks[0] += 1

    runner = ThreadRunner() if kind == "thread" else TaskRunner()
    runner.spawn(Watch("lbclient-watch", watch))
    runner.spawn(Every("lbclient-tick", tick, lambda: 0.0))
    await aeventually(lambda: started.is_set() and ticks[0] >= 50)
    assert outcome == []  # fifty rounds of another job later, the watch still runs
    await runner.astop()
    assert outcome == ["cancelled"]
    done = ticks[0]
    assert runner_threads() == []
    await asyncio.sleep(0)
    assert ticks[0] == done


@pytest.mark.parametrize("kind", KINDS)
def test_a_watch_runs_until_the_runner_stops(kind: str) -> None:
    asyncio.run(_watch_until_stopped(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_a_watch_that_ends_or_fails_is_awaited_again(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls = [0]

    async def watch() -> None:
        calls[0] += 1
        if calls[0] % 2:
            raise ConnectionResetError("the stream broke")

    async def main() -> None:
        runner = ThreadRunner() if kind == "thread" else TaskRunner()
        runner.spawn(Watch("lbclient-watch", watch, retry=0.0))
        await aeventually(lambda: calls[0] >= 6)
        await runner.astop()

    asyncio.run(main())
    assert "lbclient-watch failed; it goes on" in caplog.text
    assert "ConnectionResetError: the stream broke" in caplog.text


def test_a_round_that_raises_is_logged_and_the_next_comes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = [0]

    async def round_() -> None:
        calls[0] += 1
        raise ValueError("bad answer")

    runner = ThreadRunner()
    runner.spawn(Every("lbclient-poll", round_, lambda: 0.0))
    eventually(lambda: calls[0] >= 3)
    runner.stop()
    assert "lbclient-poll failed; it goes on" in caplog.text
    assert runner_threads() == []


@pytest.mark.parametrize("where", ["loop", "pool"])
def test_a_stop_from_the_runners_own_threads_does_not_wait_for_itself(where: str) -> None:
    runner = ThreadRunner()
    stopped = threading.Event()

    def stop() -> None:
        runner.stop()  # on one of the runner's threads: it cannot join itself
        stopped.set()

    async def round_() -> None:
        if where == "loop":
            stop()
        else:
            await asyncio.to_thread(stop)

    runner.spawn(Every("lbclient-stop", round_, lambda: 0.0))
    assert stopped.wait(20)
    eventually(lambda: runner_threads() == [])


def test_call_runs_once_on_the_loop_and_returns_its_answer() -> None:
    runner = ThreadRunner()
    try:

        async def where() -> str:
            return threading.current_thread().name

        assert runner.call(where) == THREAD_NAME
        assert asyncio.run(runner.acall(where)) == THREAD_NAME
    finally:
        runner.stop()
    assert runner_threads() == []


# -- (c) the services layer starts; the balancer forwards ---------------------------------------


def test_the_services_layer_is_what_runs_and_the_balancer_shares_its_count() -> None:
    with Acceptor(1) as acceptor:
        lb = LoadBalancer(acceptor.addresses, health_check=TcpCheck(interval=0.01))
        services = services_of(lb)
        assert isinstance(services, Services)
        assert services is lb.services
        assert services_of(LoadBalancer(acceptor.addresses)) is None  # nothing to run
        services.start()
        assert services.running
        assert [t.name for t in runner_threads()] == [THREAD_NAME]
        with lb:  # the same count: a second user
            assert services.users == 2
        assert services.running
        eventually(lambda: lb.snapshot().backends[0].checked is True)
        lb.close()  # the first user's stop, through the balancer
        assert not services.running
        assert runner_threads() == []
        services.stop()  # one stop too many is harmless
        assert services.users == 0


def test_a_later_start_waits_for_the_first_ones_lookup() -> None:
    release = threading.Event()
    entered = threading.Event()

    def lookup() -> list[str]:
        entered.set()
        assert release.wait(20)
        return ["10.0.0.7:80"]

    lb = LoadBalancer(["10.0.0.1:80"], discovery=Function(lookup), refresh=3600)
    services = services_of(lb)
    assert services is not None
    seen: list[list[str]] = []

    def start() -> None:
        lb.start()
        seen.append([b.address for b in lb.backends])

    first = threading.Thread(target=start)
    first.start()
    assert entered.wait(20)
    second = threading.Thread(target=start)
    second.start()
    eventually(lambda: services.users == 2)  # the second start is under way
    release.set()
    first.join()
    second.join()
    assert seen == [["10.0.0.7:80"], ["10.0.0.7:80"]]  # neither returned before the answer
    lb.close()
    lb.close()
    assert runner_threads() == []


class Broken(TcpCheck):
    """A check that binds itself into something that fails before the first start returns."""

    def bind(self, balancer: LoadBalancer) -> Any:
        class Keeper:
            def jobs(self) -> tuple[()]:
                return ()

            async def prepare(self) -> None:
                raise RuntimeError("cannot prepare")

        return Keeper()


def test_a_start_that_fails_leaves_no_user_and_no_thread() -> None:
    lb = LoadBalancer(["10.0.0.1:80"], health_check=Broken())
    with pytest.raises(RuntimeError, match="cannot prepare"):
        lb.start()
    services = services_of(lb)
    assert services is not None
    assert (services.users, services.running) == (0, False)
    assert runner_threads() == []


def test_astop_ends_a_job_that_swallows_one_cancellation() -> None:
    from lbclient._background import TaskRunner, Watch

    swallowed: list[int] = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:  # taken for a timeout of its own, say
            swallowed.append(1)
        await asyncio.sleep(3600)

    async def main() -> None:
        runner = TaskRunner(asyncio.get_running_loop())
        runner.spawn(Watch("stubborn", stubborn, retry=0.01))
        await asyncio.sleep(0.01)
        await asyncio.wait_for(runner.astop(), 30)  # a hang guard: it ends far sooner
        assert not {t.get_name() for t in asyncio.all_tasks()} & {"stubborn"}

    asyncio.run(main())
    assert swallowed == [1]
