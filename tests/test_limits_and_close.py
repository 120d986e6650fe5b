"""The async transport's ``limits`` as httpx applies them (per backend: ``max_connections`` at
once, the rest waiting up to the pool timeout, which ``attempt_timeout`` and the deadline cap as
they cap every timeout, ``max_keepalive_connections`` kept idle), and closing a transport under
a request in flight, sync and async: the request ends with the error plain httpx raises, not
with the transport's closed error. Real servers on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import anyio
import httpx
import pytest

from lbclient import AsyncLBTransport, LBTransport, LoadBalancer, RequestOptions, RoundRobin
from lbclient.errors import TransportClosed
from lbclient.httpx_transport import TransportClosedError
from lbclient.testing import Exchange, TestServer

SAFETY = 10.0  # a held request is let go after this long at the latest (never in a passing run)


class Held:
    """A server whose requests wait inside until ``release`` is set (or ``SAFETY`` passes),
    counting how many are inside at once; ``until`` sets ``release`` once that many are in."""

    def __init__(self, until: int | None = None, name: str = "held") -> None:
        self.release = threading.Event()
        self.until = until
        self.inside = 0
        self.most = 0
        self._lock = threading.Lock()
        self.server = TestServer("hold", name=name, behaviours={"hold": self._hold})

    def _hold(self, exchange: Exchange) -> bool:
        with self._lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            if self.until is not None and self.inside >= self.until:
                self.release.set()
        try:
            self.release.wait(SAFETY)
        finally:
            with self._lock:
                self.inside -= 1
        return exchange.respond()


@pytest.fixture
def held() -> Iterator[Callable[..., Held]]:
    made: list[Held] = []

    def make(until: int | None = None, name: str = "held") -> Held:
        h = Held(until, name)
        h.server.start()
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.release.set()
            h.server.close()


async def wait_for(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds (at most ``SAFETY`` seconds), without asserting a time."""
    with anyio.move_on_after(SAFETY):
        while not condition():
            await anyio.sleep(0.01)


async def five_at_once(
    client: httpx.AsyncClient, url: str, pool: float, on_failure: Callable[[int], None]
) -> list[int | BaseException]:
    """Five GETs at once with this pool timeout; ``on_failure(n)`` after the n-th failure."""
    outcomes: list[int | BaseException] = []

    async def get() -> None:
        try:
            response = await client.get(url, timeout=httpx.Timeout(SAFETY, pool=pool))
        except httpx.HTTPError as error:
            outcomes.append(error)
            on_failure(sum(isinstance(o, BaseException) for o in outcomes))
        else:
            outcomes.append(response.status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(get)
    return outcomes


# -- limits, async ------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_max_connections_bounds_a_backends_connections_as_httpx_does(
    anyio_backend: str, held: Callable[..., Held]
) -> None:
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=5)
    seen: dict[str, tuple[list[int | BaseException], int, int]] = {}
    for name in ("plain", "lbclient"):
        h = held()

        def let_go(failures: int, h: Held = h) -> None:
            if failures == 3:  # the three beyond max_connections timed out waiting
                h.release.set()

        if name == "plain":
            client = httpx.AsyncClient(limits=limits)
            url = h.server.url
        else:
            transport = AsyncLBTransport([h.server.address], limits=limits, max_attempts=1)
            client = httpx.AsyncClient(transport=transport)
            url = "http://users/"
        async with client:
            outcomes = await five_at_once(client, url, 0.2, let_go)
        connections = len({r.connection for r in h.server.requests})
        seen[name] = (outcomes, h.most, connections)
    for name, (outcomes, most, connections) in seen.items():
        assert sorted(o for o in outcomes if isinstance(o, int)) == [200, 200], name
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        assert [type(f) for f in failures] == [httpx.PoolTimeout] * 3, name
        assert most == 2, name
        assert connections == 2, name
    lb_failure = next(o for o in seen["lbclient"][0] if isinstance(o, httpx.PoolTimeout))
    assert lb_failure.request.url == "http://users/"
    assert "failed after 1 attempt" in str(lb_failure)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_keepalive_bounds_the_idle_connections_not_those_at_once(
    anyio_backend: str, held: Callable[..., Held]
) -> None:
    h = held(until=5)  # answers once all five are inside at once
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=2)
    transport = AsyncLBTransport([h.server.address], limits=limits, max_attempts=1)
    async with httpx.AsyncClient(transport=transport) as client:
        outcomes = await five_at_once(client, "http://users/", 0.2, lambda n: None)
        assert outcomes == [200] * 5
        assert h.most == 5
        first = {r.connection for r in h.server.requests}
        assert len(first) == 5
        # Three of the five connections were closed as they went idle; two are kept.
        (pools,) = transport._pools.values()
        assert len(pools.connections) == 2
        assert (await client.get("http://users/")).status_code == 200
        assert h.server.requests[-1].connection in first  # a kept connection, used again


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_without_max_connections_every_request_goes_at_once(
    anyio_backend: str, held: Callable[..., Held]
) -> None:
    h = held(until=5)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    transport = AsyncLBTransport([h.server.address], limits=limits, max_attempts=1)
    async with httpx.AsyncClient(transport=transport) as client:
        assert await five_at_once(client, "http://users/", 0.2, lambda n: None) == [200] * 5
        (pools,) = transport._pools.values()
        assert pools.connections == []  # none kept idle


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_connection_given_back_passes_to_the_next_in_line(
    anyio_backend: str, held: Callable[..., Held]
) -> None:
    h = held(until=1)  # every request answered at once
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=0)
    transport = AsyncLBTransport([h.server.address], limits=limits, max_attempts=1)
    async with httpx.AsyncClient(transport=transport) as client:
        # Five at once through one connection: each waits its turn and is handed the
        # connection open (none is idle in between, so keeping none closes none of them).
        assert await five_at_once(client, "http://users/", SAFETY, lambda n: None) == [200] * 5
    assert h.most == 1
    assert len({r.connection for r in h.server.requests}) == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.parametrize("option", ["attempt_timeout", "deadline"])
