"""DNS discovery against a real DNS server, with live traffic through the httpx transports.

Each test starts its own dnsmasq (see ``conftest.Dnsmasq``) on a free loopback port, answering
from files the test writes, and real ``TestServer`` backends on 127.0.0.1, 127.0.0.2, 127.0.0.3
and ::1 (one port for all, as A and AAAA records carry no port). Records change while requests
flow; the tests wait for lookups to happen (refreshes are counted in ``snapshot()``), never for
a length of time. Health runs on an injected clock, so an ejection lasts as long as a test needs.

Skipped where dnsmasq is not installed, unless ``LBCLIENT_REQUIRE_DNSMASQ=1`` (then it fails).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest
from conftest import DNS_DOMAIN, DNS_TTL, Dnsmasq

from lbclient import (
    AsyncLBTransport,
    HealthPolicy,
    LBTransport,
    LoadBalancer,
    NoBackendAvailable,
    RoundRobin,
    TcpCheck,
)
from lbclient._background import THREAD_NAME
from lbclient.discovery import DNS, Discovered
from lbclient.discovery._refresh import RefreshJob
from lbclient.testing import TestServer

pytestmark = [pytest.mark.dnsmasq, pytest.mark.timeout(120)]

NAME = f"users.{DNS_DOMAIN}"
SERVICE = f"_http._tcp.users.{DNS_DOMAIN}"
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "::1")


class Clock:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def servers() -> Iterator[dict[str, TestServer]]:
    """A TestServer on each of HOSTS, all on one port, each named by its IP."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here (::1 cannot be bound)")
    for _ in range(50):
        started: dict[str, TestServer] = {}
        try:
            first = TestServer(name=HOSTS[0], host=HOSTS[0]).start()
            started[HOSTS[0]] = first
            for host in HOSTS[1:]:
                started[host] = TestServer(name=host, host=host, port=first.port).start()
        except OSError:
            for server in started.values():
                server.close()
            continue
        break
    else:
        raise RuntimeError(f"no port free on all of {HOSTS}")
    try:
        yield started
    finally:
        for server in started.values():
            server.close()


def source(dnsmasq: Dnsmasq, port: int, **options: object) -> DNS:
    """A DNS source for NAME at ``dnsmasq``, refreshing every few hundredths of a second."""
    settings: dict[str, object] = {"min_ttl": 0.01, "max_ttl": 0.03, "timeout": 1.0}
    settings.update(options)
    return DNS(
        NAME,
        port=port,
        nameservers=["127.0.0.1"],
        nameserver_port=dnsmasq.port,
        **settings,  # type: ignore[arg-type]
    )


def srv_source(dnsmasq: Dnsmasq, **options: object) -> DNS:
    settings: dict[str, object] = {"min_ttl": 0.01, "max_ttl": 0.03, "timeout": 1.0}
    settings.update(options)
    return DNS.srv(SERVICE, nameservers=["127.0.0.1"], nameserver_port=dnsmasq.port, **settings)


def addresses(lb: LoadBalancer) -> list[str]:
    return [b.address for b in lb.backends]


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.005)


def settle(lb: LoadBalancer) -> None:
    """Wait until a lookup that started after the records changed has been taken (the one in
    flight at the change may have seen the old records)."""
    seen = lb.snapshot().discovery_refreshes
    wait_until(lambda: lb.snapshot().discovery_refreshes >= seen + 2, "two more lookups")


async def asettle(lb: LoadBalancer) -> None:
    seen = lb.snapshot().discovery_refreshes
    deadline = time.monotonic() + 20
    while lb.snapshot().discovery_refreshes < seen + 2:
        assert time.monotonic() < deadline, "gave up waiting for two more lookups"
        await asyncio.sleep(0.005)


def spread(client: httpx.Client, requests: int) -> Counter[str]:
    """Send ``requests`` GETs; count them by the server that answered."""
    seen: Counter[str] = Counter()
    for _ in range(requests):
        response = client.get("/")
        assert response.status_code == 200
        seen[response.json()["server"]] += 1
    return seen


