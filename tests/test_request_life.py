"""The life of one request through the three clients, against real servers on 127.0.0.1:
timeouts that keep their meaning, deadlines, hosts served, errors and bodies as plain clients
give them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import pickle
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import requests
from conftest import NO_EJECTION, busy_and_idle, key_for
from urllib3.exceptions import MaxRetryError, NewConnectionError, ReadTimeoutError

from lbclient import (
    AsyncLBTransport,
    Backend,
    Hash,
    KeyFunctionError,
    LBAdapter,
    LBTransport,
    LoadBalancer,
    NoBackendAvailable,
    RetryPolicy,
    RoundRobin,
)
from lbclient.requests_adapter import LBTimeout, mount
from lbclient.retry import Failure, RequestOptions
from lbclient.testing import Exchange, TestServer, closed_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def hang_and_ok() -> Iterator[tuple[TestServer, TestServer]]:
    with TestServer("hang", name="hang") as hang, TestServer(name="ok") as ok:
        yield hang, ok


# -- a hanging backend, with the client's own timeout ------------------------------------------


def test_httpx_get_fails_over_a_hanging_backend_post_does_not(
    hang_and_ok: tuple[TestServer, TestServer],
) -> None:
    hang, ok = hang_and_ok
    lb = LoadBalancer([hang.address, ok.address], Hash, health=NO_EJECTION)
    key = key_for(lb, hang)
    transport = LBTransport(lb, key=lambda r: key)
    with httpx.Client(transport=transport, base_url="http://users", timeout=1.0) as client:
        response = client.get("/a")
        assert response.status_code == 200
        assert response.json()["server"] == "ok"
        with pytest.raises(httpx.ReadTimeout) as caught:
            client.post("/b", content=b"once")
    assert [r.method for r in hang.requests] == ["GET", "POST"]
    assert [r.method for r in ok.requests] == ["GET"]
    assert "POST is not idempotent" in str(caught.value)


def test_async_httpx_get_fails_over_a_hanging_backend_post_does_not(
    hang_and_ok: tuple[TestServer, TestServer],
) -> None:
    hang, ok = hang_and_ok
    lb = LoadBalancer([hang.address, ok.address], Hash, health=NO_EJECTION)
    key = key_for(lb, hang)

    async def main() -> None:
        transport = AsyncLBTransport(lb, key=lambda r: key)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://users", timeout=1.0
        ) as client:
            response = await client.get("/a")
            assert response.json()["server"] == "ok"
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/b", content=b"once")

    asyncio.run(main())
    assert [r.method for r in hang.requests] == ["GET", "POST"]
    assert [r.method for r in ok.requests] == ["GET"]


def test_requests_get_fails_over_a_hanging_backend_post_does_not(
    hang_and_ok: tuple[TestServer, TestServer],
) -> None:
    hang, ok = hang_and_ok
    lb = LoadBalancer([hang.address, ok.address], Hash, health=NO_EJECTION)
    key = key_for(lb, hang)
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter(lb, key=lambda r: key))
        assert session.get("http://users/a", timeout=1.0).json()["server"] == "ok"
        with pytest.raises(requests.ReadTimeout) as caught:
            session.post("http://users/b", data=b"once", timeout=1.0)
    assert [r.method for r in hang.requests] == ["GET", "POST"]
    assert [r.method for r in ok.requests] == ["GET"]
    # The same args[0] object plain requests gives, with lbclient's summary added.
    assert isinstance(caught.value.args[0], ReadTimeoutError)
    assert "POST failed after 1 attempt" in str(caught.value)


def test_attempt_timeout_moves_on_well_before_the_client_timeout(
    hang_and_ok: tuple[TestServer, TestServer],
) -> None:
    hang, ok = hang_and_ok
    lb = LoadBalancer([hang.address, ok.address], Hash, health=NO_EJECTION)
    key = key_for(lb, hang)
    transport = LBTransport(lb, key=lambda r: key, attempt_timeout=0.2)
    with httpx.Client(transport=transport, timeout=30.0) as client:
        response = client.get("http://users/")
    assert response.json()["server"] == "ok"
    # The hang was cut by attempt_timeout: a maybe-sent failure, blamed on the backend.
    assert lb.health(hang.address).consecutive_failures == 1


def arrivals(times: list[float]) -> Callable[[Exchange], bool]:
    def hang(exchange: Exchange) -> bool:
        times.append(time.monotonic())
        return exchange.hang()

    return hang


def test_deadline_ends_the_request_and_no_attempt_starts_after_it() -> None:
    times: list[float] = []
    servers = [
        TestServer("slow", behaviours={"slow": arrivals(times)}, hang_seconds=5).start()
        for _ in range(3)
    ]
    try:
        lb = LoadBalancer([s.address for s in servers], RoundRobin, health=NO_EJECTION)
        transport = LBTransport(lb, deadline=0.5, max_attempts=10)
        with httpx.Client(transport=transport, timeout=0.2) as client:
            start = time.monotonic()
            with pytest.raises(httpx.ReadTimeout, match=r"deadline of 0\.5 s ran out") as caught:
                client.get("http://users/")
        assert times
        assert all(t - start < 0.5 for t in times)
        assert len(caught.value.attempts) == len(times)  # type: ignore[attr-defined]
    finally:
        for server in servers:
            server.close()


def test_one_request_overrides_the_limits(hang_and_ok: tuple[TestServer, TestServer]) -> None:
    hang, ok = hang_and_ok
    lb = LoadBalancer([hang.address, ok.address], Hash, health=NO_EJECTION)
    key = key_for(lb, hang)
    with httpx.Client(transport=LBTransport(lb, key=lambda r: key), timeout=30.0) as client:
        options = RequestOptions(attempt_timeout=0.2)
        assert client.get("http://users/", extensions={"lbclient": options}).status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            client.get(
                "http://users/",
                extensions={"lbclient": {"attempt_timeout": 0.2, "max_attempts": 1}},
            )
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter(lb, key=lambda r: key))
        response = session.get("http://users/", timeout=LBTimeout(30.0, attempt_timeout=0.2))
        assert response.json()["server"] == "ok"
        with pytest.raises(requests.ReadTimeout):
            session.get("http://users/", timeout=LBTimeout(0.3, max_attempts=1))


def test_lbtimeout_is_a_plain_tuple_to_other_adapters() -> None:
    with TestServer() as server, requests.Session() as session:
        timeout = LBTimeout(2.0, 3.0, deadline=1.0)
        assert tuple(timeout) == (2.0, 3.0)
        assert session.get(server.url, timeout=timeout).status_code == 200
        assert pickle.loads(pickle.dumps(timeout)).options.deadline == 1.0


# -- failures that must not be retried on the same backend -------------------------------------


def test_a_read_timeout_on_the_only_backend_is_sent_once() -> None:
    with TestServer("hang") as hang:
        transport = LBTransport([hang.address], max_attempts=3)
        with (
            httpx.Client(transport=transport, timeout=0.3) as client,
            pytest.raises(httpx.ReadTimeout),
        ):
            client.get("http://users/")
        with requests.Session() as session:
            session.mount("http://users/", LBAdapter([hang.address], max_attempts=3))
            with pytest.raises(requests.ReadTimeout):
                session.get("http://users/", timeout=0.3)
        assert len(hang.requests) == 2  # once per client


def test_pool_timeout_fails_over_as_never_sent() -> None:
    with busy_and_idle() as (busy, _, lb, key, release):
        transport = LBTransport(lb, key=lambda r: key, limits=httpx.Limits(max_connections=1))
        with httpx.Client(transport=transport, timeout=httpx.Timeout(10.0, pool=0.2)) as client:
            holder = threading.Thread(target=client.get, args=("http://users/hold",))
            holder.start()
            while not busy.requests:
                time.sleep(0.01)
            # The busy backend's only connection is taken: its pool times out; nothing was sent,
            # so even a POST goes to the idle backend.
            response = client.post("http://users/x", content=b"body")
            release.set()
            holder.join()
        assert response.json()["server"] == "idle"
        assert [r.target for r in busy.requests] == ["/hold"]


def test_round_robin_first_attempts_stay_fair_when_one_backend_fails() -> None:
    with TestServer("status:503", name="bad") as bad, TestServer(name="good") as good:
        lb = LoadBalancer([bad.address, good.address], RoundRobin, health=NO_EJECTION)
        transport = LBTransport(lb, retry_statuses={503})
        with httpx.Client(transport=transport) as client:
            for _ in range(100):
                assert client.get("http://users/").status_code == 200
        assert bad.count() == 50
        assert good.count() == 100


# -- hosts served ------------------------------------------------------------------------------


def test_a_redirect_to_another_host_never_reaches_the_backends() -> None:
    with TestServer(name="login") as login, TestServer(name="backend") as backend:
        target = f"http://{login.address}/callback"
        path = "/__redirect/" + target.replace("/", "%2F").replace(":", "%3A")
        transport = LBTransport([backend.address])
        with httpx.Client(
            transport=transport, base_url="http://users", follow_redirects=True
        ) as client:
            response = client.get(path)
        assert response.json()["server"] == "login"
        assert response.json()["host"] == login.address
        assert backend.count() == 1
        assert transport.hosts == frozenset({"users"})

        async def main() -> httpx.Response:
            async with httpx.AsyncClient(
                transport=AsyncLBTransport([backend.address]),
                base_url="http://users",
                follow_redirects=True,
            ) as c:
                return await c.get(path)

        assert asyncio.run(main()).json()["server"] == "login"
        assert backend.count() == 2


def test_requests_mount_covers_every_spelling_and_nothing_else() -> None:
    with TestServer(name="backend") as backend, TestServer(name="other") as other:
        with requests.Session() as session:
            adapter = LBAdapter([backend.address], hosts=["svc"])
            mount(session, adapter)
            for url in ("http://svc/x", "http://svc:80/x", "http://u:p@svc/x", "HTTP://SVC/x"):
                assert session.get(url).json()["server"] == "backend", url
            assert session.get(other.url).json()["server"] == "other"
        assert backend.count() == 4
        assert other.count() == 1
        with pytest.raises(ValueError, match="hosts"):
            mount(requests.Session(), LBAdapter([backend.address]))


def test_a_pickled_session_keeps_working() -> None:
    with TestServer(name="backend") as backend:
        session = requests.Session()
        session.mount("http://svc/", LBAdapter([backend.address], hosts=["svc"]))
        assert session.get("http://svc/").status_code == 200
        copy = pickle.loads(pickle.dumps(session))
        assert copy.get("http://svc/").json()["server"] == "backend"
        routed = requests.Session()
        mount(routed, LBAdapter([backend.address], hosts=["svc"]))
        assert pickle.loads(pickle.dumps(routed)).get("http://u:p@svc/").status_code == 200
        session.close()
        routed.close()


# -- errors as the plain clients give them -----------------------------------------------------


def test_requests_errors_keep_plain_requests_args() -> None:
    dead = f"127.0.0.1:{closed_port()}"
    with pytest.raises(requests.ConnectionError) as plain:
        requests.get(f"http://{dead}/")
    with requests.Session() as session:
        session.mount("http://svc/", LBAdapter([dead], max_attempts=1))
        with pytest.raises(requests.ConnectionError) as ours:
            session.get("http://svc/")
    assert type(ours.value) is type(plain.value)
    assert isinstance(ours.value.args[0], MaxRetryError)
    assert isinstance(ours.value.args[0].reason, NewConnectionError)
    assert str(plain.value.args[0]) in str(ours.value)  # added to, not replaced
    assert "GET failed after 1 attempt" in str(ours.value)
    assert ours.value.request is not None
    assert ours.value.request.url == "http://svc/"


def test_no_message_log_or_repr_carries_a_password(caplog: pytest.LogCaptureFixture) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    caplog.set_level(logging.DEBUG, logger="lbclient")
    with (
        httpx.Client(transport=LBTransport([dead], max_attempts=1)) as client,
        pytest.raises(httpx.ConnectError) as failed,
    ):
        client.get("http://user:hunter2@users/")
    with (
        httpx.Client(transport=LBTransport([])) as client,
        pytest.raises(NoBackendAvailable) as none,
    ):
        client.get("http://user:hunter2@users/")

    def boom(request: httpx.Request) -> str:
        raise RuntimeError("no key")

    with (
        httpx.Client(transport=LBTransport([dead], key=boom)) as client,
        pytest.raises(KeyFunctionError) as key,
    ):
        client.get("http://user:hunter2@users/")
    texts = [
        str(failed.value),
        str(none.value),
        str(key.value),
        caplog.text,
        repr(failed.value.attempts),
    ]  # type: ignore[attr-defined]
    assert not [t for t in texts if "hunter2" in t]
    assert "[secure]" in str(none.value)


def test_a_key_that_cannot_be_encoded_is_a_key_function_error() -> None:
    with TestServer() as server:
        transport = LBTransport([server.address], key=lambda r: "\ud800")
        with (
            httpx.Client(transport=transport) as client,
            pytest.raises(KeyFunctionError, match="UTF-8"),
        ):
            client.get("http://users/")
        assert server.count() == 0


def test_a_body_that_breaks_after_the_head_names_the_backend() -> None:
    with TestServer("reset") as reset:
        with (
            httpx.Client(transport=LBTransport([reset.address])) as client,
            pytest.raises(httpx.TransportError, match=reset.address),
        ):
            client.post("http://users/", content=b"x")
        with requests.Session() as session:
            session.mount("http://users/", LBAdapter([reset.address]))
            with pytest.raises(requests.RequestException, match=reset.address):
                session.post("http://users/", data=b"x")


def test_policy_and_a_flat_option_together_is_a_type_error() -> None:
    for make in (LBTransport, AsyncLBTransport, LBAdapter):
        with pytest.raises(TypeError, match="max_attempts"):
            make(["10.0.0.1:80"], policy=RetryPolicy(max_attempts=5), max_attempts=1)


# -- bodies readable through every interface ---------------------------------------------------


def test_a_buffered_requests_body_is_readable_through_raw(tmp_path: Path) -> None:
    with TestServer() as server, requests.Session() as session:
        session.mount("http://users/", LBAdapter([server.address]))
        response = session.get("http://users/file", stream=True)
        target = tmp_path / "copy"
        with target.open("wb") as out:
            shutil.copyfileobj(response.raw, out)
        body = target.read_bytes()
        assert len(body) == int(response.headers["Content-Length"]) > 0
        assert json.loads(body)["path"] == "/file"
        chunks = session.get("http://users/file", stream=True).iter_content(7)
        assert b"".join(chunks) == body
        assert session.get("http://users/file").content == body


def test_a_buffered_httpx_body_is_readable_through_every_stream_interface() -> None:
    with TestServer() as server:
        with httpx.Client(transport=LBTransport([server.address])) as client:
            with client.stream("GET", "http://users/s") as response:
                raw = b"".join(response.iter_raw())
            with client.stream("GET", "http://users/s") as response:
                decoded = b"".join(response.iter_bytes())
            with client.stream("GET", "http://users/s") as response:
                text = "".join(response.iter_text())
            content = client.get("http://users/s").content
        assert raw == decoded == text.encode() == content
        assert b'"path": "/s"' in content


# -- what the transports keep --------------------------------------------------------------------


def test_transports_hold_nothing_for_backends_that_left() -> None:
    with TestServer() as server:
        lb = LoadBalancer([server.address])
        transport = LBTransport(lb)
        with httpx.Client(transport=transport) as client:
            for i in range(50):
                lb.update(
                    [Backend(server.address, weight=1 + i % 2, metadata={"blob": "x" * 10_000})]
                )
                client.get("http://users/")
            assert len(transport._pools) == 1
            assert all(isinstance(key[1], str) for key in transport._pools)
        assert transport._pools == {}
        assert transport._plain is None


def test_io_buffers_are_not_shared_between_requests() -> None:
    # A guard for the buffered raw body: each response has its own.
    with TestServer() as server, requests.Session() as session:
        session.mount("http://users/", LBAdapter([server.address]))
        first = session.get("http://users/1", stream=True)
        second = session.get("http://users/2", stream=True)
        assert first.raw is not second.raw
        assert isinstance(first.raw._fp, io.BytesIO)  # type: ignore[attr-defined]
        assert first.json()["path"] == "/1"
        assert second.json()["path"] == "/2"


def test_maybe_sent_failures_are_recorded_as_such() -> None:
    with (
        TestServer("close") as closing,
        httpx.Client(transport=LBTransport([closing.address], max_attempts=1)) as client,
        pytest.raises(httpx.RemoteProtocolError) as caught,
    ):
        client.get("http://users/")
    assert caught.value.attempts[0].failure is Failure.MAYBE_SENT  # type: ignore[attr-defined]
