"""Passive outlier detection and panic mode through real transports and servers on 127.0.0.1.

Ejections run on an injected clock that the tests move by hand: no test sleeps through one.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import requests

from lbclient import HealthPolicy, LBAdapter, LBTransport, LoadBalancer, RoundRobin
from lbclient.testing import TestServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def three() -> Iterator[list[TestServer]]:
    servers = [TestServer(name=f"s{i}").start() for i in range(3)]
    yield servers
    for s in servers:
        s.close()


class Clock:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_out_ejection(lb: LoadBalancer, clock: Clock, address: str) -> None:
    """Move ``clock`` to the end of the ejection of ``address`` (its probe is then due)."""
    (entry,) = [b for b in lb.snapshot().backends if b.backend.address == address]
    assert entry.ejection_remaining is not None
    assert entry.ejection_remaining > 0
    assert not lb.ready(address)
    clock.now += entry.ejection_remaining


def test_503s_eject_then_one_probe_decides(three: list[TestServer]) -> None:
    sick = three[0]
    events: list[tuple[str, bool]] = []
    clock = Clock()
    lb = LoadBalancer(
        [s.address for s in three],
        RoundRobin,
        health=HealthPolicy(consecutive_5xx=3),  # ejected for 30 s, then 60 s: on the clock
        on_change=lambda b, healthy: events.append((b.address, healthy)),
        clock=clock,
    )
    with httpx.Client(transport=LBTransport(lb), base_url="http://users") as client:
        statuses = [client.get("/").status_code for _ in range(6)]
        assert statuses == [200] * 6
        sick.mode = "status:503"
        codes = [client.get("/").status_code for _ in range(12)]
        # Round robin sends every third request to it: the third 503 in a row ejects it.
        assert codes.count(503) == 3
        assert events == [(sick.address, False)]
        before = sick.count()
        assert {client.get("/").json()["server"] for _ in range(12)} == {"s1", "s2"}
        assert sick.count() == before  # traffic moved away

        # The ejection ends while it still fails: exactly one probe, which ejects it again.
        wait_out_ejection(lb, clock, sick.address)
        codes = [client.get("/").status_code for _ in range(12)]
        assert codes.count(503) == 1
        assert sick.count() == before + 1
        assert lb.health(sick.address).ejections == 2
        assert lb.health(sick.address).ejected_until == clock.now + 60  # 2 x 30 s this time

        # Healthy again: one probe succeeds and it is back in the rotation.
        sick.mode = "ok"
        wait_out_ejection(lb, clock, sick.address)
        served = [client.get("/").json()["server"] for _ in range(12)]
        assert served.count("s0") >= 3
        assert events == [(sick.address, False), (sick.address, True)]
        assert lb.ready(sick.address)


def test_connection_failures_eject_through_requests(three: list[TestServer]) -> None:
    dead = three[1]
    lb = LoadBalancer(
        [s.address for s in three], RoundRobin, health=HealthPolicy(consecutive_failures=2)
    )
    session = requests.Session()
    session.mount("http://users/", LBAdapter(lb))
    with session:
        dead.kill()
        served = [session.get("http://users/").json()["server"] for _ in range(12)]
    assert "s1" not in served  # every request saved by a retry
    assert len(served) == 12
    entry = lb.snapshot().backends[[b.address for b in lb.backends].index(dead.address)]
    assert entry.ejected
    assert entry.ejections == 1


def test_two_of_three_down_max_ejection_percent_holds(three: list[TestServer]) -> None:
    # Default 10%: of three backends only one may be ejected at a time.
    for s in three[:2]:
        s.mode = "status:503"
    lb = LoadBalancer(
        [s.address for s in three], RoundRobin, health=HealthPolicy(consecutive_5xx=2)
    )
    with httpx.Client(transport=LBTransport(lb), base_url="http://users") as client:
        for _ in range(30):
            client.get("/")
    snap = lb.snapshot()
    assert [b.ejected for b in snap.backends].count(True) == 1
    assert not snap.panic
    held = [b for b in snap.backends if not b.ejected and b.consecutive_5xx]
    assert len(held) == 1
    assert held[0].consecutive_5xx >= 2  # detected, not ejected: the limit held


def test_two_of_three_down_panic_spreads_over_all(three: list[TestServer]) -> None:
    for s in three[:2]:
        s.mode = "status:503"
    lb = LoadBalancer(
        [s.address for s in three],
        RoundRobin,
        health=HealthPolicy(consecutive_5xx=2, max_ejection_percent=100),
    )
    with httpx.Client(transport=LBTransport(lb), base_url="http://users") as client:
        for _ in range(6):
            client.get("/")
        assert lb.panic  # 1 of 3 healthy is below 50%
        counts = [s.count() for s in three]
        for _ in range(30):
            client.get("/")
    # Spread over all three, instead of every request hammering the last healthy one.
    assert [s.count() - c for s, c in zip(three, counts, strict=True)] == [10, 10, 10]