async def aspread(client: httpx.AsyncClient, requests: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(requests):
        response = await client.get("/")
        assert response.status_code == 200
        seen[response.json()["server"]] += 1
    return seen


def discovery_threads() -> list[str]:
    """The names of the runners' threads (the event loop's first, then its pool's)."""
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(THREAD_NAME))


# -- A and AAAA records --------------------------------------------------------------------------


def test_records_are_followed_under_traffic_on_a_thread(
    dnsmasq: Dnsmasq, servers: dict[str, TestServer]
) -> None:
    one, two, three, six = (servers[h] for h in HOSTS)
    dnsmasq.set_hosts({NAME: ["127.0.0.1", "127.0.0.2"]})
    dnsmasq.start()
    lb = LoadBalancer(
        discovery=source(dnsmasq, one.port),
        health=HealthPolicy(consecutive_5xx=1),
        clock=Clock(),
    )
    with lb, httpx.Client(transport=LBTransport(lb), base_url="http://users") as client:
        # Looked up before start() returned: the first request already has the backends.
        assert addresses(lb) == [one.address, two.address]
        assert discovery_threads()[:1] == [THREAD_NAME]
        assert set(spread(client, 20)) == {"127.0.0.1", "127.0.0.2"}

        two.mode = "status:503"  # one 503 ejects it; the clock never ends the ejection
        for _ in range(4):
            client.get("/")
        two.mode = "ok"
        assert lb.health(two.address).ejected

        # Added to DNS (an IPv4 and an IPv6 address): traffic within one refresh.
        dnsmasq.set_hosts({NAME: ["127.0.0.1", "127.0.0.2", "127.0.0.3", "::1"]})
        settle(lb)
        assert addresses(lb) == [one.address, two.address, three.address, six.address]
        assert six.address.startswith("[::1]:")
        seen = spread(client, 30)
        assert set(seen) == {"127.0.0.1", "127.0.0.3", "::1"}  # the ejected one gets none
        assert lb.health(two.address).ejected  # the survivor kept its health

        # Removed from DNS: no traffic after the next refresh.
        dnsmasq.set_hosts({NAME: ["127.0.0.2", "127.0.0.3", "::1"]})
        settle(lb)
        assert addresses(lb) == [two.address, three.address, six.address]
        before = one.count()
        assert set(spread(client, 30)) == {"127.0.0.3", "::1"}
        assert one.count() == before
        assert lb.health(two.address).ejected
        snapshot = lb.snapshot()
        assert snapshot.discovery_failures == 0
        assert snapshot.discovery_error is None
    assert discovery_threads() == []


def test_records_are_followed_under_traffic_on_a_task(
    dnsmasq: Dnsmasq, servers: dict[str, TestServer]
) -> None:
    one, two, three, six = (servers[h] for h in HOSTS)
    dnsmasq.set_hosts({NAME: ["127.0.0.1", "::1"]})
    dnsmasq.start()

    async def main() -> None:
        lb = LoadBalancer(
            discovery=source(dnsmasq, one.port),
            health=HealthPolicy(consecutive_5xx=1),
            clock=Clock(),
        )
        transport = AsyncLBTransport(lb)
        async with lb, httpx.AsyncClient(transport=transport, base_url="http://users") as client:
            assert addresses(lb) == [one.address, six.address]
            assert discovery_threads() == []  # the runner is a task of this loop
            assert any(t.get_name() == "lbclient-discovery" for t in asyncio.all_tasks())
            assert set(await aspread(client, 10)) == {"127.0.0.1", "::1"}

            one.mode = "status:503"
            for _ in range(3):
                await client.get("/")
            one.mode = "ok"
            assert lb.health(one.address).ejected

            dnsmasq.set_hosts({NAME: ["127.0.0.1", "127.0.0.2", "127.0.0.3", "::1"]})
            await asettle(lb)
            assert addresses(lb) == [one.address, two.address, three.address, six.address]
            assert set(await aspread(client, 30)) == {"127.0.0.2", "127.0.0.3", "::1"}
            assert lb.health(one.address).ejected

            dnsmasq.set_hosts({NAME: ["127.0.0.1", "127.0.0.2"]})
            await asettle(lb)
            assert addresses(lb) == [one.address, two.address]
            before = three.count(), six.count()
            assert set(await aspread(client, 10)) == {"127.0.0.2"}
            assert (three.count(), six.count()) == before
            assert lb.health(one.address).ejected
        assert not any(t.get_name() == "lbclient-discovery" for t in asyncio.all_tasks())

    asyncio.run(main())
    assert discovery_threads() == []


