"""WeightedRoundRobin (gRPC A58, A114): the weight formula, the periods, the stride scheduler and
its shares, with plain values and an injected clock; then weights that follow capacity."""

from __future__ import annotations

import math
import pickle
import random
import threading
from collections import Counter
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbclient import Backend, HealthPolicy, LoadBalancer, WeightedRoundRobin
from lbclient._load import Load
from lbclient.reports import LoadReport
from lbclient.selection import WeightedRoundRobinSelector
from lbclient.selection.wrr import report_weight

ADDRS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"]


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def balancer(
    count: int = 3, clock: Clock | None = None, seed: int = 1, **options: object
) -> tuple[LoadBalancer, Clock]:
    clock = clock or Clock()
    algorithm = WeightedRoundRobin(random=random.Random(seed).random, **options)  # type: ignore[arg-type]
    lb = LoadBalancer(ADDRS[:count], algorithm, clock=clock, health=HealthPolicy(panic_threshold=0))
    return lb, clock


def selector(lb: LoadBalancer) -> WeightedRoundRobinSelector:
    chosen = lb._view.selector
    assert isinstance(chosen, WeightedRoundRobinSelector)
    return chosen


def report(lb: LoadBalancer, rates: list[float], utilization: float = 0.5) -> None:
    for backend, rate in zip(lb.backends, rates, strict=False):
        lb.report_load(backend, f"TEXT cpu_utilization={utilization}, rps_fractional={rate}")


def shares(lb: LoadBalancer, picks: int) -> dict[Backend, float]:
    counts = Counter(lb.select() for _ in range(picks))
    return {b: counts[b] / picks for b in lb.backends}


# -- the formula --------------------------------------------------------------------------------


def test_weight_is_qps_over_utilization_plus_the_error_penalty() -> None:
    assert report_weight(LoadReport(0.0, cpu_utilization=0.5, rps_fractional=100)) == 200.0
    # eps / qps * penalty is added to the utilization: 100 / (0.5 + 10/100 * 1.0)
    with_errors = LoadReport(0.0, cpu_utilization=0.5, rps_fractional=100, eps=10)
    assert report_weight(with_errors) == pytest.approx(100 / 0.6)
    assert report_weight(with_errors, (), 2.0) == pytest.approx(100 / 0.7)
    assert report_weight(with_errors, (), 0.0) == 200.0
    assert WeightedRoundRobin(error_utilization_penalty=3.0).weight(with_errors) == pytest.approx(
        100 / 0.8
    )


def test_application_utilization_comes_before_cpu() -> None:
    both = LoadReport(0.0, cpu_utilization=0.5, application_utilization=0.25, rps_fractional=100)
    assert report_weight(both) == 400.0
    zero_app = LoadReport(0.0, cpu_utilization=0.5, application_utilization=0.0, rps_fractional=10)
    assert report_weight(zero_app) == 20.0


def test_metric_names_take_the_largest_and_ignore_nan_and_zero() -> None:
    named = MappingProxyType({"kv": 0.2, "queue": 0.4, "bad": math.nan, "off": 0.0})
    base = LoadReport(
        0.0, cpu_utilization=0.9, application_utilization=0.8, rps_fractional=100,
        named_metrics=named,
    )  # fmt: skip
    names = ("named_metrics.kv", "named_metrics.queue", "named_metrics.bad")
    assert report_weight(base, names) == 250.0  # 100 / max(0.2, 0.4)
    assert report_weight(base, ("named_metrics.bad", "named_metrics.off")) == 125.0  # app
    assert report_weight(base, ("named_metrics.missing",)) == 125.0
    assert report_weight(base, ("mem_utilization",)) == 125.0  # not reported
    vllm = WeightedRoundRobin(metric_names=["named_metrics.kv_cache_usage_perc"])
    parsed = LoadBalancer(["10.0.0.1:80"]).report_load(
        "10.0.0.1:80",
        "TEXT cpu_utilization=0.1, rps_fractional=8, named_metrics.kv_cache_usage_perc=0.5",
    )
    assert parsed is not None
    assert vllm.weight(parsed) == 16.0


@pytest.mark.parametrize(
    "fields",
    [
        {"cpu_utilization": 0.5},  # no qps
        {"rps_fractional": 100.0},  # no utilization
        {"rps_fractional": 0.0, "cpu_utilization": 0.5},
        {"rps_fractional": 100.0, "cpu_utilization": 0.0},
        {"rps_fractional": math.nan, "cpu_utilization": 0.5},
        {"rps_fractional": 100.0, "cpu_utilization": math.nan},
        {"rps_fractional": -5.0, "cpu_utilization": 0.5},
    ],
)
def test_a_report_without_qps_or_utilization_gives_no_weight(fields: dict[str, float]) -> None:
    assert report_weight(LoadReport(0.0, **fields)) == 0.0  # type: ignore[arg-type]


