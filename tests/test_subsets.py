"""Subsets: deterministic (the SRE book's) and rendezvous (gRPC A68's), as plain values."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lbclient
from lbclient import Backend, Subset
from lbclient.subsets import members


def fleet(n: int, start: int = 0) -> list[Backend]:
    return [Backend(f"10.{i // 60000}.{i // 250 % 240}.{i % 250 + 1}:80") for i in range(start, n)]


def counts(backends: list[Backend], subsets: list[Subset]) -> Counter[Backend]:
    seen: Counter[Backend] = Counter(dict.fromkeys(backends, 0))
    for subset in subsets:
        chosen = subset.subset(backends)
        assert len(set(chosen)) == len(chosen)  # never a backend twice
        seen.update(chosen)
    return seen


# -- deterministic ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    clients=st.integers(min_value=1, max_value=120),
    n=st.integers(min_value=1, max_value=60),
    size=st.integers(min_value=1, max_value=70),
)
def test_deterministic_gives_every_backend_the_same_count_within_one(
    clients: int, n: int, size: int
) -> None:
    backends = fleet(n)
    seen = counts(backends, [Subset(size, index=i, clients=clients) for i in range(clients)])
    assert max(seen.values()) - min(seen.values()) <= 1
    assert sum(seen.values()) == clients * min(size, n)


@settings(max_examples=60, deadline=None)
@given(
    rounds=st.integers(min_value=1, max_value=5),
    per=st.integers(min_value=1, max_value=8),
    size=st.integers(min_value=1, max_value=10),
)
def test_deterministic_exact_when_size_divides_and_rounds_are_full(
    rounds: int, per: int, size: int
) -> None:
    n = per * size  # subset_count = per, and clients is a multiple of it
    clients = rounds * per
    backends = fleet(n)
    assert Subset(size, index=0, clients=clients).clients_per_round(n) == per
    seen = counts(backends, [Subset(size, index=i, clients=clients) for i in range(clients)])
    assert set(seen.values()) == {clients * size // n}


def test_a_round_partitions_the_backends_like_the_book() -> None:
    backends = fleet(12)
    slices = [Subset(3, index=i, clients=8).subset(backends) for i in range(8)]
    assert sorted(b for s in slices[:4] for b in s) == sorted(backends)
    assert sorted(b for s in slices[4:] for b in s) == sorted(backends)
    assert slices[:4] != slices[4:]  # each round shuffles anew


def test_deterministic_ignores_input_order_and_duplicates() -> None:
    backends = fleet(30)
    subset = Subset(7, index=5, clients=40)
    shuffled = backends[::-1] + backends[:3]
    assert subset.candidates(shuffled) == subset.candidates(backends)
    assert sorted(subset.candidates(backends)) == backends


def test_deterministic_is_the_same_in_another_process() -> None:
    code = (
        "from lbclient import Subset, Backend\n"
        "bs = [Backend(f'10.0.0.{i}:80') for i in range(1, 40)]\n"
        "print([b.address for b in Subset(5, index=11, clients=30).subset(bs)])\n"
        "print([b.address for b in Subset(5, salt=b'x').subset(bs)])\n"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(runs) == 1
    bs = [Backend(f"10.0.0.{i}:80") for i in range(1, 40)]
    here = [b.address for b in Subset(5, index=11, clients=30).subset(bs)]
    there = [b.address for b in Subset(5, salt=b"x").subset(bs)]
    assert runs.pop() == f"{here}\n{there}\n"


def test_a_salt_changes_the_deterministic_shuffle_for_the_whole_fleet() -> None:
    backends = fleet(40)
    plain = [Subset(4, index=i, clients=10).subset(backends) for i in range(10)]
    salted = [Subset(4, index=i, clients=10, salt=b"svc").subset(backends) for i in range(10)]
    assert plain != salted
    assert sorted(b for s in salted for b in s) == sorted(backends)


def test_subset_larger_than_the_set_falls_back_to_the_whole_set() -> None:
    backends = fleet(5)
    for subset in (Subset(9, index=3, clients=4), Subset(9, salt=b"s")):
        assert sorted(subset.subset(backends)) == backends
        assert sorted(subset.members(backends)) == backends
    assert Subset(9, index=0, clients=1).members([]) == ()
    assert Subset(9).members([]) == ()


# -- rendezvous ------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=50),
    size=st.integers(min_value=1, max_value=20),
    salt=st.binary(min_size=0, max_size=16),
    which=st.integers(min_value=0, max_value=10_000),
)
def test_rendezvous_one_backend_joining_or_leaving_changes_at_most_one_member(
    n: int, size: int, salt: bytes, which: int
) -> None:
    backends = fleet(n)
    subset = Subset(size, salt=salt)
    before = set(subset.subset(backends))
    joined = set(subset.subset([*backends, *fleet(n + 1, n)]))
    assert len(joined - before) <= 1
    assert len(before - joined) <= 1
    gone = backends[which % n]
    left = set(subset.subset([b for b in backends if b != gone]))
    assert left - before == set() or gone in before
    assert len(before - left) <= 1
    assert len(left - before) <= 1


def test_rendezvous_salt_is_random_by_default_and_settable() -> None:
    assert Subset(3).salt != Subset(3).salt
    assert len(Subset(3).salt) == lbclient.subsets.SALT_BYTES
    backends = fleet(50)
    assert Subset(5, salt=b"a").subset(backends) == Subset(5, salt=b"a").subset(backends)
    assert Subset(5, salt=bytearray(b"a")) == Subset(5, salt=b"a")
    assert Subset(5, salt=b"a").subset(backends) != Subset(5, salt=b"b").subset(backends)


# -- the SRE book's figure -------------------------------------------------------------------


def test_sre_book_300_by_300_subset_90_deterministic_even_random_spread() -> None:
    backends = fleet(300)
    even = counts(backends, [Subset(90, index=i, clients=300) for i in range(300)])
    assert set(even.values()) == {90}
    rng = random.Random(20)
    spread = counts(backends, [Subset(90, salt=rng.randbytes(16)) for _ in range(300)])
    mean = sum(spread.values()) / 300
    assert mean == 90
    # The book: 63% and 121% of the mean; random subsets are far from even.
    assert min(spread.values()) / mean < 0.85
    assert max(spread.values()) / mean > 1.15


# -- health ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subset", [Subset(4, index=2, clients=9), Subset(4, salt=b"health")], ids=lambda s: s.mode
)
def test_an_unavailable_member_is_replaced_by_the_next_candidate_until_it_returns(
    subset: Subset,
) -> None:
    backends = fleet(20)
    order = subset.candidates(backends)
    nominal = subset.subset(backends)
    assert order[:4] == nominal == subset.members(backends, lambda b: True)
    down = {nominal[1]}
    replaced = subset.members(backends, lambda b: b not in down)
    assert replaced == (nominal[0], nominal[2], nominal[3], order[4])
    down = {nominal[1], order[4], order[5]}
    expected = (nominal[0], nominal[2], nominal[3], order[6])
    assert subset.members(backends, lambda b: b not in down) == expected
    # back: the member returns and its replacement goes
    assert subset.members(backends, lambda b: True) == nominal
    assert members(subset, backends, lambda b: b not in order[:19]) == (order[19],)
    assert members(subset, backends, lambda b: False) == ()


def test_deterministic_replacements_continue_around_the_round_ring() -> None:
    backends = fleet(12)
    last_slot = Subset(3, index=3, clients=4)  # positions 9..11 of round 0
    first_slot = Subset(3, index=0, clients=4)  # positions 0..2 of round 0
    order = first_slot.candidates(backends)
    assert last_slot.candidates(backends) == order[9:] + order[:9]


# -- the value -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"size": 0}, ValueError, "size must be at least 1, got 0"),
        ({"size": -3}, ValueError, "size must be at least 1, got -3"),
        ({"size": True}, TypeError, "size must be an int, got True"),
        ({"size": 2.0}, TypeError, "size must be an int, got 2.0"),
        ({"size": 2, "index": 1}, ValueError, "index given without clients"),
        ({"size": 2, "clients": 4}, ValueError, "clients given without index"),
        ({"size": 2, "index": 4, "clients": 4}, ValueError, r"below clients \(4\), got 4"),
        ({"size": 2, "index": -1, "clients": 4}, ValueError, "index must be at least 0, got -1"),
        ({"size": 2, "index": 0, "clients": 0}, ValueError, "clients must be at least 1, got 0"),
        ({"size": 2, "index": "1", "clients": 4}, TypeError, "index must be an int, got '1'"),
        ({"size": 2, "salt": "abc"}, TypeError, "salt must be bytes, got 'abc'"),
        ({"size": 2, "salt": 7}, TypeError, "salt must be bytes, got 7"),
    ],
)
def test_bad_values_are_clear_errors(kwargs: dict[str, object], error: type, match: str) -> None:
    size = kwargs.pop("size")
    with pytest.raises(error, match=match):
        Subset(size, **kwargs)  # type: ignore[arg-type]


def test_a_subset_is_an_immutable_comparable_picklable_value() -> None:
    subset = Subset(5, index=2, clients=10)
    assert subset == Subset(5, index=2, clients=10)
    assert hash(subset) == hash(Subset(5, index=2, clients=10))
    assert subset != Subset(5, index=3, clients=10)
    assert (subset.mode, subset.deterministic, subset.salt) == ("deterministic", True, b"")
    assert repr(subset) == "Subset(5, index=2, clients=10)"
    rendezvous = Subset(5, salt=b"\x01\x02")
    assert repr(rendezvous) == "Subset(5, salt=bytes.fromhex('0102'))"
    assert rendezvous.mode == "rendezvous"
    assert pickle.loads(pickle.dumps(rendezvous)) == rendezvous
    with pytest.raises(AttributeError, match="immutable"):
        subset.size = 3  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        del subset.index
    with pytest.raises(TypeError, match="expected Backend values"):
        subset.members(["10.0.0.1:80"])  # type: ignore[list-item]
