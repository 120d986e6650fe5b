"""Zone-aware routing wired into the balancer and the adapters: picks in the local zone while it
is healthy, the spill when it is not, the zone-blind fallback, key-based algorithms and bad
values refused, retries in the zone first, and, against real loopback servers on 127.0.0.2-4
labelled zones a, b and c, the traffic that stays local and the spill when zone a dies."""

from __future__ import annotations

import pickle
import random
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import requests

from lbclient import (
    AsyncLBTransport,
    Backend,
    Consistent,
    Hash,
    LBAdapter,
    LBTransport,
    LeastRequest,
    LoadBalancer,
    PeakEWMA,
    Random,
    RoundRobin,
    SmoothRoundRobin,
    Subset,
)
from lbclient.selection import Maglev, Rendezvous
from lbclient.testing import TestServer


def fleet(per_zone: int = 3, zones: str = "abc") -> list[Backend]:
    return [
        Backend(f"10.0.{i}.{j}:80", metadata={"zone": zone})
        for i, zone in enumerate(zones)
        for j in range(1, per_zone + 1)
    ]


def zones_of(lb: LoadBalancer, count: int) -> Counter[str]:
    chosen = Counter[str]()
    for _ in range(count):
        backend = lb.select()
        assert backend is not None
        chosen[backend.metadata["zone"]] += 1
    return chosen


def eject_zone(lb: LoadBalancer, zone: str) -> None:
    for backend in lb.backends:
        if backend.metadata["zone"] == zone:
            lb.set_enabled(backend, False)


@pytest.mark.parametrize(
    "algorithm", [RoundRobin, Random, SmoothRoundRobin, LeastRequest, PeakEWMA]
)
def test_balanced_zones_keep_every_pick_local(algorithm: object) -> None:
    lb = LoadBalancer(fleet(), algorithm, zone="a", random=random.Random(3).random)
    assert zones_of(lb, 60) == {"a": 60}
    shot = lb.snapshot()
    assert shot.zones is not None
    assert shot.zones.mode == "local"
    assert dict(shot.zones.shares) == {"a": 1.0}


def test_round_robin_cycles_over_the_local_zone() -> None:
    lb = LoadBalancer(fleet(), RoundRobin, zone="b", random=random.Random(1).random)
    chosen = Counter(lb.select() for _ in range(30))
    assert {b.address: n for b, n in chosen.items() if b is not None} == {
        f"10.0.1.{j}:80": 10 for j in (1, 2, 3)
    }


@pytest.mark.parametrize("algorithm", [RoundRobin, Random, LeastRequest])
def test_a_local_zone_down_spills_every_pick_to_the_others(algorithm: object) -> None:
    lb = LoadBalancer(fleet(), algorithm, zone="a", random=random.Random(5).random)
    eject_zone(lb, "a")
    chosen = zones_of(lb, 90)
    assert set(chosen) == {"b", "c"}
    assert sum(chosen.values()) == 90
    shot = lb.snapshot()
    assert shot.zones is not None
    assert shot.zones.mode == "blind"


def test_a_zone_that_holds_less_than_its_clients_sends_the_residual_elsewhere() -> None:
    backends = (
        fleet(2, "a")
        + fleet(4, "bc")[:0]
        + [Backend(f"10.1.{i}.1:80", metadata={"zone": z}) for i, z in enumerate("bbbbcccc")]
    )
    # Clients spread like the backends as deployed: one of a's two backends ejected leaves
    # it 1/9 of the healthy backends for 2/10 of the clients.
    lb = LoadBalancer(backends, RoundRobin, zone="a", random=random.Random(11).random)
    first = lb.backends[0]
    assert first.metadata["zone"] == "a"
    for _ in range(5):
        lb.report(first, False)
    plan = lb.snapshot().zones
    assert plan is not None
    assert plan.mode == "residual"
    assert plan.local_share == pytest.approx((1 / 9) / (2 / 10))
    chosen = zones_of(lb, 4000)
    assert chosen["a"] / 4000 == pytest.approx(plan.local_share, abs=0.03)
    assert chosen["b"] + chosen["c"] + chosen["a"] == 4000


def test_fewer_than_six_backends_is_zone_blind() -> None:
    lb = LoadBalancer(fleet(1), RoundRobin, zone="a", random=random.Random(2).random)
    assert zones_of(lb, 30) == {"a": 10, "b": 10, "c": 10}
    plan = lb.snapshot().zones
    assert plan is not None
    assert plan.mode == "blind"
    assert "fewer than 6" in plan.reason


def test_an_unknown_local_zone_is_zone_blind() -> None:
    lb = LoadBalancer(fleet(), RoundRobin, zone="z", random=random.Random(2).random)
    assert zones_of(lb, 90) == {"a": 30, "b": 30, "c": 30}


@pytest.mark.parametrize("algorithm", [Hash, Consistent, Maglev, Rendezvous])
def test_a_key_based_algorithm_with_a_zone_is_refused_saying_why(algorithm: object) -> None:
    with pytest.raises(ValueError, match="key agreement"):
        LoadBalancer(fleet(), algorithm, zone="a")


@pytest.mark.parametrize("bad", [5, b"a", ["a"], 1.0])
def test_a_zone_that_is_not_a_str_is_a_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="zone must be a str"):
        LoadBalancer(fleet(), zone=bad)  # type: ignore[arg-type]


def test_an_empty_zone_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="zone must not be empty"):
        LoadBalancer(fleet(), zone="")


