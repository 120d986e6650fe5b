"""Updates that cost what changed: a selector rebuilt from the previous one routes every key as
a full build over the same set, and the balancer carries health and load over as before."""

from __future__ import annotations

import random
from bisect import bisect_left
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from lbclient._load import Load, Total
from lbclient.hashing import crc32
from lbclient.health import HealthState
from lbclient.selection import (
    LeastRequest,
    LibKetama,
    Maglev,
    PeakEWMA,
    Rendezvous,
    SmoothRoundRobin,
    Weighted,
    WeightedRoundRobin,
)
from lbclient.selection._ring import Ring
from lbclient.selection.base import (
    Change,
    Rebuildable,
    changes,
    prepare_backends,
    prepare_update,
)

KEYS = [f"key-{i}".encode() for i in range(400)]
FALLBACKS = 4  # items of each key's selection order compared, the first pick included

ALGORITHMS: dict[str, Callable[[], Any]] = {
    "RoundRobin": RoundRobin,
    "Random": lambda: Random(seed=7),
    "Hash": Hash,
    "FNVHash": FNVHash,
    "Weighted": lambda: Weighted(crc32),
    "Consistent": Consistent,
    "Consistent-pingora": lambda: Consistent(points_per_weight=40, ipv6_brackets=False),
    "Consistent-bounded": lambda: Consistent(balance_factor=1.25),
    "Maglev": lambda: Maglev(1_009),
    "Rendezvous": Rendezvous,
    "LibKetama": LibKetama,
    "LibKetama-c": lambda: LibKetama("libketama"),
    "SmoothRoundRobin": SmoothRoundRobin,
    "LeastRequest": LeastRequest,
    "PeakEWMA": PeakEWMA,
    # Its sequence counter starts where ``random`` says: at 0 for both builds compared.
    "WeightedRoundRobin": lambda: WeightedRoundRobin(random=lambda: 0.0),
}
#: Algorithms whose picks draw from random: compared with the global random seeded alike.
DRAWING = {"LeastRequest", "PeakEWMA"}


def pool(count: int, rng: random.Random) -> list[Backend]:
    hosts = [f"10.{i >> 8}.{i & 255}.1:80" for i in range(count)]
    hosts[::7] = [f"[2001:db8::{i:x}]:8080" for i in range(len(hosts[::7]))]
    hosts[3::11] = [f"cache-{i}.internal:11211" for i in range(len(hosts[3::11]))]
    return [Backend(h, rng.choice((1, 1, 1, 2, 3))) for h in hosts]


def changed(
    current: Sequence[Backend], spare: Sequence[Backend], rng: random.Random, equal_weights: bool
) -> list[Backend]:
    """``current`` with a few backends removed, added or given another weight."""
    out = list(current)
    for _ in range(rng.randint(1, 3)):
        action = rng.random()
        if action < 0.35 and out:
            out.remove(rng.choice(out))
        elif action < 0.7 or equal_weights:
            taken = {b.address for b in out}
            free = [b for b in spare if b.address not in taken]
            if free:
                out.append(rng.choice(free))
        elif out:
            victim = rng.choice(out)
            out.remove(victim)
            out.append(victim.with_weight(victim.weight % 3 + 1))
    rng.shuffle(out)
    return out


def order(selector: Any, key: bytes) -> list[Backend]:
    return list(islice(selector.iter(key), FALLBACKS))