def test_options_are_checked_naming_the_bad_value() -> None:
    for name in ("blackout_period", "weight_expiration_period", "weight_update_period"):
        for bad in (-1.0, math.nan, math.inf):
            with pytest.raises(ValueError, match=name):
                WeightedRoundRobin(**{name: bad})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=name):
            WeightedRoundRobin(**{name: True})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight_expiration_period"):
        WeightedRoundRobin(weight_expiration_period=0)
    with pytest.raises(ValueError, match="error_utilization_penalty"):
        WeightedRoundRobin(error_utilization_penalty=-0.5)
    with pytest.raises(TypeError, match="metric_names"):
        WeightedRoundRobin(metric_names="named_metrics.kv")
    with pytest.raises(ValueError, match="kv_cache"):
        WeightedRoundRobin(metric_names=["kv_cache"])
    with pytest.raises(TypeError, match="random"):
        WeightedRoundRobin(random=7)  # type: ignore[arg-type]
    # Below A58's minimum the update period is raised to it.
    assert WeightedRoundRobin(weight_update_period=0.01).weight_update_period == 0.1
    assert WeightedRoundRobin.load_reports is True


# -- the periods --------------------------------------------------------------------------------


def test_blackout_then_weights_then_update_period_then_expiry() -> None:
    lb, clock = balancer()
    report(lb, [100, 300, 600])
    clock.now = 9.5
    assert selector(lb).round_robin  # in blackout: plain round robin
    assert set(selector(lb).reported_weights().values()) == {0.0}
    clock.now = 10.2  # blackout over, but the schedule of 9.5 stands until 10.5
    assert selector(lb).round_robin
    clock.now = 10.5
    weights = [200.0, 600.0, 1200.0]
    assert list(selector(lb).reported_weights().values()) == weights
    assert not selector(lb).round_robin
    clock.now = 10.7
    report(lb, [300, 300, 300])
    clock.now = 11.4
    assert list(selector(lb).weights().values()) == weights
    clock.now = 11.5  # one update period on: the new reports count
    assert selector(lb).round_robin
    assert set(selector(lb).weights().values()) == {600.0}
    clock.now = 10.7 + 180.0  # no report for the expiration period: every weight lapses
    assert set(selector(lb).reported_weights().values()) == {0.0}
    report(lb, [100, 300, 600])  # reports again: a new blackout
    clock.now += 9.0
    assert selector(lb).round_robin
    clock.now += 1.0
    assert list(selector(lb).reported_weights().values()) == weights


def test_a_report_without_weight_keeps_the_weight_until_it_expires() -> None:
    lb, clock = balancer()
    report(lb, [100, 300, 600])
    clock.now = 10.0
    assert list(selector(lb).reported_weights().values()) == [200.0, 600.0, 1200.0]
    lb.report_load(lb.backends[0], "TEXT cpu_utilization=0.5, rps_fractional=0")
    clock.now = 20.0
    assert list(selector(lb).reported_weights().values()) == [200.0, 600.0, 1200.0]
    clock.now = 180.0
    assert selector(lb).round_robin


def test_backends_without_weight_get_the_mean() -> None:
    lb, clock = balancer()
    report(lb, [100, 300])  # the third never reports
    clock.now = 10.0
    assert list(selector(lb).weights().values()) == [200.0, 600.0, 400.0]
    got = shares(lb, 12_000)
    for backend, want in zip(lb.backends, [1 / 6, 1 / 2, 1 / 3], strict=True):
        assert abs(got[backend] - want) < 0.01


def test_fewer_than_two_weights_is_plain_round_robin() -> None:
    lb, clock = balancer()
    report(lb, [100])
    clock.now = 10.0
    assert list(selector(lb).reported_weights().values()) == [200.0, 0.0, 0.0]
    assert selector(lb).round_robin
    counts = Counter(lb.select() for _ in range(300))
    assert counts == dict.fromkeys(lb.backends, 100)


# -- the scheduler ------------------------------------------------------------------------------


