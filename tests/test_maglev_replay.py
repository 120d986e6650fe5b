"""Maglev's fill kept with its record: a change replays only the turns it touches, and ends with
exactly what a fill from scratch makes, table and record alike, change after change."""

from __future__ import annotations

import pickle
import random
from collections.abc import Sequence

import pytest

from lbclient import Backend, LoadBalancer
from lbclient.selection import Maglev, MaglevSelector
from lbclient.selection._maglev_fill import fill, permutation_start
from lbclient.selection._maglev_log import IN_TAIL, FillLog, advance, record
from lbclient.selection.base import changes


def addresses(count: int) -> list[str]:
    return [f"10.{i >> 8 & 255}.{i & 255}.{i >> 16 & 255 or 1}:8080" for i in range(count)]


def plain(log: FillLog) -> dict[str, object]:
    """Everything a fill's record says, in terms of addresses and values only."""
    size = log.size
    return {
        "table": [b.address for b in log.table],
        "lanes": {b.address: log.lanes[id(b)] for b in log.backends},
        "claims": [log.claims[s] if log.window[s] != IN_TAIL else None for s in range(size)],
        "window": bytes(log.window),
        "reached": [sorted(log.members[i].address for i in log.reached[s]) for s in range(size)],
        "bound": log.bound,
        "set": [(b.address, b.weight) for b in log.backends],
    }


def filled(backends: Sequence[Backend], size: int) -> list[str]:
    starts = [permutation_start(b.address, size) for b in backends]
    owners = fill(tuple(backends), size, [o for o, _ in starts], [k for _, k in starts])
    return [backends[i].address for i in owners]


def changed(
    rng: random.Random, current: Sequence[Backend], pool: Sequence[str], weights: Sequence[int]
) -> tuple[Backend, ...]:
    """``current`` with a few backends out, a few in, and now and then one whose metadata
    changed (an equal backend, another object) or whose weight changed."""
    new = list(current)
    for _ in range(rng.randint(0, 3)):
        if len(new) > 1:
            new.remove(rng.choice(new))
    taken = {b.address for b in new}
    for _ in range(rng.randint(0, 3)):
        address = rng.choice([a for a in pool if a not in taken])
        taken.add(address)
        new.append(Backend(address, rng.choice(weights)))
    if rng.random() < 0.3:
        old = rng.choice(new)
        new.remove(old)
        weight = old.weight if rng.random() < 0.5 else rng.choice(weights)
        new.append(Backend(old.address, weight, {"changed": True}))
    return tuple(sorted(new))


CASES = [
    # (table size, backends, turns left to the tail, weights)
    (101, 10, 5, (1,)),
    (257, 30, 1, (1,)),
    (257, 20, 64, (1, 2, 3)),
    (1_009, 60, 32, (1,)),
    (1_009, 40, 100, (2, 4, 6)),
    (2_003, 100, 64, (1, 1, 1, 5)),
    (2_003, 3, 700, (1, 3)),
]


@pytest.mark.parametrize(("size", "count", "free", "weights"), CASES)
def test_a_replayed_fill_is_the_fill_from_scratch_change_after_change(
    size: int, count: int, free: int, weights: tuple[int, ...]
) -> None:
    rng = random.Random(size * 7 + count)
    pool = addresses(count * 3)
    current = tuple(sorted(Backend(a, rng.choice(weights)) for a in rng.sample(pool, count)))
    log = record(current, size, free=free)
    assert [b.address for b in log.table] == filled(current, size)
    replayed = 0
    for _ in range(25):
        new = changed(rng, current, pool, weights)
        got = advance(log, new, changes(log.backends, new), max_turns=None)
        fresh = record(new, size, free=free)
        if got is None:  # the weights' common divisor changed: a fill from scratch
            assert fresh.divisor != log.divisor
            got = fresh
        else:
            replayed += 1
            assert got.replayed <= size - free  # each turn of the window once at most
        assert plain(got) == plain(fresh)
        assert [b.address for b in got.table] == filled(new, size)
        # The new fill answers with the new set's objects, metadata and all.
        assert {id(b) for b in got.table} <= {id(b) for b in new}
        log, current = got, new
    assert replayed >= 15


def test_a_record_is_replayed_once_and_its_table_stays_as_it_was() -> None:
    """The first replay takes the record's lists over; a second change from the same
    record is filled from scratch, and the selector it came from keeps routing as before."""
    rng = random.Random(3)
    pool = addresses(20_000)
    current = tuple(sorted(Backend(a) for a in pool[:9_000]))
    lb = LoadBalancer(current, Maglev())
    assert lb.update(current[1:])
    kept = lb._view.selector
    assert isinstance(kept, MaglevSelector)
    assert kept._log is not None
    before = (kept.table, dict(kept._log.lanes), kept._log.claims[:], bytes(kept._log.window))
    results = []
    for _ in range(3):  # several changes from the same selector, as from a snapshot kept aside
        new = changed(rng, current[1:], pool, (1,))
        rebuilt = Maglev().rebuild(kept, new)
        assert rebuilt.table == Maglev().build(new).table
        results.append(rebuilt._log.replayed if rebuilt._log else None)  # type: ignore[attr-defined]
        assert (kept.table, kept._log.lanes, kept._log.claims, bytes(kept._log.window)) == before
    assert (results[0] or 0) > 0  # replayed
    assert results[1:] == [None, None]  # filled afresh without a record: it was spent


