"""LBAdapter (requests) against real HTTP servers on 127.0.0.1: the httpx failure matrix again."""

from __future__ import annotations

import pickle
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from lbclient import (
    Backend,
    Hash,
    HealthPolicy,
    LoadBalancer,
    NoBackendAvailable,
    RoundRobin,
)
from lbclient._requests_faults import classify
from lbclient.errors import KeyFunctionError
from lbclient.requests_adapter import LBAdapter
from lbclient.retry import Failure
from lbclient.testing import TestServer, TLSCerts, closed_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def trio() -> Iterator[list[TestServer]]:
    servers = [TestServer(name=f"s{i}").start() for i in range(3)]
    yield servers
    for server in servers:
        server.close()


def session_for(adapter: LBAdapter, prefix: str = "http://users/") -> requests.Session:
    session = requests.Session()
    session.mount(prefix, adapter)
    return session


def key_landing_on(lb: LoadBalancer, address: str) -> str:
    for i in range(10_000):
        picked = lb.select(f"k{i}")
        if picked is not None and picked.address == address:
            return f"k{i}"
    raise AssertionError("no key lands there")


def test_routing_keeps_the_logical_request(trio: list[TestServer]) -> None:
    adapter = LBAdapter([s.address for s in trio], algorithm=RoundRobin)
    with session_for(adapter) as session:
        for _ in range(9):
            response = session.get("http://users/v1/items", params={"q": "a b"})
            assert response.json()["host"] == "users"
            assert response.json()["path"] == "/v1/items?q=a+b"
            assert response.url == "http://users/v1/items?q=a+b"
            assert response.request.url == "http://users/v1/items?q=a+b"
        other = session.get(f"{trio[0].url}/direct").json()  # not under the mount
        assert other["host"] == trio[0].address
    assert [s.count("GET") for s in trio] == [4, 3, 3]


def test_key_function_sticky_and_errors(trio: list[TestServer]) -> None:
    adapter = LBAdapter(
        [s.address for s in trio], algorithm=Hash, key=lambda r: r.headers.get("x-user-id")
    )
    with session_for(adapter) as session:
        homes = {
            session.get("http://users/", headers={"x-user-id": "u7"}).json()["server"]
            for _ in range(6)
        }
        assert len(homes) == 1
    broken = LBAdapter([s.address for s in trio], key=lambda r: 1 / 0)
    with session_for(broken) as session, pytest.raises(KeyFunctionError, match="ZeroDivision"):
        session.get("http://users/")
    assert sum(s.count() for s in trio) == 6


def test_backend_killed_mid_run(trio: list[TestServer]) -> None:
    adapter = LBAdapter([s.address for s in trio], algorithm=RoundRobin)
    failures = []
    with session_for(adapter) as session:
        for i in range(60):
            if i == 20:
                trio[2].kill()
            try:
                if i % 2:
                    response = session.post("http://users/orders", data=f"order-{i}")
                else:
                    response = session.get("http://users/orders")
                assert response.status_code == 200
            except requests.RequestException as exc:
                failures.append(f"{i}: {exc!r}")
        before = trio[2].count()
        for _ in range(10):
            session.get("http://users/after")
    assert failures == []
    assert trio[2].count() == before
    bodies = sorted(r.body for s in trio for r in s.requests if r.method == "POST")
    assert bodies == sorted(f"order-{i}".encode() for i in range(1, 60, 2))


def test_hanging_backend() -> None:
    hang, ok = TestServer("hang").start(), TestServer(name="ok").start()
    try:
        lb = LoadBalancer([hang.address, ok.address], Hash)
        key = key_landing_on(lb, hang.address)
        with session_for(LBAdapter(lb, key=lambda r: key)) as session:
            with pytest.raises(requests.ReadTimeout) as info:
                session.post("http://users/charge", data=b"once", timeout=(5, 0.5))
            assert "POST is not idempotent" in str(info.value)
            assert hang.count("POST") == 1
            lb.report(hang.address, True)
            assert lb.ready(hang.address)
            assert session.get("http://users/", timeout=(5, 0.5)).json()["server"] == "ok"
        assert hang.count("GET") == 1
        assert ok.count("POST") == 0
    finally:
        hang.close()
        ok.close()


@pytest.mark.parametrize("mode", ["reset", "close"])
def test_reset_mid_response(mode: str) -> None:
    bad, ok = TestServer(mode).start(), TestServer(name="ok").start()
    try:
        lb = LoadBalancer([bad.address, ok.address], Hash)
        key = key_landing_on(lb, bad.address)
        with session_for(LBAdapter(lb, key=lambda r: key)) as session:
            with pytest.raises(requests.RequestException):
                session.post("http://users/pay", data=b"p")
            assert bad.count("POST") == 1
            assert lb.health(bad.address).consecutive_failures == 1
            assert session.get("http://users/").json()["server"] == "ok"
        assert bad.count("GET") == 1
        assert ok.count("POST") == 0
    finally:
        bad.close()
        ok.close()


