"""Subsetting wired into the balancer and the adapters: selection over the members, their
replacements on ejection and return, the subset's panic, key-based algorithms refused, and, against
real loopback servers, connections spread by the subsets."""

from __future__ import annotations

import pickle
import threading
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import requests

from lbclient import (
    AsyncLBTransport,
    Backend,
    Consistent,
    FNVHash,
    Hash,
    HealthPolicy,
    LBAdapter,
    LBTransport,
    LeastRequest,
    LoadBalancer,
    PeakEWMA,
    Prequal,
    Random,
    RoundRobin,
    SmoothRoundRobin,
    Subset,
    WeightedRoundRobin,
)
from lbclient.selection import LibKetama, Maglev, Rendezvous
from lbclient.testing import TestServer

ADDRESSES = [f"10.0.0.{i}:80" for i in range(1, 13)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def picks(lb: LoadBalancer, count: int) -> Counter[str]:
    chosen = Counter[str]()
    for _ in range(count):
        backend = lb.select()
        assert backend is not None
        chosen[backend.address] += 1
    return chosen


def addresses(backends: tuple[Backend, ...]) -> set[str]:
    return {b.address for b in backends}


# -- settings -----------------------------------------------------------------------------------


def test_selection_runs_over_the_members_only() -> None:
    subset = Subset(3, index=1, clients=4)
    lb = LoadBalancer(ADDRESSES, RoundRobin, subset=subset)
    members = subset.subset(lb.backends)
    assert lb.subset == subset
    assert lb.members == members
    assert len(lb.backends) == 12  # the full set is still known
    assert picks(lb, 30) == {b.address: 10 for b in members}
    assert set(lb.iter()) == set(members)


def test_without_a_subset_the_members_are_every_backend() -> None:
    lb = LoadBalancer(ADDRESSES)
    assert lb.subset is None
    assert lb.members == lb.backends
    assert lb.snapshot().subset is None
    assert lb.snapshot().members is None


@pytest.mark.parametrize(
    "algorithm",
    [Hash, FNVHash, Consistent, Consistent(balance_factor=1.25), Maglev, Rendezvous, LibKetama],
    ids=lambda a: repr(a),
)
def test_a_key_based_algorithm_with_a_subset_is_refused_saying_why(algorithm: object) -> None:
    with pytest.raises(ValueError, match="key agreement"):
        LoadBalancer(ADDRESSES, algorithm, subset=Subset(3))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "algorithm",
    [
        RoundRobin,
        Random(seed=3),
        SmoothRoundRobin,
        LeastRequest,
        PeakEWMA,
        WeightedRoundRobin,
        Prequal,
    ],
    ids=lambda a: repr(a),
)
def test_every_key_less_algorithm_selects_within_the_subset(algorithm: object) -> None:
    lb = LoadBalancer(ADDRESSES, algorithm, subset=Subset(4, salt=b"s"))  # type: ignore[arg-type]
    members = addresses(lb.members)
    assert len(members) == 4
    assert set(picks(lb, 200)) <= members


@pytest.mark.parametrize("bad", [3, "3", (3,), object()])
def test_a_subset_that_is_not_one_is_a_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match=r"subset must be an lbclient\.Subset"):
        LoadBalancer(ADDRESSES, subset=bad)  # type: ignore[arg-type]


def test_the_adapters_refuse_a_subset_with_a_given_balancer() -> None:
    lb = LoadBalancer(ADDRESSES)
    with pytest.raises(TypeError, match="subset= applies only when backends are given"):
        LBTransport(lb, subset=Subset(3))
    with pytest.raises(TypeError, match="subset= applies only when backends are given"):
        LBAdapter(lb, subset=Subset(3))
    with pytest.raises(ValueError, match="key agreement"):
        LBTransport(ADDRESSES, algorithm=Consistent, subset=Subset(3))


def test_the_adapters_build_their_balancer_with_the_subset() -> None:
    subset = Subset(3, index=2, clients=8)
    transport = LBTransport(ADDRESSES, subset=subset)
    adapter = LBAdapter(ADDRESSES, subset=subset, algorithm=SmoothRoundRobin)
    async_transport = AsyncLBTransport(ADDRESSES, subset=subset, algorithm=PeakEWMA)
    for lb in (transport.balancer, adapter.balancer, async_transport.balancer):
        assert lb.subset == subset
        assert lb.members == subset.subset(lb.backends)
    transport.close()
    adapter.close()


