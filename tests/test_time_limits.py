"""attempt_timeout and deadline against real servers on 127.0.0.1 that send slowly, through the
three clients: a body that comes after attempt_timeout is still read (the limit ends at the
response head), a head that trickles in one byte at a time does not outlast attempt_timeout or
the deadline, and a body that trickles does not outlast the deadline."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import requests
import trio
from conftest import NO_EJECTION, key_for

from lbclient import AsyncLBTransport, Hash, LBAdapter, LBTransport, LoadBalancer
from lbclient.requests_adapter import LBTimeout
from lbclient.testing import Exchange, TestServer, TLSCerts

pytestmark = pytest.mark.timeout(120)

#: How late the body of "late" comes after its head.
LATE = 0.5
#: A response head sent one byte every 50 ms takes this long: 4.5 s.
TRICKLED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Trickle: a byte every 50 ms\r\n"
    b"Content-Length: 2\r\n\r\n"
)
STEP = 0.05
#: Well under what the trickle takes (4.5 s for the head, 5 s for a body of 100 bytes), well
#: over what a limit of 0.5 s needs on a busy machine.
SOON = 2.0
BIG = 300_000


def late(exchange: Exchange) -> bool:
    """``late:SIZE``: the head at once, a body of SIZE bytes LATE seconds later."""
    size = int(exchange.arg or "100")
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n"
    exchange.send(head.encode("latin-1"))
    exchange.sleep(LATE)
    exchange.send(b"x" * size)
    return exchange.keep_alive


def trickle(exchange: Exchange) -> bool:
    """The head one byte every STEP seconds, then a body of two bytes."""
    for i in range(len(TRICKLED_HEAD)):
        if exchange.stopping:
            return False
        exchange.send(TRICKLED_HEAD[i : i + 1])
        exchange.sleep(STEP)
    exchange.send(b"ok")
    return False


def trickle_body(exchange: Exchange) -> bool:
    """The head at once, then a body of 100 bytes, one byte every STEP seconds."""
    exchange.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    for _ in range(100):
        if exchange.stopping:
            return False
        exchange.send(b"x")
        exchange.sleep(STEP)
    return False


BEHAVIOURS = {"late": late, "trickle": trickle, "trickle_body": trickle_body}


@pytest.fixture
def slow() -> Iterator[TestServer]:
    with TestServer("late:100", name="slow", behaviours=BEHAVIOURS) as server:
        yield server


@pytest.fixture
def ok() -> Iterator[TestServer]:
    with TestServer(name="ok") as server:
        yield server


def run_async(library: str, main: Callable[[], Awaitable[None]]) -> None:
    if library == "trio":
        trio.run(main)
    else:
        asyncio.run(main())  # type: ignore[arg-type]


# -- attempt_timeout ends at the response head: the body gets the client's own timeouts ---------


def test_httpx_body_after_attempt_timeout_is_read(slow: TestServer) -> None:
    transport = LBTransport([slow.address], attempt_timeout=0.3)
    with httpx.Client(transport=transport, base_url="http://users", timeout=5.0) as client:
        assert client.get("/small").content == b"x" * 100  # read inside the attempt
        assert client.post("/small", content=b"once").content == b"x" * 100
        slow.mode = f"late:{BIG}"
        with client.stream("GET", "/big") as response:
            assert len(response.read()) == BIG
        assert len(client.get("/big").content) == BIG
    assert len(slow.requests) == 4  # no attempt was cut: none was retried


@pytest.mark.parametrize("library", ["asyncio", "trio"])
def test_async_httpx_body_after_attempt_timeout_is_read(slow: TestServer, library: str) -> None:
    async def main() -> None:
        transport = AsyncLBTransport([slow.address], attempt_timeout=0.3)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://users", timeout=5.0
        ) as client:
            slow.mode = "late:100"
            assert (await client.get("/small")).content == b"x" * 100
            assert (await client.post("/small", content=b"once")).content == b"x" * 100
            slow.mode = f"late:{BIG}"
            async with client.stream("GET", "/big") as response:
                assert len(await response.aread()) == BIG
            assert len((await client.get("/big")).content) == BIG

    run_async(library, main)
    assert len(slow.requests) == 4


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("timeout", [(5.0, 5.0), None])
def test_requests_body_after_attempt_timeout_is_read(
    slow: TestServer, stream: bool, timeout: tuple[float, float] | None
) -> None:
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter([slow.address], attempt_timeout=0.3))
        get = session.get("http://users/small", stream=stream, timeout=timeout)
        assert get.content == b"x" * 100
        post = session.post("http://users/small", data=b"once", stream=stream, timeout=timeout)
        assert post.content == b"x" * 100
        slow.mode = f"late:{BIG}"
        big = session.get("http://users/big", stream=stream, timeout=timeout)
        assert len(big.content) == BIG
    assert len(slow.requests) == 3


def test_a_deadline_leaves_a_body_that_comes_in_time(slow: TestServer) -> None:
    transport = LBTransport([slow.address], deadline=2.0)
    with httpx.Client(transport=transport, base_url="http://users", timeout=5.0) as client:
        assert client.get("/small").content == b"x" * 100
        slow.mode = f"late:{BIG}"
        with client.stream("GET", "/big") as response:
            assert len(response.read()) == BIG
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter([slow.address], deadline=2.0))
        assert len(session.get("http://users/big", stream=True, timeout=5.0).content) == BIG


# -- a head that trickles in does not outlast the deadline or attempt_timeout -------------------


def test_httpx_deadline_holds_against_a_trickled_head(slow: TestServer) -> None:
    slow.mode = "trickle"
    lb = LoadBalancer([slow.address], health=NO_EJECTION)
    with httpx.Client(transport=LBTransport(lb, deadline=0.5), timeout=1.0) as client:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout, match=r"deadline of 0\.5 s ran out"):
            client.get("http://users/")
        assert time.monotonic() - start < SOON
    assert lb.health(slow.address).consecutive_failures == 0  # the deadline's, not the backend's


@pytest.mark.parametrize("library", ["asyncio", "trio"])
def test_async_httpx_deadline_holds_against_a_trickled_head(slow: TestServer, library: str) -> None:
    slow.mode = "trickle"
    lb = LoadBalancer([slow.address], health=NO_EJECTION)
    elapsed: list[float] = []

    async def main() -> None:
        transport = AsyncLBTransport(lb, deadline=0.5)
        async with httpx.AsyncClient(transport=transport, timeout=1.0) as client:
            start = time.monotonic()
            with pytest.raises(httpx.ReadTimeout, match=r"deadline of 0\.5 s ran out"):
                await client.get("http://users/")
            elapsed.append(time.monotonic() - start)

    run_async(library, main)
    assert elapsed[0] < SOON
    assert lb.health(slow.address).consecutive_failures == 0


def test_requests_deadline_holds_against_a_trickled_head(slow: TestServer) -> None:
    slow.mode = "trickle"
    lb = LoadBalancer([slow.address], health=NO_EJECTION)
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter(lb))
        start = time.monotonic()
        with pytest.raises(requests.ReadTimeout, match=r"deadline of 0\.5 s ran out"):
            session.get("http://users/", timeout=LBTimeout(1.0, deadline=0.5))
        assert time.monotonic() - start < SOON
    assert lb.health(slow.address).consecutive_failures == 0


def _trickle_first(slow: TestServer, ok: TestServer) -> tuple[LoadBalancer, str]:
    slow.mode = "trickle"
    lb = LoadBalancer([slow.address, ok.address], Hash, health=NO_EJECTION)
    return lb, key_for(lb, slow)


def test_httpx_attempt_timeout_holds_against_a_trickled_head(
    slow: TestServer, ok: TestServer
) -> None:
    lb, key = _trickle_first(slow, ok)
    transport = LBTransport(lb, key=lambda r: key, attempt_timeout=0.3)
    with httpx.Client(transport=transport, timeout=1.0) as client:
        start = time.monotonic()
        response = client.get("http://users/")
        assert time.monotonic() - start < SOON
        assert response.json()["server"] == "ok"
        # Cut by attempt_timeout: a maybe-sent failure, blamed on the backend, not retried
        # for a POST.
        assert lb.health(slow.address).consecutive_failures == 1
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout, match="POST is not idempotent"):
            client.post("http://users/", content=b"once")
        assert time.monotonic() - start < SOON
    assert lb.health(slow.address).consecutive_failures == 2


@pytest.mark.parametrize("library", ["asyncio", "trio"])
def test_async_httpx_attempt_timeout_holds_against_a_trickled_head(
    slow: TestServer, ok: TestServer, library: str
) -> None:
    lb, key = _trickle_first(slow, ok)
    elapsed: list[float] = []

    async def main() -> None:
        transport = AsyncLBTransport(lb, key=lambda r: key, attempt_timeout=0.3)
        async with httpx.AsyncClient(transport=transport, timeout=1.0) as client:
            start = time.monotonic()
            response = await client.get("http://users/")
            elapsed.append(time.monotonic() - start)
            assert response.json()["server"] == "ok"

    run_async(library, main)
    assert elapsed[0] < SOON
    assert lb.health(slow.address).consecutive_failures == 1


def test_requests_attempt_timeout_holds_against_a_trickled_head(
    slow: TestServer, ok: TestServer
) -> None:
    lb, key = _trickle_first(slow, ok)
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter(lb, key=lambda r: key, attempt_timeout=0.3))
        start = time.monotonic()
        response = session.get("http://users/", timeout=1.0)
        assert time.monotonic() - start < SOON
        assert response.json()["server"] == "ok"
        assert lb.health(slow.address).consecutive_failures == 1
        start = time.monotonic()
        with pytest.raises(requests.ReadTimeout, match="POST is not idempotent"):
            session.post("http://users/", data=b"once", timeout=1.0)
        assert time.monotonic() - start < SOON
    assert lb.health(slow.address).consecutive_failures == 2


# -- a body that trickles in does not outlast the deadline, whoever reads it --------------------


def test_httpx_deadline_holds_against_a_trickled_body(slow: TestServer) -> None:
    slow.mode = "trickle_body"
    lb = LoadBalancer([slow.address], health=NO_EJECTION)
    with httpx.Client(transport=LBTransport(lb, deadline=0.5), timeout=1.0) as client:
        for send in (
            lambda: client.get("http://users/"),  # read by lbclient, inside the attempt
            lambda: client.post("http://users/", content=b"once"),  # read by httpx
        ):
            start = time.monotonic()
            with pytest.raises(httpx.ReadTimeout, match=r"deadline of 0\.5 s ran out"):
                send()
            assert time.monotonic() - start < SOON
        start = time.monotonic()
        with (
            client.stream(
                "GET", "http://users/", extensions={"lbclient": {"max_attempts": 1}}
            ) as r,
            pytest.raises(httpx.ReadTimeout, match=r"deadline of 0\.5 s ran out"),
        ):
            r.read()  # streamed by the caller
        assert time.monotonic() - start < SOON
    assert lb.health(slow.address).consecutive_failures == 0


@pytest.mark.parametrize("library", ["asyncio", "trio"])
def test_async_httpx_deadline_holds_against_a_trickled_body(slow: TestServer, library: str) -> None:
    slow.mode = "trickle_body"
    lb = LoadBalancer([slow.address], health=NO_EJECTION)
    elapsed: list[float] = []

    async def main() -> None:
        transport = AsyncLBTransport(lb, deadline=0.5)
        async with httpx.AsyncClient(transport=transport, timeout=1.0) as client:
            start = time.monotonic()
            with pytest.raises(httpx.ReadTimeout, match=r"deadline of 0\.5 s ran out"):
                await client.get("http://users/")
            elapsed.append(time.monotonic() - start)
            start = time.monotonic()
            with pytest.raises(httpx.ReadTimeout, match=r"deadline of 0\.5 s ran out"):
                await client.post("http://users/", content=b"once")
            elapsed.append(time.monotonic() - start)

    run_async(library, main)
    assert max(elapsed) < SOON
    assert lb.health(slow.address).consecutive_failures == 0


@pytest.mark.parametrize("stream", [False, True])
def test_requests_deadline_holds_against_a_trickled_body(slow: TestServer, stream: bool) -> None:
    slow.mode = "trickle_body"
    lb = LoadBalancer([slow.address], health=NO_EJECTION)
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter(lb, deadline=0.5))
        for method in ("GET", "POST"):
            start = time.monotonic()
            with pytest.raises(requests.ConnectionError, match=r"deadline of 0\.5 s ran out"):
                session.request(method, "http://users/", stream=stream, timeout=1.0).content  # noqa: B018
            assert time.monotonic() - start < SOON
    assert lb.health(slow.address).consecutive_failures == 0


# -- a server that does not read: a write cut by the deadline is the deadline's -----------------


@pytest.fixture
def deaf() -> Iterator[str]:
    """A listener that accepts connections and never reads from them."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for sock in [*held, listener]:
            sock.close()


