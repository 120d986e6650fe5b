"""LBTransport and AsyncLBTransport against real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from lbclient import (
    Backend,
    Consistent,
    Hash,
    HealthPolicy,
    LoadBalancer,
    RetryPolicy,
    RoundRobin,
)
from lbclient.errors import KeyFunctionError, NoBackendAvailable
from lbclient.httpx_transport import AsyncLBTransport, LBTransport
from lbclient.testing import TestServer, TLSCerts, closed_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def trio() -> Iterator[list[TestServer]]:
    servers = [TestServer(name=f"s{i}").start() for i in range(3)]
    yield servers
    for server in servers:
        server.close()


def addresses(servers: list[TestServer]) -> list[str]:
    return [s.address for s in servers]


def key_landing_on(lb: LoadBalancer, target: TestServer | str) -> str:
    """A key whose first candidate is ``target`` (a server or an address)."""
    address = target if isinstance(target, str) else target.address
    for i in range(10_000):
        key = f"k{i}"
        picked = lb.select(key)
        if picked is not None and picked.address == address:
            return key
    raise AssertionError("no key lands on the target")


def by_header(request: httpx.Request) -> str | None:
    return request.headers.get("x-user-id")


# -- routing -----------------------------------------------------------------------------------


def test_round_robin_spreads_and_keeps_logical_request(trio: list[TestServer]) -> None:
    transport = LBTransport(addresses(trio), algorithm=RoundRobin)
    with httpx.Client(transport=transport, base_url="http://users") as client:
        for _ in range(30):
            response = client.get("/v1/items", params={"q": "a b"})
            assert response.status_code == 200
            body = response.json()
            assert body["host"] == "users"
            assert body["path"] == "/v1/items?q=a+b"
            assert response.request.url == "http://users/v1/items?q=a+b"
            assert response.url == "http://users/v1/items?q=a+b"
    assert [s.count("GET") for s in trio] == [10, 10, 10]


def test_body_method_and_headers_unchanged(trio: list[TestServer]) -> None:
    payload = b"x" * 10_000
    with httpx.Client(transport=LBTransport(addresses(trio)), base_url="http://users:8080") as c:
        response = c.put("/things/1", content=payload, headers={"X-Trace": "abc"})
    body = response.json()
    assert body["method"] == "PUT"
    assert body["host"] == "users:8080"
    assert body["body_length"] == len(payload)
    assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()
    recorded = [r for s in trio for r in s.requests]
    assert len(recorded) == 1
    assert recorded[0].headers["x-trace"] == "abc"


def test_mounts_route_only_the_logical_service(trio: list[TestServer]) -> None:
    other = TestServer(name="direct").start()
    try:
        transport = LBTransport(addresses(trio[:2]))
        with httpx.Client(mounts={"http://users": transport}) as client:
            assert client.get("http://users/a").json()["server"] in {"s0", "s1"}
            direct = client.get(f"{other.url}/b").json()
            assert direct["server"] == "direct"
            assert direct["host"] == other.address
        assert other.count() == 1
        assert trio[2].count() == 0
    finally:
        other.close()


@pytest.mark.parametrize(
    ("key", "make"),
    [
        (by_header, lambda i: {"headers": {"x-user-id": f"user-{i % 7}"}}),
        (lambda r: r.url.path, lambda i: {"url": f"/users/{i % 7}/profile"}),
        (lambda r: r.url.params.get("tenant"), lambda i: {"params": {"tenant": f"t{i % 7}"}}),
    ],
    ids=["header", "path", "query"],
)
def test_sticky_keys(trio: list[TestServer], key: Any, make: Any) -> None:
    transport = LBTransport(addresses(trio), key=key, algorithm=Consistent)
    homes: dict[str, set[str]] = {}
    with httpx.Client(transport=transport, base_url="http://users") as client:
        for i in range(70):
            kwargs = {"url": "/x", **make(i)}
            url = kwargs.pop("url")
            response = client.get(url, **kwargs)
            homes.setdefault(str(i % 7), set()).add(response.json()["server"])
    assert all(len(servers) == 1 for servers in homes.values())
    assert len({next(iter(v)) for v in homes.values()}) > 1


def test_key_function_errors_send_nothing(trio: list[TestServer]) -> None:
    def broken(request: httpx.Request) -> str:
        raise LookupError("no tenant")

    with (
        httpx.Client(transport=LBTransport(addresses(trio), key=broken)) as client,
        pytest.raises(KeyFunctionError, match="broken raised LookupError: no tenant"),
    ):
        client.get("http://users/")
    wrong = LBTransport(addresses(trio), key=lambda r: 42)  # type: ignore[arg-type, return-value]
    with (
        httpx.Client(transport=wrong) as client,
        pytest.raises(KeyFunctionError, match=r"returned 42 \(int\)"),
    ):
        client.get("http://users/")
    assert sum(s.count() for s in trio) == 0
    with pytest.raises(TypeError, match="key must be a function"):
        LBTransport(addresses(trio), key="x-user-id")  # type: ignore[arg-type]


# -- failover ----------------------------------------------------------------------------------


def run_kill_mid_run(client: httpx.Client, trio: list[TestServer]) -> list[str]:
    failures: list[str] = []
    for i in range(90):
        if i == 30:
            trio[1].kill()
        try:
            if i % 2:
                response = client.post("/orders", content=f"order-{i}".encode())
            else:
                response = client.get("/orders")
            assert response.status_code == 200
        except httpx.HTTPError as exc:
            failures.append(f"{i}: {exc!r}")
    return failures


def test_backend_killed_mid_run_sync(trio: list[TestServer]) -> None:
    transport = LBTransport(addresses(trio), algorithm=RoundRobin)
    with httpx.Client(transport=transport, base_url="http://users") as client:
        failures = run_kill_mid_run(client, trio)
        before = trio[1].count()
        for _ in range(20):
            client.get("/after")
    assert failures == []
    assert trio[1].count() == before  # traffic left the dead backend
    # Every POST reached exactly one server exactly once.
    bodies = [r.body for s in trio for r in s.requests if r.method == "POST"]
    assert sorted(bodies) == sorted(f"order-{i}".encode() for i in range(1, 90, 2))
    assert not transport.balancer.ready(trio[1].address)


@pytest.mark.anyio
async def test_backend_killed_mid_run_async(trio: list[TestServer]) -> None:
    transport = AsyncLBTransport(addresses(trio), algorithm=RoundRobin)
    async with httpx.AsyncClient(transport=transport, base_url="http://users") as client:
        failures = []
        for i in range(90):
            if i == 30:
                await asyncio.to_thread(trio[1].kill)
            try:
                if i % 2:
                    response = await client.post("/orders", content=f"order-{i}".encode())
                else:
                    response = await client.get("/orders")
                assert response.status_code == 200
            except httpx.HTTPError as exc:
                failures.append(f"{i}: {exc!r}")
        before = trio[1].count()
        for _ in range(20):
            await client.get("/after")
    assert failures == []
    assert trio[1].count() == before
    bodies = [r.body for s in trio for r in s.requests if r.method == "POST"]
    assert sorted(bodies) == sorted(f"order-{i}".encode() for i in range(1, 90, 2))


def hang_pair() -> tuple[TestServer, TestServer, LoadBalancer]:
    hang = TestServer("hang", name="hang").start()
    ok = TestServer(name="ok").start()
    # One failure ejects, so the tests see each timeout recorded.
    return (
        hang,
        ok,
        LoadBalancer([hang.address, ok.address], Hash, health=HealthPolicy(consecutive_failures=1)),
    )


TIMEOUT = httpx.Timeout(10.0, read=0.5)


def test_hanging_backend_post_times_out_once_get_fails_over() -> None:
    hang, ok, lb = hang_pair()
    try:
        key = key_landing_on(lb, hang)
        transport = LBTransport(lb, key=lambda r: key)
        with httpx.Client(transport=transport, base_url="http://users", timeout=TIMEOUT) as c:
            with pytest.raises(httpx.ReadTimeout) as info:
                c.post("/charge", content=b"once")
            assert hang.address in str(info.value)
            assert "POST is not idempotent" in str(info.value)
            assert hang.count("POST") == 1
            assert ok.count() == 0
            assert not lb.ready(hang.address)  # the timeout was recorded
            response = c.get("/read")  # the hanging backend is skipped while unhealthy
            assert response.json()["server"] == "ok"
        assert hang.count("GET") == 0
        assert ok.count("GET") == 1
    finally:
        hang.close()
        ok.close()


@pytest.mark.anyio
async def test_hanging_backend_async() -> None:
    hang, ok, lb = hang_pair()
    try:
        key = key_landing_on(lb, hang)
        transport = AsyncLBTransport(lb, key=lambda r: key)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://users", timeout=TIMEOUT
        ) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/charge", content=b"once")
            assert hang.count("POST") == 1
            response = await client.get("/read")
            assert response.json()["server"] == "ok"
        assert ok.count("POST") == 0
    finally:
        hang.close()
        ok.close()


def test_get_on_hanging_backend_is_retried_elsewhere_when_healthy() -> None:
    hang, ok, lb = hang_pair()
    try:
        key = key_landing_on(lb, hang)
        with httpx.Client(transport=LBTransport(lb, key=lambda r: key), timeout=TIMEOUT) as c:
            assert c.get("http://users/x").json()["server"] == "ok"
        assert hang.count("GET") == 1
        assert not lb.ready(hang.address)
    finally:
        hang.close()
        ok.close()


@pytest.mark.parametrize("mode", ["reset", "close"])
def test_reset_mid_response(mode: str) -> None:
    bad = TestServer(mode, name="bad").start()
    ok = TestServer(name="ok").start()
    try:
        lb = LoadBalancer([bad.address, ok.address], Hash)
        key = key_landing_on(lb, bad)
        with httpx.Client(transport=LBTransport(lb, key=lambda r: key)) as client:
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                client.post("http://users/pay", content=b"p")
            assert bad.count("POST") == 1
            assert lb.health(bad.address).consecutive_failures == 1  # health recorded
            assert client.get("http://users/get").json()["server"] == "ok"
        assert bad.count("GET") == 1
        assert ok.count("POST") == 0
    finally:
        bad.close()
        ok.close()


def test_503_recorded_and_optionally_retried() -> None:
    sick = TestServer("status:503", name="sick").start()
    ok = TestServer(name="ok").start()
    try:
        lb = LoadBalancer([sick.address, ok.address], Hash, health=HealthPolicy(consecutive_5xx=2))
        key = key_landing_on(lb, sick)
        with httpx.Client(transport=LBTransport(lb, key=lambda r: key)) as client:
            assert client.get("http://users/").status_code == 503  # off by default
            assert lb.health(sick.address).consecutive_5xx == 1
        retrying = LBTransport(lb, key=lambda r: key, retry_statuses={502, 503, 504})
        with httpx.Client(transport=retrying) as client:
            assert client.get("http://users/").json()["server"] == "ok"
            assert not lb.ready(sick.address)  # the second 503 in a row ejected it
            lb.report_check(sick.address, True)  # a passing check takes it back
            post = client.post("http://users/", content=b"x")
            assert post.status_code == 503  # not idempotent: not retried
        assert sick.count("POST") == 1
        assert ok.count("POST") == 0
    finally:
        sick.close()
        ok.close()


def test_all_attempts_failed_names_every_backend() -> None:
    ports = [closed_port() for _ in range(3)]
    backends = [f"127.0.0.1:{p}" for p in ports]
    with (
        httpx.Client(transport=LBTransport(backends)) as client,
        pytest.raises(httpx.ConnectError) as info,
    ):
        client.post("http://users/", content=b"x")
    message = str(info.value)
    assert "failed after 3 attempts" in message
    for port in ports:
        assert f"127.0.0.1:{port} (ConnectError" in message
    assert info.value.request.url == "http://users/"


def test_no_backend_available() -> None:
    with (
        httpx.Client(transport=LBTransport([])) as client,
        pytest.raises(httpx.ConnectError, match="no backends"),
    ):
        client.get("http://users/")
    lb = LoadBalancer(["127.0.0.1:1"])
    lb.set_enabled("127.0.0.1:1", False)
    with (
        httpx.Client(transport=LBTransport(lb)) as client,
        pytest.raises(NoBackendAvailable, match="disabled"),
    ):
        client.get("http://users/")


def test_unready_backends_are_skipped_and_panic_off_means_no_request(
    trio: list[TestServer],
) -> None:
    # One connection failure ejects, any number may be ejected, panic mode is off, and the clock
    # stands still: an ejected backend stays ejected, with no probe due, all test long.
    dead = f"127.0.0.1:{closed_port()}"
    ready, *ejected = trio
    lb = LoadBalancer(
        [dead, *addresses(trio)],
        Hash,
        health=HealthPolicy(consecutive_failures=1, max_ejection_percent=100, panic_threshold=0),
        clock=lambda: 1000.0,
    )
    for server in ejected:
        lb.report(server.address, False)
    assert [lb.ready(s.address) for s in trio] == [True, False, False]
    assert lb.ready(dead)

    def fallback(key: str) -> list[str]:
        return [b.address for b in lb.iter(key)]

    # A key whose fallback order is the dead backend, both ejected ones, then the ready one.
    key = next(
        k
        for k in (f"k{i}" for i in range(10_000))
        if fallback(k)[0] == dead and fallback(k)[-1] == ready.address
    )
    with httpx.Client(transport=LBTransport(lb, key=lambda r: key, max_attempts=3)) as client:
        # The dead backend refuses; the retry passes over the ejected backends to the ready one.
        assert client.get("http://users/").json()["server"] == ready.name
        assert [s.count() for s in trio] == [1, 0, 0]
        assert not lb.ready(dead)  # the refused connection ejected it
        lb.report(ready.address, False)
        assert not any(lb.ready(b) for b in lb.backends)
        assert not lb.panic
        # Nothing is healthy and panic mode is off: no request at all, and the error says why.
        with pytest.raises(NoBackendAvailable, match="panic mode is off") as caught:
            client.get("http://users/")
    assert isinstance(caught.value, httpx.ConnectError)
    assert [s.count() for s in trio] == [1, 0, 0]


def test_retry_maybe_sent_can_be_turned_off() -> None:
    hang, ok, lb = hang_pair()
    try:
        key = key_landing_on(lb, hang)
        transport = LBTransport(lb, key=lambda r: key, retry_maybe_sent=False)
        with (
            httpx.Client(transport=transport, timeout=TIMEOUT) as client,
            pytest.raises(httpx.ReadTimeout, match="retry_maybe_sent is off"),
        ):
            client.get("http://users/")
        assert ok.count() == 0
    finally:
        hang.close()
        ok.close()


def test_deadline_bounds_all_attempts() -> None:
    servers = [TestServer("hang").start() for _ in range(3)]
    try:
        transport = LBTransport(addresses(servers), max_attempts=3, deadline=0.5)
        with (
            httpx.Client(transport=transport, timeout=httpx.Timeout(0.5, read=0.3)) as c,
            pytest.raises(httpx.ReadTimeout, match=r"deadline of 0\.5 s ran out") as caught,
        ):
            c.get("http://users/")
        # The first attempt had its own 0.3 s; the second got what was left of the deadline;
        # a third could not have had a useful share of it.
        assert 1 <= sum(s.count() for s in servers) <= 2
        assert len(caught.value.attempts) == sum(s.count() for s in servers)  # type: ignore[attr-defined]
    finally:
        for server in servers:
            server.close()


# -- streaming ---------------------------------------------------------------------------------


def test_streaming_request_body_retried_only_when_never_sent(trio: list[TestServer]) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    lb = LoadBalancer([dead, trio[0].address], Hash)
    stream_key = key_landing_on(lb, dead)

    def chunks() -> Iterator[bytes]:
        yield b"part-1;"
        yield b"part-2"

    with httpx.Client(transport=LBTransport(lb, key=lambda r: stream_key)) as client:
        body = client.post("http://users/upload", content=chunks()).json()
    assert body["body_length"] == len(b"part-1;part-2")
    assert trio[0].requests[0].body == b"part-1;part-2"


@pytest.mark.parametrize(
    ("method", "policy"),
    [("GET", RetryPolicy(buffer_limit=16)), ("POST", RetryPolicy())],
    ids=["body-over-buffer-limit", "not-retried-when-maybe-sent"],
)
def test_streaming_response(method: str, policy: RetryPolicy) -> None:
    # A body that is not buffered reaches the caller as it arrives. The server sends the head
    # and the first 10 of 100000 body bytes, then resets the connection: those 10 bytes are read
    # before the body fails (a transport that read the body first would fail before returning).
    server = TestServer("reset").start()
    try:
        lb = LoadBalancer([server.address])
        with httpx.Client(transport=LBTransport(lb, policy=policy)) as client:
            with client.stream(method, "http://users/stream") as response:
                assert response.status_code == 200
                assert response.headers["content-length"] == "100000"
                chunks = response.iter_raw()
                assert next(chunks) == b"0123456789"
                with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                    next(chunks)
            assert lb.health(server.address).consecutive_failures == 1  # the body failed

            # A whole body: nothing read before the caller reads it (its success is reported
            # only then, ending the failure streak), all of it read after.
            server.mode = "ok"
            with client.stream(method, "http://users/stream") as response:
                assert not response.is_stream_consumed
                assert lb.health(server.address).consecutive_failures == 1
                body = json.loads(b"".join(response.iter_bytes()))
            assert lb.health(server.address).consecutive_failures == 0
    finally:
        server.close()
    assert (body["method"], body["host"], body["path"]) == (method, "users", "/stream")
    assert server.count(method) == 2


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture
def tls() -> TLSCerts:
    return TLSCerts("users.internal", "orders.internal")


def test_tls_verified_against_logical_name(tls: TLSCerts) -> None:
    servers = [TestServer(ssl_context=tls.server_context()).start() for _ in range(2)]
    try:
        transport = LBTransport(
            addresses(servers),
            verify=tls.client_context(),
            hosts=["users.internal", "orders.internal"],
        )
        with httpx.Client(transport=transport) as client:
            for _ in range(4):
                body = client.get("https://users.internal/secure").json()
                assert body["host"] == "users.internal"
            client.get("https://orders.internal/secure")
        recorded = [r for s in servers for r in s.requests]
        assert {r.tls_server_name for r in recorded} == {"users.internal", "orders.internal"}
        # Connections are never shared between two logical TLS names.
        peers: dict[Any, set[str | None]] = {}
        for r in recorded:
            peers.setdefault(r.peer, set()).add(r.tls_server_name)
        assert all(len(names) == 1 for names in peers.values())
    finally:
        for server in servers:
            server.close()


def test_tls_wrong_name_rejected(tls: TLSCerts) -> None:
    server = TestServer(ssl_context=tls.server_context()).start()
    try:
        transport = LBTransport([server.address], verify=tls.client_context())
        with httpx.Client(transport=transport) as client, pytest.raises(httpx.ConnectError) as info:
            client.get("https://billing.internal/")
        assert "certificate" in str(info.value.__cause__) or "CERTIFICATE" in str(
            info.value.__cause__
        )
        assert server.count() == 0
    finally:
        server.close()


@pytest.mark.anyio
async def test_tls_async(tls: TLSCerts) -> None:
    server = TestServer(ssl_context=tls.server_context()).start()
    try:
        transport = AsyncLBTransport([server.address], verify=tls.client_context())
        async with httpx.AsyncClient(transport=transport) as client:
            body = (await client.get("https://users.internal/a")).json()
        assert body["host"] == "users.internal"
        assert server.requests[0].tls_server_name == "users.internal"
    finally:
        server.close()


# -- scale and lifecycle -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_thousand_concurrent_async_requests_with_a_backend_killed() -> None:
    servers = [TestServer(name=f"c{i}").start() for i in range(3)]
    try:
        # A burst of 1,000 at once: a third fail over together, more than the default retry
        # budget allows (it bounds retry storms); this test is about failover, so no budget.
        transport = AsyncLBTransport(addresses(servers), algorithm=RoundRobin, budget=None)
        done = 0
        killed = asyncio.Event()

        async with httpx.AsyncClient(
            transport=transport, base_url="http://users", timeout=30
        ) as client:

            async def one(i: int) -> int:
                nonlocal done
                response = await client.get(f"/item/{i}")
                done += 1
                if done == 300 and not killed.is_set():
                    killed.set()
                    await asyncio.to_thread(servers[1].kill)
                return response.status_code

            results = await asyncio.gather(*(one(i) for i in range(1000)), return_exceptions=True)
        errors = [r for r in results if r != 200]
        assert errors == []
        assert killed.is_set()
        assert sum(s.count() for s in servers) >= 1000
    finally:
        for server in servers:
            server.close()


def test_close_and_context_manager(trio: list[TestServer]) -> None:
    transport = LBTransport(addresses(trio))
    with transport:
        with httpx.Client(transport=transport) as client:
            client.get("http://users/")
        transport.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        transport.handle_request(httpx.Request("GET", "http://users/"))


def test_constructor_arguments(trio: list[TestServer]) -> None:
    lb = LoadBalancer(addresses(trio))
    with pytest.raises(TypeError, match="algorithm= applies only"):
        LBTransport(lb, algorithm=Hash)
    with pytest.raises(ValueError, match="max_attempts"):
        LBTransport(lb, max_attempts=0)
    with pytest.raises(ValueError, match="retry_statuses"):
        LBTransport(lb, retry_statuses={999})
    with pytest.raises(TypeError, match="limits"):
        LBTransport(lb, limits=10)  # type: ignore[arg-type]
    transport = LBTransport(
        [Backend(trio[0].address, 2)],
        algorithm=Consistent,
        limits=httpx.Limits(max_connections=2),
        local_address="127.0.0.1",
    )
    with httpx.Client(transport=transport) as client:
        assert client.get("http://users/").status_code == 200
    assert transport.balancer.backends == (Backend(trio[0].address, 2),)


def test_pools_of_removed_backends_are_closed(trio: list[TestServer]) -> None:
    lb = LoadBalancer(addresses(trio[:2]))
    transport = LBTransport(lb)
    with httpx.Client(transport=transport) as client:
        for _ in range(4):
            client.get("http://users/")
        assert {key[1] for key in transport._pools} == set(addresses(trio[:2]))
        lb.update(addresses(trio[1:]))
        for _ in range(4):
            client.get("http://users/")
        assert {key[1] for key in transport._pools} == set(addresses(trio[1:]))


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_async_backoff_under_asyncio_and_trio(anyio_backend: str) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    ok = TestServer(name="ok").start()
    try:
        # One backend: attempts 2 and 3 revisit it, each after a backoff sleep.
        transport = AsyncLBTransport([dead], max_attempts=3)
        async with httpx.AsyncClient(transport=transport) as client:
            with pytest.raises(httpx.ConnectError, match="failed after 3 attempts"):
                await client.get("http://users/")
        async with httpx.AsyncClient(transport=AsyncLBTransport([dead, ok.address])) as client:
            assert (await client.get("http://users/")).status_code == 200
    finally:
        ok.close()


def test_body_cut_short_by_the_caller_reports_nothing(trio: list[TestServer]) -> None:
    from lbclient._httpx_bodies import SyncBody
    from lbclient._plan import BodyReport, RequestPlan
    from lbclient.retry import RetryPolicy

    lb = LoadBalancer(addresses(trio))
    backend = lb.backends[0]
    plan = RequestPlan(lb, b"", "GET", True, RetryPolicy())
    lb.report(backend, False)  # a failure streak: a success report would end it
    stream = SyncBody(iter([b"a", b"b"]))
    stream.report = BodyReport(plan, backend, False, lb.begin(backend))
    assert lb.load(backend).in_flight == 1
    for _chunk in stream:
        break  # the caller stops reading
    stream.close()
    assert lb.health(backend).consecutive_failures == 1  # neither a success nor a failure
    assert lb.load(backend).in_flight == 0  # but the attempt is over
    unread = SyncBody(iter([b"a"]))
    unread.report = BodyReport(plan, backend, False, lb.begin(backend))
    unread.close()  # headers only: the attempt succeeded
    assert lb.health(backend).consecutive_failures == 0
    assert lb.load(backend).in_flight == 0


@pytest.mark.anyio
async def test_a_body_closed_part_read_frees_its_place_and_its_load() -> None:
    from lbclient.testing import Exchange

    def big(exchange: Exchange) -> bool:
        return exchange.respond(200, b"x" * 1_000_000)

    with TestServer("big", behaviours={"big": big}) as server:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        transport = AsyncLBTransport([server.address], limits=limits)
        timeout = httpx.Timeout(5.0, pool=1.0)  # one place: a leaked one is a PoolTimeout
        async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
            for _ in range(3):
                async with client.stream("POST", "http://users/", content=b"") as response:
                    async for _chunk in response.aiter_raw(1024):
                        break  # read a little, then close
                assert transport.balancer.load(server.address).in_flight == 0
            assert (await client.get("http://users/")).status_code == 200


@pytest.mark.anyio
async def test_no_pool_after_aclose(trio: list[TestServer]) -> None:
    transport = AsyncLBTransport(addresses(trio))
    await transport.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await transport._pool(httpx.Request("GET", "http://users/"), transport.balancer.backends[0])
    assert transport._pools == {}


@pytest.mark.anyio
async def test_reset_and_503_async() -> None:
    bad = TestServer("reset", name="bad").start()
    sick = TestServer("status:503", name="sick").start()
    ok = TestServer(name="ok").start()
    try:
        lb = LoadBalancer([bad.address, ok.address], Hash)
        key = key_landing_on(lb, bad)
        async with httpx.AsyncClient(transport=AsyncLBTransport(lb, key=lambda r: key)) as c:
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                await c.post("http://users/pay", content=b"p")
            assert bad.count("POST") == 1
            assert lb.health(bad.address).consecutive_failures == 1  # the failed body
            assert (await c.get("http://users/")).json()["server"] == "ok"
        assert bad.count("GET") == 1
        lb = LoadBalancer([sick.address, ok.address], Hash)
        key = key_landing_on(lb, sick)
        transport = AsyncLBTransport(lb, key=lambda r: key, retry_statuses={503})
        async with httpx.AsyncClient(transport=transport) as c:
            assert (await c.get("http://users/")).json()["server"] == "ok"
            assert lb.health(sick.address).consecutive_5xx == 1
            assert (await c.post("http://users/", content=b"x")).status_code == 503
        assert sick.count("POST") == 1
        assert ok.count("POST") == 0
    finally:
        for server in (bad, sick, ok):
            server.close()


def test_http2_needs_h2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lbclient._pools.importlib.util.find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"lbclient\[http2\]"):
        LBTransport(["127.0.0.1:1"], http2=True)


def test_requests_queued_when_aclose_is_called_are_never_sent() -> None:
    from lbclient.testing import Exchange

    held = threading.Event()

    def hold(exchange: Exchange) -> bool:
        held.set()
        exchange.sleep(0.3)
        return exchange.respond()

    with TestServer("hold", behaviours={"hold": hold}) as server:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)  # one at a time
        transport = AsyncLBTransport([server.address], limits=limits, max_attempts=1)

        async def main() -> list[BaseException | int]:
            client = httpx.AsyncClient(transport=transport)
            tasks = [asyncio.ensure_future(client.get("http://users/")) for _ in range(20)]
            while not held.is_set():  # the first is inside, the other 19 wait their turn
                await asyncio.sleep(0.01)
            await transport.aclose()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            return [o if isinstance(o, BaseException) else o.status_code for o in outcomes]

        outcomes = asyncio.run(main())
        queued = [o for o in outcomes if isinstance(o, RuntimeError)]
        assert len(queued) == 19  # turned away with the transport's closed error
        assert all("AsyncLBTransport is closed" in str(o) for o in queued)
        assert server.count() == 1  # nothing queued was sent, before or after aclose()