@pytest.mark.parametrize("rates", [[1, 3, 6], [1, 2, 3, 7], [5, 5, 1, 50], [100, 101, 1, 1]])
def test_shares_within_one_percent_of_the_weights(rates: list[float]) -> None:
    lb, clock = balancer(len(rates))
    report(lb, rates)
    clock.now = 10.0
    weights = selector(lb).weights()
    total = sum(weights.values())
    got = shares(lb, 10_000)
    assert selector(lb).weights() == weights
    for backend in lb.backends:
        assert abs(got[backend] - weights[backend] / total) <= 0.01, (rates, got)


def test_weights_above_ten_times_the_mean_are_capped_as_grpc_does() -> None:
    lb, clock = balancer(4)
    report(lb, [1, 1, 1, 1000])
    clock.now = 10.0
    got = shares(lb, 10_000)
    # The mean is 250.75: 1000 stays; 1 is raised to 1% of the mean, about 2.5.
    assert 0.97 < got[lb.backends[3]] < 0.995


def test_random_start_differs_between_sources_and_repeats_with_the_same() -> None:
    def first_picks(seed: int) -> list[Backend | None]:
        lb, clock = balancer(4, seed=seed)
        report(lb, [1, 2, 3, 4])
        clock.now = 10.0
        return [lb.select() for _ in range(20)]

    runs = {seed: first_picks(seed) for seed in range(6)}
    assert first_picks(3) == runs[3]
    assert len({tuple(run) for run in runs.values()}) > 1
    assert len({run[0] for run in runs.values()}) > 1  # they start at different backends


def test_fallbacks_are_the_others_by_weight() -> None:
    lb, clock = balancer(4)
    a, b, c, d = lb.backends
    assert list(selector(lb).iter_after(b"", b)) == [c, d, a]  # round robin: on from b
    report(lb, [2, 1, 4, 3])
    clock.now = 10.0
    assert list(selector(lb).iter_after(b"", c)) == [d, a, b]
    walk = list(selector(lb).iter(b"k"))
    assert sorted(walk) == sorted(lb.backends)
    assert list(lb.iter(after=c)) == [d, a, b]


def test_backends_down_the_others_share_by_weight() -> None:
    lb, clock = balancer(4)
    report(lb, [1, 2, 3, 4])
    clock.now = 10.0
    lb.set_enabled(lb.backends[3], False)
    got = shares(lb, 12_000)
    assert got[lb.backends[3]] == 0.0
    for backend, want in zip(lb.backends, [1 / 6, 2 / 6, 3 / 6], strict=False):
        assert abs(got[backend] - want) < 0.01


def test_picks_under_threads_stay_in_the_set() -> None:
    lb, clock = balancer(4, weight_update_period=0.1)
    seen: list[Backend | None] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for i in range(2000):
                seen.append(lb.select())
                if i % 50 == 0:
                    report(lb, [random.randint(1, 100) for _ in range(4)])
                    clock.now += 0.5
        except BaseException as exc:  # pragma: no cover - shown by the assert
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert set(seen) <= set(lb.backends)


def test_a_balancer_with_it_pickles_and_updates_carry_the_weights() -> None:
    lb, clock = balancer(3)
    copy = pickle.loads(pickle.dumps(lb))
    assert isinstance(copy.algorithm, WeightedRoundRobin)
    report(lb, [100, 300, 600])
    clock.now = 10.0
    before = selector(lb).reported_weights()
    lb.update([*ADDRS[:3], ADDRS[3]])
    after = selector(lb).reported_weights()
    assert {b: after[b] for b in before} == before
    assert after[Backend(ADDRS[3])] == 0.0


# -- properties ---------------------------------------------------------------------------------

numbers = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1e9))
reports_st = st.builds(
    LoadReport,
    at=st.floats(0, 1000),
    cpu_utilization=numbers,
    application_utilization=numbers,
    rps_fractional=numbers,
    eps=numbers,
    named_metrics=st.dictionaries(st.sampled_from(["kv", "q"]), st.floats(allow_nan=True)),
)


