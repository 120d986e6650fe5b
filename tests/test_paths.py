"""Paths users take through the transports and the adapter, against real servers on loopback:
HTTP/2 (streams multiplexed on one connection, a backend killed under load), IPv6 backends,
redirects followed within the service, and a streamed body whose connection breaks."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import requests

from lbclient import (
    AsyncLBTransport,
    Backend,
    HealthPolicy,
    LBAdapter,
    LBTransport,
    LoadBalancer,
    RetryPolicy,
    RoundRobin,
)
from lbclient.health import BackendHealth
from lbclient.testing import H2TestServer, TestServer, TLSCerts, serve

pytestmark = pytest.mark.timeout(120)

NAME = "users.internal"
# Long enough that a stuck request shows up as a failed liveness guard (GUARD), not as a read
# timeout quietly retried on another backend.
TIMEOUT = httpx.Timeout(60.0)
GUARD = 30.0  # seconds a condition or a request may take before the test gives up on it
CONCURRENT = 12


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_leftover_server_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    new = [t for t in threading.enumerate() if t not in before]
    assert [t.name for t in new if t.name.startswith("TestServer-")] == []


@pytest.fixture(scope="module")
def certs() -> TLSCerts:
    return TLSCerts(NAME)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition``; a liveness guard that fails the test if it never holds."""
    deadline = time.monotonic() + GUARD
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


async def await_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + GUARD
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)


def health_of(balancer: LoadBalancer, address: str) -> BackendHealth:
    (entry,) = [h for h in balancer.snapshot().backends if h.backend.address == address]
    return entry


# -- HTTP/2 ------------------------------------------------------------------------------------


@pytest.fixture
def h2_servers(certs: TLSCerts) -> Iterator[list[H2TestServer]]:
    """Three HTTP/2 backends that hold every request until their mode changes."""
    servers = [
        H2TestServer("hold", name=f"h{i}", ssl_context=certs.server_context(alpn=["h2"]))
        for i in range(3)
    ]
    with serve(*servers):
        yield servers
    assert [e for s in servers for e in s.errors] == []


def check_h2_response(response: httpx.Response, path: str, servers: set[str]) -> None:
    assert response.status_code == 200
    assert response.http_version == "HTTP/2"
    assert response.url == f"https://{NAME}{path}"
    body = response.json()
    assert (body["method"], body["path"], body["host"]) == ("GET", path, NAME)
    assert body["server"] in servers


def check_multiplexed(server: H2TestServer, count: int) -> None:
    """``count`` requests, all recorded before any was answered (the server held them): they
    were open at once, as streams of one TCP connection, each with the logical :authority and
    SNI."""
    recorded = server.requests
    assert len(recorded) == count
    assert len({r.connection for r in recorded}) == 1
    assert len({r.stream for r in recorded}) == count
    assert {r.headers[":authority"] for r in recorded} == {NAME}
    assert {r.tls_server_name for r in recorded} == {NAME}


def open_in_turn(
    pool: ThreadPoolExecutor, client: httpx.Client, paths: list[str], opened: Callable[[], int]
) -> list[Future[httpx.Response]]:
    """Start one GET per path on its own thread, each once the one before is open on a server
    (``opened()`` counts them); they stay open together while the servers hold them.

    httpcore's sync HTTP/2 connection takes a stream id and sends its HEADERS in two steps, so
    streams opened at the same moment by several threads can go out of order and break the
    connection; opening them in turn keeps these tests about lbclient.
    """
    return [open_one(pool, client, path, opened) for path in paths]


def open_one(
    pool: ThreadPoolExecutor, client: httpx.Client, path: str, opened: Callable[[], int]
) -> Future[httpx.Response]:
    before = opened()
    future = pool.submit(client.get, f"https://{NAME}{path}")
    wait_until(lambda: opened() > before, f"{path} to reach a server")
    return future


def test_http2_requests_to_one_backend_share_one_connection(
    h2_servers: list[H2TestServer], certs: TLSCerts
) -> None:
    server = h2_servers[0]
    transport = LBTransport([server.address], http2=True, verify=certs.client_context())
    paths = [f"/items/{i}" for i in range(CONCURRENT)]
    with (
        httpx.Client(transport=transport, timeout=TIMEOUT) as client,
        ThreadPoolExecutor(CONCURRENT) as pool,
    ):
        futures = open_in_turn(pool, client, paths, server.count)
        server.mode = "ok"  # every request is open on the server: answer them all
        responses = [f.result(timeout=GUARD) for f in futures]
    check_multiplexed(server, CONCURRENT)
    for path, response in zip(paths, responses, strict=True):
        check_h2_response(response, path, {"h0"})


