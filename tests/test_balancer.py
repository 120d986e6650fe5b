from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Callable

import pytest

from lbclient import (
    Backend,
    Consistent,
    FNVHash,
    Hash,
    HealthPolicy,
    LoadBalancer,
    Random,
    RoundRobin,
)
from lbclient.health import HealthState

A, B, C = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"


def test_strings_and_backends_accepted_and_sorted() -> None:
    lb = LoadBalancer([C, Backend(A, 2), "[::1]:80", "b.example:1"])
    assert lb.backends == (Backend(A, 2), Backend(C), Backend("[::1]:80"), Backend("b.example:1"))
    assert len(lb) == 4
    assert "backends=4" in repr(lb)


@pytest.mark.parametrize(
    "algorithm",
    [
        RoundRobin,
        Random,
        Hash,
        FNVHash,
        Consistent,
        RoundRobin(),
        Consistent(points_per_weight=160),
    ],
)
def test_class_or_instance_accepted(algorithm: object) -> None:
    lb = LoadBalancer([A, B, C], algorithm)  # type: ignore[arg-type]
    assert lb.select(b"key") in set(lb.backends)


def test_bad_algorithm_rejected() -> None:
    with pytest.raises(TypeError, match="selection algorithm"):
        LoadBalancer([A], "round_robin")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="selection algorithm"):
        LoadBalancer([A], int)
    with pytest.raises(TypeError, match="cannot be made without arguments"):
        LoadBalancer([A], Backend)


def test_empty_backend_list_selects_none() -> None:
    for algorithm in (RoundRobin, Random, Hash, FNVHash, Consistent):
        lb = LoadBalancer([], algorithm)
        assert lb.select() is None
        assert lb.select_with(b"k", 10, lambda b, r: True) is None
        assert list(lb.iter(b"k")) == []


def test_select_matches_selector_first_pick() -> None:
    lb = LoadBalancer([A, B, Backend(C, 3)], Hash)
    sel = Hash.build(lb.backends)
    for i in range(100):
        assert lb.select(f"k{i}") == sel.first(f"k{i}")


def test_select_skips_unready_and_falls_back() -> None:
    lb = LoadBalancer([A, B, C], Consistent)
    key = b"user-42"
    order = list(lb.iter(key))
    assert lb.select(key) == order[0]
    lb.set_enabled(order[0], False)
    assert lb.select(key) == order[1]
    lb.set_enabled(order[1], False)
    assert lb.select(key) == order[2]
    lb.set_enabled(order[2], False)
    assert lb.select(key) is None
    lb.set_enabled(order[1], True)
    assert lb.select(key) == order[1]


def test_select_max_iterations() -> None:
    lb = LoadBalancer([A, B, C], Hash)
    assert lb.select(b"k", max_iterations=0) is None
    first = lb.select(b"k", 1)
    assert first is not None
    lb.set_enabled(first, False)
    assert lb.select(b"k", 1) is None
    with pytest.raises(ValueError, match="-1"):
        lb.select(b"k", -1)
    with pytest.raises(TypeError, match="max_iterations"):
        lb.select(b"k", True)
    with pytest.raises(TypeError, match="max_iterations"):
        lb.select(b"k", 2.0)  # type: ignore[arg-type]


def test_select_rejects_bad_keys_on_both_paths() -> None:
    lb = LoadBalancer([A, B], Hash)
    with pytest.raises(TypeError, match="selection key"):
        lb.select(123)  # type: ignore[arg-type]
    lb.set_enabled(A, False)
    with pytest.raises(TypeError, match="selection key"):
        lb.select(123)  # type: ignore[arg-type]