def assert_routes_alike(name: str, rebuilt: Any, full: Any) -> None:
    """``rebuilt`` routes every key as ``full``: first picks and the first fallbacks."""
    assert rebuilt.backends == full.backends
    assert all(a is b for a, b in zip(rebuilt.backends, full.backends, strict=True))
    if name in DRAWING:
        loads = {b: Load() for b in full.backends}
        for i, b in enumerate(full.backends):
            for _ in range(i % 3):
                loads[b].begin()
        for selector in (rebuilt, full):
            selector.attach(loads, lambda: 0.0)
        picks = []
        state = random.getstate()
        try:
            for selector in (rebuilt, full):
                random.seed(11)
                picks.append([selector.first(k) for k in KEYS[:100]])
        finally:
            random.setstate(state)
        assert picks[0] == picks[1]
        assert rebuilt.ranked() == full.ranked()
        return
    if name == "Consistent-bounded":
        total = Total()
        loads = {b: Load(0.0, total) for b in full.backends}
        for i, b in enumerate(full.backends):
            for _ in range(i % 4):
                loads[b].begin()
        for selector in (rebuilt, full):
            selector.attach(loads, None, total)
    for key in KEYS:
        first = full.first(key)
        assert rebuilt.first(key) is first, key
        assert order(rebuilt, key) == order(full, key), key
    if hasattr(full, "points"):
        assert rebuilt.points() == full.points()
        assert rebuilt.ring_size == full.ring_size
    if hasattr(full, "table"):
        assert rebuilt.table == full.table
    if hasattr(full, "ranking"):
        assert [rebuilt.ranking(k) for k in KEYS[:50]] == [full.ranking(k) for k in KEYS[:50]]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_rebuilt_selector_routes_as_a_full_build(name: str, seed: int) -> None:
    rng = random.Random(f"{name}-{seed}")
    algorithm = ALGORITHMS[name]()
    assert isinstance(algorithm, Rebuildable)
    everyone = pool(90, rng)
    equal = name.startswith("LibKetama") and seed == 0  # digests stay: rebuilt in place
    if equal:
        everyone = [b.with_weight(1) for b in everyone]
    current = prepare_backends(rng.sample(everyone, 60))
    selector = algorithm.build(current)
    for _ in range(12):
        wanted = changed(current, everyone, rng, equal)
        prepared, change = prepare_update(wanted, current, {b.address: b for b in current})
        assert prepared == prepare_backends(wanted)
        rebuilt = algorithm.rebuild(selector, prepared, change)
        assert_routes_alike(name, rebuilt, algorithm.build(prepared))
        selector, current = rebuilt, prepared


@pytest.mark.parametrize("name", ["Consistent", "LibKetama", "Rendezvous", "Maglev"])
def test_rebuild_without_a_change_works_it_out(name: str) -> None:
    rng = random.Random(name)
    algorithm = ALGORITHMS[name]()
    everyone = [b.with_weight(1) for b in pool(80, rng)]
    before = prepare_backends(everyone[:64])
    after = prepare_backends([*everyone[1:64], everyone[70]])
    rebuilt = algorithm.rebuild(algorithm.build(before), after)
    assert_routes_alike(name, rebuilt, algorithm.build(after))


def test_rings_are_rebuilt_in_place_for_small_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    builds = []
    build = Ring.from_steps.__func__  # type: ignore[attr-defined]

    def counted(cls: type[Ring], *args: Any, **kwargs: Any) -> Ring:
        builds.append(1)
        ring: Ring = build(cls, *args, **kwargs)
        return ring

    monkeypatch.setattr(Ring, "from_steps", classmethod(counted))  # every build comes here
    rng = random.Random(3)
    everyone = [b.with_weight(1) for b in pool(200, rng)]
    for algorithm in (Consistent(), LibKetama()):
        builds.clear()
        lb = LoadBalancer(everyone[:150], algorithm)
        assert builds == [1]  # the count sees the build
        builds.clear()
        for i in range(10):
            lb.update([*everyone[i + 1 : 150], everyone[150 + i]])
        assert builds == []
        full = algorithm.build(lb.backends)
        assert_routes_alike(type(algorithm).__name__, lb._view.selector, full)


def test_other_options_or_big_changes_build_afresh() -> None:
    backends = [f"10.0.0.{i}:80" for i in range(1, 40)]
    ring = Consistent.build(backends)
    other = Consistent(points_per_weight=10)
    prepared = prepare_backends(backends[:-1])
    rebuilt = other.rebuild(ring, prepared)
    assert rebuilt.ring_size == other.build(prepared).ring_size
    assert Consistent(balance_factor=2.0).rebuild(ring, prepared).first(b"k") is not None
    half = prepare_backends(backends[:20])
    assert_routes_alike("Consistent", Consistent().rebuild(ring, half), Consistent.build(half))
    maglev = Maglev(101).build(backends)
    assert Maglev(103).rebuild(maglev, prepared).table_size == 103
    assert_routes_alike(
        "Maglev", Maglev(101).rebuild(Hash.build(backends), prepared), Maglev(101).build(prepared)
    )