@pytest.mark.anyio
async def test_http2_async_requests_to_one_backend_share_one_connection(
    h2_servers: list[H2TestServer], certs: TLSCerts
) -> None:
    server = h2_servers[0]
    transport = AsyncLBTransport([server.address], http2=True, verify=certs.client_context())
    paths = [f"/items/{i}" for i in range(CONCURRENT)]
    async with httpx.AsyncClient(transport=transport, timeout=TIMEOUT) as client:
        tasks = [asyncio.ensure_future(client.get(f"https://{NAME}{path}")) for path in paths]
        await await_until(lambda: server.count() == CONCURRENT, "every request to reach it")
        server.mode = "ok"
        responses = await asyncio.wait_for(asyncio.gather(*tasks), GUARD)
    check_multiplexed(server, CONCURRENT)
    for path, response in zip(paths, responses, strict=True):
        check_h2_response(response, path, {"h0"})


def check_failover(servers: list[H2TestServer], balancer: LoadBalancer, answered: int) -> None:
    live, victim = servers[:2], servers[2]
    # Every request was answered exactly once, by a live backend.
    assert sum(s.count() for s in live) == answered
    entry = health_of(balancer, victim.address)
    assert entry.ejected
    assert not entry.ready
    assert all(health_of(balancer, s.address).healthy for s in live)


def test_http2_backend_killed_under_load_fails_over(
    h2_servers: list[H2TestServer], certs: TLSCerts
) -> None:
    live, victim = h2_servers[:2], h2_servers[2]
    # Weighted round robin sends the victim one request in five. One at a time: the streams
    # failing on it are retried at once, on the live connections (see open_in_turn).
    balancer = LoadBalancer(
        [Backend(s.address, weight=1 if s is victim else 2) for s in h2_servers],
        RoundRobin,
        health=HealthPolicy(consecutive_failures=3),
    )
    transport = LBTransport(balancer, http2=True, verify=certs.client_context())
    names = {"h0", "h1"}
    paths = [f"/before/{i}" for i in range(5)]
    with (
        httpx.Client(transport=transport, timeout=TIMEOUT) as client,
        ThreadPoolExecutor(len(paths)) as pool,
    ):
        futures = open_in_turn(pool, client, paths, lambda: sum(s.count() for s in h2_servers))
        assert [s.count() for s in h2_servers] == [2, 2, 1]  # in flight on all three
        victim.kill()
        wait_until(lambda: sum(s.count() for s in live) == 5, "its request to fail over")
        for server in live:
            server.mode = "ok"
        for path, future in zip(paths, futures, strict=True):
            check_h2_response(future.result(timeout=GUARD), path, names)
        assert health_of(balancer, victim.address).consecutive_failures == 1  # reported

        # New requests while it is down: its refused connections fail over too, and eject it.
        for i in range(15):
            check_h2_response(client.get(f"https://{NAME}/after/{i}"), f"/after/{i}", names)
    check_failover(h2_servers, balancer, 5 + 15)


@pytest.mark.anyio
async def test_http2_async_backend_killed_under_load_fails_over(
    h2_servers: list[H2TestServer], certs: TLSCerts
) -> None:
    live, victim = h2_servers[:2], h2_servers[2]
    # Round robin: a third of each wave goes to the victim first. Its streams in flight are
    # reported when it dies; the connections refused in the next wave eject it.
    balancer = LoadBalancer(
        [s.address for s in h2_servers], RoundRobin, health=HealthPolicy(consecutive_failures=6)
    )
    transport = AsyncLBTransport(balancer, http2=True, verify=certs.client_context())
    names = {"h0", "h1"}
    async with httpx.AsyncClient(transport=transport, timeout=TIMEOUT) as client:
        paths = [f"/before/{i}" for i in range(CONCURRENT)]
        tasks = [asyncio.ensure_future(client.get(f"https://{NAME}{path}")) for path in paths]
        await await_until(
            lambda: sum(s.count() for s in h2_servers) == CONCURRENT, "every request to be open"
        )
        assert [s.count() for s in h2_servers] == [4, 4, 4]  # in flight on all three
        await asyncio.to_thread(victim.kill)
        await await_until(
            lambda: sum(s.count() for s in live) == CONCURRENT, "its requests to fail over"
        )
        for server in live:
            server.mode = "ok"
        responses = await asyncio.wait_for(asyncio.gather(*tasks), GUARD)
        for path, response in zip(paths, responses, strict=True):
            check_h2_response(response, path, names)
        assert health_of(balancer, victim.address).consecutive_failures == 4  # each reported

        paths = [f"/after/{i}" for i in range(CONCURRENT)]
        wave = [client.get(f"https://{NAME}{path}") for path in paths]
        responses = await asyncio.wait_for(asyncio.gather(*wave), GUARD)
        for path, response in zip(paths, responses, strict=True):
            check_h2_response(response, path, names)
    check_failover(h2_servers, balancer, 2 * CONCURRENT)


