"""Prequal's selector with plain values: the hot-cold rule, the quantile, the pool's ageing,
reuse and removals, the probe accumulator, the fallback, and the balancer's hooks."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbclient import Backend, LoadBalancer, Prequal
from lbclient.health import HealthPolicy, Outcome
from lbclient.reports import LoadReport
from lbclient.selection.prequal import HOT_MEMORY, MAX_REUSE, PrequalSelector, default_reuse


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(
    count: int = 4, clock: Clock | None = None, seed: int = 7, **options: object
) -> tuple[PrequalSelector, list[Backend], Clock]:
    clock = clock or Clock()
    algorithm = Prequal(random=random.Random(seed).random, **options)  # type: ignore[arg-type]
    selector = algorithm.build([f"10.0.0.{i}:80" for i in range(1, count + 1)])
    selector.attach({}, clock)
    return selector, list(selector.backends), clock


def report(
    selector: PrequalSelector,
    backend: Backend,
    rif: float,
    latency: float | None,
    at: float,
) -> None:
    selector.reported(backend, LoadReport(at, rif=rif, latency=latency))


def test_cold_entry_with_lowest_latency_wins() -> None:
    selector, (a, b, c, d), clock = make(reuse=10, q_rif=0.6)
    for backend, rif in ((a, 1), (b, 2), (c, 3), (d, 100)):
        report(selector, backend, rif, 0.5, clock.now)
    report(selector, b, 2, 0.01, clock.now)  # cold and fastest
    report(selector, d, 100, 0.001, clock.now)  # fastest, but hot
    assert selector.first() == b


def test_all_hot_takes_lowest_rif() -> None:
    selector, (a, b, c, d), clock = make(reuse=10)
    for _ in range(20):  # the window sees low RIFs: threshold 1
        report(selector, a, 1, 0.1, clock.now)
    selector._pool.clear()
    report(selector, b, 9, 0.001, clock.now)
    report(selector, c, 5, 0.5, clock.now)
    report(selector, d, 7, 0.0001, clock.now)
    assert selector.threshold() < 5
    assert selector.first() == c


def test_quantile_threshold_is_nearest_rank() -> None:
    selector, (a, *_), clock = make(q_rif=0.6)
    assert selector.threshold() == float("inf")
    for rif in range(1, 11):
        report(selector, a, rif, 0.1, clock.now)
    assert selector.threshold() == 6
    selector2, (b, *_), _ = make(q_rif=0.84)
    for rif in range(1, 101):
        report(selector2, b, rif, 0.1, clock.now)
    assert selector2.threshold() == 90  # the 54th of the last 64 (37..100)
    assert sorted(selector2._window)[0] == 37


def test_fewer_than_two_entries_falls_back_to_peak_ewma_cost() -> None:
    clock = Clock()
    balancer = LoadBalancer(
        ["10.0.0.1:80", "10.0.0.2:80"], Prequal(random=random.Random(1).random), clock=clock
    )
    a, b = balancer.backends
    balancer.observe(balancer.load(a), 2.0, False)
    balancer.observe(balancer.load(b), 0.01, False)
    balancer.report_load(a, rif="0", latency_us="1")  # one entry: not enough
    assert {balancer.select() for _ in range(20)} == {b}


def test_pool_ages_out_entries() -> None:
    selector, (a, b, c, _d), clock = make(max_age=1.0, reuse=10)
    report(selector, a, 1, 0.001, clock.now - 1.5)  # too old already
    report(selector, b, 1, 0.1, clock.now)
    report(selector, c, 1, 0.2, clock.now)
    assert selector.first() == b
    assert a not in [entry[0] for entry in selector.pool()]
    clock.now += 1.01
    assert selector.pool()  # still there until a pick looks
    selector.first()
    assert selector.pool() == []


def test_reuse_budget_removes_an_entry_once_spent() -> None:
    selector, (a, b, c, d), clock = make(reuse=2)
    report(selector, d, 10, 0.5, clock.now - 5)  # aged out: in the window only (threshold 10)
    report(selector, b, 1, 0.5, clock.now)
    report(selector, c, 1, 0.6, clock.now)
    report(selector, a, 1, 0.001, clock.now)
    assert selector.first() == a  # one use left; the oldest (b) leaves
    assert [entry[0] for entry in selector.pool()] == [c, a]
    assert selector.first() == a  # spent: gone
    assert [entry[0] for entry in selector.pool()] == [c]


def test_removals_alternate_oldest_and_worst_keeping_two() -> None:
    selector, backends, clock = make(count=9, reuse=10)
    *backends, spare = backends
    for _ in range(5):  # aged out: in the window only (threshold 10)
        report(selector, spare, 10, 0.5, clock.now - 5)
    for i, backend in enumerate(backends):  # oldest first, latency rising: the last is worst
        report(selector, backend, 1, 0.01 * (i + 1), clock.now + i * 0.01)
    clock.now += 0.1
    assert selector.first() == backends[0]
    left = [entry[0] for entry in selector.pool()]
    assert backends[0] not in left  # the oldest left (it was also the pick)
    assert len(left) == 7
    assert selector.first() == backends[1]
    left = [entry[0] for entry in selector.pool()]
    assert backends[7] not in left  # then the worst
    assert backends[1] in left
    assert len(left) == 6
    for _ in range(10):
        selector.first()
    assert len(selector.pool()) == 2


def test_pool_size_bound_drops_the_oldest() -> None:
    selector, backends, clock = make(count=10, pool_size=4)
    for i, backend in enumerate(backends):
        report(selector, backend, 1, 0.1, clock.now + i)
    assert [entry[0] for entry in selector.pool()] == backends[-4:]


def test_newer_report_replaces_the_backends_entry() -> None:
    selector, (a, b, *_), clock = make()
    report(selector, a, 1, 0.1, clock.now)
    report(selector, b, 1, 0.1, clock.now)
    report(selector, a, 5, 0.2, clock.now + 1)
    assert [(e[0], e[1]) for e in selector.pool()] == [(b, 1), (a, 5)]


def test_reports_without_rif_or_of_strangers_are_not_pooled() -> None:
    selector, (a, *_), clock = make()
    selector.reported(a, LoadReport(clock.now, cpu_utilization=0.5))
    selector.reported(Backend("10.9.9.9:80"), LoadReport(clock.now, rif=1))
    assert selector.pool() == []


@pytest.mark.parametrize(("rate", "requests", "expected"), [(3, 10, 30), (0.5, 10, 5)])
def test_probe_accumulator_sends_exactly_r_per_request(
    rate: float, requests: int, expected: int
) -> None:
    selector, _, _ = make(count=6, r_probe=rate)
    counts = [len(selector.probes_for_request()) for _ in range(requests)]
    assert sum(counts) == expected
    if rate == 0.5:
        assert counts == [0, 1] * 5


def test_fractional_rate_is_deterministic_over_many_requests() -> None:
    selector, _, _ = make(count=6, r_probe=0.3)
    assert sum(len(selector.probes_for_request()) for _ in range(1000)) == 300


def test_no_probes_at_rate_zero() -> None:
    selector, _, _ = make(r_probe=0)
    assert all(selector.probes_for_request() == [] for _ in range(10))


def test_probes_are_distinct_and_only_ready_ones() -> None:
    selector, (_a, _b, c, _d), _ = make(r_probe=3)
    for _ in range(20):
        picked = selector.probes_for_request(lambda backend: backend != c)
        assert len(picked) == len(set(picked)) == 3
        assert c not in picked
    assert selector.probes_for_request(lambda backend: False) == []


def test_no_probes_to_ejected_backends_through_the_balancer() -> None:
    clock = Clock()
    balancer = LoadBalancer(
        ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"],
        Prequal(r_probe=3, random=random.Random(3).random),
        health=HealthPolicy(consecutive_failures=1),
        clock=clock,
    )
    a, b, c = balancer.backends
    balancer.report(b, Outcome.CONNECTION_FAILURE)
    assert not balancer.ready(b)
    for _ in range(10):
        targets = balancer.probe_targets()
        assert sorted(targets) == [a, c]


def test_other_algorithms_probe_nothing() -> None:
    assert LoadBalancer(["10.0.0.1:80"]).probe_targets() == []


def test_fallback_order_is_pool_then_peak_ewma_cost() -> None:
    clock = Clock()
    balancer = LoadBalancer(
        [f"10.0.0.{i}:80" for i in range(1, 6)],
        Prequal(random=random.Random(5).random, reuse=10),
        clock=clock,
    )
    a, b, c, d, e = balancer.backends
    for backend, latency in ((a, 0.5), (b, 0.1), (c, 0.3), (d, 0.2), (e, 0.05)):
        balancer.observe(balancer.load(backend), latency, False)
    balancer.report_load(c, rif="1", latency_us="900")
    balancer.report_load(a, rif="1", latency_us="100")
    order = list(balancer.iter(after=a))
    assert order[:1] == [c]  # the pool's other entry
    assert order[1:] == [e, b, d]  # the rest by cost


def test_reports_reach_the_selector_through_the_balancer() -> None:
    clock = Clock()
    balancer = LoadBalancer(["10.0.0.1:80", "10.0.0.2:80"], Prequal(), clock=clock)
    a, b = balancer.backends
    balancer.report_load(a, "TEXT named_metrics.rif=3, named_metrics.latency_ms=2")
    balancer.report_load(str(b.address), rif="1", latency_us="5000")
    selector = balancer._view.selector
    assert isinstance(selector, PrequalSelector)
    assert [(e[0], e[1], e[2]) for e in selector.pool()] == [(a, 3, 0.002), (b, 1, 0.005)]


def test_pool_survives_an_update_for_backends_that_stay() -> None:
    clock = Clock()
    balancer = LoadBalancer(["10.0.0.1:80", "10.0.0.2:80"], Prequal(), clock=clock)
    a, b = balancer.backends
    balancer.report_load(a, rif="1", latency_us="5")
    balancer.report_load(b, rif="1", latency_us="5")
    balancer.update([a, "10.0.0.3:80"])
    selector = balancer._view.selector
    assert isinstance(selector, PrequalSelector)
    assert [e[0] for e in selector.pool()] == [a]


def test_options_are_checked_and_defaults_documented() -> None:
    algorithm = Prequal()
    assert (algorithm.r_probe, algorithm.pool_size, algorithm.max_age) == (3.0, 16, 1.0)
    assert (algorithm.q_rif, algorithm.reuse, algorithm.probe_path) == (0.84, 1, "/.lbclient/load")
    assert Prequal.load_reports is True
    assert default_reuse(0.5) == 4
    assert default_reuse(0) == MAX_REUSE
    for bad in (
        {"r_probe": -1},
        {"pool_size": 1},
        {"max_age": 0},
        {"q_rif": 1.5},
        {"reuse": 0},
        {"probe_path": "x"},
        {"probe_timeout": 0},
    ):
        with pytest.raises((TypeError, ValueError)):
            Prequal(**bad)  # type: ignore[arg-type]
    assert "Prequal(r_probe=3" in repr(algorithm)


def test_a_single_backend_and_none() -> None:
    selector, (only,), _ = make(count=1)
    assert selector.first() == only
    empty = Prequal().build([])
    assert empty.first() is None
    assert list(empty.iter()) == []


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(1, 6),
    events=st.lists(
        st.tuples(
            st.integers(0, 5), st.floats(0, 50), st.floats(0, 2), st.floats(0, 3), st.booleans()
        ),
        max_size=40,
    ),
)
def test_every_pick_is_a_backend_of_the_set(
    count: int, events: list[tuple[int, float, float, float, bool]]
) -> None:
    selector, backends, clock = make(count=count, reuse=2, pool_size=3)
    stranger = Backend("10.9.9.9:80")
    for index, rif, latency, step, pick in events:
        clock.now += step
        target = backends[index % count] if index < 5 else stranger
        report(selector, target, rif, latency, clock.now)
        if pick:
            assert selector.first() in backends
            assert set(selector.ranked()) == set(backends)
        assert all(b in backends for b in selector.probes_for_request())
        assert len(selector.pool()) <= 3


def test_concurrent_picks_and_reports_stay_in_the_set() -> None:
    import threading

    selector, backends, clock = make(count=5, reuse=1)
    seen: list[Backend | None] = []
    errors: list[BaseException] = []

    def work(action: Callable[[int], None]) -> None:
        try:
            for i in range(2000):
                action(i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(lambda i: seen.append(selector.first()),)),
        threading.Thread(
            target=work, args=(lambda i: report(selector, backends[i % 5], i % 7, 0.1, clock.now),)
        ),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert set(seen) <= set(backends)


def test_a_backend_answering_with_reports_is_not_probed() -> None:
    selector, (a, b, c, d), clock = make(r_probe=4, max_age=1.0, reuse=10)
    assert sorted(selector.probes_for_request()) == [a, b, c, d]
    selector.reported(a, LoadReport(clock.now, rif=1.0), probe=False)  # a response's report
    selector.reported(b, LoadReport(clock.now - 0.6, rif=1.0))  # older than half of max_age
    selector.reported(c, LoadReport(clock.now, rif=1.0), probe=True)  # a probe's: no answer
    assert sorted(selector.probes_for_request()) == [b, c, d]
    clock.now += 0.4  # a's answer is still younger than 0.5 s
    assert sorted(selector.probes_for_request()) == [b, c, d]
    clock.now += 0.2  # now it is not: probed again
    assert sorted(selector.probes_for_request()) == [a, b, c, d]
    # Reports on every response: no probe while they keep coming, though picks spend the pool.
    for backend in (a, b, c, d):
        selector.reported(backend, LoadReport(clock.now, rif=1.0))
    for _ in range(4):
        selector.first(b"")
    assert selector.probes_for_request() == []
    # A report without a RIF feeds nothing here, and spares no probe.
    clock.now += 1.0
    selector.reported(a, LoadReport(clock.now, cpu_utilization=0.5))
    assert a in selector.probes_for_request()


def test_a_pick_counts_its_request_in_the_entrys_rif() -> None:
    selector, (a, b, *_), clock = make(reuse=10, q_rif=0.5)
    for rif in (1, 1, 3, 3):  # the window: threshold 1 (the median, nearest rank)
        report(selector, b, rif, 0.5, clock.now - 5)
    report(selector, b, 1, 0.5, clock.now)
    report(selector, a, 0, 0.001, clock.now)
    assert selector.threshold() == 1
    assert selector.first() == a  # cold and fastest: its RIF becomes 1, still cold
    assert selector.first() == a  # now 2: hot
    assert selector.first() == b  # the cold one, though slower
    assert {e[0]: e[1] for e in selector.pool()}[a] == 2


def probe_free(clock: Clock, seed: int = 3) -> LoadBalancer:
    return LoadBalancer(
        [f"10.0.0.{i}:80" for i in range(1, 5)],
        Prequal(0, random=random.Random(seed).random),
        clock=clock,
    )


def test_with_no_probes_a_pick_explores_backends_outside_the_pool() -> None:
    clock = Clock()
    balancer = probe_free(clock)
    a, b, c, d = balancer.backends
    for backend in (a, b):  # a and b answer with reports and carry this client's requests
        balancer.observe(balancer.load(backend), 0.005, False)
        balancer.report_load(backend, rif="2", latency_us="5000")
        for _ in range(3):
            balancer.begin(backend)
    picks = [balancer.select() for _ in range(12)]  # fewer than the entries serve
    # c and d never reported and carry nothing: peak EWMA's cost prefers them when drawn.
    assert {c, d} <= set(picks)
    assert all(p in (a, b, c, d) for p in picks)


def test_with_no_probes_a_recent_hot_report_keeps_a_backend_out_until_it_is_old() -> None:
    clock = Clock()
    balancer = probe_free(clock)
    a, b, c, d = balancer.backends
    for backend in (a, b, c, d):
        balancer.observe(balancer.load(backend), 0.005, False)
    balancer.report_load(d, rif="40", latency_us="5000")  # hot, then no news of it
    clock.now += 1.5  # out of the pool (max_age 1), not yet forgotten
    for backend in (a, b, c):
        for _ in range(4):  # this client's requests: d, idle, costs least
            balancer.begin(backend)

    def picks(count: int) -> set[Backend]:
        seen = set()
        for _ in range(count):
            pick = balancer.select()
            seen.add(pick)
            balancer.report_load(pick, rif="1", latency_us="5000")  # its response reports
        return seen

    for backend in (a, b, c):
        balancer.report_load(backend, rif="1", latency_us="5000")
    assert d not in picks(60)
    clock.now += HOT_MEMORY * 1.0  # its report is old now: cost decides again
    assert d in picks(60)


def test_with_probes_picks_stay_in_the_pool() -> None:
    clock = Clock()
    balancer = LoadBalancer(
        [f"10.0.0.{i}:80" for i in range(1, 5)],
        Prequal(random=random.Random(3).random, reuse=16),
        clock=clock,
    )
    a, b, *_ = balancer.backends
    for backend in (a, b):
        balancer.report_load(backend, rif="2", latency_us="5000")
        for _ in range(3):
            balancer.begin(backend)
    assert {balancer.select() for _ in range(8)} <= {a, b}  # the probes explore, not the pick


def test_a_backend_its_probe_found_hot_is_not_probed_again_soon() -> None:
    selector, (a, b, c, d), clock = make(r_probe=4, max_age=1.0)
    for backend in (a, b, c):
        selector.reported(backend, LoadReport(clock.now, rif=1.0), probe=True)
    selector.reported(d, LoadReport(clock.now, rif=30.0), probe=True)  # hot: RIF above 1
    # Probes that found a backend cold spare nothing: its entry serves one pick, then goes.
    assert sorted(selector.probes_for_request()) == [a, b, c]
    clock.now += 0.4
    assert sorted(selector.probes_for_request()) == [a, b, c]
    clock.now += 0.2  # half of max_age has passed: ask again
    assert sorted(selector.probes_for_request()) == [a, b, c, d]
    selector.reported(d, LoadReport(clock.now, rif=1.0), probe=True)  # cold now
    assert sorted(selector.probes_for_request()) == [a, b, c, d]


def test_the_fallback_passes_over_a_backend_its_probe_found_hot() -> None:
    clock = Clock()
    balancer = LoadBalancer(
        ["10.0.0.1:80", "10.0.0.2:80"], Prequal(random=random.Random(2).random), clock=clock
    )
    a, b = balancer.backends
    balancer.observe(balancer.load(a), 0.001, False)  # a looks the faster to peak EWMA
    balancer.observe(balancer.load(b), 0.05, False)
    balancer.report_load(b, rif="1", latency_us="500", probe=True)  # the window: threshold 1
    balancer.report_load(a, rif="40", latency_us="500", probe=True)  # hot
    selector = balancer._view.selector
    assert isinstance(selector, PrequalSelector)
    selector._pool.clear()  # fewer than two entries: the fallback picks
    assert {balancer.select() for _ in range(20)} == {b}
    clock.now += 0.6  # half of max_age later, peak EWMA's cost decides again
    assert {balancer.select() for _ in range(20)} == {a}


def test_an_idle_backend_comes_before_faster_busy_ones() -> None:
    selector, (a, b, c, _d), clock = make(reuse=10)
    for _ in range(10):  # the window: RIFs of 3, every entry below cold
        report(selector, c, 3, 0.002, clock.now - 5)
    report(selector, a, 1, 0.002, clock.now)  # fast, busy
    report(selector, b, 0, 0.009, clock.now)  # slower once, idle now: its median is stale
    assert selector.first() == b
    assert selector.first() == a  # b's RIF counts the request just sent: not idle any more


def test_after_a_change_of_metadata_picks_return_the_new_objects() -> None:
    clock = Clock()
    zone = {"zone": "a"}
    balancer = LoadBalancer(
        [Backend(f"10.0.0.{i}:80", metadata=zone) for i in range(1, 5)],
        Prequal(random=random.Random(3).random, reuse=16),
        clock=clock,
    )
    for backend in balancer.backends:
        balancer.report_load(backend, rif="1", latency_us="500")
    assert balancer.update([Backend(f"10.0.0.{i}:80", metadata={"zone": "b"}) for i in range(1, 5)])
    picks = [balancer.select() for _ in range(6)] + list(balancer.iter())
    assert all(pick is not None and pick.metadata == {"zone": "b"} for pick in picks)