# -- the ring itself, with points made to collide -------------------------------------------


def ring_points(backends: Sequence[Backend], points: dict[Backend, list[int]]) -> list[list[int]]:
    return [points[b] for b in backends]


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    last_wins=st.booleans(),
    values=st.integers(min_value=1, max_value=40),
)
def test_ring_rebuild_matches_build_with_colliding_points(
    seed: int, last_wins: bool, values: int
) -> None:
    # Few distinct values: backends share points, within one backend too; a point passes to
    # the next backend in line (first or last in sorted order) when its owner leaves.
    rng = random.Random(seed)
    space = [rng.getrandbits(32) for _ in range(values)]
    everyone = [Backend(f"10.3.{i >> 8}.{i & 255}:80") for i in range(30)]
    points = {b: [rng.choice(space) for _ in range(rng.randint(0, 5))] for b in everyone}
    current = sorted(rng.sample(everyone, rng.randint(0, 15)))
    ring = Ring.build(current, ring_points(current, points), last_wins)
    for _ in range(8):
        leaving = sorted(b for b in current if rng.random() < 0.2)
        joining = sorted(set(rng.sample(everyone, 3)) - set(current))
        wanted = sorted((set(current) - set(leaving)) | set(joining))
        rebuilt = ring.rebuild([(b, points[b]) for b in leaving], [(b, points[b]) for b in joining])
        full = Ring.build(wanted, ring_points(wanted, points), last_wins)
        if rebuilt is None:  # the bucket index no longer fits the ring's size: built anew
            ring, current = full, wanted
            continue
        assert rebuilt.points() == full.points()
        if rebuilt.shift == full.shift:  # a rebuild keeps its index while it fits
            assert (rebuilt.lows, rebuilt.starts) == (full.lows, full.starts)
        assert shadows(rebuilt) == shadows(full)
        values = rebuilt.values()
        assert values == sorted(set(values))
        for h in [0, 2**32 - 1, *space, *(v + 1 for v in space if v < 2**32 - 1)]:
            assert rebuilt._find(h) == bisect_left(values, h)
        ring, current = rebuilt, wanted


def shadows(ring: Ring) -> dict[int, list[str]]:
    """The backends kept aside for each shared point value, by address."""
    members = ring.members
    return {h: sorted(str(members[s]) for s in slots) for h, slots in ring.shadow.items()}


def test_consistent_points_of_shared_values_follow_the_full_build() -> None:
    # Two backends with one point value each: the first in sorted order owns it; when it
    # leaves, the point passes to the other (kept aside, not lost).
    a, b, c = Backend("10.0.0.1:80"), Backend("10.0.0.2:80"), Backend("10.0.0.3:80")
    points = {a: [5, 9], b: [5], c: [9, 12]}
    ring = Ring.build([a, b, c], ring_points([a, b, c], points), False)
    assert ring.points() == [(5, a), (9, a), (12, c)]
    without_a = ring.rebuild([(a, points[a])], [])
    assert without_a is not None
    assert without_a.points() == [(5, b), (9, c), (12, c)]
    back = without_a.rebuild([], [(a, points[a])])
    assert back is not None
    assert back.points() == ring.points()


# -- preparing an update ---------------------------------------------------------------------


