"""SmoothRoundRobin: nginx's smooth weighted round robin, its fallbacks, threads and health."""

from __future__ import annotations

import itertools
import pickle
import sys
import threading
from collections import Counter
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lbclient
from lbclient import Backend, HealthPolicy, LoadBalancer, SmoothRoundRobin
from lbclient.cli.simulate import backends_for, format_report, make_keys, simulate
from lbclient.selection import SmoothSelector

A, B, C, D = (f"10.0.0.{i}:80" for i in range(1, 5))


def reference(weights: Sequence[int], picks: int) -> tuple[list[int], list[int]]:
    """The published rule, one backend at a time: the indexes picked and the current weights."""
    current = [0] * len(weights)
    total = sum(weights)
    chosen = []
    for _ in range(picks):
        best = -1
        for i, weight in enumerate(weights):
            current[i] += weight
            if best < 0 or current[i] > current[best]:
                best = i
        current[best] -= total
        chosen.append(best)
    return chosen, current


def make_backends(weights: Sequence[int]) -> list[Backend]:
    return [Backend(f"10.9.{i // 200}.{i % 200 + 1}:{8000 + i}", w) for i, w in enumerate(weights)]


def letters(selector: SmoothSelector, picks: Iterator[Backend | None]) -> str:
    names = {b: "abcdefgh"[i] for i, b in enumerate(selector.backends)}
    return " ".join(names[b] for b in picks if b is not None)


def test_five_one_one_is_spread_out() -> None:
    sel = SmoothRoundRobin.build([Backend(A, 5), Backend(B, 1), Backend(C, 1)])
    picks = (sel.first(b"") for _ in range(21))
    assert letters(sel, picks) == " ".join(["a a b a c a a"] * 3)
    assert sel.total_weight == 7
    assert sel.current_weights() == (0, 0, 0)  # a whole number of periods


def test_three_one_and_equal_weights() -> None:
    sel = SmoothRoundRobin.build([Backend(A, 3), Backend(B, 1)])
    assert letters(sel, (sel.first("") for _ in range(8))) == "a a b a a a b a"
    equal = SmoothRoundRobin.build([A, B, C])
    assert letters(equal, (equal.first(b"") for _ in range(6))) == "a b c a b c"


def test_ties_go_to_the_first_in_sorted_order_not_the_order_given() -> None:
    backends = [Backend(C, 2), Backend(A, 1), Backend(B, 2)]
    sel = SmoothRoundRobin.build(backends)
    assert [b.address for b in sel.backends] == [A, B, C]
    expected, _ = reference([1, 2, 2], 10)
    assert [sel.backends.index(sel.first(b"")) for _ in range(10)] == expected


def test_the_key_is_ignored_but_must_be_a_key() -> None:
    sel = SmoothRoundRobin.build([Backend(A, 2), Backend(B, 1)])
    picks = [sel.first(key) for key in (b"x", "y", b"", "another key", b"x", "z")]
    assert letters(sel, iter(picks)) == "a b a a b a"
    with pytest.raises(TypeError, match="42"):
        sel.first(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="None"):
        sel.iter(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"1\.5"):
        sel.iter_after(1.5, sel.backends[0])  # type: ignore[arg-type]


weights_st = st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=9)


@settings(max_examples=200, deadline=None)
@given(weights=weights_st)
def test_one_period_gives_each_backend_exactly_its_weight(weights: list[int]) -> None:
    backends = make_backends(weights)
    lb = LoadBalancer(backends, SmoothRoundRobin)
    counts = Counter(lb.select() for _ in range(sum(weights)))
    assert counts == {b: b.weight for b in backends}


@settings(max_examples=200, deadline=None)
@given(weights=weights_st, extra=st.integers(min_value=0, max_value=60))
def test_picks_and_current_weights_follow_the_published_rule(
    weights: list[int], extra: int
) -> None:
    sel = SmoothRoundRobin.build(make_backends(weights))
    picks = 2 * sum(weights) + extra  # across period boundaries
    expected, current = reference(weights, picks)
    got = [sel.backends.index(sel.first(b"")) for _ in range(picks)]
    assert got == expected
    assert list(sel.current_weights()) == current
    assert sum(sel.current_weights()) == 0