# -- health -------------------------------------------------------------------------------------


def test_an_ejected_member_is_replaced_then_probed_and_back_after_its_ejection_time() -> None:
    clock = Clock()
    subset = Subset(3, index=0, clients=4)
    lb = LoadBalancer(ADDRESSES, RoundRobin, subset=subset, clock=clock)
    order = subset.candidates(lb.backends)
    first, replacement = order[0], order[3]
    for _ in range(5):
        lb.report(first, False)
    assert lb.health(first).ejected
    # The next candidate outside the subset takes the ejected member's share.
    assert lb.members == (*order[1:3], replacement)
    assert picks(lb, 30) == {b.address: 10 for b in (*order[1:3], replacement)}
    assert first in lb.snapshot().subset  # type: ignore[operator]
    assert first not in lb.snapshot().members  # type: ignore[operator]
    # After its ejection time, the member's probe goes to it (once), and it returns.
    clock.now = 31.0
    assert lb.select() == first
    assert first not in picks(lb, 9)  # the probe is out: nobody else goes there
    lb.report(first, True)
    assert not lb.health(first).ejected
    assert lb.members == order[:3]
    assert picks(lb, 30) == {b.address: 10 for b in order[:3]}


def test_a_failed_probe_keeps_the_replacement() -> None:
    clock = Clock()
    subset = Subset(3, index=0, clients=4)
    lb = LoadBalancer(ADDRESSES, RoundRobin, subset=subset, clock=clock)
    order = subset.candidates(lb.backends)
    for _ in range(5):
        lb.report(order[0], False)
    clock.now = 31.0
    assert lb.select() == order[0]
    lb.report(order[0], False)
    assert lb.health(order[0]).ejected
    assert lb.members == (*order[1:3], order[3])
    assert set(picks(lb, 30)) == addresses((*order[1:3], order[3]))


def test_members_switched_off_or_failing_checks_are_replaced_in_order() -> None:
    subset = Subset(3, salt=b"order")
    lb = LoadBalancer(ADDRESSES, subset=subset)
    order = subset.candidates(lb.backends)
    lb.set_enabled(order[1], False)
    lb.report_check(order[2], False)
    assert lb.members == (order[0], order[3], order[4])
    lb.report_check(order[4], False)  # a replacement fails: the next one
    assert lb.members == (order[0], order[3], order[5])
    lb.set_enabled(order[1], True)
    lb.report_check(order[2], True)
    assert lb.members == order[:3]


def test_health_is_kept_for_every_backend_of_the_full_set() -> None:
    subset = Subset(3, salt=b"full")
    lb = LoadBalancer(ADDRESSES, subset=subset)
    outsider = subset.candidates(lb.backends)[-1]
    lb.report_check(outsider, False)
    assert lb.health(outsider).checked is False
    assert len(lb.snapshot().backends) == 12


def test_panic_is_the_subsets() -> None:
    subset = Subset(4, salt=b"panic")
    lb = LoadBalancer(ADDRESSES, subset=subset, health=HealthPolicy(panic_threshold=50))
    order = subset.candidates(lb.backends)
    for backend in order[:9]:  # 3 of 12 healthy: the whole set would panic
        lb.report_check(backend, False)
    assert not lb.panic  # 3 of the subset's 4 places are filled by available backends
    assert lb.members == order[9:]
    assert set(picks(lb, 30)) == addresses(order[9:])
    lb.report_check(order[9], False)  # 2 of 4: not below half
    assert not lb.panic
    lb.report_check(order[10], False)  # 1 of 4: panic, health ignored within the subset
    assert lb.panic
    assert lb.snapshot().panic
    chosen = set(picks(lb, 50))
    assert addresses(order[:4]) <= chosen <= addresses((*order[:4], order[11]))
    for backend in order[:4]:
        lb.report_check(backend, True)
    assert not lb.panic
    assert lb.members == order[:4]


# -- changes ------------------------------------------------------------------------------------


def test_an_update_recomputes_the_members_and_rendezvous_moves_at_most_one() -> None:
    for i in range(20):
        subset = Subset(3, salt=f"client-{i}".encode())
        lb = LoadBalancer(ADDRESSES, subset=subset)
        before = set(lb.members)
        assert lb.update([*ADDRESSES, "10.0.1.1:80"])
        after = set(lb.members)
        assert after == set(subset.subset(lb.backends))
        assert len(after - before) <= 1
        removed = sorted(after, key=lambda b: b.address)[0]
        assert lb.update([b for b in lb.backends if b != removed])
        assert len(set(lb.members) - after) == 1
        assert removed not in set(picks(lb, 30))