@pytest.mark.anyio
async def test_the_wait_for_a_connection_is_part_of_the_attempts_time(
    anyio_backend: str, option: str, held: Callable[..., Held]
) -> None:
    h = held()  # the first request holds the one connection until released
    limits = httpx.Limits(max_connections=1)
    transport = AsyncLBTransport([h.server.address], limits=limits, max_attempts=1)
    short = RequestOptions(**{option: 0.3})
    outcomes: list[int | BaseException] = []
    async with (
        httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(SAFETY)) as client,
        anyio.create_task_group() as tg,
    ):

        async def first() -> None:
            outcomes.append((await client.get("http://users/")).status_code)

        tg.start_soon(first)
        await wait_for(lambda: h.inside == 1)
        # The client's pool timeout is SAFETY; the attempt's time caps it, as it caps the rest.
        with pytest.raises(httpx.PoolTimeout):
            await client.get("http://users/", extensions={"lbclient": short})
        assert not h.release.is_set()  # it ended while the first still held the connection
        assert h.inside == 1
        h.release.set()
    assert outcomes == [200]


# -- closed under a request in flight ---------------------------------------------------------


def test_close_under_a_request_in_flight_ends_it_as_plain_httpx_does(
    held: Callable[..., Held],
) -> None:
    seen: dict[str, BaseException] = {}
    for name in ("plain", "lbclient"):
        servers = [held(name=f"held-{i}") for i in range(2)]
        if name == "plain":
            client = httpx.Client()
            url = servers[0].server.url
        else:
            lb = LoadBalancer([s.server.address for s in servers], RoundRobin)
            client = httpx.Client(transport=LBTransport(lb))
            url = "http://users/"

        def get(client: httpx.Client = client, url: str = url, name: str = name) -> None:
            try:
                client.get(url, timeout=SAFETY)
            except BaseException as error:
                seen[name] = error

        caller = threading.Thread(target=get)
        caller.start()
        deadline = time.monotonic() + SAFETY
        while not any(s.inside for s in servers) and time.monotonic() < deadline:
            time.sleep(0.01)
        client.close()
        for s in servers:  # a thread blocked reading wakes up when the answer comes
            s.release.set()
        caller.join()
    plain, ours = seen["plain"], seen["lbclient"]
    assert type(ours) is type(plain)  # httpx.ReadError
    assert isinstance(ours, httpx.ReadError)
    assert not isinstance(ours, TransportClosed)
    assert ours.request.url == "http://users/"
    assert isinstance(ours.__cause__, httpx.ReadError)
    assert "GET failed after 1 attempt" in str(ours)
    assert len(ours.attempts) == 1  # type: ignore[attr-defined]
    # The client's own close cut the attempt: the backend is not blamed (a balancer may serve
    # other clients, whose backends would be ejected by one client's shutdown).
    assert [b.consecutive_failures for b in lb.snapshot().backends] == [0, 0]