#: More than the kernel buffers on both sides of a loopback connection.
HUGE = b"x" * (64 * 1024 * 1024)


def test_a_write_cut_by_the_deadline_is_not_blamed_on_the_backend(deaf: str) -> None:
    lb = LoadBalancer([deaf], health=NO_EJECTION)
    with httpx.Client(transport=LBTransport(lb, deadline=0.5), timeout=5.0) as client:
        start = time.monotonic()
        with pytest.raises(httpx.WriteTimeout, match=r"deadline of 0\.5 s ran out"):
            client.post("http://users/", content=HUGE)
        assert time.monotonic() - start < SOON
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter(lb, deadline=0.5))
        start = time.monotonic()
        with pytest.raises(requests.ConnectionError, match=r"deadline of 0\.5 s ran out"):
            session.post("http://users/", data=HUGE, timeout=5.0)
        assert time.monotonic() - start < SOON
    assert lb.health(deaf).consecutive_failures == 0


def test_limits_hold_over_tls(tmp_path: Path) -> None:
    certs = TLSCerts("users")
    ca = certs.write_ca(tmp_path / "ca.pem")
    context = certs.server_context()
    with TestServer(ssl_context=context, behaviours=BEHAVIOURS) as server:
        lb = LoadBalancer([server.address], health=NO_EJECTION)
        transport = LBTransport(lb, deadline=2.0, verify=certs.client_context())
        with (
            httpx.Client(transport=transport, timeout=1.0) as client,
            requests.Session() as session,
        ):
            session.mount("https://users/", LBAdapter(lb, deadline=2.0))
            assert client.get("https://users/").json()["host"] == "users"
            assert session.get("https://users/", verify=str(ca)).json()["host"] == "users"
            server.mode = "trickle"
            for send in (
                lambda: client.get("https://users/", extensions={"lbclient": {"deadline": 0.5}}),
                lambda: session.get(
                    "https://users/", verify=str(ca), timeout=LBTimeout(1.0, deadline=0.5)
                ),
            ):
                start = time.monotonic()
                with pytest.raises((httpx.ReadTimeout, requests.ReadTimeout), match="deadline"):
                    send()
                assert time.monotonic() - start < SOON
        assert lb.health(server.address).consecutive_failures == 0


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "h2-tls"])
@pytest.mark.parametrize("client", ["sync", "async"])
def test_one_requests_limits_leave_the_others_on_an_http2_connection(
    tls: bool, client: str
) -> None:
    # Requests multiplexed on one HTTP/2 connection share its reads and writes: one request's
    # deadline ending them failed every other stream of the connection, B's too (no limit).
    from lbclient import RequestOptions
    from lbclient.testing import H2TestServer

    certs = TLSCerts("users", "127.0.0.1") if tls else None
    server = H2TestServer(ssl_context=certs.server_context(alpn=["h2"]) if certs else None)
    server.start()
    scheme = "https" if certs else "http"
    options = {"verify": certs.client_context()} if certs else {"http1": False}
    limited = {"lbclient": RequestOptions(deadline=0.5, max_attempts=1)}
    outcomes: dict[str, object] = {}

    def release_later() -> None:
        time.sleep(1.0)  # past A's deadline, while both wait on the connection
        server.mode = "ok"

    try:
        if client == "sync":
            transport = LBTransport([server.address], http2=True, max_attempts=1, **options)
            with httpx.Client(transport=transport, timeout=10) as http:
                http.get(f"{scheme}://users/warm")  # the one connection both will share
                server.mode = "hold"

                def one(name: str, extensions: dict[str, object]) -> None:
                    try:
                        outcomes[name] = http.get(
                            f"{scheme}://users/{name}", extensions=extensions
                        ).status_code
                    except httpx.HTTPError as error:
                        outcomes[name] = type(error)

                workers = [
                    threading.Thread(target=one, args=("b", {})),
                    threading.Thread(target=one, args=("a", limited)),
                    threading.Thread(target=release_later),
                ]
                workers[0].start()  # B first: it is reading the connection when A comes
                for _ in range(1000):
                    if any(r.target == "/b" for r in server.requests):
                        break
                    time.sleep(0.01)
                for worker in workers[1:]:
                    worker.start()
                for worker in workers:
                    worker.join(30)
        else:

            async def main() -> None:
                transport = AsyncLBTransport(
                    [server.address], http2=True, max_attempts=1, **options
                )
                async with httpx.AsyncClient(transport=transport, timeout=10) as http:
                    await http.get(f"{scheme}://users/warm")
                    server.mode = "hold"

                    async def one(name: str, extensions: dict[str, object]) -> None:
                        try:
                            response = await http.get(
                                f"{scheme}://users/{name}", extensions=extensions
                            )
                            outcomes[name] = response.status_code
                        except httpx.HTTPError as error:
                            outcomes[name] = type(error)

                    async def release() -> None:
                        await asyncio.to_thread(release_later)

                    await asyncio.gather(one("b", {}), one("a", limited), release())

            asyncio.run(main())
        assert outcomes["b"] == 200
        assert outcomes["a"] in (200, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)
    finally:
        server.close()
