"""Property tests: weights, unique fallbacks, consistency under change, determinism."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter

from hypothesis import HealthCheck, given, settings
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
    SmoothRoundRobin,
    WeightedRoundRobin,
)

ALGORITHMS = {
    "RoundRobin": RoundRobin,
    "SmoothRoundRobin": SmoothRoundRobin,
    "Random": Random,
    "Hash": Hash,
    "FNVHash": FNVHash,
    "Consistent": Consistent,
    "WeightedRoundRobin": WeightedRoundRobin,
}

weights_st = st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=9)


def make_backends(weights: list[int]) -> list[Backend]:
    return [Backend(f"10.9.{i // 200}.{i % 200 + 1}:{8000 + i}", w) for i, w in enumerate(weights)]


@given(weights=weights_st, rounds=st.integers(min_value=1, max_value=4))
def test_round_robin_first_picks_exactly_proportional(weights: list[int], rounds: int) -> None:
    backends = make_backends(weights)
    lb = LoadBalancer(backends, RoundRobin)
    total = sum(weights)
    counts = Counter(lb.select() for _ in range(rounds * total))
    assert counts == {b: rounds * b.weight for b in backends}


@settings(max_examples=25, deadline=None)
@given(weights=weights_st, algorithm=st.sampled_from(["Hash", "FNVHash", "Random"]))
def test_hashed_first_picks_proportional_to_weights(weights: list[int], algorithm: str) -> None:
    backends = make_backends(weights)
    lb = LoadBalancer(backends, ALGORITHMS[algorithm])
    n = 6000
    # Keys spread over the whole key space: FNV-1a of keys that differ in one trailing digit is
    # known to be lumpy, and this checks the weights, not FNV's avalanche.
    rng = random.Random(0)
    counts = Counter(lb.select(f"key-{rng.getrandbits(64):016x}") for _ in range(n))
    total = sum(weights)
    for b in backends:
        p = b.weight / total
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[b] - n * p) <= 5 * sigma + 1, (b, counts[b], n * p)


@settings(max_examples=60, deadline=None)
@given(
    weights=weights_st,
    algorithm=st.sampled_from(sorted(ALGORITHMS)),
    key=st.binary(max_size=24),
    limit=st.integers(min_value=0, max_value=400),
    disabled=st.sets(st.integers(min_value=0, max_value=8)),
)
def test_select_with_never_offers_a_backend_twice(
    weights: list[int], algorithm: str, key: bytes, limit: int, disabled: set[int]
) -> None:
    backends = make_backends(weights)
    lb = LoadBalancer(backends, ALGORITHMS[algorithm])
    for i in disabled:
        if i < len(backends):
            lb.set_enabled(backends[i], False)
    offered: list[Backend] = []

    def refuse(backend: Backend, ready: bool) -> bool:
        assert ready == lb.ready(backend)
        offered.append(backend)
        return False

    assert lb.select_with(key, limit, refuse) is None
    assert len(offered) == len(set(offered)) <= min(limit, len(backends))
    assert set(offered) <= set(backends)
    walk = list(lb.iter(key, limit))
    assert sorted(walk) == sorted(backends)
    if algorithm in ("Hash", "FNVHash", "Consistent"):  # stateless: the same order again
        assert walk[: len(offered)] == offered
    chosen = lb.select(key, limit)
    assert chosen is None or lb.ready(chosen)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(min_value=3, max_value=24), victim=st.integers(min_value=0))
def test_consistent_moves_only_the_removed_backends_keys(n: int, victim: int) -> None:
    backends = make_backends([1] * n)
    removed = backends[victim % n]
    before = Consistent.build(backends)
    after = Consistent.build([b for b in backends if b != removed])
    keys = [f"session-{i}".encode() for i in range(4000)]
    moved = 0
    for key in keys:
        old, new = before.first(key), after.first(key)
        if old == removed:
            moved += 1
            assert new != removed
        else:
            assert new == old
    share = moved / len(keys)
    assert 0.4 / n <= share <= 1.8 / n, (n, share)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(min_value=2, max_value=16))
def test_consistent_added_backend_only_takes_keys(n: int) -> None:
    backends = make_backends([1] * (n + 1))
    added = backends[-1]
    before = Consistent.build(backends[:-1])
    after = Consistent.build(backends)
    for i in range(2000):
        key = f"k{i}"
        new = after.first(key)
        assert new == added or new == before.first(key)


ROUTE_SCRIPT = r"""
import json, sys
from lbclient import Backend, LoadBalancer, Hash, FNVHash, Consistent
data = json.load(sys.stdin)
backends = [Backend(a, w) for a, w in data["backends"]]
out = {}
for name, alg in (("Hash", Hash), ("FNVHash", FNVHash), ("Consistent", Consistent)):
    lb = LoadBalancer(backends, alg)
    out[name] = [[b.address for b in list(lb.iter(bytes.fromhex(k)))[:3]] for k in data["keys"]]