# -- IPv6 backends -----------------------------------------------------------------------------


def ipv6_loopback() -> str | None:
    """Why this machine cannot listen on ``::1``, or None when it can."""
    if not socket.has_ipv6:
        return "this Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        return f"cannot bind ::1 ({exc})"
    return None


@pytest.fixture(params=["http", "https"])
def ipv6(request: pytest.FixtureRequest, certs: TLSCerts) -> Iterator[tuple[str, list[TestServer]]]:
    """The logical base URL, and two backends on ``[::1]`` (with a certificate for the logical
    name under https)."""
    why = ipv6_loopback()
    if why is not None:
        pytest.skip(f"this machine has no IPv6 loopback: {why}")
    tls = request.param == "https"
    servers = [
        TestServer(name=f"v{i}", host="::1", ssl_context=certs.server_context() if tls else None)
        for i in range(2)
    ]
    with serve(*servers):
        yield (f"https://{NAME}" if tls else "http://users"), servers
    assert [e for s in servers for e in s.errors] == []


def check_ipv6(base: str, servers: list[TestServer], bodies: list[dict[str, object]]) -> None:
    host = httpx.URL(base).host
    assert all(s.address == f"[::1]:{s.port}" for s in servers)
    assert [b["host"] for b in bodies] == [host] * len(bodies)
    assert sorted(str(b["server"]) for b in bodies) == ["v0", "v0", "v1", "v1"]
    recorded = [r for s in servers for r in s.requests]
    assert len(recorded) == 4
    assert {r.peer[0] for r in recorded} == {"::1"}
    tls_names = {r.tls_server_name for r in recorded}
    assert tls_names == ({NAME} if base.startswith("https") else {None})


def test_ipv6_backends_httpx(ipv6: tuple[str, list[TestServer]], certs: TLSCerts) -> None:
    base, servers = ipv6
    transport = LBTransport([s.address for s in servers], verify=certs.client_context())
    with httpx.Client(transport=transport, base_url=base) as client:
        responses = [client.get(f"/v6/{i}") for i in range(4)]
    assert [str(r.url) for r in responses] == [f"{base}/v6/{i}" for i in range(4)]
    check_ipv6(base, servers, [r.json() for r in responses])


@pytest.mark.anyio
async def test_ipv6_backends_httpx_async(
    ipv6: tuple[str, list[TestServer]], certs: TLSCerts
) -> None:
    base, servers = ipv6
    transport = AsyncLBTransport([s.address for s in servers], verify=certs.client_context())
    async with httpx.AsyncClient(transport=transport, base_url=base) as client:
        responses = [await client.get(f"/v6/{i}") for i in range(4)]
    assert [str(r.url) for r in responses] == [f"{base}/v6/{i}" for i in range(4)]
    check_ipv6(base, servers, [r.json() for r in responses])


def test_ipv6_backends_requests(
    ipv6: tuple[str, list[TestServer]], certs: TLSCerts, tmp_path: Path
) -> None:
    base, servers = ipv6
    ca = str(certs.write_ca(tmp_path / "ca.pem"))
    with requests.Session() as session:
        session.mount(f"{base}/", LBAdapter([s.address for s in servers]))
        responses = [session.get(f"{base}/v6/{i}", verify=ca, timeout=30) for i in range(4)]
    assert [r.url for r in responses] == [f"{base}/v6/{i}" for i in range(4)]
    check_ipv6(base, servers, [r.json() for r in responses])


