"""DNS answers in part: one record type (or one SRV target) fails, the rest is used.

Against a real dnsmasq serving ``*.svc`` names from a hosts file without ``--local=/svc/`` (a
resolver with no upstream, a common local set-up): the A query of a name in the file answers,
its AAAA query is REFUSED. Given an upstream (``conftest.Upstream``) that answers SERVFAIL or
never answers, dnsmasq passes the SERVFAIL on, or lets the query time out. ``getaddrinfo``
returns the A records in every one of these cases; so must ``DNS``, counting what failed.

Skipped where dnsmasq is not installed, unless ``LBCLIENT_REQUIRE_DNSMASQ=1`` (then it fails).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import DNS_DOMAIN, Dnsmasq, Upstream, dnsmasq_binary

from lbclient import LBTransport, LoadBalancer
from lbclient.discovery import DNS, Discovered
from lbclient.discovery._refresh import RefreshJob
from lbclient.testing import TestServer

pytestmark = [pytest.mark.dnsmasq, pytest.mark.timeout(120)]

dns_resolver = pytest.importorskip("dns.resolver", reason="the DNS tests need dnspython")

NAME = "users.svc"
SERVICE = "_http._tcp.users.svc"


@contextmanager
def resolver(
    directory: Path,
    hosts: dict[str, list[str]],
    srv: list[tuple[str, str, int, int, int]] | None = None,
    upstream: int | None = None,
) -> Iterator[Dnsmasq]:
    """A dnsmasq without ``--local`` for ``*.svc``, serving ``hosts`` (and ``srv``)."""
    server = Dnsmasq(dnsmasq_binary(), directory, local=False, upstream=upstream)
    try:
        server.set_hosts(hosts)
        if srv:
            server.set_srv(srv)
        yield server.start()
    finally:
        server.stop()


def source(server: Dnsmasq, name: str = NAME, port: int = 80, **options: object) -> DNS:
    settings: dict[str, object] = {"timeout": 2.0, "min_ttl": 0.01, "max_ttl": 0.05}
    settings.update(options)
    return DNS(
        name,
        port=port,
        nameservers=["127.0.0.1"],
        nameserver_port=server.port,
        **settings,  # type: ignore[arg-type]
    )


def srv_source(server: Dnsmasq, name: str = SERVICE, **options: object) -> DNS:
    settings: dict[str, object] = {"timeout": 2.0, "min_ttl": 0.01, "max_ttl": 0.05}
    settings.update(options)
    return DNS.srv(name, nameservers=["127.0.0.1"], nameserver_port=server.port, **settings)


def both(make: DNS) -> tuple[Discovered, Discovered]:
    """The answer of a blocking lookup and of one on an event loop."""
    return make.discover(), asyncio.run(make.adiscover())


# -- one record type fails ------------------------------------------------------------------------


def test_a_refused_aaaa_query_leaves_the_a_records(tmp_path: Path) -> None:
    with resolver(tmp_path, {NAME: ["127.0.0.1", "127.0.0.2"]}) as server:
        for found in both(source(server)):
            assert [b.address for b in found.backends] == ["127.0.0.1:80", "127.0.0.2:80"]
            ((part, why),) = found.failed
            assert part == "AAAA"
            assert why.startswith("AAAA users.svc: NoNameservers: ")
            assert "REFUSED" in why
            assert found.ttl == 0.05  # the A records' TTL (1 s), clamped


@pytest.mark.parametrize(("rcode", "said"), [("SERVFAIL", "SERVFAIL"), (None, "Timeout")])
def test_a_servfail_or_a_timeout_on_one_type_leaves_the_other(
    tmp_path: Path, rcode: str | None, said: str
) -> None:
    with (
        Upstream(rcode) as upstream,
        resolver(tmp_path, {NAME: ["127.0.0.1"]}, upstream=upstream.port) as server,
    ):
        for found in both(source(server, timeout=0.5)):
            assert [b.address for b in found.backends] == ["127.0.0.1:80"]
            ((part, why),) = found.failed
            assert part == "AAAA"
            assert said in why
        assert upstream.queries > 0  # the AAAA queries went there


def test_every_type_failing_fails_the_lookup(tmp_path: Path) -> None:
    with resolver(tmp_path, {NAME: ["127.0.0.1"]}) as server:
        gone = source(server, "gone.svc")  # in no file: A and AAAA are REFUSED
        with pytest.raises(dns_resolver.NoNameservers, match="REFUSED"):
            gone.discover()
        with pytest.raises(dns_resolver.NoNameservers, match="REFUSED"):
            asyncio.run(gone.adiscover())
        # One type asked, and it fails: nothing answered.
        with pytest.raises(dns_resolver.NoNameservers, match="REFUSED"):
            source(server, records="AAAA").discover()


# -- through the balancer: counted in the snapshot and the metrics ---------------------------------


def test_traffic_flows_and_the_failed_type_is_counted(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from lbclient.metrics import register

    with (
        TestServer(name="one", host="127.0.0.1") as one,
        resolver(tmp_path, {NAME: ["127.0.0.1"]}) as server,
    ):
        lb = LoadBalancer(discovery=source(server, port=one.port))
        registry = CollectorRegistry()
        register(lb, service="users", registry=registry)
        with lb, httpx.Client(transport=LBTransport(lb), base_url="http://users") as client:
            assert client.get("/").json()["server"] == "one"
        snapshot = lb.snapshot()  # closed: no refresh (one each 50 ms) moves it before the scrape
        assert snapshot.discovery_failures == 0
        assert snapshot.discovery_error is None
        assert snapshot.discovery_refreshes >= 1
        assert snapshot.discovery_part_failures["AAAA"] == snapshot.discovery_refreshes
        assert snapshot.discovery_partial is not None
        assert snapshot.discovery_partial.startswith("AAAA users.svc: NoNameservers")
        assert "failed parts: AAAA " in str(snapshot)
        assert "latest answer lacks: AAAA users.svc" in str(snapshot)
        scraped = generate_latest(registry).decode()
        count = snapshot.discovery_part_failures["AAAA"]
        line = f'lbclient_discovery_part_failures_total{{part="AAAA",service="users"}} {count}.0'
        assert line in scraped
        assert 'lbclient_discovery_failures_total{service="users"} 0.0' in scraped


# -- SRV: one target failing leaves the others -----------------------------------------------------


def test_srv_targets_that_fail_leave_the_others(tmp_path: Path) -> None:
    hosts = {"a.svc": ["127.0.0.1"], "c.svc": ["127.0.0.3"]}
    records = [
        (SERVICE, "a.svc", 8080, 1, 1),
        (SERVICE, "b.svc", 8081, 1, 1),  # in no file: both of its queries are REFUSED
        (SERVICE, "c.svc", 8082, 2, 1),
    ]
    with resolver(tmp_path, hosts, records) as server:
        sync, asynchronous = both(srv_source(server))
        assert sync == asynchronous
        assert [(b.address, b.metadata["priority"]) for b in sync.backends] == [
            ("127.0.0.1:8080", 1),
            ("127.0.0.3:8082", 2),
        ]
        assert sorted(why.split(":")[0] for _part, why in sync.failed) == [
            "A b.svc",
            "AAAA a.svc",
            "AAAA b.svc",
            "AAAA c.svc",
        ]
        assert sorted(part for part, _why in sync.failed) == ["A", "AAAA", "AAAA", "AAAA"]


def test_srv_whose_every_target_fails_fails_the_lookup(tmp_path: Path) -> None:
    records = [(SERVICE, "b.svc", 8081, 1, 1), (SERVICE, "d.svc", 8083, 1, 1)]
    with resolver(tmp_path, {"a.svc": ["127.0.0.1"]}, records) as server:
        with pytest.raises(dns_resolver.NoNameservers, match="REFUSED"):
            srv_source(server).discover()
        with pytest.raises(dns_resolver.NoNameservers, match="REFUSED"):
            asyncio.run(srv_source(server).adiscover())


def test_no_backend_while_a_target_failed_is_a_failed_lookup(dnsmasq: Dnsmasq) -> None:
    # One target is gone (NXDOMAIN: its domain is dnsmasq's own), the other's queries are
    # REFUSED: "no backends" would be a guess, so the last set stays.
    service = f"_http._tcp.users.{DNS_DOMAIN}"
    dnsmasq.set_hosts({f"a.{DNS_DOMAIN}": ["127.0.0.1"]})
    dnsmasq.set_srv([(service, f"a.{DNS_DOMAIN}", 8080, 1, 1)])
    dnsmasq.start()
    lb = LoadBalancer()
    job = RefreshJob(srv_source(dnsmasq, service), lb, None)
    asyncio.run(job.lookup())
    assert [b.address for b in lb.backends] == ["127.0.0.1:8080"]
    dnsmasq.set_srv([(service, f"gone.{DNS_DOMAIN}", 8080, 1, 1), (service, "b.svc", 8081, 1, 1)])
    dnsmasq.restart()
    found = srv_source(dnsmasq, service).discover()
    assert found.backends == ()
    assert [part for part, _why in found.failed] == ["A", "AAAA"]
    for _ in range(5):
        asyncio.run(job.lookup())
    assert [b.address for b in lb.backends] == ["127.0.0.1:8080"]  # kept
    snapshot = lb.snapshot()
    assert (snapshot.discovery_refreshes, snapshot.discovery_failures) == (1, 5)
    assert snapshot.discovery_error is not None
    assert snapshot.discovery_error.startswith(
        "no backends found, and part of the lookup failed: A b.svc: NoNameservers"
    )