def test_retries_stay_in_the_zone_first_then_go_elsewhere() -> None:
    lb = LoadBalancer(fleet(), RoundRobin, zone="a", random=random.Random(4).random)
    first = lb.select()
    assert first is not None
    assert first.metadata["zone"] == "a"
    order = list(lb.iter(after=first))
    assert first not in order
    assert len(order) == 8
    # One more backend of the zone, then the other zones (a dead zone costs one retry, not all
    # of them), then the rest of the zone.
    zones = [b.metadata["zone"] for b in order]
    assert zones[0] == "a"
    assert set(zones[1:7]) == {"b", "c"}
    assert zones[7] == "a"
    # Without a first pick, the order starts in the zone too.
    assert [b.metadata["zone"] for b in list(lb.iter())[:3]] == ["a", "a", "a"]


def test_select_with_walks_the_zone_first() -> None:
    lb = LoadBalancer(fleet(), LeastRequest, zone="c", random=random.Random(4).random)
    seen: list[Backend] = []

    def accept(backend: Backend, ready: bool) -> bool:
        seen.append(backend)
        return ready and len(seen) > 3

    chosen = lb.select_with(b"", 20, accept)
    assert [b.metadata["zone"] for b in seen[:3]] == ["c", "c", "c"]
    assert chosen is not None
    assert chosen.metadata["zone"] != "c"


def test_zones_compose_with_a_subset() -> None:
    subset = Subset(6, salt=b"zones")
    lb = LoadBalancer(fleet(4), RoundRobin, subset=subset, zone="a", random=random.Random(1).random)
    members = set(lb.members)
    local = {b for b in members if b.metadata["zone"] == "a"}
    chosen = Counter(lb.select() for _ in range(200))
    assert set(chosen) <= members
    plan = lb.snapshot().zones
    assert plan is not None
    if plan.mode == "local":
        assert set(chosen) == local


def test_the_zone_survives_pickling() -> None:
    lb = LoadBalancer(fleet(), RoundRobin, zone="b")
    again = pickle.loads(pickle.dumps(lb))
    assert zones_of(again, 9) == {"b": 9}


def test_the_adapters_pass_the_zone_to_their_balancer() -> None:
    assert zones_of(LBTransport(fleet(), zone="c").balancer, 9) == {"c": 9}
    assert zones_of(LBAdapter(fleet(), zone="c").balancer, 9) == {"c": 9}
    assert zones_of(AsyncLBTransport(fleet(), zone="c").balancer, 9) == {"c": 9}
    with pytest.raises(TypeError, match="zone= applies only when backends are given"):
        LBTransport(LoadBalancer(fleet()), zone="c")


# -- against real servers -----------------------------------------------------------------------


@pytest.fixture
def zoned() -> Iterator[dict[str, list[TestServer]]]:
    servers = {
        zone: [TestServer(host=host, name=f"{zone}{i}").start() for i in range(2)]
        for zone, host in (("a", "127.0.0.2"), ("b", "127.0.0.3"), ("c", "127.0.0.4"))
    }
    yield servers
    for group in servers.values():
        for server in group:
            server.close()


def _backends(servers: dict[str, list[TestServer]]) -> list[Backend]:
    return [
        Backend(s.address, metadata={"zone": zone})
        for zone, group in servers.items()
        for s in group
    ]


def _counts(servers: dict[str, list[TestServer]]) -> dict[str, int]:
    return {zone: sum(s.count() for s in group) for zone, group in servers.items()}


def test_the_local_zone_takes_the_traffic_then_spills_when_it_dies(
    zoned: dict[str, list[TestServer]],
) -> None:
    transport = LBTransport(_backends(zoned), zone="a", hosts=["svc"])
    with httpx.Client(transport=transport, base_url="http://svc") as http:
        for _ in range(100):
            http.get("/").raise_for_status()
        counts = _counts(zoned)
        assert counts["a"] >= 95, counts
        for server in zoned["a"]:
            server.close()
        failed = 0
        for _ in range(100):
            if http.get("/").status_code != 200:
                failed += 1
        assert failed == 0
    after = _counts(zoned)
    assert after["b"] + after["c"] - counts["b"] - counts["c"] >= 100
    assert after["b"] > counts["b"]
    assert after["c"] > counts["c"]


def test_a_whole_zone_of_three_dying_loses_no_request() -> None:
    servers = {
        zone: [TestServer(host=host, name=f"{zone}{i}").start() for i in range(3)]
        for zone, host in (("a", "127.0.0.2"), ("b", "127.0.0.3"), ("c", "127.0.0.4"))
    }
    try:
        transport = LBTransport(_backends(servers), zone="a", hosts=["svc"])  # max_attempts 3
        with httpx.Client(transport=transport, base_url="http://svc") as http:
            for _ in range(30):
                http.get("/").raise_for_status()
            assert _counts(servers)["a"] >= 28
            for server in servers["a"]:
                server.close()
            statuses = [http.get("/").status_code for _ in range(30)]
        assert statuses == [200] * 30
    finally:
        for group in servers.values():
            for server in group:
                server.close()


def test_the_requests_adapter_routes_by_zone(zoned: dict[str, list[TestServer]]) -> None:
    adapter = LBAdapter(_backends(zoned), zone="b", hosts=["svc"])
    with requests.Session() as session:
        session.mount("http://svc/", adapter)
        for _ in range(30):
            session.get("http://svc/").raise_for_status()
    assert _counts(zoned)["b"] >= 29
