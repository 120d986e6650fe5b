"""Pingora's weighted selection vectors (reference: pingora-load-balancing selection tests)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable

import pytest

from lbclient import (
    Backend,
    FNVHash,
    Hash,
    Random,
    RoundRobin,
)
from lbclient.hashing import fnv1a_64, le64, xxh3_64
from lbclient.selection import UniqueIterator, Weighted, WeightedIterator
from lbclient.selection.weighted import WeightedSelector

B1 = "1.1.1.1:80"
B2 = "1.0.0.1:80"
B3 = "1.0.0.255:80"


def names(backends: dict[str, Backend], picks: list[Backend]) -> list[str]:
    by_backend = {v: k for k, v in backends.items()}
    return [by_backend[b] for b in picks]


def trio(w1: int, w2: int, w3: int) -> dict[str, Backend]:
    return {"b1": Backend(B1, w1), "b2": Backend(B2, w2), "b3": Backend(B3, w3)}


def test_fnv() -> None:
    bs = trio(1, 10, 1)
    sel = FNVHash.build(bs.values())
    assert sel.backends == (bs["b2"], bs["b3"], bs["b1"])
    assert sel.total_weight == 12
    it = sel.iter(b"test")
    assert isinstance(it, WeightedIterator)
    expected = ["b2", "b2", "b2", "b1", "b3", "b2", "b2", "b1", "b2", "b3", "b1"]
    assert names(bs, list(itertools.islice(it, 11))) == expected
    firsts = [next(sel.iter(f"test{i}".encode())) for i in range(1, 8)]
    assert names(bs, firsts) == ["b2", "b2", "b3", "b1", "b2", "b2", "b2"]
    assert names(bs, [sel.first(f"test{i}") for i in range(1, 8)]) == names(bs, firsts)


def test_fnv_chain_by_formula() -> None:
    # first pick weighted[h % 12], later picks backends[h % 3] with h = fnv(le64(h)).
    h = fnv1a_64(b"test")
    assert h == 0xF9E6E6EF197C2B25
    chain = []
    for _ in range(4):
        h = fnv1a_64(le64(h))
        chain.append(h)
    assert chain == [0x92AFA3F8AD1ED11A, 0x45518D238F59251D, 0x948C91041EEB7121, 0x06229442FD7D1235]
    assert [c % 3 for c in chain] == [0, 0, 2, 1]


def test_round_robin() -> None:
    bs = trio(1, 8, 1)
    sel = RoundRobin.build(bs.values())
    assert names(bs, list(itertools.islice(sel.iter("test"), 5))) == ["b2", "b3", "b1", "b2", "b3"]
    # Pingora's seven first picks take counter values 5-11, its four fallbacks having taken 1-4.
    # Here fallbacks leave the counter at 1: four more first picks (all b2) bring it to 5.
    assert names(bs, [sel.first("") for _ in range(4)]) == ["b2"] * 4
    firsts = [next(sel.iter("test1")) for _ in range(7)]
    assert names(bs, firsts) == ["b2", "b2", "b2", "b3", "b1", "b2", "b2"]


def test_round_robin_walk_by_formula_with_unequal_weights() -> None:
    # Sorted [b2 (w=1), b3 (w=3), b1 (w=2)]: weighted = [b2, b3, b3, b3, b1, b1], 6 slots.
    bs = trio(2, 1, 3)
    sel = RoundRobin.build(bs.values())
    # First picks at counter 0 and 1: weighted[0], weighted[1].
    assert names(bs, [sel.first(b"") for _ in range(2)]) == ["b2", "b3"]
    # A walk: first pick at counter 2 (weighted[2]), then h = 3, 4, 5, 6, 7 -> backends[h % 3],
    # exactly what Pingora yields with no other request picking during the walk.
    walk = list(itertools.islice(sel.iter(b"any"), 6))
    assert names(bs, walk) == ["b3", "b2", "b3", "b1", "b2", "b3"]
    # The walk took one counter value: the next first picks are weighted[3], weighted[4].
    assert names(bs, [sel.first(b"") for _ in range(2)]) == ["b3", "b1"]
    # Counter 5: weighted[5], then h = 6, 7 -> backends[0], backends[1].
    assert names(bs, list(itertools.islice(sel.iter(b""), 3))) == ["b1", "b2", "b3"]
    # Counter 6 wraps the weighted table: weighted[0].
    assert sel.first(b"") == bs["b2"]


def test_round_robin_fallbacks_leave_the_counter_alone() -> None:
    draws: list[bytes] = []

    class Counted(RoundRobin):
        def index_function(self) -> Callable[[bytes], int]:
            inner = super().index_function()

            def counted(data: bytes) -> int:
                draws.append(data)
                return inner(data)

            return counted

    bs = trio(1, 1, 1)
    sel = Counted.build(bs.values())
    walks = [list(itertools.islice(sel.iter(b"k"), 10)) for _ in range(6)]
    assert len(draws) == 6  # one per first pick
    # Walk i starts at counter i and goes round the sorted backends from there.
    ordered = sel.backends
    for i, walk in enumerate(walks):
        assert walk == [ordered[(i + j) % 3] for j in range(10)]


def test_later_picks_of_other_algorithms_rehash_the_previous_value() -> None:
    seen: list[bytes] = []

    def index(data: bytes) -> int:
        seen.append(data)
        return fnv1a_64(data)

    bs = trio(1, 2, 3)
    sel = Weighted(index).build(bs.values())
    list(itertools.islice(sel.iter(b"key"), 4))
    h = fnv1a_64(b"key")
    expected = [b"key"]
    for _ in range(3):
        expected.append(le64(h))
        h = fnv1a_64(le64(h))
    assert seen == expected


def test_round_robin_counter_restarts_per_build_and_is_per_selector() -> None:
    bs = trio(1, 1, 1)
    algorithm = RoundRobin()
    a = algorithm.build(bs.values())
    assert [a.first(b"") for _ in range(2)] == [bs["b2"], bs["b3"]]
    b = algorithm.build(bs.values())
    assert b.first(b"") == bs["b2"]
    assert a.first(b"") == bs["b1"]


def test_random_share() -> None:
    bs = trio(1, 8, 1)
    sel = Random.build(bs.values())
    counts = Counter(sel.first(b"") for _ in range(10_000))
    assert 7000 <= counts[bs["b2"]] <= 9000
    assert set(counts) == set(bs.values())


def test_random_seeded_is_reproducible() -> None:
    bs = trio(1, 2, 3)
    first = [Random(seed=5).build(bs.values()).first(b"") for _ in range(3)]
    again = [Random(seed=5).build(bs.values()).first(b"") for _ in range(3)]
    assert first == again


def test_hash_uses_xxh3_64_by_formula() -> None:
    bs = trio(3, 1, 2)
    sel = Hash.build(bs.values())
    ordered = sel.backends
    weighted = [b for b in ordered for _ in range(b.weight)]
    for i in range(200):
        key = f"user-{i}".encode()
        h = xxh3_64(key)
        picks = list(itertools.islice(sel.iter(key), 6))
        expected = [weighted[h % len(weighted)]]
        for _ in range(5):
            h = xxh3_64(le64(h))
            expected.append(ordered[h % len(ordered)])
        assert picks == expected
        assert sel.first(key) == expected[0]
        assert sel.first(key.decode()) == expected[0]


def test_custom_index_function_masked_to_u64() -> None:
    bs = trio(1, 1, 1)
    sel = Weighted(lambda data: -1).build(bs.values())
    # -1 as u64 is 2**64 - 1, and (2**64 - 1) % 3 == 0.
    assert sel.first(b"x") == sel.backends[0]
    with pytest.raises(TypeError, match="must return an int"):
        Weighted(lambda data: "nope").build(bs.values()).first(b"x")  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match="callable"):
        Weighted(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="index function"):
        Weighted().build(bs.values())


def test_empty() -> None:
    for algorithm in (RoundRobin, Random, Hash, FNVHash):
        sel = algorithm.build([])
        assert sel.first(b"k") is None
        assert list(sel.iter(b"k")) == []


def test_round_robin_iter_after_continues_past_first_without_a_draw() -> None:
    bs = {f"b{i}": Backend(f"10.0.0.{i}:80", 1 + i % 2) for i in range(1, 6)}
    sel = RoundRobin.build(bs.values())
    ordered = sel.backends
    for i, first in enumerate(ordered):
        after = list(itertools.islice(sel.iter_after(b"k", first), 10))
        assert after == [ordered[(i + j) % 5] for j in range(1, 11)]
    # None of that drew from the counter.
    assert sel.first(b"") == ordered[0]
    # A backend not in the set: the walk starts where it would sit.
    stranger = Backend("10.0.0.3:80", 9)  # between 10.0.0.3 (w=2) and 10.0.0.4
    assert next(sel.iter_after(b"k", stranger)) == Backend("10.0.0.4:80", 1)
    assert next(sel.iter_after(b"k", Backend("10.0.0.9:80"))) == ordered[0]
    assert next(sel.iter_after(b"k", Backend("10.0.0.0:80"))) == ordered[0]
    assert list(RoundRobin.build([]).iter_after(b"k", stranger)) == []


@pytest.mark.parametrize("algorithm", [Hash, FNVHash])
def test_hashed_iter_after_is_iter(algorithm: type[Weighted]) -> None:
    bs = trio(1, 2, 3)
    sel = algorithm.build(bs.values())
    for i in range(50):
        key = f"k{i}".encode()
        first = sel.first(key)
        assert first is not None
        assert list(itertools.islice(sel.iter_after(key, first), 8)) == list(
            itertools.islice(sel.iter(key), 8)
        )


def test_big_total_weight_uses_cumulative_search_with_same_answers() -> None:
    backends = tuple(
        sorted(Backend(f"10.0.{i // 200}.{i % 200 + 1}:80", 1 + i % 7) for i in range(300))
    )
    expanded = WeightedSelector(backends, xxh3_64)
    searched = WeightedSelector(backends, xxh3_64, expand_limit=0)
    for i in range(3000):
        key = f"k{i}".encode()
        assert expanded.first(key) == searched.first(key)
        assert list(itertools.islice(expanded.iter(key), 3)) == list(
            itertools.islice(searched.iter(key), 3)
        )
    # Every weighted slot maps to the backend that owns it.
    total = expanded.total_weight
    for h in range(total):
        assert expanded.weighted_pick(h) == searched.weighted_pick(h)


def test_scale_10000_backends_weights_up_to_100() -> None:
    backends = [
        Backend(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:80", 1 + i % 100)
        for i in range(10_000)
    ]
    sel = Hash.build(backends)
    assert len(sel.backends) == 10_000
    assert sel.total_weight == sum(b.weight for b in backends)
    assert sel.first(b"key") in set(backends)


def test_unique_iterator_max_iterations() -> None:
    b1, b2, b3 = (Backend(a) for a in (B1, B2, B3))
    assert list(UniqueIterator([b1, b2, b3], 3)) == [b1, b2, b3]
    assert list(UniqueIterator([b1, b2, b3], 1)) == [b1]
    assert list(UniqueIterator([b1, b2, b3], 0)) == []


def test_unique_iterator_filters_duplicates_and_counts_them() -> None:
    b1, b2, b3 = (Backend(a) for a in (B1, B2, B3))
    assert list(UniqueIterator([b1, b1, b2, b2, b2, b3], 10)) == [b1, b2, b3]
    # Duplicates use up steps: 5 pulls reach only b1 and b2.
    assert list(UniqueIterator([b1, b1, b2, b2, b2, b3], 5)) == [b1, b2]
    it = UniqueIterator(iter([b1, b2]), 10)
    assert next(it) == b1
    assert it.seen == frozenset({b1})


def test_build_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="single str"):
        Hash.build("1.2.3.4:80")
    with pytest.raises(TypeError, match="iterable"):
        Hash.build(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="None"):
        Hash.build([None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"'1.2.3.4:80' is listed twice, with weights 1 and 2"):
        Hash.build([Backend("1.2.3.4:80"), Backend("1.2.3.4:80", 2)])
    # Exact duplicates are one backend.
    assert len(Hash.build(["1.2.3.4:80", Backend("1.2.3.4:80")]).backends) == 1


def test_keys_must_be_bytes_or_str() -> None:
    sel = Hash.build([B1])
    with pytest.raises(TypeError, match="42"):
        sel.first(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="None"):
        sel.iter(None)  # type: ignore[arg-type]
    assert sel.first(bytearray(b"k")) == sel.first(b"k")  # type: ignore[arg-type]
    assert sel.first("é") == sel.first("é".encode())


# -- among the available backends -------------------------------------------------------------


def test_round_robin_among_the_available_goes_on_from_the_same_counter() -> None:
    backends = [Backend(f"10.0.0.{i}:80") for i in range(1, 5)]
    full = RoundRobin.build(backends)
    assert full.among(full.backends) is full
    some = full.among((backends[0], *backends[2:]))
    assert some is not None
    assert some.backends == (backends[0], backends[2], backends[3])
    assert [full.first(b"") for _ in range(2)] == backends[:2]  # counter values 0, 1
    # Values 2, 3, 4, 5 over the three left (value % 3 of the restricted set).
    a, _, c, d = backends
    assert [some.first(b"") for _ in range(4)] == [d, a, c, d]
    assert full.first(b"") == backends[2]  # value 6 on the full set: the counter is shared
    # Its fallbacks go round the available backends from the first pick, drawing nothing.
    walk = some.iter_after(b"", backends[3])
    assert list(itertools.islice(walk, 3)) == [backends[0], backends[2], backends[3]]
    assert full.first(b"") == backends[3]  # value 7


def test_random_among_the_available_draws_by_weight_from_the_same_source() -> None:
    backends = [Backend("10.0.0.1:80", 1), Backend("10.0.0.2:80", 2), Backend("10.0.0.3:80", 3)]
    some = Random(seed=3).build([*backends, Backend("10.0.0.4:80", 2)])
    restricted = some.among(tuple(backends))
    assert restricted is not None
    assert restricted.total_weight == 6
    counts = Counter(restricted.first(b"") for _ in range(60_000))
    for backend in backends:
        assert abs(counts[backend] - 10_000 * backend.weight) < 500, counts


@pytest.mark.parametrize("algorithm", [Hash, FNVHash])
def test_keyed_selections_keep_their_own_fallback(algorithm: type[Weighted]) -> None:
    selector = algorithm.build([B1, B2, B3])
    assert selector.among(selector.backends[1:]) is None
    assert selector.among(selector.backends) is None
    plain = Weighted(fnv1a_64).build([B1, B2])
    assert plain.among(plain.backends) is None


def test_without_keeps_the_order_for_few_and_many() -> None:
    from lbclient.selection.base import without

    backends = tuple(Backend(f"10.0.{i // 250}.{i % 250 + 1}:80") for i in range(1_000))
    for out in ({backends[0]}, {backends[-1], backends[500]}, set(backends[100:900])):
        kept = without(backends, frozenset(out))
        assert kept == tuple(b for b in backends if b not in out)
    assert without(backends, frozenset()) is backends
    assert without(backends, frozenset({Backend("10.9.9.9:80")})) == backends
