"""Outlier detection, probes, the ejection limit, panic mode and check verdicts, with an
injected clock: every rule is exercised without sleeping."""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbclient import (
    Backend,
    Hash,
    HealthPolicy,
    LoadBalancer,
    Outcome,
    RoundRobin,
    SmoothRoundRobin,
    TcpCheck,
)
from lbclient.health import HealthState

CONN, FIVE, OK = Outcome.CONNECTION_FAILURE, Outcome.SERVER_ERROR, Outcome.SUCCESS
A, B, C, D = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    backends: list[str] | None = None, algorithm: object = RoundRobin, **policy: object
) -> tuple[LoadBalancer, FakeClock, list[tuple[str, bool]]]:
    clock = FakeClock()
    changes: list[tuple[str, bool]] = []
    lb = LoadBalancer(
        backends or [A, B, C, D],
        algorithm,  # type: ignore[arg-type]
        health=HealthPolicy(**policy),  # type: ignore[arg-type]
        clock=clock,
        on_change=lambda b, healthy: changes.append((b.address, healthy)),
    )
    return lb, clock, changes


def feed(lb: LoadBalancer, backend: str, *outcomes: Outcome | bool) -> None:
    for outcome in outcomes:
        lb.report(backend, outcome)


# -- the policy -----------------------------------------------------------------------------