# -- outages ---------------------------------------------------------------------------------------


def test_dns_down_during_traffic_keeps_the_last_set_on_a_thread(
    dnsmasq: Dnsmasq, servers: dict[str, TestServer]
) -> None:
    one, two, three = servers["127.0.0.1"], servers["127.0.0.2"], servers["127.0.0.3"]
    dnsmasq.set_hosts({NAME: ["127.0.0.1", "127.0.0.2"]})
    dnsmasq.start()
    lb = LoadBalancer(discovery=source(dnsmasq, one.port, timeout=0.2))
    failures: list[BaseException] = []
    sent = [0]
    stop = threading.Event()
    with lb, httpx.Client(transport=LBTransport(lb), base_url="http://users") as client:
        # On a busy machine a first lookup may miss its 0.2 s and be tried again.
        wait_until(lambda: addresses(lb) == [one.address, two.address], "the first set")

        def traffic() -> None:
            while not stop.is_set():
                try:
                    assert client.get("/").status_code == 200
                except BaseException as exc:  # every failure counts
                    failures.append(exc)
                sent[0] += 1

        worker = threading.Thread(target=traffic, name="traffic")
        worker.start()
        try:
            dnsmasq.stop()
            wait_until(lambda: lb.snapshot().discovery_failures >= 3, "three failed lookups")
            snapshot = lb.snapshot()
            assert addresses(lb) == [one.address, two.address]  # the last good set
            assert snapshot.discovery_error is not None
            assert "Timeout" in snapshot.discovery_error

            # Back, with a change: it is followed again.
            dnsmasq.set_hosts({NAME: ["127.0.0.1", "127.0.0.3"]})
            dnsmasq.start()
            wait_until(lambda: addresses(lb) == [one.address, three.address], "the new set")
            assert lb.snapshot().discovery_error is None
            sent_before = sent[0]
            wait_until(lambda: sent[0] > sent_before + 20, "more traffic")
        finally:
            stop.set()
            worker.join()
    assert failures == []
    assert sent[0] > 20
    assert three.count() > 0


def test_dns_down_during_traffic_keeps_the_last_set_on_a_task(
    dnsmasq: Dnsmasq, servers: dict[str, TestServer]
) -> None:
    one, two, six = servers["127.0.0.1"], servers["127.0.0.2"], servers["::1"]
    dnsmasq.set_hosts({NAME: ["127.0.0.1", "127.0.0.2"]})
    dnsmasq.start()

    async def main() -> tuple[list[BaseException], int]:
        lb = LoadBalancer(discovery=source(dnsmasq, one.port, timeout=0.2))
        failures: list[BaseException] = []
        sent = 0
        transport = AsyncLBTransport(lb)
        async with lb, httpx.AsyncClient(transport=transport, base_url="http://users") as client:

            async def until(condition: Callable[[], bool]) -> None:
                nonlocal sent
                deadline = time.monotonic() + 20
                while not condition():
                    assert time.monotonic() < deadline
                    try:
                        assert (await client.get("/")).status_code == 200
                    except Exception as exc:
                        failures.append(exc)
                    sent += 1
                    await asyncio.sleep(0.001)

            # The first set in (on a busy machine a first lookup may miss its 0.2 s and be
            # tried again), then traffic, then DNS down.
            deadline = time.monotonic() + 20
            while addresses(lb) != [one.address, two.address]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            await until(lambda: sent >= 10)
            dnsmasq.stop()
            await until(lambda: lb.snapshot().discovery_failures >= 3)
            assert addresses(lb) == [one.address, two.address]
            assert lb.snapshot().discovery_error is not None
            dnsmasq.set_hosts({NAME: ["127.0.0.2", "::1"]})
            dnsmasq.start()
            await until(lambda: addresses(lb) == [two.address, six.address])
            assert lb.snapshot().discovery_error is None
            count = sent
            await until(lambda: sent >= count + 10)
        return failures, sent

    failures, sent = asyncio.run(main())
    assert failures == []
    assert sent >= 30
    assert six.count() > 0