def test_503_recorded_and_optionally_retried() -> None:
    sick, ok = TestServer("status:503").start(), TestServer(name="ok").start()
    try:
        lb = LoadBalancer([sick.address, ok.address], Hash, health=HealthPolicy(consecutive_5xx=2))
        key = key_landing_on(lb, sick.address)
        with session_for(LBAdapter(lb, key=lambda r: key)) as session:
            assert session.get("http://users/").status_code == 503
            assert lb.health(sick.address).consecutive_5xx == 1
        adapter = LBAdapter(lb, key=lambda r: key, retry_statuses={503})
        with session_for(adapter) as session:
            assert session.get("http://users/").json()["server"] == "ok"
            assert not lb.ready(sick.address)  # the second 503 in a row ejected it
            lb.report_check(sick.address, True)  # a passing check takes it back
            assert session.post("http://users/", data=b"x").status_code == 503
        assert sick.count("POST") == 1
        assert ok.count("POST") == 0
    finally:
        sick.close()
        ok.close()


def test_all_attempts_failed_and_no_backend() -> None:
    ports = [closed_port() for _ in range(3)]
    adapter = LBAdapter([f"127.0.0.1:{p}" for p in ports])
    with session_for(adapter) as session, pytest.raises(requests.ConnectionError) as info:
        session.post("http://users/", data=b"x")
    for port in ports:
        assert f"127.0.0.1:{port}" in str(info.value)
    with (
        session_for(LBAdapter([])) as session,
        pytest.raises(requests.ConnectionError, match="no backends"),
    ):
        session.get("http://users/")
    with session_for(LBAdapter([])) as session, pytest.raises(NoBackendAvailable):
        session.get("http://users/")


def test_relative_redirect_stays_on_the_logical_service(trio: list[TestServer]) -> None:
    with session_for(LBAdapter([s.address for s in trio])) as session:
        response = session.get(
            "http://users/a/__redirect/..%2Flanding%3Fx%3D1", headers={"Authorization": "Bearer t"}
        )
    assert response.status_code == 200
    assert response.url == "http://users/a/landing?x=1"
    assert response.history[0].status_code == 302
    assert response.json()["host"] == "users"
    assert response.json()["path"] == "/a/landing?x=1"
    landing = [r for s in trio for r in s.requests if r.target == "/a/landing?x=1"]
    assert landing[0].headers["authorization"] == "Bearer t"  # same host: auth kept


def test_tls_logical_name_and_threads(tmp_path: Path) -> None:
    certs = TLSCerts("users.internal", "orders.internal")
    ca = tmp_path / "ca.pem"
    certs.write_ca(ca)
    servers = [TestServer(ssl_context=certs.server_context()).start() for _ in range(3)]
    try:
        adapter = LBAdapter(
            [s.address for s in servers],
            algorithm=RoundRobin,
            pool_connections=20,
            hosts=["users.internal", "orders.internal"],
        )
        session = requests.Session()
        session.mount("https://users.internal/", adapter)
        session.mount("https://orders.internal/", adapter)
        errors: list[str] = []

        def worker(slot: int) -> None:
            name = "users.internal" if slot % 2 else "orders.internal"
            for i in range(25):
                if slot == 0 and i == 10:
                    servers[1].kill()
                try:
                    body = session.get(f"https://{name}/t{slot}", verify=str(ca)).json()
                    if body["host"] != name:
                        errors.append(f"cross-talk: asked {name}, server saw {body['host']}")
                except requests.RequestException as exc:
                    errors.append(repr(exc))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        recorded = [r for s in servers for r in s.requests]
        assert len(recorded) == 16 * 25
        for r in recorded:
            assert r.tls_server_name == r.headers["host"]  # SNI always the logical name
        live = [s.address for s in servers if s is not servers[1]]
        billing = LBAdapter(live, hosts=["billing.internal"])
        session.mount("https://billing.internal/", billing)
        with pytest.raises(requests.exceptions.SSLError, match="certificate verify failed") as bad:
            session.get("https://billing.internal/", verify=str(ca))
        # A certificate that fails is never retried on the same backend; each backend once.
        tried = [a.backend for a in bad.value.attempts]  # type: ignore[attr-defined]
        assert len(tried) == len(set(tried)) == 2
        session.close()
    finally:
        for server in servers:
            server.close()