def test_documented_defaults() -> None:
    p = HealthPolicy()
    assert (p.consecutive_failures, p.consecutive_5xx, p.combine_failures) == (5, 5, False)
    assert (p.base_ejection_time, p.max_ejection_time) == (30.0, 300.0)
    assert (p.max_ejection_percent, p.panic_threshold) == (10.0, 50.0)
    assert LoadBalancer([A]).policy == p


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"consecutive_failures": 0}, ValueError, "consecutive_failures must be >= 1, got 0"),
        ({"consecutive_5xx": True}, TypeError, "consecutive_5xx must be an int or None, got True"),
        ({"consecutive_5xx": 2.0}, TypeError, "2.0"),
        ({"combine_failures": 1}, TypeError, "combine_failures must be a bool, got 1"),
        ({"combine_failures": True, "consecutive_failures": None}, ValueError, "combine_failures"),
        ({"base_ejection_time": -1}, ValueError, "base_ejection_time .* got -1"),
        ({"max_ejection_time": float("inf")}, ValueError, "inf"),
        ({"max_ejection_percent": 101}, ValueError, "between 0 and 100, got 101"),
        ({"panic_threshold": "50"}, TypeError, "panic_threshold must be a number, got '50'"),
    ],
)
def test_bad_policy_settings_named(
    kwargs: dict[str, object], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        HealthPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"health": 5}, "health must be a HealthPolicy"),
        ({"health_check": "http"}, "health_check must be a TcpCheck, an HttpCheck or None"),
        ({"on_change": 3}, "on_change"),
        ({"clock": 3}, "clock"),
    ],
)
def test_bad_balancer_settings_named(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(TypeError, match=fragment):
        LoadBalancer([A], **kwargs)  # type: ignore[arg-type]


def test_bad_reports_named() -> None:
    lb = LoadBalancer([A])
    with pytest.raises(TypeError, match="outcome must be an Outcome or a bool, got 1"):
        lb.report(A, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ok must be a bool, got 'yes'"):
        lb.report_check(A, "yes")  # type: ignore[arg-type]


def test_policy_rules_are_pure() -> None:
    policy = HealthPolicy(consecutive_failures=2, base_ejection_time=3)
    start = HealthState()
    one = policy.observe(start, CONN, 0.0)
    assert one == HealthState(consecutive_failures=1)
    assert start == HealthState()
    out = policy.observe(one, CONN, 1.0)
    assert out == HealthState(ejections=1, ejected_until=4.0)
    assert not out.healthy
    assert not out.ready(3.9)
    assert out.ready(4.0)
    assert policy.observe(out, CONN, 2.0) is out  # in flight before the ejection: ignored
    assert policy.observe(out, OK, 2.0) is out
    assert policy.observe(start, OK, 0.0) is start
    claimed = policy.claim_probe(out, 4.0)
    assert claimed == HealthState(ejections=1, ejected_until=4.0, probe_until=7.0)
    assert policy.claim_probe(claimed, 5.0) is None
    assert policy.observe(claimed, OK, 5.0) == HealthState(ejections=1, restored_at=5.0)


def test_ejection_limit_and_panic_arithmetic() -> None:
    p = HealthPolicy()
    assert [p.ejection_limit(n) for n in (0, 1, 3, 10, 19, 20, 100)] == [1, 1, 1, 1, 1, 2, 10]
    assert HealthPolicy(max_ejection_percent=30).ejection_limit(10) == 3
    assert p.panics(1, 3)
    assert not p.panics(2, 3)
    assert not p.panics(2, 4)
    assert p.panics(1, 4)
    assert not p.panics(0, 0)
    assert not HealthPolicy(panic_threshold=0).panics(0, 5)
    times = [p.ejection_time(n) for n in range(1, 13)]
    assert times == [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]
    assert HealthPolicy(base_ejection_time=500).ejection_time(3) == 500


# -- passive outlier detection ---------------------------------------------------------------


def test_connection_failures_eject_at_the_threshold() -> None:
    lb, clock, changes = make()
    feed(lb, A, False, False, False, False)
    assert lb.ready(A)
    assert lb.health(A).consecutive_failures == 4
    feed(lb, A, True)  # a success ends the streak
    assert lb.health(A) == HealthState()
    feed(lb, A, *[False] * 4)
    assert lb.report(A, False) is True
    state = lb.health(A)
    assert state.ejected
    assert state.ejected_until == clock.now + 30
    assert state.ejections == 1
    assert not lb.ready(A)
    assert changes == [(A, False)]
    assert {lb.select(f"k{i}") for i in range(40)} == {Backend(B), Backend(C), Backend(D)}


def test_5xx_and_connection_failures_counted_apart() -> None:
    lb, _, changes = make()
    # A 5xx ends a connection-failure streak (the connection worked)...
    feed(lb, A, CONN, CONN, CONN, CONN, FIVE, CONN, CONN, CONN, CONN)
    assert lb.ready(A)
    assert (lb.health(A).consecutive_failures, lb.health(A).consecutive_5xx) == (4, 1)
    # ...but a connection failure leaves the 5xx streak alone.
    feed(lb, A, FIVE, FIVE, FIVE)
    assert lb.ready(A)
    assert lb.report(A, FIVE) is True
    assert changes == [(A, False)]
    # The same mix against B with one combined streak ejects at the fifth failure of any kind.
    lb2, _, _ = make(combine_failures=True)
    feed(lb2, B, CONN, FIVE, CONN, FIVE)
    assert lb2.ready(B)
    assert lb2.report(B, FIVE) is True


def test_a_detector_can_be_turned_off() -> None:
    lb, _, _ = make(consecutive_5xx=None)
    feed(lb, A, *[FIVE] * 50)
    assert lb.ready(A)
    feed(lb, A, *[CONN] * 5)
    assert not lb.ready(A)
    lb2, _, _ = make(consecutive_failures=None)
    feed(lb2, A, *[CONN] * 50)
    assert lb2.ready(A)


def test_ejection_grows_with_each_ejection_and_is_capped() -> None:
    lb, clock, changes = make(consecutive_failures=1, base_ejection_time=10, max_ejection_time=35)
    lb.report(A, False)
    durations = []
    for _ in range(5):
        state = lb.health(A)
        assert state.ejected_until is not None
        durations.append(state.ejected_until - clock.now)
        clock.now = state.ejected_until - 0.001
        assert not lb.ready(A)
        clock.now = state.ejected_until
        assert lb.ready(A)  # due for its probe
        assert lb.report(A, False) is False  # the probe fails: still unhealthy
    assert durations == [10, 20, 30, 35, 35]
    assert lb.health(A).ejections == 6
    assert changes == [(A, False)]


def test_one_probe_at_a_time_and_its_success_restores() -> None:
    lb, clock, changes = make([A, B], Hash, consecutive_failures=1)
    keys = [f"k{i}" for i in range(60)]
    assert {lb.select(k) for k in keys} == {Backend(A), Backend(B)}
    lb.report(A, False)
    clock.now += 30
    picks = [lb.select(k) for k in keys]
    assert picks.count(Backend(A)) == 1  # the probe; every other key went to B
    assert lb.snapshot().backends[0].probing
    assert not lb.ready(A)
    assert lb.report(A, True) is True
    assert lb.health(A).healthy
    assert changes == [(A, False), (A, True)]
    assert {lb.select(k) for k in keys} == {Backend(A), Backend(B)}


def test_probe_not_taken_when_accept_refuses() -> None:
    lb, clock, _ = make([A, B], consecutive_failures=1)
    lb.report(A, False)
    clock.now += 30
    offered = []
    assert lb.select_with(b"", 10, lambda b, ready: offered.append((b, ready)) and False) is None
    assert (Backend(A), True) in offered
    assert lb.admit(A)  # still free: taken now
    assert not lb.admit(A)


def test_unreported_probe_is_given_up_after_base_ejection_time() -> None:
    lb, clock, _ = make([A, B], consecutive_failures=1)
    lb.report(A, False)
    clock.now += 30
    assert lb.admit(A)
    clock.now += 29.9
    assert not lb.admit(A)
    clock.now += 0.1
    assert lb.admit(A)


def test_outcomes_during_ejection_ignored_then_first_one_decides() -> None:
    lb, clock, _ = make([A, B], consecutive_failures=1)
    lb.report(A, False)
    until = lb.health(A).ejected_until
    clock.now += 10
    assert lb.report(A, True) is False  # a request from before the ejection
    assert lb.report(A, False) is False
    assert lb.health(A).ejected_until == until
    clock.now += 20
    assert lb.report(A, True) is True  # after it, without a probe claim: decides anyway
    assert lb.health(A).healthy


def test_the_multiplier_decays_while_healthy() -> None:
    lb, clock, _ = make([A, B], consecutive_failures=1, base_ejection_time=10)
    lb.report(A, False)
    clock.now += 10
    lb.report(A, False)  # probe failed: ejection 2, 20 s
    clock.now += 20
    lb.report(A, True)
    assert lb.snapshot().backends[0].ejections == 2
    clock.now += 10
    assert lb.snapshot().backends[0].ejections == 1
    lb.report(A, False)  # one decay period later: ejection 2 again, not 3
    assert lb.health(A).ejected_until == clock.now + 20
    clock.now += 20
    lb.report(A, True)
    clock.now += 25
    lb.report(A, False)  # two periods: back to the first ejection
    assert lb.health(A).ejected_until == clock.now + 10


def test_max_ejection_percent_is_respected_but_one_always_may_go() -> None:
    lb, _, _ = make([A, B, C])
    for backend in (A, B, C):
        feed(lb, backend, *[CONN] * 5)
    snap = lb.snapshot()
    assert [b.ejected for b in snap.backends] == [True, False, False]
    assert snap.backends[1].consecutive_failures == 5  # detected, held back by the limit
    twenty = [f"10.1.0.{i}:80" for i in range(1, 21)]
    lb2, clock, _ = make(twenty, consecutive_failures=1)
    for backend in twenty:
        lb2.report(backend, False)
    assert sum(b.ejected for b in lb2.snapshot().backends) == 2
    # When an ejected one comes back, the next failure of a held-back one ejects it.
    clock.now += 30
    lb2.report(twenty[0], True)
    lb2.report(twenty[5], False)
    assert [b.backend.address for b in lb2.snapshot().backends if b.ejected] == [
        twenty[1],
        twenty[5],
    ]


def test_panic_mode_spreads_over_all_backends(caplog: pytest.LogCaptureFixture) -> None:
    lb, _, _ = make(consecutive_failures=1, max_ejection_percent=100)
    with caplog.at_level(logging.INFO, logger="lbclient"):
        lb.report(A, False)
        lb.report(B, False)
        assert not lb.panic  # 2 of 4 healthy: not below 50%
        assert {lb.select() for _ in range(8)} == {Backend(C), Backend(D)}
        lb.report(C, False)
        assert lb.panic
        assert lb.snapshot().panic
        assert "panic mode on: 1 of 4 backends healthy" in caplog.text
        assert Counter(lb.select() for _ in range(400)) == dict.fromkeys(
            map(Backend, [A, B, C, D]), 100
        )
        assert all(lb.ready(b) and lb.admit(b) for b in (A, B, C, D))
        assert lb.snapshot().ready == 4
        lb.report_check(A, True)  # a passing check brings A back (B and C stay out)
        assert not lb.panic
        assert "panic mode off: 2 of 4 backends healthy" in caplog.text
    assert {lb.select() for _ in range(8)} == {Backend(A), Backend(D)}


def test_panic_counts_enabled_backends_and_can_be_turned_off() -> None:
    lb, _, _ = make(consecutive_failures=1, max_ejection_percent=100)
    lb.set_enabled(C, False)
    lb.set_enabled(D, False)
    lb.report(A, False)
    assert not lb.panic  # 1 of 2 enabled backends is healthy
    lb.report(B, False)
    assert lb.panic
    assert {lb.select() for _ in range(8)} == {Backend(A), Backend(B)}  # never disabled ones
    lb.set_enabled(C, True)
    assert lb.panic  # 1 of 3
    lb.set_enabled(D, True)
    assert not lb.panic  # 2 of 4
    off, _, _ = make(consecutive_failures=1, max_ejection_percent=100, panic_threshold=0)
    for backend in (A, B, C, D):
        off.report(backend, False)
    assert not off.panic
    assert off.select() is None


def test_disabled_backend_stays_out_whatever_its_health() -> None:
    lb, clock, _ = make([A, B], consecutive_failures=1)
    lb.set_enabled(A, False)
    lb.report(A, True)
    clock.now += 100
    assert not lb.ready(A)
    assert not lb.admit(A)
    lb.set_enabled(A, True)
    assert lb.ready(A)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        lb.set_enabled(A, 0)  # type: ignore[arg-type]


def test_concurrent_selects_take_one_probe() -> None:
    lb, clock, _ = make([A, B], Hash, consecutive_failures=1)
    lb.report(A, False)
    clock.now += 30
    barrier = threading.Barrier(8)
    picks: list[Backend | None] = []

    def pick() -> None:
        barrier.wait()
        picks.extend(lb.select(f"k{i}") for i in range(200))

    threads = [threading.Thread(target=pick) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert picks.count(Backend(A)) == 1
    assert picks.count(Backend(B)) == 1599


def test_ejection_logged_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    lb, clock, _ = make([A, B, C], consecutive_5xx=3)
    with caplog.at_level(logging.INFO, logger="lbclient"):
        feed(lb, A, FIVE, FIVE, FIVE)
        clock.now += 30
        assert lb.admit(A)
        lb.report(A, CONN)
        clock.now += 60
        lb.report(A, OK)
    assert (
        "backend 10.0.0.1:80 ejected for 30 s after 3 server errors in a row (ejection 1)"
        in caplog.text
    )
    assert "sending a probe request" in caplog.text
    assert "ejected for 60 s after its probe request failed (ejection 2)" in caplog.text
    assert "backend 10.0.0.1:80 restored: its probe request succeeded" in caplog.text


def test_on_change_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def boom(backend: Backend, healthy: bool) -> None:
        raise RuntimeError("observer broke")

    lb = LoadBalancer([A, B], health=HealthPolicy(consecutive_failures=1), on_change=boom)
    with caplog.at_level(logging.WARNING, logger="lbclient"):
        assert lb.report(A, False) is True
    assert "observer broke" in caplog.text


def test_update_keeps_ejections_of_backends_that_stay() -> None:
    lb, _, _ = make([A, B, C], consecutive_failures=1)
    lb.report(A, False)
    assert lb.update([A, B, C, D])
    assert lb.health(A).ejected
    assert not lb.ready(A)
    assert lb.update([B, C, D])
    assert lb.update([A, B, C, D])
    assert lb.ready(A)
    assert lb.health(A) == HealthState()


# -- active check verdicts -------------------------------------------------------------------


def test_check_verdicts_follow_thresholds_and_first_verdict_fires() -> None:
    lb, _, changes = make([A, B])
    assert lb.report_check(A, True) is False  # first verdict: up; health did not change
    assert changes == [(A, True)]
    assert lb.report_check(A, True) is False
    assert changes == [(A, True)]
    assert lb.report_check(B, False) is True  # B's first verdict is down
    assert changes == [(A, True), (B, False)]
    assert not lb.ready(B)
    assert lb.report_check(B, True) is True
    assert lb.ready(B)
    s = HealthState()
    down = HealthPolicy.check(s, False, 2, 3)
    assert down == HealthState(check_streak=1)
    down = HealthPolicy.check(HealthPolicy.check(down, False, 2, 3), False, 2, 3)
    assert down.checked is False
    assert down.check_streak == 0
    up = HealthPolicy.check(down, True, 2, 3)
    assert up.checked is False
    assert up.check_streak == 1
    assert HealthPolicy.check(up, False, 2, 3).check_streak == 0  # the run was broken
    assert HealthPolicy.check(up, True, 2, 3).checked is True


def test_a_check_passes_its_thresholds_to_report_check() -> None:
    lb, _, changes = make([A, B])
    lb.report_check(A, True, successes=2, failures=3)
    assert lb.report_check(A, False, failures=3) is False  # 1 of 3
    assert lb.report_check(A, False, failures=3) is False  # 2 of 3
    assert lb.report_check(A, False, "refused", failures=3) is True  # 3 of 3: down
    assert lb.report_check(A, True, successes=2) is False  # 1 of 2
    assert lb.report_check(A, True, successes=2) is True  # 2 of 2: up
    assert changes == [(A, True), (A, False), (A, True)]
    # Without thresholds every result decides (1 and 1), whatever the balancer's settings.
    checked = LoadBalancer([A, B], health_check=TcpCheck(consecutive_failures=5))
    assert checked.report_check(B, False) is True


def test_the_discovery_reports_its_counts_for_snapshots() -> None:
    lb, _, _ = make([A, B])
    snapshot = lb.snapshot()
    assert (snapshot.discovery_refreshes, snapshot.discovery_failures) == (0, 0)
    assert (snapshot.discovery_error, snapshot.discovery_priority) == (None, None)
    lb.report_discovery(refreshes=3, failures=1, error="RuntimeError: down", priority=10)
    snapshot = lb.snapshot()
    assert (snapshot.discovery_refreshes, snapshot.discovery_failures) == (3, 1)
    assert (snapshot.discovery_error, snapshot.discovery_priority) == ("RuntimeError: down", 10)
    assert "discovery: 3 answers, 1 failed lookups, priority 10 in use" in str(snapshot)


def test_passing_check_ends_an_ejection_and_failing_one_takes_it_out() -> None:
    lb, clock, changes = make([A, B, C, D], consecutive_failures=1)
    lb.report(A, False)
    assert not lb.ready(A)
    assert lb.report_check(A, True) is True
    assert lb.ready(A)
    assert not lb.health(A).ejected
    assert changes == [(A, False), (A, True)]
    # A failing check takes a backend out for as long as it fails, not for a time.
    lb.report_check(B, False)
    clock.now += 10_000
    assert not lb.ready(B)
    assert lb.snapshot().backends[1].checked is False
    lb.report_check(B, True)
    assert lb.ready(B)


def test_snapshot_describes_every_backend() -> None:
    lb, clock, _ = make([A, B, C], consecutive_failures=2)
    lb.report(B, False)
    lb.report(C, False)
    lb.report(C, False)
    lb.set_enabled(A, False)
    clock.now += 12
    snap = lb.snapshot()
    a, b, c = snap.backends
    assert snap.at == clock.now
    assert not snap.panic
    assert snap.ready == 1
    assert (a.enabled, a.ready, a.healthy) == (False, False, True)
    assert (b.ready, b.healthy, b.consecutive_failures, b.ejected) == (True, True, 1, False)
    assert (c.ready, c.healthy, c.ejected, c.ejections) == (False, False, True, 1)
    assert c.ejected_until == clock.now + 18
    assert c.ejection_remaining == 18
    assert c.checked is None
    assert not c.probing
    text = str(snap)
    assert "panic mode: off" in text
    assert "disabled" in text
    assert "18.0 s left" in text


def test_a_disabled_ejected_backend_does_not_hold_the_ejection_place() -> None:
    lb, _, _ = make([A, B, C])
    feed(lb, A, *[CONN] * 5)
    lb.set_enabled(A, False)  # taken out by hand: it will never get its probe
    feed(lb, B, *[CONN] * 5)
    assert lb.health(B).ejected


def test_on_change_calls_arrive_in_the_order_of_the_changes() -> None:
    seen: list[tuple[str, bool]] = []
    lb: LoadBalancer

    def on_change(backend: Backend, healthy: bool) -> None:
        seen.append((backend.address, healthy))
        if backend.address == A and not healthy:
            lb.report(B, False)  # a change made by the callback itself comes after this one

    lb = LoadBalancer(
        [A, B, C, D],
        health=HealthPolicy(consecutive_failures=1, max_ejection_percent=100),
        on_change=on_change,
    )
    assert lb.report(A, False) is True
    assert seen == [(A, False), (B, False)]
    assert lb.report_check(A, True) is True
    assert seen[2:] == [(A, True)]


def test_on_change_order_holds_across_threads() -> None:
    # The thread that ejects A is held up in a log handler, after its change and before its
    # callback; meanwhile a check result brings A back. The calls still come in change order.
    seen: list[tuple[str, bool]] = []
    lb = LoadBalancer(
        [A, B, C, D],
        health=HealthPolicy(consecutive_failures=1),
        on_change=lambda b, healthy: seen.append((b.address, healthy)),
    )
    held, release = threading.Event(), threading.Event()

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "ejected" in record.getMessage():
                held.set()
                release.wait(10)

    handler = Hold(logging.WARNING)
    logger = logging.getLogger("lbclient")
    logger.addHandler(handler)
    try:
        ejecting = threading.Thread(target=lb.report, args=(A, False))
        ejecting.start()
        assert held.wait(10)
        lb.report_check(A, True)
        release.set()
        ejecting.join()
    finally:
        logger.removeHandler(handler)
    assert seen == [(A, False), (A, True)]
    assert lb.ready(A)


ops = st.lists(
    st.tuples(st.integers(0, 7), st.integers(0, 7), st.sampled_from([True, False, CONN, FIVE])),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(
    ops,
    st.sampled_from([10.0, 50.0, 100.0]),
    st.booleans(),
    st.sampled_from([RoundRobin, SmoothRoundRobin, Hash]),
)
def test_set_wide_counts_always_match_a_recount(
    steps: list[tuple[int, int, object]], percent: float, combine: bool, algorithm: type
) -> None:
    addresses = [f"10.9.0.{i}:80" for i in range(1, 9)]
    lb, clock, _ = make(
        addresses[:4],
        algorithm,
        consecutive_failures=2,
        consecutive_5xx=2,
        base_ejection_time=1,
        max_ejection_time=3,
        max_ejection_percent=percent,
        combine_failures=combine,
    )
    policy = lb.policy
    for op, index, value in steps:
        backends = lb.backends
        target = backends[index % len(backends)] if backends else None
        if op == 0 and target:
            lb.report(target, value)  # type: ignore[arg-type]
        elif op == 1 and target:
            lb.report_check(target, value is True)
        elif op == 2 and target:
            lb.set_enabled(target, value is not False)
        elif op == 3 and target:
            lb.admit(target)
        elif op == 4:
            lb.select(bytes([index]))
        elif op == 5:
            clock.now += index / 2
        elif op == 6:
            lb.update(addresses[index % 3 : index % 3 + 2 + index % 5])
        view = lb._view
        states = [view.cells[b].state for b in view.backends]
        enabled = [s for s in states if s.enabled]
        healthy = sum(s.healthy for s in enabled)
        assert view.disabled == len(states) - len(enabled)
        assert view.unhealthy == len(enabled) - healthy
        assert view.ejected == sum(s.ejected for s in enabled)
        assert view.impaired == sum(not (s.healthy and s.enabled) for s in states)
        assert view.panic == policy.panics(healthy, len(enabled))
        snap = lb.snapshot()
        assert [b.ready for b in snap.backends] == [lb.ready(b) for b in lb.backends]
        assert_roster_matches_a_recount(lb, algorithm is Hash)


@pytest.mark.parametrize("take", ["admit", "select"])
def test_a_taken_probe_moves_when_the_next_one_is_due(take: str) -> None:
    lb, clock, _ = make([A, B, C, D], consecutive_failures=1, base_ejection_time=10)
    lb.report(A, False)
    assert_roster_matches_a_recount(lb, False)
    clock.now += 10
    if take == "admit":
        assert lb.admit(A)
    else:
        assert lb.select() == Backend(A)  # a due probe goes first
    assert_roster_matches_a_recount(lb, False)
    roster = lb._view.roster
    assert roster is not None
    assert roster.due == clock.now + 10
    assert Backend(A) not in {lb.select() for _ in range(30)}  # one request only
    clock.now += 10  # the probe never reported back: another request may probe
    assert lb.select() == Backend(A)


def assert_roster_matches_a_recount(lb: LoadBalancer, keyed: bool) -> None:
    """The view's roster (what a selection that follows weights chooses among) is what the
    cells say now."""
    view = lb._view
    roster = view.roster
    if keyed:
        assert roster is None
        return
    assert roster is not None
    states = {b: view.cells[b].state for b in view.backends}
    down = {b for b, s in states.items() if not (s.healthy and s.enabled)}
    disabled = {b for b, s in states.items() if not s.enabled}
    assert roster.down == down
    assert roster.disabled == disabled
    out = disabled if view.panic else down
    assert roster.selector.backends == tuple(b for b in view.backends if b not in out)
    if not out:
        assert roster.selector is view.selector
    probes = []
    if not view.panic:
        for b in down:
            s = states[b]
            if s.enabled and s.ejected_until is not None and s.checked is not False:
                probes.append((max(s.ejected_until, s.probe_until or -math.inf), b))
    assert sorted(roster.probes, key=str) == sorted(probes, key=str)
    assert [t for t, _ in roster.probes] == sorted(t for t, _ in probes)
