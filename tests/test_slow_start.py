"""Slow start: a backend that joins, or returns from an ejection, ramps up over a window
(counted over selections, with an injected clock)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import pytest

from lbclient import (
    Backend,
    Hash,
    HealthPolicy,
    LeastRequest,
    LoadBalancer,
    PeakEWMA,
    Random,
    RoundRobin,
    SmoothRoundRobin,
)
from lbclient.selection.slow_start import SlowStart

OLD = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
NEW = "10.0.0.4:80"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_ramp() -> None:
    ramp = SlowStart(60.0)
    assert ramp.factor(0) == 0.1  # the minimum share
    assert ramp.factor(30) == pytest.approx(0.5)
    assert ramp.factor(60) == ramp.factor(600) == 1.0
    assert SlowStart(60.0, aggression=2.0).factor(15) == pytest.approx(0.5)
    assert SlowStart(60.0, min_weight_percent=0).factor(0) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"window": 0}, ValueError),
        ({"window": "1"}, TypeError),
        ({"window": 1, "aggression": 0}, ValueError),
        ({"window": 1, "min_weight_percent": 120}, ValueError),
    ],
)
def test_slow_start_validation(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        SlowStart(**kwargs)  # type: ignore[arg-type]


def shares(lb: LoadBalancer, picks: int = 20_000) -> Counter[str]:
    counted: Counter[str] = Counter()
    for _ in range(picks):
        backend = lb.select()
        assert backend is not None
        counted[backend.address] += 1
    return counted


@pytest.mark.parametrize(
    "algorithm",
    [
        RoundRobin(slow_start=60),
        Random(slow_start=60),
        SmoothRoundRobin(slow_start=60),
        LeastRequest(slow_start=60),
        PeakEWMA(slow_start=60),
    ],
)
def test_a_new_backend_ramps_up_over_the_window(algorithm: object) -> None:
    clock = Clock()
    lb = LoadBalancer(OLD, algorithm, clock=clock)  # type: ignore[arg-type]
    first = shares(lb, 4_000)
    assert len(first) == 3
    assert max(first.values()) - min(first.values()) < 4_000 * 0.1  # no ramp at the start
    lb.update([*OLD, NEW])
    clock.now += 6.0  # the first tenth of the window
    early = shares(lb)
    fair = 20_000 / 4
    assert early[NEW] <= fair / 3
    assert early[NEW] > 0  # it is not starved: the minimum share
    clock.now += 60.0
    late = shares(lb)
    assert abs(late[NEW] - fair) < fair * 0.1


def test_a_backend_back_from_an_ejection_ramps_up() -> None:
    clock = Clock()
    lb = LoadBalancer(
        [*OLD, NEW],
        RoundRobin(slow_start=SlowStart(60.0)),
        clock=clock,
        health=HealthPolicy(consecutive_failures=1, base_ejection_time=10, panic_threshold=0),
    )
    lb.report(NEW, False)
    assert not lb.ready(NEW)
    clock.now += 11.0
    assert lb.admit(NEW)  # the probe
    lb.report(NEW, True)  # restored now
    early = shares(lb)
    assert early[NEW] <= 20_000 / 4 / 3
    clock.now += 61.0
    assert abs(shares(lb)[NEW] - 5_000) < 500


def ramping(clock: Clock, draw: Callable[[], float]) -> LoadBalancer:
    """Round robin over OLD, then NEW joined a tenth of the window ago, drawing from ``draw``."""
    lb = LoadBalancer(OLD, RoundRobin(slow_start=60), clock=clock, random=draw)
    lb.update([*OLD, NEW])
    clock.now += 6.0
    return lb


def test_slow_start_draws_from_the_injected_random_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def picks(seed: int) -> list[str]:
        lb = ramping(Clock(), random.Random(seed).random)
        return [b.address for b in (lb.select() for _ in range(2_000)) if b is not None]

    # The global random source is never drawn from: the same seed, the same picks.
    def refuse() -> float:
        raise AssertionError("slow start drew from the global random source")

    monkeypatch.setattr(random, "random", refuse)
    first = picks(7)
    assert picks(7) == first
    assert picks(8) != first
    assert 0 < first.count(NEW) < 2_000 / 4 / 3


def test_slow_start_takes_the_sources_draw_as_it_is() -> None:
    # A draw below the ramp's share lets the ramping backend take its turn; one above, never.
    draws: list[float] = []

    def low() -> float:
        draws.append(0.0)
        return 0.0

    lb = ramping(Clock(), low)
    assert shares(lb, 4_000)[NEW] == 1_000  # every one of its round robin turns
    assert len(draws) == 1_000  # one draw per turn of the ramping backend, none for others
    assert shares(ramping(Clock(), lambda: 0.99), 4_000)[NEW] == 0
    with pytest.raises(TypeError, match="random must be callable"):
        LoadBalancer(OLD, random=0.5)  # type: ignore[arg-type]


def test_key_based_algorithms_take_no_slow_start() -> None:
    with pytest.raises(TypeError):
        Hash(slow_start=60)  # type: ignore[call-arg]
    lb = LoadBalancer(OLD, Hash)
    lb.update([*OLD, NEW])
    key_owner = {lb.select(f"k{i}") for i in range(200)}
    assert Backend(NEW) in key_owner  # a new backend takes its keys at once


@pytest.mark.parametrize("algorithm", [RoundRobin(slow_start=60), SmoothRoundRobin(slow_start=60)])
def test_a_ramping_backends_passed_turns_are_not_given_to_its_neighbour(algorithm: object) -> None:
    # The new backend sorts between two old ones; while it ramps, the turns it passes over are
    # drawn afresh, so the old ones share them evenly instead of the one after it taking them.
    middle = "10.0.0.2:81"
    clock = Clock()
    lb = LoadBalancer(OLD, algorithm, clock=clock, random=lambda: 0.99)  # type: ignore[arg-type]
    lb.update([*OLD, middle])
    assert lb.backends[2] == Backend(middle)
    clock.now += 1.0
    counted = shares(lb, 3_000)
    assert Backend(middle).address not in counted
    assert max(counted.values()) - min(counted.values()) <= 2, counted