def test_many_backends_of_few_weights() -> None:
    weights = [1 + i % 3 for i in range(1_000)]
    backends = make_backends(weights)
    sel = SmoothRoundRobin.build(backends)
    order = {b: i for i, b in enumerate(sel.backends)}
    sorted_weights = [b.weight for b in sel.backends]
    picks = [order[sel.first(b"")] for _ in range(sum(weights))]  # type: ignore[index]
    assert picks == reference(sorted_weights, len(picks))[0]
    assert Counter(picks) == dict(enumerate(sorted_weights))


# -- threads ---------------------------------------------------------------------------------


@pytest.fixture
def fine_switching() -> Iterator[None]:
    """Switch threads as often as the interpreter allows, so that picks interleave."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def run_threads(count: int, work: object) -> None:
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(slot: int) -> None:
        barrier.wait()
        try:
            work(slot)  # type: ignore[operator]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


@pytest.mark.usefixtures("fine_switching")
def test_concurrent_picks_are_never_lost_or_counted_twice() -> None:
    backends = [Backend(A, 5), Backend(B, 1), Backend(C, 1)]
    lb = LoadBalancer(backends, SmoothRoundRobin)
    threads, per_thread = 16, 1_000
    counts: list[Counter[Backend | None]] = [Counter() for _ in range(threads)]

    def work(slot: int) -> None:
        c = counts[slot]
        select = lb.select
        for _ in range(per_thread):
            c[select()] += 1

    run_threads(threads, work)
    total: Counter[Backend | None] = sum(counts, Counter())
    # 16,000 picks: 2,285 whole periods (5/7, 1/7, 1/7 each) and the first 5 of the next,
    # a a b a c.
    periods, rest = divmod(threads * per_thread, 7)
    assert (periods, rest) == (2_285, 5)
    assert total == {
        backends[0]: 5 * periods + 3,
        backends[1]: periods + 1,
        backends[2]: periods + 1,
    }
    # The shared state is where 16,000 picks in a row leave it.
    selector = lb._view.selector
    assert isinstance(selector, SmoothSelector)
    assert list(selector.current_weights()) == reference([5, 1, 1], threads * per_thread)[1]


@pytest.mark.usefixtures("fine_switching")
def test_concurrent_whole_periods_split_exactly_by_weight_with_fallback_walks() -> None:
    backends = [Backend(A, 5), Backend(B, 1), Backend(C, 1)]
    lb = LoadBalancer(backends, SmoothRoundRobin)
    threads, per_thread = 16, 1_001  # 16,016 picks: 2,288 whole periods
    counts: list[Counter[Backend]] = [Counter() for _ in range(threads)]

    def work(slot: int) -> None:
        c = counts[slot]
        for i in range(per_thread):
            if i % 2:
                walk = list(lb.iter())  # one pick, then the fallbacks, which take none
                assert sorted(walk) == backends
                c[walk[0]] += 1
            else:
                first = lb.select()
                assert first is not None
                c[first] += 1
                assert sorted(lb.iter(after=first)) == [b for b in backends if b != first]

    run_threads(threads, work)
    total: Counter[Backend] = sum(counts, Counter())
    picks = threads * per_thread
    assert total == {b: picks * b.weight // 7 for b in backends}


# -- fallbacks -------------------------------------------------------------------------------


def test_iter_is_one_pick_then_every_other_backend_once_by_next_pick_value() -> None:
    weights = [5, 1, 3, 1]
    sel = SmoothRoundRobin.build(make_backends(weights))
    for step in range(3 * sum(weights)):
        walk = list(itertools.islice(sel.iter(b"k"), 12))
        expected, current = reference(weights, step + 1)
        first = expected[-1]
        assert sel.backends.index(walk[0]) == first
        cycle = walk[:4]
        assert sorted(cycle) == sorted(sel.backends)  # each backend once
        assert walk[4:8] == cycle  # then the same again, without end
        assert walk[8:12] == cycle
        # The others by current weight plus weight, largest first, ties in sorted order;
        # the first of them is the backend a retry of the published rule takes.
        others = sorted(
            (i for i in range(4) if i != first), key=lambda i: (-(current[i] + weights[i]), i)
        )
        assert [sel.backends.index(b) for b in cycle[1:]] == others
        assert others[0] == max(
            (i for i in range(4) if i != first), key=lambda i: (current[i] + weights[i], -i)
        )


def test_fallbacks_take_no_pick() -> None:
    sel = SmoothRoundRobin.build([Backend(A, 5), Backend(B, 1), Backend(C, 1)])
    walks = [list(itertools.islice(sel.iter(b""), 9)) for _ in range(7)]
    assert letters(sel, (w[0] for w in walks)) == "a a b a c a a"
    assert sel.current_weights() == (0, 0, 0)
    an_iterator_not_pulled = sel.iter(b"")
    assert sel.first(b"") == sel.backends[0]  # the walk above drew nothing yet
    assert next(an_iterator_not_pulled) == sel.backends[0]  # the second pick of the period


def test_iter_after_continues_without_a_pick() -> None:
    backends = [Backend(A, 5), Backend(B, 1), Backend(C, 1)]
    sel = SmoothRoundRobin.build(backends)
    first = sel.first(b"")
    assert first == backends[0]
    before = sel.current_weights()  # (-2, 1, 1) after the first pick
    after = list(itertools.islice(sel.iter_after(b"", first), 6))
    # Next-pick values: a -2+5=3, b 1+1=2, c 1+1=2.
    assert after == [backends[1], backends[2], first] * 2
    assert sel.current_weights() == before
    # A first pick not among the backends: every backend, ranked.
    stranger = Backend("10.0.0.9:80", 5)
    assert list(itertools.islice(sel.iter_after(b"", stranger), 3)) == backends
    assert list(SmoothRoundRobin.build([]).iter_after(b"", stranger)) == []


def test_balancer_iter_after_yields_each_other_backend_once() -> None:
    backends = make_backends([4, 2, 1, 1, 3])
    lb = LoadBalancer(backends, SmoothRoundRobin)
    for _ in range(30):
        first = lb.select()
        assert first is not None
        rest = list(lb.iter(after=first))
        assert sorted(rest) == sorted(b for b in backends if b != first)
        walk = list(lb.iter())
        assert sorted(walk) == sorted(backends)


# -- the balancer ----------------------------------------------------------------------------


def test_an_ejected_backend_is_skipped() -> None:
    now = [0.0]
    backends = [Backend(A, 5), Backend(B, 1), Backend(C, 1)]
    lb = LoadBalancer(
        backends,
        SmoothRoundRobin,
        health=HealthPolicy(consecutive_failures=1, panic_threshold=0, base_ejection_time=10),
        clock=lambda: now[0],
    )
    assert lb.report(backends[0], False)  # a ejected
    assert not lb.ready(backends[0])
    picks = Counter(lb.select() for _ in range(70))
    assert backends[0] not in picks
    assert picks[backends[1]] + picks[backends[2]] == 70
    assert picks[backends[1]] > 0
    assert picks[backends[2]] > 0
    now[0] = 11.0  # the probe is due: a is back in the sequence
    assert Counter(lb.select() for _ in range(7))[backends[0]] >= 1


def test_state_is_fresh_at_every_build_and_update() -> None:
    backends = [Backend(A, 5), Backend(B, 1), Backend(C, 1)]
    algorithm = SmoothRoundRobin()
    one = algorithm.build(backends)
    assert letters(one, (one.first(b"") for _ in range(3))) == "a a b"
    two = algorithm.build(backends)
    assert letters(two, (two.first(b"") for _ in range(3))) == "a a b"
    assert letters(one, (one.first(b"") for _ in range(2))) == "a c"  # its own state

    lb = LoadBalancer(backends, SmoothRoundRobin)
    assert [lb.select() for _ in range(3)] == [backends[0], backends[0], backends[1]]
    assert not lb.update(list(reversed(backends)))  # the same set: the sequence goes on
    assert lb.select() == backends[0]
    assert lb.update([*backends, Backend(D, 1)])  # a new set: it starts over
    assert [lb.select() for _ in range(3)] == [backends[0], backends[0], backends[1]]


def test_empty_and_single() -> None:
    empty = SmoothRoundRobin.build([])
    assert empty.first(b"") is None
    assert list(empty.iter(b"")) == []
    assert LoadBalancer([], SmoothRoundRobin).select() is None
    single = SmoothRoundRobin.build([Backend(A, 7)])
    assert {single.first(b"") for _ in range(20)} == {Backend(A, 7)}
    assert list(itertools.islice(single.iter(b""), 3)) == [Backend(A, 7)] * 3


def test_bad_weights_and_backends_are_rejected() -> None:
    for weight in (0, -1, 65_536):
        with pytest.raises(ValueError, match=r"weight must be in 1\.\.65535"):
            SmoothRoundRobin.build([Backend(A, weight)])
    bad: tuple[object, ...] = (1.5, True, "2")
    for odd in bad:
        with pytest.raises(TypeError, match="weight must be an int"):
            SmoothRoundRobin.build([Backend(A, odd)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="listed twice, with weights 1 and 2"):
        SmoothRoundRobin.build([Backend(A, 1), Backend(A, 2)])
    with pytest.raises(TypeError, match="single str"):
        SmoothRoundRobin.build(A)
    with pytest.raises(TypeError, match="iterable"):
        LoadBalancer(42, SmoothRoundRobin)  # type: ignore[arg-type]


def test_exported_and_picklable_with_its_balancer() -> None:
    assert "SmoothRoundRobin" in lbclient.__all__
    assert lbclient.SmoothRoundRobin is SmoothRoundRobin
    assert repr(SmoothRoundRobin()) == "SmoothRoundRobin()"
    lb = LoadBalancer([Backend(A, 2), Backend(B, 1)], SmoothRoundRobin)
    assert [lb.select() for _ in range(2)] == [Backend(A, 2), Backend(B, 1)]
    copy = pickle.loads(pickle.dumps(lb))
    assert isinstance(copy.algorithm, SmoothRoundRobin)
    assert copy.select() == Backend(A, 2)  # a fresh sequence


def test_simulate_spreads_exactly_by_weight() -> None:
    result = simulate("smooth", backends_for([5, 1, 1]), make_keys(7_000, 0))
    assert [s.keys for s in result.shares] == [5_000, 1_000, 1_000]
    assert result.max_load.load == pytest.approx(1.0)
    assert result.removal is None
    assert result.addition is None
    assert "n/a: smooth does not map keys to backends" in format_report(result)


# -- among the available backends -------------------------------------------------------------


def test_among_the_available_from_a_fresh_start_is_their_own_sequence() -> None:
    backends = [Backend(A, 5), Backend(B, 1), Backend(C, 1), Backend(D, 2)]
    full = SmoothRoundRobin.build(backends)
    assert full.among(full.backends) is full
    some = full.among(tuple(backends[1:]), full)
    alone = SmoothRoundRobin.build(backends[1:])
    assert [some.first(b"") for _ in range(12)] == [alone.first(b"") for _ in range(12)]
    assert full.current_weights() == (0, 0, 0, 0)  # the full selector did not move


def test_each_weights_turns_go_on_across_a_change_of_availability() -> None:
    backends = make_backends([1] * 6)
    full = SmoothRoundRobin.build(backends)
    assert [full.first(b"") for _ in range(4)] == backends[:4]
    # The last one goes down: the turns go on from the fifth, not from the first again.
    some = full.among(tuple(backends[:5]), full)
    assert [some.first(b"") for _ in range(6)] == [backends[4], *backends[:4], backends[4]]
    assert sum(some.current_weights()) == 0
    # The fifth goes down too (the next turn was the first's): then back to all six.
    fewer = full.among(tuple(backends[:4]), some)
    assert [fewer.first(b"") for _ in range(3)] == backends[:3]
    assert full.among(full.backends, fewer) is full
    assert [full.first(b"") for _ in range(6)] == [*backends[3:], *backends[:3]]


def test_turns_start_after_a_backend_that_left_and_per_weight() -> None:
    backends = [Backend(A, 2), Backend(B, 1), Backend(C, 2), Backend(D, 1)]
    full = SmoothRoundRobin.build(backends)
    # 2, 1, 2, 1: a (2) c (2) b (1) a c d: the weight-2 turns are a's, the weight-1 turns b's.
    assert full.turns() == {2: backends[0], 1: backends[1]}
    full.first(b"")
    assert full.turns() == {2: backends[2], 1: backends[1]}
    some = full.among((*backends[:2], backends[3]), full)  # c, whose turn it was, is out
    assert some.turns() == {2: backends[0], 1: backends[1]}  # the next after it: a again
    assert sum(some.current_weights()) == 0


def test_balancer_retries_follow_the_sequence_among_the_available() -> None:
    backends = make_backends([1] * 4)
    lb = LoadBalancer(backends, SmoothRoundRobin)
    lb.set_enabled(backends[3], False)
    retries: Counter[Backend] = Counter()
    for _ in range(30):
        first = lb.select()
        assert first is not None
        assert first != backends[3]
        retry = next(lb.iter(after=first))
        assert retry not in (first, backends[3])
        retries[retry] += 1
    assert set(retries) == set(backends[:3])  # not one backend taking every retry