def test_select_with_sees_readiness_and_unique_candidates() -> None:
    lb = LoadBalancer([A, B, C], Random)
    lb.set_enabled(B, False)
    offered: list[tuple[Backend, bool]] = []

    def refuse(backend: Backend, ready: bool) -> bool:
        offered.append((backend, ready))
        return False

    assert lb.select_with(b"", 256, refuse) is None
    seen = [b for b, _ in offered]
    assert len(seen) == len(set(seen)) == 3
    assert dict(offered) == {Backend(A): True, Backend(B): False, Backend(C): True}
    # accept may ignore health.
    assert lb.select_with(b"", 256, lambda b, r: b == Backend(B)) == Backend(B)
    with pytest.raises(TypeError, match="accept"):
        lb.select_with(b"", 5, None)  # type: ignore[arg-type]


def test_iter_yields_every_backend_once_in_fallback_order() -> None:
    backends = [f"10.0.0.{i}:80" for i in range(1, 21)]
    lb = LoadBalancer(backends, Consistent)
    walk = list(lb.iter(b"key", max_iterations=5))
    assert sorted(walk) == sorted(lb.backends)
    ring = Consistent.build(backends)
    distinct_on_ring = list(dict.fromkeys(itertools.islice(ring.iter(b"key"), 5)))
    assert walk[: len(distinct_on_ring)] == distinct_on_ring
    assert walk[0] == lb.select(b"key")


def requests_with_one_failing(lb: LoadBalancer, bad: Backend, n: int) -> Counter[Backend]:
    """``n`` requests: the first pick by select(), the next candidate when it is ``bad``."""
    firsts: Counter[Backend] = Counter()
    for i in range(n):
        key = f"req-{i}"
        first = lb.select(key)
        assert first is not None
        firsts[first] += 1
        if first == bad:
            retry = next(lb.iter(key, after=first))
            assert retry != bad
    return firsts


def test_round_robin_first_picks_split_evenly_while_one_backend_fails() -> None:
    lb = LoadBalancer([A, B], RoundRobin)
    firsts = requests_with_one_failing(lb, Backend(A), 1000)
    assert firsts == {Backend(A): 500, Backend(B): 500}


@pytest.mark.parametrize("bad", [A, C])
def test_round_robin_first_picks_follow_weights_while_one_backend_fails(bad: str) -> None:
    backends = [Backend(A, 2), Backend(B), Backend(C)]
    lb = LoadBalancer(backends, RoundRobin)
    failing = next(b for b in backends if b.address == bad)
    firsts = requests_with_one_failing(lb, failing, 1000)  # 250 rounds of the total weight 4
    assert firsts == {Backend(A, 2): 500, Backend(B): 250, Backend(C): 250}


ALL = [RoundRobin, Random, Hash, FNVHash, Consistent]


@pytest.mark.parametrize("algorithm", ALL)
@pytest.mark.parametrize("limit", [0, 1, 2, 3, 5, 256])
def test_iter_after_skips_the_first_pick_and_yields_the_rest_once(
    algorithm: type, limit: int
) -> None:
    backends: list[Backend | str] = [A, Backend(B, 3), C, "10.0.0.4:80", Backend("10.0.0.5:80", 2)]
    lb = LoadBalancer(backends, algorithm)
    for i in range(20):
        key = f"user-{i}".encode()
        for b in lb.backends:
            walk = list(lb.iter(key, limit, after=b))
            assert b not in walk
            assert len(walk) == len(set(walk)) == 4
            assert set(walk) == set(lb.backends) - {b}
            if algorithm in (Hash, FNVHash, Consistent):  # the same order, less b
                assert walk == [x for x in lb.iter(key, limit) if x != b]
    # A backend not in the set (say, picked before an update) leaves every backend to walk.
    assert sorted(lb.iter(b"k", limit, after=Backend("10.9.9.9:80"))) == sorted(lb.backends)


def test_round_robin_iter_after_goes_round_from_the_first_pick() -> None:
    lb = LoadBalancer([A, B, C, "10.0.0.4:80"], RoundRobin)
    ordered = lb.backends
    for i, b in enumerate(ordered):
        assert list(lb.iter(after=b)) == [ordered[(i + j) % 4] for j in range(1, 4)]
    # The walks took nothing from the counter.
    assert [lb.select() for _ in range(4)] == list(ordered)