def test_an_update_keeps_the_health_of_members_that_stay() -> None:
    clock = Clock()
    subset = Subset(3, salt=b"stay")
    lb = LoadBalancer(ADDRESSES, subset=subset, clock=clock)
    order = subset.candidates(lb.backends)
    for _ in range(5):
        lb.report(order[0], False)
    lb.update([*ADDRESSES, "10.0.1.1:80"])
    assert lb.health(order[0]).ejected
    assert order[0] not in lb.members
    clock.now = 31.0
    order = subset.candidates(lb.backends)
    # Still reachable for its probe after the update.
    assert lb.select() == order[0]
    lb.report(order[0], True)
    assert lb.members == order[:3]


def test_the_snapshot_shows_the_subset_and_pickling_keeps_it() -> None:
    subset = Subset(3, index=3, clients=7)
    lb = LoadBalancer(ADDRESSES, SmoothRoundRobin, subset=subset)
    shot = lb.snapshot()
    assert shot.subset == subset.subset(lb.backends)
    assert shot.members == lb.members
    copy = pickle.loads(pickle.dumps(lb))
    assert copy.subset == subset
    assert copy.members == lb.members
    assert set(picks(copy, 30)) == addresses(lb.members)


def test_load_aware_selection_reads_the_members_loads() -> None:
    lb = LoadBalancer(ADDRESSES, LeastRequest(choices=3), subset=Subset(3, salt=b"load"))
    busy = lb.members[0]
    loads = [lb.begin(busy) for _ in range(5)]
    assert set(picks(lb, 100)) <= addresses(lb.members[1:])
    for load in loads:
        assert load is not None
        load.end()


# -- against real servers -----------------------------------------------------------------------


@pytest.fixture
def twelve() -> Iterator[list[TestServer]]:
    servers = [TestServer(name=f"b{i}").start() for i in range(12)]
    yield servers
    for server in servers:
        server.close()


def _fleet(servers: list[TestServer], subsets: list[Subset]) -> list[LoadBalancer]:
    """Each client on its own thread with its own transport and balancer sends 9 GETs."""
    balancers: list[LoadBalancer] = []
    errors: list[BaseException] = []

    def client(i: int, subset: Subset) -> None:
        try:
            transport = LBTransport([s.address for s in servers], subset=subset, hosts=["svc"])
            balancers.append(transport.balancer)
            with httpx.Client(transport=transport, base_url="http://svc") as http:
                for _ in range(9):
                    http.get("/", headers={"x-client": str(i)}).raise_for_status()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i, s)) for i, s in enumerate(subsets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    return balancers


def test_deterministic_subsets_give_every_backend_five_client_connections(
    twelve: list[TestServer],
) -> None:
    _fleet(twelve, [Subset(3, index=i, clients=20) for i in range(20)])
    connections = [len({r.connection for r in s.requests}) for s in twelve]
    clients = [len({r.headers["x-client"] for r in s.requests}) for s in twelve]
    assert all(4 <= n <= 6 for n in connections), connections
    assert clients == [5] * 12
    assert sum(s.count() for s in twelve) == 20 * 9


def test_rendezvous_subsets_contact_their_members_only(twelve: list[TestServer]) -> None:
    subsets = [Subset(3, salt=f"fixed-{i}".encode()) for i in range(20)]
    _fleet(twelve, subsets)
    backends = LoadBalancer([s.address for s in twelve]).backends
    for i, subset in enumerate(subsets):
        contacted = {
            s.address for s in twelve for r in s.requests if r.headers["x-client"] == str(i)
        }
        assert contacted == addresses(subset.subset(backends))
    assert sum(s.count() for s in twelve) == 20 * 9


def test_the_requests_adapter_contacts_its_subset_only(twelve: list[TestServer]) -> None:
    subset = Subset(2, salt=b"requests")
    adapter = LBAdapter([s.address for s in twelve], subset=subset, hosts=["svc"])
    with requests.Session() as session:
        session.mount("http://svc/", adapter)
        for _ in range(10):
            session.get("http://svc/").raise_for_status()
    used = {s.address for s in twelve if s.count()}
    assert used == addresses(adapter.balancer.members)
    assert len(used) == 2