@pytest.mark.parametrize("hedge_after", [None, 0.05])
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_aclose_under_a_request_in_flight_ends_it_as_plain_httpx_does(
    anyio_backend: str, hedge_after: float | None, held: Callable[..., Held]
) -> None:
    seen: dict[str, BaseException] = {}
    for name in ("plain", "lbclient"):
        servers = [held(name=f"held-{i}") for i in range(2)]
        in_flight = 1 if hedge_after is None or name == "plain" else 2
        if name == "plain":
            client = httpx.AsyncClient()
            url = servers[0].server.url
        else:
            lb = LoadBalancer([s.server.address for s in servers], RoundRobin)
            client = httpx.AsyncClient(transport=AsyncLBTransport(lb, hedge_after=hedge_after))
            url = "http://users/"

        async def get(client: httpx.AsyncClient = client, url: str = url, name: str = name) -> None:
            try:
                await client.get(url, timeout=SAFETY)
            except Exception as error:
                seen[name] = error

        async with anyio.create_task_group() as tg:
            tg.start_soon(get)
            # With hedging, both backends have the request before the close.
            await wait_for(
                lambda: sum(s.inside for s in servers) == in_flight  # noqa: B023
            )
            await client.aclose()
        for s in servers:
            s.release.set()
    plain, ours = seen["plain"], seen["lbclient"]
    assert isinstance(plain, httpx.ReadError)
    assert type(ours) is type(plain)
    assert not isinstance(ours, TransportClosed)
    assert ours.request.url == "http://users/"
    assert isinstance(ours.__cause__, httpx.ReadError)
    assert "GET failed after" in str(ours)
    assert all(a.error is not None for a in ours.attempts)  # type: ignore[attr-defined]
    assert [b.consecutive_failures for b in lb.snapshot().backends] == [0, 0]


# -- closed before a request begins, or while it waits for a connection --------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_request_waiting_at_aclose_gets_the_closed_error_an_httpx_error(
    anyio_backend: str, held: Callable[..., Held]
) -> None:
    h = held()
    limits = httpx.Limits(max_connections=1)
    transport = AsyncLBTransport([h.server.address], limits=limits)
    client = httpx.AsyncClient(transport=transport)
    seen: list[BaseException] = []

    async def get(path: str) -> None:
        try:
            await client.get(f"http://users/{path}", timeout=SAFETY)
        except Exception as error:
            seen.append(error)

    async with anyio.create_task_group() as tg:
        tg.start_soon(get, "inside")
        await wait_for(lambda: h.inside == 1)
        tg.start_soon(get, "waiting")
        await wait_for(
            lambda: transport._pools and next(iter(transport._pools.values())).gate._waiters
        )
        await transport.aclose()
    h.release.set()
    waiting = next(e for e in seen if e.request.url.path == "/waiting")  # type: ignore[attr-defined]
    assert isinstance(waiting, TransportClosedError)
    assert isinstance(waiting, (TransportClosed, httpx.TransportError, RuntimeError))
    assert str(waiting) == "AsyncLBTransport is closed"
    inside = next(e for e in seen if e.request.url.path == "/inside")  # type: ignore[attr-defined]
    assert isinstance(inside, httpx.ReadError)
    assert [r.target for r in h.server.requests] == ["/inside"]  # the waiting one never sent
    await client.aclose()


def test_a_request_after_close_gets_the_closed_error_an_httpx_error() -> None:
    with TestServer() as server:
        transport = LBTransport([server.address])
        transport.close()
        request = httpx.Request("GET", "http://users/")
        with pytest.raises(httpx.TransportError) as caught:
            transport.handle_request(request)
        assert isinstance(caught.value, TransportClosed)
        assert isinstance(caught.value, RuntimeError)  # as before
        assert caught.value.request is request
        assert str(caught.value) == "LBTransport is closed"

        async def main() -> None:
            transport = AsyncLBTransport([server.address])
            await transport.aclose()
            with pytest.raises(TransportClosedError, match="AsyncLBTransport is closed"):
                await transport.handle_async_request(request)

        anyio.run(main)
        assert server.count() == 0


