"""Prequal's probes through real clients and real servers: both httpx transports and LBAdapter
probe beside requests (counted, without the caller's headers), route by what the probes bring,
send none when the responses carry the reports (``r_probe=0``), none when nothing is sent, and
none after closing."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import requests

import lbclient._probes
from lbclient import AsyncLBTransport, LBAdapter, LBTransport, LoadBalancer, Prequal
from lbclient.testing import Exchange, TestServer, TLSCerts

PATH = "/.lbclient/load"


def answering(exchange: Exchange) -> bool:
    """The probe path answers with the RIF given as the mode's arg (Prequal's headers); any
    other path answers ``ok``, with the same report when the mode's arg ends in ``+``."""
    arg = exchange.arg or "1"
    rif = arg.rstrip("+")
    report = {"x-prequal-rif": rif, "x-prequal-latency-us": "500"}
    if exchange.request.target.startswith(PATH):
        return exchange.respond(200, b"", report)
    return exchange.respond(200, b"ok", report if arg.endswith("+") else {})


def orca(exchange: Exchange) -> bool:
    if exchange.request.target.startswith(PATH):
        header = f"TEXT named_metrics.rif={exchange.arg}, named_metrics.latency_ms=0.5"
        return exchange.respond(200, b"", {"endpoint-load-metrics": header})
    return exchange.respond(200, b"ok")


@pytest.fixture
def servers() -> Iterator[list[TestServer]]:
    started = [
        TestServer("probe:1", behaviours={"probe": answering, "orca": orca}).start()
        for _ in range(3)
    ]
    yield started
    for server in started:
        server.kill()


def probes(server: TestServer) -> list[dict[str, str]]:
    return [r.headers for r in server.requests if r.target.startswith(PATH)]


def served(server: TestServer) -> int:
    return sum(not r.target.startswith(PATH) for r in server.requests)


def read(balancer: LoadBalancer) -> int:
    """Reports read so far (kept, or refused as older than the one kept)."""
    loads = [balancer.load(b) for b in balancer.backends]
    return sum(load.reports + sum(load.refused.values()) for load in loads)


