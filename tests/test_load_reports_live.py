"""Load reports through real clients and real servers: both httpx transports and LBAdapter ask
for a report when told to (or when the algorithm reads them), and each response's report lands in
its backend's load; a hostile report never reaches the caller."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import anyio
import httpx
import pytest
import requests

from lbclient import AsyncLBTransport, LBAdapter, LBTransport, LoadBalancer
from lbclient.testing import Exchange, TestServer


def reporting(exchange: Exchange) -> bool:
    """Answer with a load report in the format asked (none when not asked), as vLLM does; the
    mode's arg, when given, is sent as the header's whole value instead."""
    asked = exchange.request.headers.get("endpoint-load-metrics-format")
    headers: dict[str, str] = {}
    port = exchange.server.port
    if exchange.arg is not None:
        headers["endpoint-load-metrics"] = exchange.arg
    elif asked == "TEXT":
        headers["endpoint-load-metrics"] = f"TEXT rps_fractional={port}, cpu_utilization=0.5"
    elif asked == "JSON":
        report = {"rps_fractional": port, "named_metrics": {"rif": 2}}
        headers["endpoint-load-metrics"] = "JSON " + json.dumps(report)
    return exchange.respond(200, b"ok", headers)


def prequal(exchange: Exchange) -> bool:
    return exchange.respond(200, b"ok", {"x-prequal-rif": "5", "x-prequal-latency-us": "800"})


@pytest.fixture
def servers() -> Iterator[list[TestServer]]:
    started = [
        TestServer("report", behaviours={"report": reporting, "prequal": prequal}).start()
        for _ in range(2)
    ]
    yield started
    for server in started:
        server.kill()


def asked(server: TestServer) -> list[str | None]:
    return [r.headers.get("endpoint-load-metrics-format") for r in server.requests]


def reports(balancer: LoadBalancer) -> dict[int, float | None]:
    return {
        int(b.backend.address.rsplit(":", 1)[1]): None
        if b.report is None
        else b.report.rps_fractional
        for b in balancer.snapshot().backends
    }


def test_lbtransport_asks_for_text_and_keeps_each_backends_report(
    servers: list[TestServer],
) -> None:
    balancer = LoadBalancer([s.address for s in servers])
    with httpx.Client(transport=LBTransport(balancer, load_reports=True)) as client:
        for _ in range(4):
            assert client.get("http://users/").text == "ok"
    assert all(asked(s) == ["TEXT", "TEXT"] for s in servers)
    assert reports(balancer) == {s.port: float(s.port) for s in servers}
    assert all(b.reports == 2 for b in balancer.snapshot().backends)


def test_json_is_asked_when_named(servers: list[TestServer]) -> None:
    balancer = LoadBalancer([s.address for s in servers])
    with httpx.Client(transport=LBTransport(balancer, load_reports="json")) as client:
        client.get("http://users/")
    server = next(s for s in servers if s.requests)
    assert asked(server) == ["JSON"]
    backend = next(b for b in balancer.snapshot().backends if b.report is not None)
    assert backend.report is not None
    assert backend.report.rif == 2.0


def test_nothing_is_asked_or_read_by_default(servers: list[TestServer]) -> None:
    balancer = LoadBalancer([s.address for s in servers])
    for server in servers:
        server.mode = "report:TEXT eps=1"  # sent though not asked: not read either
    with httpx.Client(transport=LBTransport(balancer)) as client:
        client.get("http://users/")
        client.get("http://users/")
    assert all(asked(s) == [None] for s in servers)
    assert reports(balancer) == {s.port: None for s in servers}


def test_the_async_transport_asks_and_reads(servers: list[TestServer]) -> None:
    balancer = LoadBalancer([s.address for s in servers])

    async def main() -> None:
        transport = AsyncLBTransport(balancer, load_reports=True)
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(2):
                assert (await client.get("http://users/")).text == "ok"

    anyio.run(main)
    assert all(asked(s) == ["TEXT"] for s in servers)
    assert reports(balancer) == {s.port: float(s.port) for s in servers}


def test_lbadapter_asks_and_reads(servers: list[TestServer]) -> None:
    balancer = LoadBalancer([s.address for s in servers])
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter(balancer, load_reports=True))
        for _ in range(2):
            assert session.get("http://users/").text == "ok"
    assert all(asked(s) == ["TEXT"] for s in servers)
    assert reports(balancer) == {s.port: float(s.port) for s in servers}


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("TEXT cpu_utilization=NaN", "not finite"),
        ("TEXT cpu_utilization=1e308", "too large"),
        ("TEXT eps=1, eps=2", "duplicate field"),
        ("TEXT warp=9", "unknown field"),
        ("TEXT eps=" + "9" * 9000, "too long"),
        ("JSON {nope", "malformed"),
    ],
)
def test_a_hostile_report_is_counted_and_the_caller_gets_the_response(
    servers: list[TestServer], header: str, reason: str
) -> None:
    server = servers[0]
    server.mode = f"report:{header}"
    balancer = LoadBalancer([server.address])
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter(balancer, load_reports=True))
        assert session.get("http://users/").text == "ok"
    with httpx.Client(transport=LBTransport(balancer, load_reports=True)) as client:
        assert client.get("http://users/").text == "ok"
    (backend,) = balancer.snapshot().backends
    assert backend.report is None
    assert backend.reports_refused == {reason: 2}
    assert backend.healthy
    assert backend.in_flight == 0


def test_prequal_headers_are_read(servers: list[TestServer]) -> None:
    server = servers[0]
    server.mode = "prequal"
    balancer = LoadBalancer([server.address])
    with httpx.Client(transport=LBTransport(balancer, load_reports=True)) as client:
        client.get("http://users/")
    report = balancer.snapshot().backends[0].report
    assert report is not None
    assert (report.rif, report.latency) == (5.0, 0.0008)


def test_a_callers_own_format_header_is_replaced_not_doubled() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        heads: list[bytes] = []

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(4096)
                heads.append(head)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

        thread = threading.Thread(target=serve)
        thread.start()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with httpx.Client(transport=LBTransport([address], load_reports="JSON")) as client:
            client.get("http://users/", headers={"Endpoint-Load-Metrics-Format": "TEXT"})
        thread.join(10)
    lines = heads[0].decode("latin-1").lower().split("\r\n")
    assert [line for line in lines if line.startswith("endpoint-load-metrics-format")] == [
        "endpoint-load-metrics-format: json"
    ]


def test_a_bad_load_reports_option_is_a_clear_error() -> None:
    for bad in ("XML", 1, "yes"):
        with pytest.raises(ValueError, match=repr(bad)):
            LBTransport(["10.0.0.1:80"], load_reports=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=repr(bad)):
            LBAdapter(["10.0.0.1:80"], load_reports=bad)  # type: ignore[arg-type]


def test_metrics_show_each_backends_latest_report_and_the_refused(
    servers: list[TestServer],
) -> None:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.parser import text_string_to_metric_families

    from lbclient.metrics import register

    good, bad = servers
    bad.mode = "report:TEXT eps=-1"
    balancer = LoadBalancer([good.address, bad.address])
    transport = LBTransport(balancer, load_reports=True)
    registry = CollectorRegistry()
    register(transport, service="users", registry=registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        with httpx.Client(transport=transport) as client:
            for _ in range(4):
                client.get("http://users/")
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        text = httpx.get(url, trust_env=False, timeout=10).text
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def at(name: str, backend: str, **labels: str) -> float:
        return samples[
            (name, frozenset({"service": "users", "backend": backend, **labels}.items()))
        ]

    assert at("lbclient_backend_load_report", good.address, field="rps_fractional") == good.port
    assert at("lbclient_backend_load_report", good.address, field="cpu_utilization") == 0.5
    assert at("lbclient_backend_load_report_age_seconds", good.address) >= 0.0
    assert at("lbclient_load_reports_total", good.address, result="kept") == 2
    assert at("lbclient_load_reports_total", bad.address, result="kept") == 0
    assert at("lbclient_load_reports_total", bad.address, result="negative") == 2
    assert not any(
        name == "lbclient_backend_load_report" and ("backend", bad.address) in labels
        for name, labels in samples
    )