def inputs(rng: random.Random, known: Sequence[Backend]) -> list[Backend | str]:
    out: list[Backend | str] = []
    for b in known:
        roll = rng.random()
        if roll < 0.05:
            continue
        if roll < 0.3:
            out.append(b.address if b.weight == 1 and not b.metadata else b)
        elif roll < 0.35:
            out.append(Backend(b.address, b.weight, {"zone": "b"}))  # other metadata
        elif roll < 0.4:
            out.append(Backend(b.address, b.weight, dict(b.metadata)))  # equal, another object
        else:
            out.append(b)
    out += [f"10.200.0.{i}:80" for i in range(rng.randint(0, 3))]
    if out and rng.random() < 0.3:
        out.append(rng.choice(out))  # listed twice, same weight
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_prepare_update_is_prepare_backends_with_the_objects_that_stay(seed: int) -> None:
    rng = random.Random(seed)
    known = prepare_backends(pool(rng.choice((0, 5, 120)), rng))
    items = inputs(rng, known)
    prepared, change = prepare_update(items, known, {b.address: b for b in known})
    expected = prepare_backends(items)
    assert prepared == expected
    for got, want in zip(prepared, expected, strict=True):
        assert got.metadata == want.metadata
        stays = next((b for b in known if b == got and b.metadata == got.metadata), None)
        if stays is not None:
            assert got is stays
        else:
            assert not any(got is b for b in known)
    assert isinstance(change, Change)
    # The change turns the previous set into the new one, indexes and all.
    assert change.removed == tuple(known[i] for i in change.removed_at)
    assert change.added == tuple(prepared[i] for i in change.added_at)
    kept = [b for b in known if not any(b is r for r in change.removed)]
    assert [b for b in prepared if not any(b is a for a in change.added)] == kept
    by_id = changes(known, prepared)
    assert (by_id.removed_at, by_id.added_at) == (change.removed_at, change.added_at)
    if not change.removed and not change.added:
        assert prepared is known


def test_prepare_update_takes_equal_objects_made_afresh_as_the_known_ones() -> None:
    # A discovery makes new Backend objects on every lookup: those equal to known ones, with
    # the same metadata, are the known objects; the others are theirs.
    known = prepare_backends(
        [
            Backend(f"10.1.0.{i}:80", 1 + i % 2, {"zone": "a"} if i % 5 else None)
            for i in range(1, 200)
        ]
    )
    fresh = [Backend(b.address, b.weight, dict(b.metadata)) for b in known[1:]]
    fresh[7] = Backend(fresh[7].address, fresh[7].weight, {"zone": "b"})
    fresh[9] = fresh[9].with_weight(3)
    fresh.append(Backend("10.1.1.1:80"))
    prepared, change = prepare_update(fresh, known, {b.address: b for b in known})
    assert prepared == prepare_backends(fresh)
    assert change.added == tuple(sorted([fresh[7], fresh[9], fresh[-1]]))
    assert change.removed == tuple(sorted([known[0], known[8], known[10]]))
    for got in prepared:
        if got not in change.added:
            assert any(got is b for b in known)


def test_prepare_update_errors_as_prepare_backends() -> None:
    known = prepare_backends(["10.0.0.1:80", "10.0.0.2:80"])
    mapping = {b.address: b for b in known}
    for bad, error in (
        (["10.0.0.1:80", Backend("10.0.0.1:80", 2)], ValueError),
        (["10.0.0.1:80", 42], TypeError),
        ([["x"]], TypeError),
        ("10.0.0.1:80", TypeError),
        (["nope"], ValueError),
    ):
        with pytest.raises(error) as expected:
            prepare_backends(bad)  # type: ignore[arg-type]
        with pytest.raises(error) as caught:
            prepare_update(bad, known, mapping)  # type: ignore[arg-type]
        assert str(caught.value) == str(expected.value)


# -- the balancer's carry-over ---------------------------------------------------------------


def states(lb: LoadBalancer) -> dict[Backend, HealthState]:
    return {b: lb.health(b) for b in lb.backends}


def tally(lb: LoadBalancer) -> tuple[Any, ...]:
    view = lb._view
    return (view.disabled, view.unhealthy, view.ejected, view.impaired, view.panic)


def recount(lb: LoadBalancer) -> tuple[Any, ...]:
    view = lb._view
    fresh = type(view)(view.backends, view.selector, view.cells, view.loads, lb.policy)
    return (fresh.disabled, fresh.unhealthy, fresh.ejected, fresh.impaired, fresh.panic)


