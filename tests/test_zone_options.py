"""Zone settings beyond the defaults, wired: ``LoadBalancer(zone=Zone(...))`` with the fleet's
clients per zone, ``min_backends``, the panic threshold, and the load spill read from the
balancer's live load (requests in flight, or reported utilization) on the balancer's clock, at
most once per ``load_every``; a subset taken within each zone; and, against real loopback
servers, a local zone whose requests pile up spilling and coming back."""

from __future__ import annotations

import pickle
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from lbclient import Backend, LBTransport, LoadBalancer, RoundRobin, Subset
from lbclient._load import Load
from lbclient._zone_view import Zones
from lbclient.testing import Exchange, TestServer
from lbclient.zones import Zone, ZonePlan, zone_of


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fleet(per_zone: int = 3, zones: str = "abc") -> list[Backend]:
    return [
        Backend(f"10.0.{i}.{j}:80", metadata={"zone": zone})
        for i, zone in enumerate(zones)
        for j in range(1, per_zone + 1)
    ]


def balancer(zone: Zone | str, clock: Clock | None = None, **kwargs: object) -> LoadBalancer:
    return LoadBalancer(
        kwargs.pop("backends", fleet()),  # type: ignore[arg-type]
        kwargs.pop("algorithm", RoundRobin),  # type: ignore[arg-type]
        zone=zone,
        clock=clock or Clock(),
        random=random.Random(7).random,
        **kwargs,  # type: ignore[arg-type]
    )


def plan(lb: LoadBalancer) -> ZonePlan:
    lb.select()  # a select makes the plan current
    shown = lb.snapshot().zones
    assert shown is not None
    return shown


def zones_of(lb: LoadBalancer, count: int) -> Counter[str]:
    return Counter(zone_of(b) for b in (lb.select() for _ in range(count)) if b is not None)


def hold(lb: LoadBalancer, zone: str, each: int) -> list[Load]:
    """``each`` requests in flight to every backend of ``zone``."""
    loads = [lb.begin(b) for b in lb.backends if zone_of(b) == zone for _ in range(each)]
    assert all(load is not None for load in loads)
    return [load for load in loads if load is not None]


# -- the value -------------------------------------------------------------------------------


def test_a_zone_is_an_immutable_hashable_picklable_value() -> None:
    zone = Zone("a", clients={"b": 1, "a": 2}, min_backends=3, load_spill=3.0)
    assert zone == Zone("a", clients={"a": 2.0, "b": 1.0}, min_backends=3, load_spill=3.0)
    assert hash(zone) == hash(pickle.loads(pickle.dumps(zone)))
    assert pickle.loads(pickle.dumps(zone)) == zone
    assert list(zone.clients or {}) == ["a", "b"]
    with pytest.raises(AttributeError):
        zone.name = "b"  # type: ignore[misc]
    assert LoadBalancer(fleet(), zone="a")._zones.zone == Zone("a")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": ""}, ValueError, "zone must not be empty"),
        ({"name": 3}, TypeError, "zone must be a str, got 3"),
        ({"clients": {"b": 1}}, ValueError, "clients has none in the zone 'a'"),
        ({"clients": {"a": -1}}, ValueError, r"clients\['a'\] must be a finite number >= 0"),
        ({"clients": ["a"]}, TypeError, "clients must be a mapping"),
        ({"min_backends": -1}, ValueError, "min_backends must be an int >= 0, got -1"),
        ({"panic_threshold": 1.5}, ValueError, "panic_threshold must be in 0..1, got 1.5"),
        ({"load_spill": 0.5}, ValueError, "load_spill must be at least 1, got 0.5"),
        ({"load_return": 3.0}, ValueError, "load_return must not be above load_spill"),
        ({"load": "cpu"}, ValueError, "Zone load must be one of .*'cpu'"),
        ({"load_floor": -1}, ValueError, "load_floor must be a finite number >= 0, got -1"),
        ({"load_every": float("nan")}, ValueError, "load_every must be a finite number"),
    ],
)
def test_bad_zone_settings_are_clear_errors(
    kwargs: dict[str, object], error: type, match: str
) -> None:
    settings: dict[str, object] = {"name": "a", **kwargs}
    with pytest.raises(error, match=match):
        Zone(**settings)  # type: ignore[arg-type]