def test_tls_handshake_timeout_is_never_sent(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # the kernel accepts TCP; nothing ever speaks TLS
    stalled = f"127.0.0.1:{listener.getsockname()[1]}"
    certs = TLSCerts("users.internal")
    ca = tmp_path / "ca.pem"
    certs.write_ca(ca)
    good = TestServer(ssl_context=certs.server_context()).start()
    try:
        # No time left for another attempt: the stalled handshake surfaces as a ReadTimeout...
        lb = LoadBalancer([stalled], Hash)
        with requests.Session() as session:
            session.mount("https://users.internal/", LBAdapter(lb))
            with pytest.raises(requests.ReadTimeout) as info:
                session.post("https://users.internal/", data=b"x", timeout=0.3, verify=str(ca))
        # ...yet it is known to be never sent,
        fault = classify(info.value.__cause__)  # type: ignore[arg-type]
        assert fault is not None
        assert fault.failure is Failure.NEVER_SENT
        # so with time to spare even a POST moves on to the next backend. (The connect timeout
        # bounds the handshake too: the answering server's must fit in it on a loaded machine.)
        lb = LoadBalancer([stalled, good.address], Hash)
        key = key_landing_on(lb, stalled)
        with requests.Session() as session:
            session.mount("https://users.internal/", LBAdapter(lb, key=lambda r: key))
            response = session.post(
                "https://users.internal/", data=b"x", timeout=(2, 5), verify=str(ca)
            )
        assert response.status_code == 200
        assert good.count("POST") == 1
    finally:
        listener.close()
        good.close()


def test_adapter_options() -> None:
    adapter = LBAdapter([Backend("10.0.0.1:80", 2)], pool_connections=3, pool_maxsize=4)
    assert adapter.balancer.backends == (Backend("10.0.0.1:80", 2),)
    assert adapter.max_retries.total == 0
    with pytest.raises(TypeError, match="algorithm= applies only"):
        LBAdapter(LoadBalancer([]), algorithm=Hash)
    with pytest.raises(ValueError, match="max_attempts"):
        LBAdapter([], max_attempts=0)


# -- the pools the adapter remembers ---------------------------------------------------------


def test_a_pool_per_backend_is_remembered_and_forgotten_when_the_set_changes() -> None:
    with TestServer() as a, TestServer() as b, requests.Session() as session:
        lb = LoadBalancer([a.address, b.address], algorithm=RoundRobin)
        adapter = LBAdapter(lb)
        session.mount("http://users/", adapter)
        for _ in range(6):
            assert session.get("http://users/x").status_code == 200
        assert sorted(key[0] for key in adapter._pools) == sorted(
            f"http://{s.address}" for s in (a, b)
        )
        # Reused: three requests each over one kept-alive connection per backend.
        assert len({r.connection for r in a.requests}) == 1
        assert len({r.connection for r in b.requests}) == 1
        lb.update([a.address])
        assert session.get("http://users/x").status_code == 200
        assert [key[0] for key in adapter._pools] == [f"http://{a.address}"]
        # A remembered pool that was closed is never used again: after close(), as with a
        # plain HTTPAdapter, the next request opens a new one.
        adapter.close()
        assert session.get("http://users/x").status_code == 200
        assert len({r.connection for r in a.requests}) == 2
        copy = pickle.loads(pickle.dumps(session))
        assert copy.get("http://users/x").status_code == 200
        copy.close()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_each_requests_tls_settings_get_their_own_pool(tmp_path: Path) -> None:
    # verify=False first, then the default verification: the unverified pool must not be
    # reused for the request that asks for verification.
    certs = TLSCerts("users.internal")
    with TestServer(ssl_context=certs.server_context()) as server, requests.Session() as session:
        session.mount("https://users.internal/", LBAdapter([server.address], max_attempts=1))
        assert session.get("https://users.internal/", verify=False).status_code == 200
        with pytest.raises(requests.exceptions.SSLError, match="certificate verify failed"):
            session.get("https://users.internal/")
        ca = certs.write_ca(tmp_path / "ca.pem")
        assert session.get("https://users.internal/", verify=str(ca)).status_code == 200
        assert session.get("https://users.internal/", verify=False).status_code == 200


@pytest.mark.parametrize("timeout", [(1, 2, 3), "foo", (1, "x"), -1, (0, 1)])
def test_a_bad_timeout_is_the_error_plain_requests_raises(timeout: object) -> None:
    def error_of(session: requests.Session, url: str) -> tuple[type[BaseException], str]:
        with pytest.raises(Exception) as caught:  # noqa: PT011 (whatever requests raises)
            session.get(url, timeout=timeout)  # type: ignore[arg-type]
        return type(caught.value), str(caught.value)

    with TestServer() as server, requests.Session() as plain, requests.Session() as ours:
        ours.mount("http://users/", LBAdapter([server.address]))
        expected = error_of(plain, server.url)
        assert expected[0] is ValueError
        assert error_of(ours, "http://users/") == expected
        assert server.count() == 0


def test_lbadapter_refuses_hedging_with_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"hedge_after=0\.1: LBAdapter does not hedge"):
        LBAdapter(["127.0.0.1:80"], hedge_after=0.1)