def test_a_first_lookup_that_fails_fails_the_request_naming_it(
    dnsmasq: Dnsmasq, servers: dict[str, TestServer]
) -> None:
    one = servers["127.0.0.1"]
    dnsmasq.set_hosts({NAME: ["127.0.0.1"]})  # written, but dnsmasq is not running yet
    lb = LoadBalancer(discovery=source(dnsmasq, one.port, timeout=0.2))
    with lb, httpx.Client(transport=LBTransport(lb), base_url="http://users") as client:
        with pytest.raises(NoBackendAvailable) as caught:
            client.get("/")
        assert "it has no backends: discovery failed: LifetimeTimeout: " in str(caught.value)
        dnsmasq.start()
        wait_until(lambda: addresses(lb) == [one.address], "the first answer")
        assert client.get("/").json()["server"] == "127.0.0.1"


def test_an_empty_answer_empties_the_set_only_when_it_repeats_and_holds(
    dnsmasq: Dnsmasq, servers: dict[str, TestServer]
) -> None:
    one = servers["127.0.0.1"]
    dnsmasq.set_hosts({NAME: ["127.0.0.1", "::1"]})
    dnsmasq.start()
    lb = LoadBalancer()
    clock = Clock()
    # Stepped by hand, lookup by lookup, on a clock of the test's.
    job = RefreshJob(source(dnsmasq, one.port, empty_for=5.0), lb, None, clock=clock)
    asyncio.run(job.lookup())
    assert len(lb) == 2
    dnsmasq.set_hosts({NAME: []})  # NXDOMAIN from now on
    assert source(dnsmasq, one.port).discover() == Discovered([], 0.01)  # asked again soon
    for _ in range(4):  # four NXDOMAIN answers in a row, over 3 s: kept
        clock.now += 1.0
        asyncio.run(job.lookup())
        assert len(lb) == 2
    clock.now += 2.0  # the first of them was 5 s ago
    asyncio.run(job.lookup())
    assert len(lb) == 0
    assert job.progress.refreshes == 6
    assert job.progress.failures == 0


def test_ttls_are_clamped(dnsmasq: Dnsmasq) -> None:
    dnsmasq.set_hosts({NAME: ["127.0.0.1"], f"a.{DNS_DOMAIN}": ["::1"]})
    dnsmasq.set_srv([(SERVICE, f"a.{DNS_DOMAIN}", 8080, 1, 1)])
    dnsmasq.start()
    assert source(dnsmasq, 80, min_ttl=0.01, max_ttl=300).discover().ttl == DNS_TTL
    assert source(dnsmasq, 80, min_ttl=0.01, max_ttl=0.5).discover().ttl == 0.5
    assert source(dnsmasq, 80, min_ttl=5, max_ttl=300).discover().ttl == 5
    assert srv_source(dnsmasq, min_ttl=0.01, max_ttl=300).discover().ttl == DNS_TTL
    assert srv_source(dnsmasq, min_ttl=7, max_ttl=300).discover().ttl == 7


def test_records_of_one_kind_only(dnsmasq: Dnsmasq) -> None:
    dnsmasq.set_hosts({NAME: ["127.0.0.1", "::1"]})
    dnsmasq.start()
    assert [b.address for b in source(dnsmasq, 80, records="A").discover().backends] == [
        "127.0.0.1:80"
    ]
    assert [b.address for b in source(dnsmasq, 80, records=["AAAA"]).discover().backends] == [
        "[::1]:80"
    ]


# -- SRV records -----------------------------------------------------------------------------------