def test_a_change_of_one_backend_in_ten_thousand_visits_few_turns() -> None:
    size = 65_537
    pool = addresses(10_010)
    current = tuple(sorted(Backend(a) for a in pool[:10_000]))
    log = record(current, size)
    rng = random.Random(9)
    spare = [Backend(a) for a in pool[10_000:]]
    for _ in range(3):
        new = list(current)
        new.remove(rng.choice(new))
        new.append(spare.pop())
        new_set = tuple(sorted(new))
        got = advance(log, new_set, changes(current, new_set))
        assert got is not None
        # A fill from scratch takes 65,537 turns; about a hundred are visited here.
        assert 0 < got.replayed < 1_000
        log, current = got, new_set
    assert [b.address for b in log.table] == filled(current, size)


def test_balancer_refreshes_keep_the_record_and_route_as_a_fresh_build() -> None:
    rng = random.Random(11)
    pool = addresses(6_000)
    lb = LoadBalancer([Backend(a) for a in pool[:5_000]], Maglev())
    first = lb._view.selector
    assert isinstance(first, MaglevSelector)
    assert first._log is None  # a build that never changed keeps no record
    for step in range(4):
        wanted = list(lb.backends)
        for b in rng.sample(wanted, 2):
            wanted.remove(b)
        taken = {b.address for b in wanted}
        wanted += [Backend(a) for a in rng.sample([a for a in pool if a not in taken], 2)]
        assert lb.update(wanted)
        selector = lb._view.selector
        assert isinstance(selector, MaglevSelector)
        assert selector._log is not None
        # The first change makes the record; the next ones visit about 1% of the turns.
        replayed = selector._log.replayed
        assert replayed == 0 if step == 0 else 0 < replayed < selector.table_size // 10
        assert selector.table == Maglev().build(lb.backends).table
        key = f"user-{step}"
        assert lb.select(key) == Maglev().build(lb.backends).first(key)


@pytest.mark.parametrize(("size", "count"), [(1_009, 40), (65_537, 1_000), (8_209, 500)])
def test_small_tables_and_sets_of_many_turns_each_are_filled_afresh_without_a_record(
    size: int, count: int
) -> None:
    """Below 8,192 slots, or with more than 16 turns per backend, a record costs more than it
    saves."""
    lb = LoadBalancer([Backend(a) for a in addresses(count)], Maglev(size))
    for wanted in (addresses(count + 1)[1:], addresses(count + 2)[2:]):
        assert lb.update([Backend(a) for a in wanted])
        selector = lb._view.selector
        assert isinstance(selector, MaglevSelector)
        assert selector._log is None
        assert selector.table == Maglev(size).build(lb.backends).table


def test_sets_emptied_and_filled_again_route_as_fresh_builds() -> None:
    backends = [Backend(a, 1 + i % 3) for i, a in enumerate(addresses(30))]
    lb = LoadBalancer(backends, Maglev(8_209))
    for wanted in (
        backends[:20],
        [],
        backends[5:25],
        [b.with_weight(2) for b in backends[5:25]],
        backends[:1],
        backends,
    ):
        lb.update(wanted)
        selector = lb._view.selector
        assert isinstance(selector, MaglevSelector)
        assert selector.table == Maglev(8_209).build(wanted).table


def test_a_change_past_the_table_size_raises_as_a_build_does() -> None:
    size = 8_209
    base = [Backend(a) for a in addresses(8_000)]
    lb = LoadBalancer(base, Maglev(size))
    assert lb.update(base[1:])
    assert lb._view.selector._log is not None  # type: ignore[attr-defined]
    wanted = [*base[1:], Backend("10.9.9.9:80", 300)]  # a total weight of 8,299 turns a round
    with pytest.raises(ValueError, match="smaller than the total weight 8299") as built:
        Maglev(size).build(wanted)
    with pytest.raises(ValueError, match="smaller than the total weight 8299") as updated:
        lb.update(wanted)
    assert str(updated.value) == str(built.value)
    assert lb.backends == tuple(sorted(base[1:]))  # the set in use stays
    one = (Backend("10.0.0.1:80", 3),)
    two = (*one, Backend("10.0.0.2:80", 11))  # 14 turns a round in 13 slots
    assert advance(record(one, 13, free=4), two, changes(one, two), max_turns=None) is None


def test_a_large_change_fills_afresh_and_the_next_small_one_records_again() -> None:
    pool = [Backend(a) for a in addresses(6_000)]
    lb = LoadBalancer(pool[:5_000], Maglev())
    assert lb.update(pool[1:5_000])
    assert lb._view.selector._log is not None  # type: ignore[attr-defined]
    assert lb.update(pool[40:5_000])  # 39 out: too many to replay
    assert lb._view.selector._log is None  # type: ignore[attr-defined]
    assert lb._view.selector.table == Maglev().build(pool[40:5_000]).table  # type: ignore[attr-defined]
    assert lb.update(pool[41:5_000])
    assert lb._view.selector._log.replayed == 0  # type: ignore[attr-defined]
    assert lb.update(pool[41:5_001])
    assert lb._view.selector._log.replayed > 0  # type: ignore[attr-defined]
    assert lb._view.selector.table == Maglev().build(pool[41:5_001]).table  # type: ignore[attr-defined]


def test_a_copy_of_a_selector_with_a_record_routes_alike_and_refreshes_exactly() -> None:
    pool = [Backend(a) for a in addresses(5_002)]
    selector = Maglev().rebuild(Maglev().build(pool[:5_000]), tuple(sorted(pool[1:5_000])))
    assert selector._log is not None
    copy = pickle.loads(pickle.dumps(selector))
    assert isinstance(copy, MaglevSelector)
    assert [b.address for b in copy.table] == [b.address for b in selector.table]
    assert copy._log is None  # its backends are other objects: the record is not carried
    wanted = tuple(sorted((*copy.backends[1:], pool[5_001])))
    assert Maglev().rebuild(copy, wanted).table == Maglev().build(wanted).table