@settings(max_examples=150, deadline=None)
@given(
    reports=st.lists(st.one_of(st.none(), reports_st), min_size=1, max_size=6),
    now=st.floats(0, 2000),
    failures=st.lists(st.integers(0, 3), min_size=6, max_size=6),
)
def test_weights_never_negative_or_nan_and_picks_stay_in_the_set(
    reports: list[LoadReport | None], now: float, failures: list[int]
) -> None:
    algorithm = WeightedRoundRobin(
        metric_names=("named_metrics.kv", "named_metrics.q"), random=random.Random(0).random
    )
    chosen = algorithm.build([f"10.1.0.{i + 1}:80" for i in range(len(reports))])
    loads = {b: Load() for b in chosen.backends}
    for backend, sent, failed in zip(chosen.backends, reports, failures, strict=False):
        loads[backend].report = sent
        for _ in range(failed):
            loads[backend].observe(0.0, None, True, 10.0)
    chosen.attach(loads, lambda: now)
    assert report_weight(reports[0]) >= 0.0 if reports[0] else True
    for weights in (chosen.weights(), chosen.reported_weights()):
        assert all(w >= 0.0 and math.isfinite(w) for w in weights.values())
    for _ in range(30):
        assert chosen.first(b"") in chosen.backends
    assert sorted(chosen.iter(b"")) == sorted(chosen.backends)


@settings(max_examples=50, deadline=None)
@given(
    fields=st.dictionaries(
        st.sampled_from(["cpu_utilization", "application_utilization", "rps_fractional", "eps"]),
        st.floats(allow_nan=True, allow_infinity=True),
    ),
    penalty=st.floats(0, 1e6),
)
def test_report_weight_is_never_negative_nan_or_infinite(
    fields: dict[str, float], penalty: float
) -> None:
    weight = report_weight(LoadReport(0.0, **fields), (), penalty)  # type: ignore[arg-type]
    assert weight >= 0.0
    assert math.isfinite(weight)


# -- weights that follow capacity ---------------------------------------------------------------


def test_weights_follow_capacity_within_fifteen_simulated_seconds() -> None:
    capacities = [100.0, 300.0, 600.0]  # 1:3:6
    lb, clock = balancer(3)
    picks_per_second = 1000
    history: list[dict[Backend, float]] = []
    for second in range(15):
        clock.now = float(second)
        counts = Counter(lb.select() for _ in range(picks_per_second))
        history.append({b: counts[b] / picks_per_second for b in lb.backends})
        for backend, capacity in zip(lb.backends, capacities, strict=True):
            rps = float(counts[backend])
            lb.report_load(backend, f"TEXT rps_fractional={rps}, cpu_utilization={rps / capacity}")
    # Round robin through the blackout (10 s from the first reports), then by capacity.
    assert all(abs(s - 1 / 3) < 0.01 for s in history[9].values())
    for second in range(10, 15):
        for backend, want in zip(lb.backends, [0.1, 0.3, 0.6], strict=True):
            assert abs(history[second][backend] - want) < 0.05, (second, history[second])


def test_a_backend_that_fails_fast_gets_less() -> None:
    lb, clock = balancer(3)
    report(lb, [300, 300, 300])  # it reports as fast as the others
    clock.now = 10.0
    failing = lb.backends[0]
    load = lb.load(failing)
    for _ in range(3):
        lb.observe(load, None, True)  # three failures: the weight divided by 4
    clock.now = 11.0
    got = shares(lb, 9000)
    assert abs(got[failing] - 1 / 9) < 0.01
    clock.now = 200.0  # no reports for long: round robin, and the penalty has decayed
    assert abs(shares(lb, 900)[failing] - 1 / 3) < 0.01


def test_failures_count_without_reports_too() -> None:
    lb, clock = balancer(2)
    lb.observe(lb.load(lb.backends[1]), None, True)
    clock.now = 1.0
    assert not selector(lb).round_robin
    got = shares(lb, 3000)
    assert got[lb.backends[1]] < got[lb.backends[0]]


def test_built_without_a_balancer_it_is_round_robin() -> None:
    built = WeightedRoundRobin.build(ADDRS)
    counts = Counter(built.first(b"") for _ in range(400))
    assert counts == {Backend(a): 100 for a in ADDRS}
    assert WeightedRoundRobin.build([]).first(b"") is None
    assert list(WeightedRoundRobin.build([]).iter(b"")) == []
    with pytest.raises(TypeError):
        built.first(7)  # type: ignore[arg-type]


def test_the_simulator_feeds_reports_and_the_weights_follow_them() -> None:
    from lbclient.cli.simulate import backends_for, simulate_load

    # 20,000 requests, about half a simulated second: reports every 50 ms, weights every 0.1 s.
    backends = backends_for([1, 1, 1, 1])
    slow = simulate_load("wrr", backends, "slow")
    assert slow.shares[0].share < 0.10  # the 10x slower backend: far below its 25%
    failing = simulate_load("wrr", backends, "failing")
    assert failing.failures / failing.requests < 0.05  # round robin: 12.5%