def test_iter_after_checks_its_argument_and_handles_no_backends() -> None:
    lb = LoadBalancer([A, B])
    with pytest.raises(TypeError, match="after must be a Backend"):
        lb.iter(after=A)  # type: ignore[arg-type]
    assert list(LoadBalancer([]).iter(after=Backend(A))) == []
    assert list(LoadBalancer([A], Consistent).iter(after=Backend(A))) == []


def test_round_robin_counter_counts_first_picks_only_across_threads() -> None:
    draws: list[int] = []  # list.append is atomic: one entry per counter value taken

    class Counted(RoundRobin):
        def index_function(self) -> Callable[[bytes], int]:
            inner = super().index_function()

            def counted(data: bytes) -> int:
                draws.append(1)
                return inner(data)

            return counted

    backends = [A, B, C, "10.0.0.4:80"]
    lb = LoadBalancer(backends, Counted())
    per_thread = 2_000
    counts: list[Counter[Backend]] = [Counter() for _ in range(8)]
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def run(slot: int) -> None:
        c = counts[slot]
        try:
            barrier.wait()
            for i in range(per_thread):
                first = lb.select(f"k{slot}-{i}")
                assert first is not None
                c[first] += 1
                if i % 4 == 0:  # a retry walk continuing from the first pick
                    rest = list(lb.iter(f"k{slot}-{i}", after=first))
                    assert len(rest) == 3
                    assert first not in rest
                elif i % 4 == 2:  # a walk of its own: one first pick, then fallbacks
                    walk = list(lb.iter(f"w{slot}-{i}"))
                    assert sorted(walk) == sorted(lb.backends)
                    c[walk[0]] += 1
        except BaseException as exc:
            errors.append(exc)

    before = len(draws)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    firsts = 8 * (per_thread + per_thread // 4)
    assert len(draws) - before == firsts
    total: Counter[Backend] = Counter()
    for c in counts:
        total.update(c)
    assert total == {Backend(a): firsts // 4 for a in backends}


def test_update_returns_whether_changed_and_keeps_health() -> None:
    lb = LoadBalancer(
        [A, B], RoundRobin, health=HealthPolicy(consecutive_failures=1, panic_threshold=0)
    )
    lb.report(A, False)
    lb.set_enabled(B, False)
    assert not lb.ready(A)
    assert not lb.update([B, A])
    # New metadata replaces the backend's object, and its health stays.
    assert lb.update([Backend(A, metadata={"x": 1}), B])
    assert not lb.ready(A)
    assert lb.update([A, B, C])
    assert not lb.ready(A)
    assert not lb.ready(B)
    assert lb.ready(C)
    # A weight change is a new backend: its health starts over.
    assert lb.update([A, Backend(B, 2), C])
    assert lb.ready(B)
    assert lb.health(B) == HealthState()
    # Removed backends lose their state; added back, they start healthy.
    assert lb.update([B, C])
    assert lb.update([A, B, C])
    assert lb.ready(A)


def test_update_validates_before_changing_anything() -> None:
    lb = LoadBalancer([A, B])
    with pytest.raises(ValueError, match="nope"):
        lb.update([A, "nope"])
    with pytest.raises(ValueError, match="listed twice"):
        lb.update([A, Backend(A, 2)])
    assert lb.backends == (Backend(A), Backend(B))


def test_update_rebuilds_selector() -> None:
    lb = LoadBalancer([A, B], RoundRobin)
    assert [lb.select() for _ in range(2)] == [Backend(A), Backend(B)]
    assert lb.update([A, B, C])
    assert [lb.select() for _ in range(3)] == [Backend(A), Backend(B), Backend(C)]
    assert lb.update([])
    assert lb.select() is None


def test_ready_and_health_for_unknown_backends() -> None:
    lb = LoadBalancer([A])
    assert not lb.ready(B)
    assert not lb.ready(Backend(A, 2))
    assert lb.ready(A)
    assert lb.ready(Backend(A))
    with pytest.raises(ValueError, match=r"10.0.0.2:80"):
        lb.health(B)
    with pytest.raises(ValueError, match="not one of"):
        lb.set_enabled(B, False)
    with pytest.raises(TypeError, match="42"):
        lb.ready(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no port"):
        lb.ready("10.0.0.1")
    assert lb.report(B, False) is False  # a report racing an update is dropped


# -- with backends unavailable ------------------------------------------------------------------


@pytest.mark.parametrize("down", [[B], [A, B], ["10.0.0.4:80"]])
def test_round_robin_spreads_the_turns_of_unavailable_backends_over_the_others(
    down: list[str],
) -> None:
    backends = [A, B, C, "10.0.0.4:80"]
    lb = LoadBalancer(backends, RoundRobin, health=HealthPolicy(panic_threshold=0))
    for backend in down:
        lb.set_enabled(backend, False)
    up = [b for b in backends if b not in down]
    picks = Counter(lb.select() for _ in range(100 * len(up)))
    assert picks == {Backend(b): 100 for b in up}  # before: the next one got the turns too


def test_the_counter_goes_on_when_a_backend_goes_and_comes_back() -> None:
    lb = LoadBalancer([A, B, C, "10.0.0.4:80"], RoundRobin)
    first = [lb.select() for _ in range(2)]
    lb.set_enabled(C, False)
    during = [lb.select() for _ in range(3)]  # counter values 2, 3, 4 over A, B, D
    lb.set_enabled(C, True)
    after = [lb.select() for _ in range(3)]  # values 5, 6, 7 over all four
    four = "10.0.0.4:80"
    assert [*first, *during, *after] == list(map(Backend, [A, B, four, A, B, B, C, four]))


def test_a_due_probe_is_taken_first_then_the_others_share() -> None:
    now = [0.0]
    lb = LoadBalancer(
        [A, B, C],
        RoundRobin,
        health=HealthPolicy(consecutive_failures=1, base_ejection_time=10),
        clock=lambda: now[0],
    )
    assert lb.report(B, False)
    assert Counter(lb.select() for _ in range(10)) == {Backend(A): 5, Backend(C): 5}
    now[0] = 10.0
    assert lb.select() == Backend(B)  # the probe, for this request alone
    assert Counter(lb.select() for _ in range(10)) == {Backend(A): 5, Backend(C): 5}
    assert lb.report(B, True)  # restored
    assert Counter(lb.select() for _ in range(30)) == dict.fromkeys(map(Backend, [A, B, C]), 10)


def test_select_with_offers_every_backend_starting_among_the_available() -> None:
    lb = LoadBalancer([A, B, C, "10.0.0.4:80"], RoundRobin)
    lb.set_enabled(B, False)
    offers: list[list[tuple[Backend, bool]]] = []
    for _ in range(6):
        offered: list[tuple[Backend, bool]] = []
        refuse = offered.append  # returns None: refuses every backend, noting it
        lb.select_with(b"", 256, lambda b, r, note=refuse: note((b, r)) is not None)
        offers.append(offered)
    assert all(len({b for b, _ in o}) == len(o) == 4 for o in offers)
    assert all(o[0][1] for o in offers)  # the first offered is available
    assert Counter(o[0][0] for o in offers) == dict.fromkeys(map(Backend, [A, C, "10.0.0.4:80"]), 2)
    assert lb.select_with(b"", 256, lambda b, r: b == Backend(B)) == Backend(B)


@pytest.mark.parametrize("algorithm", [Hash, FNVHash, Consistent])
def test_key_based_algorithms_keep_their_own_fallback(algorithm: type) -> None:
    lb = LoadBalancer([A, B, C, "10.0.0.4:80"], algorithm)
    lb.set_enabled(B, False)
    for i in range(200):
        key = f"user-{i}"
        assert lb.select(key) == next(b for b in lb.iter(key) if b != Backend(B))


def test_shares_among_the_available_are_exact_across_threads_while_health_changes() -> None:
    backends = [A, B, C, "10.0.0.4:80"]
    lb = LoadBalancer(backends, RoundRobin, health=HealthPolicy(panic_threshold=0))
    lb.set_enabled(B, False)
    counts: list[Counter[Backend | None]] = [Counter() for _ in range(8)]
    barrier = threading.Barrier(9)
    errors: list[BaseException] = []

    def run(slot: int) -> None:
        try:
            barrier.wait()
            for _ in range(1_500):
                counts[slot][lb.select()] += 1
        except BaseException as exc:
            errors.append(exc)

    def flap() -> None:  # health changes that move no backend in or out, meanwhile
        barrier.wait()
        for _ in range(300):
            lb.report("10.0.0.4:80", False)  # a streak of one failure (five eject)
            lb.report("10.0.0.4:80", True)
            lb.set_enabled(B, False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=flap))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    total: Counter[Backend | None] = Counter()
    for c in counts:
        total.update(c)
    assert total == {Backend(b): 4_000 for b in (A, C, "10.0.0.4:80")}
    # Switched on and off while others pick: every pick is of an available backend.
    flapping = LoadBalancer(backends, RoundRobin, health=HealthPolicy(panic_threshold=0))
    picked: list[Backend | None] = []
    stop = threading.Event()

    def toggle() -> None:
        while not stop.is_set():
            flapping.set_enabled(C, False)
            flapping.set_enabled(C, True)

    toggler = threading.Thread(target=toggle)
    toggler.start()
    try:
        picked.extend(flapping.select() for _ in range(20_000))
    finally:
        stop.set()
        toggler.join()
    assert None not in picked
    assert set(picked) <= set(flapping.backends)
    flapping.set_enabled(C, False)
    assert Counter(flapping.select() for _ in range(300)) == {
        Backend(b): 100 for b in (A, B, "10.0.0.4:80")
    }


def test_update_takes_a_change_of_metadata_alone_and_keeps_health() -> None:
    balancer = LoadBalancer([Backend("10.0.0.1:80", metadata={"zone": "a"}), "10.0.0.2:80"])
    first = balancer.backends[0]
    balancer.report(first, False)
    assert balancer.update([Backend("10.0.0.1:80", metadata={"zone": "b"}), "10.0.0.2:80"])
    moved = balancer.backends[0]
    assert moved.metadata == {"zone": "b"}
    assert balancer.health(moved).consecutive_failures == 1  # kept
    assert balancer.select(b"") in balancer.backends
    # The same again, in another order, or fewer: only what changed counts.
    assert not balancer.update(["10.0.0.2:80", Backend("10.0.0.1:80", metadata={"zone": "b"})])
    assert balancer.update([Backend("10.0.0.1:80", metadata={"zone": "b"})])
    assert [str(b.address) for b in balancer.backends] == ["10.0.0.1:80"]


def test_zone_routing_follows_a_zone_changed_in_metadata() -> None:
    def fleet(local: int) -> list[Backend]:
        return [
            Backend(f"10.0.0.{i}:80", metadata={"zone": "a" if i <= local else "b"})
            for i in range(1, 9)
        ]

    balancer = LoadBalancer(fleet(4), RoundRobin, zone="a")
    assert {str(balancer.select(b"").address) for _ in range(40)} == {
        f"10.0.0.{i}:80" for i in range(1, 5)
    }
    assert balancer.update(fleet(6))  # two backends found to be in zone a after all
    assert {str(balancer.select(b"").address) for _ in range(60)} == {
        f"10.0.0.{i}:80" for i in range(1, 7)
    }