json.dump(out, sys.stdout)
"""


def route_here(backends: list[Backend], keys: list[bytes]) -> dict[str, list[list[str]]]:
    out = {}
    for name in ("Hash", "FNVHash", "Consistent"):
        lb = LoadBalancer(backends, ALGORITHMS[name])
        out[name] = [[b.address for b in list(lb.iter(k))[:3]] for k in keys]
    return out


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keys=st.lists(st.binary(max_size=40), min_size=1, max_size=300),
    weights=st.lists(st.integers(min_value=1, max_value=5), min_size=2, max_size=8),
)
def test_routing_is_identical_in_another_process(keys: list[bytes], weights: list[int]) -> None:
    backends = [*make_backends(weights), Backend("[2001:db8::7]:443"), Backend("svc.local:80")]
    payload = json.dumps(
        {"backends": [[b.address, b.weight] for b in backends], "keys": [k.hex() for k in keys]}
    )
    expected = route_here(backends, keys)
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", ROUTE_SCRIPT],
            input=payload,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert json.loads(result.stdout) == expected


#: Availability changes: (backend index, switched on or off, selects made afterwards).
changes_st = st.lists(
    st.tuples(st.integers(min_value=0, max_value=8), st.booleans(), st.integers(0, 30)),
    max_size=8,
)


def after_changes(
    algorithm: object, weights: list[int], changes: list[tuple[int, bool, int]]
) -> tuple[LoadBalancer, list[Backend]]:
    """A balancer whose backends were switched off and on (panic mode off), with selects in
    between; and the backends available at the end."""
    backends = make_backends(weights)
    lb = LoadBalancer(backends, algorithm, health=HealthPolicy(panic_threshold=0))  # type: ignore[arg-type]
    for index, enabled, picks in changes:
        lb.set_enabled(backends[index % len(backends)], enabled)
        for _ in range(picks):
            picked = lb.select()
            assert picked is None or lb.ready(picked)
    return lb, [b for b in backends if lb.ready(b)]


@settings(max_examples=80, deadline=None)
@given(
    weights=weights_st,
    changes=changes_st,
    algorithm=st.sampled_from(["RoundRobin", "SmoothRoundRobin"]),
    rounds=st.integers(min_value=1, max_value=3),
)
def test_round_robins_share_exactly_by_weight_among_the_available(
    weights: list[int], changes: list[tuple[int, bool, int]], algorithm: str, rounds: int
) -> None:
    lb, up = after_changes(ALGORITHMS[algorithm], weights, changes)
    total = sum(b.weight for b in up)
    picks = Counter(lb.select() for _ in range(rounds * max(total, 1)))
    if not up:
        assert picks == {None: rounds}
        return
    # Any run of consecutive picks as long as the available weight, wherever it starts.
    assert picks == {b: rounds * b.weight for b in up}


@settings(max_examples=25, deadline=None)
@given(weights=weights_st, changes=changes_st, seed=st.integers(0, 2**32))
def test_random_draws_by_weight_among_the_available(
    weights: list[int], changes: list[tuple[int, bool, int]], seed: int
) -> None:
    lb, up = after_changes(Random(seed=seed), weights, changes)
    n = 6000
    counts = Counter(lb.select() for _ in range(n))
    if not up:
        assert counts == {None: n}
        return
    total = sum(b.weight for b in up)
    assert set(counts) <= set(up)
    for b in up:
        p = b.weight / total
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[b] - n * p) <= 5 * sigma + 1, (b, counts[b], n * p)


@settings(max_examples=40, deadline=None)
@given(
    weights=weights_st,
    changes=changes_st,
    algorithm=st.sampled_from(["Hash", "FNVHash", "Consistent"]),
    key=st.binary(max_size=24),
)
def test_key_based_algorithms_fall_back_along_the_keys_own_order(
    weights: list[int], changes: list[tuple[int, bool, int]], algorithm: str, key: bytes
) -> None:
    lb, up = after_changes(ALGORITHMS[algorithm], weights, changes)
    assert lb.select(key) == next((b for b in lb.iter(key) if b in up), None)