# -- redirects followed within the service -----------------------------------------------------


@pytest.fixture
def pair() -> Iterator[list[TestServer]]:
    servers = [TestServer(name=f"r{i}") for i in range(2)]
    with serve(*servers):
        yield servers
    assert [e for s in servers for e in s.errors] == []


REDIRECT = "/a/__redirect/..%2Flanding%3Fx%3D1"  # 302 to ../landing?x=1


def check_redirect(response: httpx.Response, servers: list[TestServer]) -> None:
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [302]
    assert response.history[0].headers["location"] == "../landing?x=1"
    assert response.url == "http://users/a/landing?x=1"
    body = response.json()
    assert (body["host"], body["path"]) == ("users", "/a/landing?x=1")
    # The redirected request was balanced again: round robin sent it to the other backend,
    # with the logical Host.
    assert [s.count() for s in servers] == [1, 1]
    seen = {r.target: (s.name, r.headers["host"]) for s in servers for r in s.requests}
    assert sorted(seen) == ["/a/__redirect/..%2Flanding%3Fx%3D1", "/a/landing?x=1"]
    assert {host for _, host in seen.values()} == {"users"}
    assert body["server"] == seen["/a/landing?x=1"][0]


def test_redirect_followed_through_the_balancer(pair: list[TestServer]) -> None:
    transport = LBTransport([s.address for s in pair], algorithm=RoundRobin)
    with httpx.Client(transport=transport, base_url="http://users", follow_redirects=True) as c:
        response = c.get(REDIRECT)
    check_redirect(response, pair)


@pytest.mark.anyio
async def test_redirect_followed_through_the_balancer_async(pair: list[TestServer]) -> None:
    transport = AsyncLBTransport([s.address for s in pair], algorithm=RoundRobin)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://users", follow_redirects=True
    ) as client:
        response = await client.get(REDIRECT)
    check_redirect(response, pair)


# -- a streamed body whose connection breaks ---------------------------------------------------

# "reset" announces 100000 bytes, sends 10 and resets the connection: far over this limit, so
# the body is handed to the caller unread and breaks while the caller reads it.
SMALL_BUFFER = RetryPolicy(buffer_limit=16)


@pytest.fixture
def resetting() -> Iterator[TestServer]:
    with TestServer("reset", name="reset") as server:
        yield server
    assert server.errors == []


def test_streamed_body_broken_names_the_backend(resetting: TestServer) -> None:
    balancer = LoadBalancer([resetting.address])
    transport = LBTransport(balancer, policy=SMALL_BUFFER)
    with (
        httpx.Client(transport=transport) as client,
        client.stream("GET", "http://users/big") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-length"] == "100000"
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)) as info:
            for _ in response.iter_bytes():
                pass
    assert resetting.address in str(info.value)
    assert balancer.health(resetting.address).consecutive_failures == 1
    assert resetting.count("GET") == 1  # the caller had the body: nothing was retried


@pytest.mark.anyio
async def test_streamed_body_broken_names_the_backend_async(resetting: TestServer) -> None:
    balancer = LoadBalancer([resetting.address])
    transport = AsyncLBTransport(balancer, policy=SMALL_BUFFER)
    async with (
        httpx.AsyncClient(transport=transport) as client,
        client.stream("GET", "http://users/big") as response,
    ):
        assert response.status_code == 200
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)) as info:
            async for _ in response.aiter_bytes():
                pass
    assert resetting.address in str(info.value)
    assert balancer.health(resetting.address).consecutive_failures == 1
    assert resetting.count("GET") == 1


def test_streamed_body_broken_names_the_backend_requests(resetting: TestServer) -> None:
    balancer = LoadBalancer([resetting.address])
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter(balancer, policy=SMALL_BUFFER))
        response = session.get("http://users/big", stream=True, timeout=30)
        assert response.status_code == 200
        assert response.headers["content-length"] == "100000"
        with pytest.raises(
            (requests.exceptions.ChunkedEncodingError, requests.ConnectionError)
        ) as info:
            for _ in response.iter_content(1024):
                pass
        response.close()
    assert resetting.address in str(info.value)
    assert balancer.health(resetting.address).consecutive_failures == 1
    assert resetting.count("GET") == 1