@pytest.mark.parametrize(
    "name",
    [
        "RoundRobin",
        "Hash",
        "Consistent",
        "Maglev",
        "LeastRequest",
        "SmoothRoundRobin",
        "WeightedRoundRobin",
    ],
)
def test_balancer_carries_health_and_load_over(name: str) -> None:
    rng = random.Random(name)
    now = [100.0]
    everyone = pool(120, rng)
    lb = LoadBalancer(
        everyone[:80],
        ALGORITHMS[name](),
        health=HealthPolicy(consecutive_failures=1, panic_threshold=0),
        clock=lambda: now[0],
    )
    for _ in range(15):
        for b in rng.sample(lb.backends, 4):
            lb.report(b, False)  # ejected
        for b in rng.sample(lb.backends, 2):
            lb.set_enabled(b, rng.random() < 0.5)
        for b in rng.sample(lb.backends, 3):
            lb.begin(b)
        before_states, before_loads = states(lb), dict(lb._view.loads)
        now[0] += 1.0
        wanted: list[Backend | str] = list(changed(lb.backends, everyone, rng, False))
        if rng.random() < 0.3:
            victim = rng.choice(wanted)
            assert isinstance(victim, Backend)
            wanted[wanted.index(victim)] = Backend(victim.address, victim.weight, {"v": 2})
        if rng.random() < 0.3:
            wanted = [
                b.address if isinstance(b, Backend) and b.weight == 1 and not b.metadata else b
                for b in wanted
            ]
        assert lb.update(wanted)
        assert lb.backends == prepare_backends(wanted)
        for b in lb.backends:
            assert lb.health(b) == before_states.get(b, HealthState())
            load = lb._view.loads[b]
            if b in before_loads:
                assert load is before_loads[b]
            else:
                assert load.joined == now[0]
                assert load.in_flight == 0
        objects = {id(b) for b in lb.backends}
        assert set(map(id, lb._view.cells)) == objects
        assert set(map(id, lb._view.loads)) == objects
        assert tally(lb) == recount(lb)
        # The picks are the new set's objects, metadata included.
        full = ALGORITHMS[name]().build(lb.backends)
        for key in KEYS[:60]:
            got = lb._view.selector.first(key)
            assert got is not None
            assert id(got) in objects
            if name not in DRAWING and name not in (
                "RoundRobin",
                "SmoothRoundRobin",
                "WeightedRoundRobin",
            ):
                assert got is full.first(key)


def test_metadata_alone_changes_the_objects_and_keeps_the_ring() -> None:
    lb = LoadBalancer(["10.0.0.1:80", "10.0.0.2:80"], Consistent)
    keys = [f"k{i}".encode() for i in range(200)]
    routes = [lb.select(k) for k in keys]
    before = lb.backends
    assert lb.update([Backend("10.0.0.2:80", metadata={"x": 1}), "10.0.0.1:80"])
    assert lb.backends == before  # equal by (address, weight), the new objects in place
    assert lb.backends[1].metadata == {"x": 1}
    assert [lb.select(k) for k in keys] == routes  # the same ring
    after = lb.backends
    assert not lb.update([Backend("10.0.0.2:80", metadata={"x": 1}), "10.0.0.1:80"])
    assert lb.backends is after


def test_update_racing_another_update_works_out_its_own_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lbclient.selection.base as base

    lb = LoadBalancer([f"10.0.0.{i}:80" for i in range(1, 30)], Consistent)
    real = base.prepare_update

    def racing(*args: Any) -> tuple[tuple[Backend, ...], Change]:
        # Another update lands while this one is being prepared against the first set.
        prepared = real(*args)
        monkeypatch.setattr(base, "prepare_update", real)
        assert lb.update([f"10.0.0.{i}:80" for i in range(2, 31)])
        return prepared

    monkeypatch.setattr(base, "prepare_update", racing)
    wanted = [f"10.0.0.{i}:80" for i in range(1, 29)]
    assert lb.update(wanted)
    assert lb.backends == prepare_backends(wanted)
    assert_routes_alike("Consistent", lb._view.selector, Consistent.build(lb.backends))
    assert tally(lb) == recount(lb)