# -- the settings, wired ---------------------------------------------------------------------


def test_clients_per_zone_send_the_residual_to_the_spare_zones() -> None:
    # Half the fleet's clients are in a, which holds a third of the backends: a keeps
    # (1/3) / (1/2) = 2/3 and each other zone has 1/3 - 1/4 of spare capacity.
    lb = balancer(Zone("a", clients={"a": 2, "b": 1, "c": 1}))
    shown = plan(lb)
    assert shown.mode == "residual"
    assert dict(shown.shares) == pytest.approx({"a": 2 / 3, "b": 1 / 6, "c": 1 / 6})
    chosen = zones_of(lb, 3000)
    assert chosen["a"] / 3000 == pytest.approx(2 / 3, abs=0.03)
    assert chosen["b"] / 3000 == pytest.approx(1 / 6, abs=0.03)
    # The default spreads the clients like the backends: everything stays.
    assert plan(balancer("a")).mode == "local"


def test_min_backends_is_the_zone_s_own() -> None:
    assert plan(balancer(Zone("a", min_backends=10))).mode == "blind"
    assert plan(balancer(Zone("a", min_backends=3), backends=fleet(1))).mode == "local"
    assert plan(balancer("a", backends=fleet(1))).mode == "blind"


def test_the_panic_threshold_is_the_zone_s_own() -> None:
    default, lenient = balancer("a"), balancer(Zone("a", panic_threshold=0.3))
    for lb in (default, lenient):
        for backend in [b for b in lb.backends if zone_of(b) == "a"][:2]:
            lb.set_enabled(backend, False)
    assert plan(default).mode == "blind"  # 1 of 3 is under half
    shown = plan(lenient)  # 1 of 3 is over 30%: a keeps what its one backend can take
    assert shown.mode == "residual"
    assert shown.local_share == pytest.approx((1 / 7) / (1 / 3))


def test_the_local_zone_spills_when_its_load_leaves_the_band_at_the_next_reading() -> None:
    clock = Clock()
    lb = balancer("a", clock)
    assert plan(lb).mode == "local"
    held = hold(lb, "a", 3)  # 3 in flight per backend: over 2x the others' (0, counted as 1)
    assert plan(lb).mode == "local"  # read at most once a second: not yet
    clock.now += 1.0
    shown = plan(lb)
    assert (shown.mode, shown.spilled) == ("blind", True)
    assert "over 2x" in shown.reason
    assert set(zones_of(lb, 60)) == {"a", "b", "c"}
    # Between the band's ends it stays spilled (1 in flight per backend: over 0.8x, under 2x).
    for load in held[3:]:
        load.end()
    clock.now += 1.0
    assert plan(lb).spilled
    for load in held[:3]:
        load.end()
    clock.now += 1.0
    shown = plan(lb)
    assert (shown.mode, shown.spilled) == ("local", False)
    assert zones_of(lb, 30) == {"a": 30}


def test_the_spill_compares_with_the_other_zones_load() -> None:
    clock = Clock()
    lb = balancer("a", clock)
    plan(lb)
    hold(lb, "a", 3)
    hold(lb, "b", 2)
    hold(lb, "c", 2)  # 3 against 2: under 2x
    clock.now += 1.0
    assert plan(lb).mode == "local"
    hold(lb, "a", 2)  # 5 against 2: over
    clock.now += 1.0
    assert plan(lb).mode == "blind"


def test_without_a_load_spill_load_is_never_read() -> None:
    clock = Clock()
    lb = balancer(Zone("a", load_spill=None), clock)
    hold(lb, "a", 50)
    clock.now += 10.0
    assert plan(lb).mode == "local"


def test_reported_utilization_is_the_load_when_asked_for() -> None:
    clock = Clock()
    lb = balancer(Zone("a", load="utilization", load_floor=0.1), clock)
    for backend in lb.backends:
        busy = 0.9 if zone_of(backend) == "a" else 0.3
        lb.report_load(backend, f"TEXT application_utilization={busy}")
    clock.now += 1.0
    assert plan(lb).spilled  # 0.9 against 0.3
    for backend in lb.backends:
        if zone_of(backend) == "a":
            lb.report_load(backend, "TEXT cpu_utilization=0.2")
    clock.now += 1.0
    assert plan(lb).mode == "local"