def test_srv_answers_the_same_sync_and_async(dnsmasq: Dnsmasq) -> None:
    dnsmasq.set_hosts({f"a.{DNS_DOMAIN}": ["127.0.0.1", "::1"], f"b.{DNS_DOMAIN}": ["127.0.0.2"]})
    dnsmasq.set_srv(
        [
            (SERVICE, f"a.{DNS_DOMAIN}", 8080, 10, 0),
            (SERVICE, f"b.{DNS_DOMAIN}", 8081, 20, 7),
            (SERVICE, f"gone.{DNS_DOMAIN}", 8082, 10, 5),  # no address: left out
        ]
    )
    dnsmasq.start()
    found = srv_source(dnsmasq).discover()
    found_async = asyncio.run(srv_source(dnsmasq).adiscover())
    assert found_async == found
    assert [dict(b.metadata) for b in found_async.backends] == [
        dict(b.metadata) for b in found.backends
    ]
    assert [(b.address, b.weight, dict(b.metadata)) for b in found.backends] == [
        (
            "127.0.0.1:8080",
            1,
            {"name": SERVICE, "target": f"a.{DNS_DOMAIN}", "priority": 10, "srv_weight": 0},
        ),
        (
            "127.0.0.2:8081",
            7,
            {"name": SERVICE, "target": f"b.{DNS_DOMAIN}", "priority": 20, "srv_weight": 7},
        ),
        (
            "[::1]:8080",
            1,
            {"name": SERVICE, "target": f"a.{DNS_DOMAIN}", "priority": 10, "srv_weight": 0},
        ),
    ]


def test_srv_priorities_and_weights_with_failover_and_back(
    dnsmasq: Dnsmasq, servers: dict[str, TestServer]
) -> None:
    one, two, three, six = (servers[h] for h in HOSTS)
    port = one.port
    dnsmasq.set_hosts(
        {
            f"a.{DNS_DOMAIN}": ["127.0.0.1"],
            f"b.{DNS_DOMAIN}": ["127.0.0.2"],
            f"c.{DNS_DOMAIN}": ["127.0.0.3"],
            f"d.{DNS_DOMAIN}": ["::1"],
        }
    )
    dnsmasq.set_srv(
        [
            (SERVICE, f"a.{DNS_DOMAIN}", port, 10, 3),
            (SERVICE, f"b.{DNS_DOMAIN}", port, 10, 1),
            (SERVICE, f"c.{DNS_DOMAIN}", port, 20, 2),
            (SERVICE, f"d.{DNS_DOMAIN}", port, 20, 0),  # weight 0: the smallest weight, 1
        ]
    )
    dnsmasq.start()
    lb = LoadBalancer(
        algorithm=RoundRobin,
        discovery=srv_source(dnsmasq, failover_interval=0.02),
        health_check=TcpCheck(interval=0.02, timeout=0.5),
    )
    with lb, httpx.Client(transport=LBTransport(lb), base_url="http://users") as client:
        # Only the lowest priority group serves, shared by weight.
        assert [(b.address, b.weight) for b in lb.backends] == [
            (one.address, 3),
            (two.address, 1),
        ]
        assert lb.snapshot().discovery_priority == 10
        assert spread(client, 400) == {"127.0.0.1": 300, "127.0.0.2": 100}

        # The whole group goes down: the next group takes over.
        one.kill()
        two.kill()
        wait_until(lambda: lb.snapshot().discovery_priority == 20, "failover to priority 20")
        assert [(b.address, b.weight) for b in lb.backends] == [
            (three.address, 2),
            (six.address, 1),
        ]
        assert spread(client, 300) == {"127.0.0.3": 200, "::1": 100}  # IPv6 reached too

        # Back up: a probe finds it, and it takes over again.
        one.start()
        two.start()
        wait_until(lambda: lb.snapshot().discovery_priority == 10, "back to priority 10")
        assert addresses(lb) == [one.address, two.address]
        before = three.count(), six.count()
        assert set(spread(client, 40)) == {"127.0.0.1", "127.0.0.2"}
        assert (three.count(), six.count()) == before

        # A record change needs a restart of dnsmasq: a new group 5 takes over at once.
        dnsmasq.set_srv(
            [
                (SERVICE, f"a.{DNS_DOMAIN}", port, 10, 3),
                (SERVICE, f"d.{DNS_DOMAIN}", port, 5, 1),
            ]
        )
        dnsmasq.restart()
        wait_until(lambda: lb.snapshot().discovery_priority == 5, "priority 5")
        assert addresses(lb) == [six.address]
    assert discovery_threads() == []