def test_the_closed_error_survives_a_copy_and_pickling() -> None:
    import copy
    import pickle

    error = TransportClosedError(AsyncLBTransport(["127.0.0.1:1"]))
    for twin in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert type(twin) is TransportClosedError
        assert str(twin) == str(error) == "AsyncLBTransport is closed"


def streaming(exchange: Exchange) -> bool:
    """The head at once, then a chunked body of two pieces 50 ms apart."""
    exchange.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(2):
        exchange.sleep(0.05)
        exchange.send(b"5\r\nhello\r\n")
    exchange.send(b"0\r\n\r\n")
    return exchange.keep_alive


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_hedged_requests_cancelled_around_their_answer_keep_no_slot() -> None:
    # Cancelled from outside as a response came (or while the losers were being cancelled), a
    # hedged request left that response open: its backend's slot was lost for good, and with
    # max_connections every later request to it waited for the pool timeout. Its result stream
    # was left unclosed too (a ResourceWarning each).
    import gc
    import warnings

    slow = TestServer("ok", delay=0.2).start()
    fast = TestServer("streaming", behaviours={"streaming": streaming}).start()
    transport = AsyncLBTransport(
        [slow.address, fast.address],
        limits=httpx.Limits(max_connections=2),
        hedge_after=0.02,
        budget=None,
        hedge_budget=None,
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://svc", timeout=httpx.Timeout(5, pool=1)
            ) as client:
                for trial in range(150):
                    with anyio.move_on_after(0.015 + (trial % 60) * 0.0005):
                        async with client.stream("GET", "/") as response:
                            await response.aread()
                    await anyio.sleep(0.02)
                await wait_for(lambda: all(p.gate.active == 0 for p in transport._pools.values()))
                for _ in range(4):  # every slot free: none of these waits for the pool
                    assert (await client.get("/")).status_code == 200
            gc.collect()
        unclosed = [w for w in caught if "MemoryObject" in str(w.message)]
        assert unclosed == []
    finally:
        slow.close()
        fast.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_full_pool_is_not_the_backends_failure() -> None:
    # A burst beyond the client's own max_connections ends in PoolTimeouts, as with plain
    # httpx; those are the client's queue, not a failing backend: none is ejected for them.
    servers = [TestServer("ok", delay=0.5).start() for _ in range(2)]
    transport = AsyncLBTransport(
        [s.address for s in servers], limits=httpx.Limits(max_connections=2)
    )
    timeouts = 0
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://svc", timeout=httpx.Timeout(5, pool=0.1)
        ) as client:

            async def get(number: int) -> None:
                nonlocal timeouts
                try:
                    await client.get(f"/{number}")
                except httpx.PoolTimeout:
                    timeouts += 1

            async with anyio.create_task_group() as group:
                for number in range(30):
                    group.start_soon(get, number)
            assert timeouts >= 20  # 4 at a time for 0.5 s, each of the rest waits 0.2 s at most
            assert transport.balancer.snapshot().ready == 2
    finally:
        for server in servers:
            server.close()


def unavailable(exchange: Exchange) -> bool:
    """503 with a chunked body (no length: never read ahead)."""
    exchange.send(
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    return exchange.keep_alive


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_hedged_retry_does_not_wait_for_the_connection_of_the_response_it_retries() -> None:
    # The hedged loop kept a response of a status to retry open (to return it if nothing
    # better came) while the next attempt waited for a connection: with one backend and
    # max_connections=1 that was its own connection, and with no pool timeout a hang.
    server = TestServer("unavailable", behaviours={"unavailable": unavailable}).start()
    transport = AsyncLBTransport(
        [server.address],
        limits=httpx.Limits(max_connections=1),
        retry_statuses=[503],
        hedge_after=0.05,
        max_attempts=3,
    )
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://svc", timeout=httpx.Timeout(5, pool=None)
        ) as client:
            with anyio.fail_after(SAFETY):  # a bound: without the fix it never returns
                response = await client.get("/")
        assert response.status_code == 503
        assert 2 <= server.count("GET") <= 3  # retried (max_attempts counts hedges too)
    finally:
        server.close()