def test_load_is_read_at_most_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    readings = []
    read = Zones.reading

    def counted(self: Zones, view: object) -> dict[str, float]:
        readings.append(view)
        return read(self, view)  # type: ignore[arg-type]

    monkeypatch.setattr(Zones, "reading", counted)
    clock = Clock()
    lb = balancer(Zone("a", load_every=0.5), clock)
    for _ in range(1000):
        lb.select()
    assert len(readings) == 1
    clock.now += 0.5
    for _ in range(1000):
        lb.select()
    assert len(readings) == 2
    lb.set_enabled(lb.backends[0], False)  # a change of availability plans afresh
    lb.select()
    assert len(readings) == 3


def test_a_subset_is_taken_within_each_zone() -> None:
    backends = fleet(4)
    # Six clients in zone a, deterministic subsets of 2 within each zone: each of a's four
    # backends has 6 x 2 / 4 = 3 of them.
    balancers = [
        LoadBalancer(backends, subset=Subset(2, index=i, clients=6), zone="a") for i in range(6)
    ]
    for lb in balancers:
        assert Counter(zone_of(b) for b in lb.members) == {"a": 2, "b": 2, "c": 2}
        assert set(zones_of(lb, 10)) == {"a"}
    clients = Counter(b for lb in balancers for b in lb.members if zone_of(b) == "a")
    assert sorted(clients.values()) == [3, 3, 3, 3]


# -- against real servers ------------------------------------------------------------------------


@pytest.fixture
def gated() -> Iterator[tuple[dict[str, list[TestServer]], threading.Event]]:
    release = threading.Event()

    def wait(exchange: Exchange) -> bool:
        release.wait(10)  # a hang guard; the test releases it
        return exchange.respond()

    servers = {
        zone: [
            TestServer("gate" if zone == "a" else "ok", host=host, behaviours={"gate": wait})
            for _ in range(2)
        ]
        for zone, host in (("a", "127.0.0.2"), ("b", "127.0.0.3"), ("c", "127.0.0.4"))
    }
    for group in servers.values():
        for server in group:
            server.start()
    yield servers, release
    release.set()
    for group in servers.values():
        for server in group:
            server.close()


def test_requests_piling_up_in_the_local_zone_spill_then_come_back(
    gated: tuple[dict[str, list[TestServer]], threading.Event],
) -> None:
    servers, release = gated
    backends = [Backend(s.address, metadata={"zone": z}) for z, g in servers.items() for s in g]
    transport = LBTransport(backends, zone=Zone("a", load_every=0.0), hosts=["svc"])
    lb = transport.balancer
    statuses: list[int] = []
    with httpx.Client(transport=transport, base_url="http://svc", timeout=20) as http:

        def get() -> None:
            statuses.append(http.get("/").status_code)

        assert plan(lb).mode == "local"
        threads = [threading.Thread(target=get) for _ in range(5)]
        for thread in threads:
            thread.start()
        for _ in range(1000):  # a hang guard of 10 s
            if sum(s.count() for s in servers["a"]) >= 5:
                break
            time.sleep(0.01)
        # Five requests held in a's two backends: 2.5 per backend, over 2x the others' 1.
        shown = plan(lb)
        assert (shown.mode, shown.spilled) == ("blind", True)
        release.set()
        for thread in threads:
            thread.join(15)
        assert plan(lb).mode == "local"
        for _ in range(20):
            get()
    assert statuses == [200] * 25
    assert sum(s.count() for s in servers["a"]) == 25


def test_the_load_floor_follows_the_unit_of_the_reading() -> None:
    assert Zone("a").load_floor == 1.0
    assert Zone("a", load="utilization").load_floor == 0.1
    assert Zone("a", load="utilization", load_floor=0.3).load_floor == 0.3
    # A local zone nearly full against idle others spills on utilization by default.
    zone = Zone("a", load="utilization")
    counts = {"a": 3.0, "b": 3.0, "c": 3.0}
    assert zone.plan(counts, counts, {"a": 0.99, "b": 0.05, "c": 0.05}).mode == "blind"
    assert zone.plan(counts, counts, {"a": 0.15, "b": 0.05, "c": 0.05}).mode == "local"