def wait_for(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds (probes end in the background); a bound, not a measure."""
    for _ in range(2000):  # 20 s: a loaded machine's probes may wait for a worker
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("the probes never came")


def balancer_of(servers: list[TestServer], **options: object) -> LoadBalancer:
    algorithm = Prequal(random=random.Random(11).random, **options)  # type: ignore[arg-type]
    return LoadBalancer([s.address for s in servers], algorithm)


def test_lbtransport_probes_without_the_callers_headers(servers: list[TestServer]) -> None:
    balancer = balancer_of(servers, r_probe=2)
    transport = LBTransport(balancer)
    client = httpx.Client(transport=transport, headers={"x-secret": "s3"}, cookies={"c": "1"})
    with client:
        for sent in range(1, 6):
            assert client.get("http://users/").text == "ok"
            # Each request's two probes answered before the next request: on a busy machine
            # probes left pending would pile up to the bound, and the next ones be dropped.
            wait_for(lambda: read(balancer) == 2 * sent)  # noqa: B023 (used at once)
    stats = transport.stats()
    assert (stats.probes_sent, stats.probes_failed, stats.probes_dropped) == (10, 0, 0)
    for server in servers:
        for headers in probes(server):
            assert "x-secret" not in headers
            assert "cookie" not in headers
            assert headers["endpoint-load-metrics-format"] == "TEXT"
            assert headers["host"] == "users"
        assert all(r.headers.get("x-secret") == "s3" for r in server.requests if r.target == "/")


def test_routing_follows_the_probed_rif(servers: list[TestServer]) -> None:
    busy, *idle = servers
    busy.mode = "orca:50"
    for server in idle:
        server.mode = "orca:1"
    balancer = balancer_of(servers, r_probe=3, reuse=4, max_age=60.0)
    transport = LBTransport(balancer)
    with httpx.Client(transport=transport) as client:
        client.get("http://users/")
        wait_for(lambda: transport.stats().probes_sent >= 3)
        wait_for(lambda: all(b.report is not None for b in balancer.snapshot().backends))
        for _ in range(30):
            client.get("http://users/")
    assert served(busy) < min(served(s) for s in idle)
    # Of 31 requests (a third each if spread evenly): a few at most, the picks made while a slow
    # machine's probes had not yet refilled the pool (peak EWMA's, then).
    assert served(busy) <= 6


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_async_transport_probes_on_asyncio_and_trio(
    servers: list[TestServer], backend: str
) -> None:
    balancer = balancer_of(servers, r_probe=1)

    async def main() -> tuple[int, int, int]:
        transport = AsyncLBTransport(balancer)
        async with httpx.AsyncClient(transport=transport, headers={"x-secret": "s3"}) as client:
            for _ in range(4):
                assert (await client.get("http://users/")).text == "ok"
            for _ in range(200):
                if transport.stats().probes_sent == 4 and read(balancer) == 4:
                    break
                await anyio.sleep(0.01)
        stats = transport.stats()
        return stats.probes_sent, stats.probes_failed, stats.probes_dropped

    sent, failed, dropped = anyio.run(main, backend=backend)
    assert (sent, failed, dropped) == (4, 0, 0)
    assert sum(len(probes(s)) for s in servers) == 4
    assert all("x-secret" not in h for s in servers for h in probes(s))


def test_lbadapter_probes_from_the_runner(servers: list[TestServer]) -> None:
    balancer = balancer_of(servers, r_probe=0.5)
    adapter = LBAdapter(balancer)
    with requests.Session() as session:
        session.headers["Authorization"] = "Bearer t"
        session.mount("http://users/", adapter)
        for _ in range(6):
            assert session.get("http://users/").text == "ok"
        wait_for(lambda: adapter.stats().probes_sent == 3)
        wait_for(lambda: read(balancer) == 3)
    assert adapter.stats().probes_failed == 0
    assert all("authorization" not in h for s in servers for h in probes(s))
    reports = [b.report for b in balancer.snapshot().backends if b.report is not None]
    assert reports
    assert all(r.rif == 1.0 for r in reports)


def test_reports_on_responses_need_no_probes(servers: list[TestServer]) -> None:
    for server in servers:
        server.mode = "probe:2+"
    balancer = balancer_of(servers, r_probe=0)
    transport = LBTransport(balancer)
    with httpx.Client(transport=transport) as client:
        for _ in range(6):
            client.get("http://users/")
    assert transport.stats().probes_sent == 0
    assert all(probes(s) == [] for s in servers)
    assert any(b.report is not None and b.report.rif == 2.0 for b in balancer.snapshot().backends)


def test_nothing_sent_no_probes_and_none_after_close(servers: list[TestServer]) -> None:
    balancer = balancer_of(servers, r_probe=3)
    transport = LBTransport(balancer)
    client = httpx.Client(transport=transport)
    time.sleep(0.05)
    assert transport.stats().probes_sent == 0
    client.get("http://users/")
    wait_for(lambda: sum(len(probes(s)) for s in servers) == 3)
    client.close()
    with pytest.raises(RuntimeError):
        client.get("http://users/")
    assert transport.stats().probes_sent == 3
    assert sum(len(probes(s)) for s in servers) == 3


def test_a_failing_probe_is_counted_and_harms_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lbclient._probes, "QUIET", 60.0)  # no probe to it again in this test
    server = TestServer("ok").start()  # no probe path: 200 without a report
    try:
        balancer = LoadBalancer([server.address], Prequal(r_probe=1))
        adapter = LBAdapter(balancer)
        with requests.Session() as session:
            session.mount("http://users/", adapter)
            assert session.get("http://users/").status_code == 200
            wait_for(lambda: adapter.stats().probes_failed == 1)
            for _ in range(3):  # its probe failed: not probed again for QUIET seconds
                assert session.get("http://users/").status_code == 200
            stats = adapter.stats()
        assert (stats.probes_sent, stats.probes_failed, stats.probes_dropped) == (1, 1, 0)
        assert sum(r.target == PATH for r in server.requests) == 1
        assert balancer.health(server.address).healthy
    finally:
        server.kill()


def test_lbadapter_probes_over_tls_with_the_requests_verify(tmp_path: Path) -> None:
    certs = TLSCerts("users.internal")
    ca = tmp_path / "ca.pem"
    certs.write_ca(ca)
    context = certs.server_context()
    servers = [
        TestServer("probe:1", ssl_context=context, behaviours={"probe": answering}).start()
        for _ in range(2)
    ]
    try:
        balancer = balancer_of(servers, r_probe=1)
        adapter = LBAdapter(balancer, hosts=["users.internal"])
        with requests.Session() as session:
            session.mount("https://users.internal/", adapter)
            for _ in range(3):
                assert session.get("https://users.internal/", verify=str(ca)).text == "ok"
            wait_for(lambda: adapter.stats().probes_sent == 3 and read(balancer) == 3)
        stats = adapter.stats()
        assert (stats.probes_sent, stats.probes_failed) == (3, 0)
        names = [r.tls_server_name for s in servers for r in s.requests if r.target == PATH]
        assert names == ["users.internal"] * 3
    finally:
        for server in servers:
            server.kill()


def test_backends_answering_with_reports_are_probed_no_more(servers: list[TestServer]) -> None:
    for server in servers:
        server.mode = "probe:2+"  # every response carries the RIF
    algorithm = Prequal(random=random.Random(11).random, r_probe=3)
    # The balancer's clock stands still: every answer stays within half of max_age.
    balancer = LoadBalancer([s.address for s in servers], algorithm, clock=lambda: 50.0)
    transport = LBTransport(balancer)
    probes_of = transport._config.probes
    assert probes_of is not None
    with httpx.Client(transport=transport) as client:
        for _ in range(50):  # until each backend has answered a request
            client.get("http://users/")
            if all(served(s) for s in servers):
                break
        assert all(served(s) for s in servers)
        wait_for(lambda: probes_of._pending == 0)
        before = transport.stats().probes_sent
        for _ in range(10):
            client.get("http://users/")
        wait_for(lambda: probes_of._pending == 0)
        assert transport.stats().probes_sent == before
    assert before <= 3 * sum(served(s) for s in servers)
    assert sum(len(probes(s)) for s in servers) == before


def silent_probes(exchange: Exchange) -> bool:
    """The probe path is read and never answered (until the server stops); the rest ``ok``."""
    if exchange.request.target.startswith(PATH):
        return exchange.hang()
    return exchange.respond(200, b"ok")


@pytest.mark.parametrize(
    ("client", "tls"),
    [("httpx", False), ("requests", False), ("trio", False), ("httpx", True), ("requests", True)],
)
def test_closing_ends_probes_waiting_on_a_silent_backend(
    client: str, tls: bool, tmp_path: Path
) -> None:
    # A probe blocked reading a backend that never answers kept close() waiting until its
    # probe_timeout (here an hour): the sync probes' sockets (over TLS, the TLS sockets) are
    # shut down by close().
    certs = TLSCerts("svc", "127.0.0.1") if tls else None
    started = [
        TestServer(
            "silent",
            hang_seconds=3600,
            behaviours={"silent": silent_probes},
            ssl_context=certs.server_context() if certs else None,
        ).start()
        for _ in range(3)
    ]
    scheme = "https" if certs else "http"
    verify: object = True
    if certs is not None:
        verify = (
            certs.client_context()
            if client == "httpx"
            else str(certs.write_ca(tmp_path / "ca.pem"))
        )
    try:
        balancer = balancer_of(started, probe_timeout=3600.0)

        def waiting() -> bool:
            return sum(len(probes(s)) for s in started) >= 3

        def closed_in_time(close: Callable[[], object]) -> None:
            done: list[object] = []
            closer = threading.Thread(target=lambda: done.append(close()), daemon=True)
            closer.start()
            closer.join(30)  # a bound, not a measure: the probes would wait an hour
            assert done, "close() still waits for the probes"

        if client == "httpx":
            transport = LBTransport(balancer, verify=verify)  # type: ignore[arg-type]
            with httpx.Client(transport=transport, base_url=f"{scheme}://svc") as http:
                for _ in range(3):
                    assert http.get("/").status_code == 200
                wait_for(waiting)
                closed_in_time(http.close)
        elif client == "requests":
            session = requests.Session()
            session.mount(f"{scheme}://svc/", LBAdapter(balancer))
            for _ in range(3):
                response = session.get(f"{scheme}://svc/", verify=verify)  # type: ignore[arg-type]
                assert response.status_code == 200
            wait_for(waiting)
            closed_in_time(session.close)
        else:

            async def main() -> None:
                transport = AsyncLBTransport(balancer)
                async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
                    for _ in range(3):
                        assert (await http.get("/")).status_code == 200
                    await anyio.to_thread.run_sync(wait_for, waiting)
                    with anyio.fail_after(30):  # a bound: the probes would wait an hour
                        await transport.aclose()

            anyio.run(main, backend="trio")
    finally:
        for server in started:
            server.kill()


@pytest.mark.parametrize("client", ["httpx", "requests"])
def test_closing_ends_probes_still_in_their_tls_handshake(client: str, tmp_path: Path) -> None:
    # A probe whose TLS handshake was under way as the probes closed added its TLS socket after
    # they had shut the others down (its TCP socket, given over to the TLS one, could not be):
    # it sent its probe and waited out probe_timeout (here an hour), and close() with it (seen
    # in 1 run of the whole suite in 3). Now a socket added after the shutdown is shut at once.
    certs = TLSCerts("svc", "127.0.0.1")
    context = certs.server_context()
    gate = threading.Event()  # set: handshakes go on; clear: held until it is set again
    gate.set()
    held: list[str | None] = []

    def hold(_sock: object, name: str | None, _context: object) -> None:
        if not gate.is_set():
            held.append(name)
        gate.wait(60)

    context.sni_callback = hold  # runs within the server's handshake
    # One backend: the requests keep one connection (its handshake let through), the probes
    # open others (one per request: r_probe=1).
    started = [
        TestServer(
            "silent", hang_seconds=3600, behaviours={"silent": silent_probes}, ssl_context=context
        ).start()
    ]
    try:
        balancer = balancer_of(started, probe_timeout=3600.0, r_probe=1)
        if client == "httpx":
            http: Any = httpx.Client(
                transport=LBTransport(balancer, verify=certs.client_context()),
                base_url="https://svc",
            )
            get: Callable[[], int] = lambda: http.get("/").status_code  # noqa: E731
            close: Callable[[], object] = http.close
        else:
            session = requests.Session()
            session.mount("https://svc/", LBAdapter(balancer))
            ca = str(certs.write_ca(tmp_path / "ca.pem"))
            get = lambda: session.get("https://svc/", verify=ca).status_code  # noqa: E731
            close = session.close
        assert get() == 200
        wait_for(lambda: len(probes(started[0])) == 1)  # its probe, waiting on the silence
        gate.clear()
        assert get() == 200  # on the kept connection; its probe opens a new one, held
        wait_for(lambda: bool(held))
        done: list[object] = []
        closer = threading.Thread(target=lambda: done.append(close()), daemon=True)
        closer.start()
        closer.join(0.5)  # close() under way (it waits for the probes): let the handshake end
        gate.set()
        closer.join(30)  # a bound, not a measure: the probe would wait an hour
        assert done, "close() still waits for a probe that was in its TLS handshake"
    finally:
        gate.set()
        for server in started:
            server.kill()
