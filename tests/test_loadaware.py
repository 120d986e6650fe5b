"""LeastRequest and PeakEWMA: the rules with plain values and an injected clock, then through
the balancer and a real transport."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from unittest.mock import patch

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbclient import Backend, HealthPolicy, LBTransport, LeastRequest, LoadBalancer, PeakEWMA
from lbclient._load import Load
from lbclient.selection.loadaware import LoadAwareSelector
from lbclient.testing import Exchange, TestServer

ADDRS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def selector(
    algorithm: object, addresses: Sequence[str | Backend] = ADDRS, clock: Clock | None = None
) -> tuple[LoadAwareSelector, dict[Backend, Load]]:
    built = algorithm.build(addresses)  # type: ignore[attr-defined]
    loads = {b: Load() for b in built.backends}
    built.attach(loads, clock or Clock())
    return built, loads


def test_least_request_never_picks_the_busier_of_two() -> None:
    sel, loads = selector(LeastRequest())
    busy = sel.backends[0]
    for _ in range(5):
        loads[busy].begin()
    picks = Counter(sel.first(b"") for _ in range(3_000))
    assert picks[busy] == 0  # two distinct choices: the busy one always loses
    assert set(picks) == set(sel.backends[1:])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=20), min_size=2, max_size=8), st.data())
def test_p2c_never_picks_the_worse_of_its_two_choices(
    in_flight: list[int], data: st.DataObject
) -> None:
    addresses = [f"10.0.0.{i + 1}:80" for i in range(len(in_flight))]
    sel, loads = selector(LeastRequest(), addresses)
    for backend, count in zip(sel.backends, in_flight, strict=True):
        for _ in range(count):
            loads[backend].begin()
    pair = data.draw(
        st.lists(st.integers(0, len(addresses) - 1), min_size=2, max_size=2, unique=True)
    )
    with patch.object(type(sel), "_sample", lambda self, count: pair):
        picked = sel.first(b"")
    assert picked in sel.backends  # every pick is a backend of the set
    a, b = (sel.backends[i] for i in pair)
    assert loads[picked].in_flight == min(loads[a].in_flight, loads[b].in_flight)


def test_least_request_with_weights_compares_weight_over_load() -> None:
    heavy, light = Backend("10.0.0.1:80", weight=4), Backend("10.0.0.2:80", weight=1)
    sel, loads = selector(LeastRequest(), [heavy, light])
    assert sel.first(b"") == heavy  # 4 / 1 beats 1 / 1
    for _ in range(4):
        loads[heavy].begin()
    assert sel.first(b"") == light  # 4 / 5 loses to 1 / 1
    for _ in range(1):
        loads[light].begin()
    assert sel.first(b"") == heavy  # 4 / 5 beats 1 / 2


def test_peak_ewma_prefers_the_fast_backend_and_tries_an_unmeasured_one() -> None:
    clock = Clock()
    sel, loads = selector(PeakEWMA(), ADDRS[:2], clock)
    slow, fast = sel.backends
    loads[slow].observe(clock.now, 0.5, False, 10.0)
    loads[fast].observe(clock.now, 0.01, False, 10.0)
    assert all(sel.first(b"") == fast for _ in range(50))
    for _ in range(60):  # 0.01 x 61 > 0.5 x 1: the fast one is now the costlier
        loads[fast].begin()
    assert sel.first(b"") == slow
    fresh, fresh_loads = selector(PeakEWMA(), ADDRS[:2], clock)
    measured, new = fresh.backends
    fresh_loads[measured].observe(clock.now, 0.01, False, 10.0)
    assert fresh.first(b"") == new  # never measured, idle: tried
    fresh_loads[new].begin()
    assert fresh.first(b"") == measured  # busy and still unmeasured: does not take it all


def test_a_backend_that_fails_fast_does_not_look_fast() -> None:
    clock = Clock()
    for algorithm in (PeakEWMA(), LeastRequest()):
        sel, loads = selector(algorithm, ADDRS[:2], clock)
        failing, healthy = sel.backends
        loads[healthy].observe(clock.now, 0.010, False, 10.0)
        loads[failing].observe(clock.now, 0.0001, True, 10.0)  # a quick 503
        assert sel.first(b"") == healthy, algorithm
        # The penalty decays: after a minute the failing backend is tried again.
        clock.now += 60
        loads[healthy].observe(clock.now, 0.010, False, 10.0)
        loads[healthy].begin()
        loads[healthy].begin()
        assert sel.first(b"") == failing, algorithm
        clock.now -= 60


def test_retry_after_holds_the_penalty() -> None:
    clock = Clock()
    sel, loads = selector(PeakEWMA(), ADDRS[:2], clock)
    limited, other = sel.backends
    loads[other].observe(clock.now, 0.05, False, 10.0)
    loads[limited].observe(clock.now, 0.001, True, 10.0, hold=120.0)  # 429, Retry-After: 120
    clock.now += 100
    loads[other].observe(clock.now, 0.05, False, 10.0)
    assert sel.first(b"") == other


def test_fallback_order_is_every_other_backend_best_first() -> None:
    lb = LoadBalancer(ADDRS, LeastRequest)
    first = lb.select()
    assert first is not None
    for backend in lb.backends:
        if backend != first:
            lb.load(backend).begin()
    busiest = next(b for b in lb.backends if b != first)
    lb.load(busiest).begin()
    order = list(lb.iter(after=first))
    assert first not in order
    assert len(order) == len(set(order)) == 2
    assert order[-1] == busiest


def test_load_aware_algorithms_ignore_the_key_and_respect_health() -> None:
    lb = LoadBalancer(
        ADDRS, PeakEWMA(decay=5.0), health=HealthPolicy(consecutive_failures=1, panic_threshold=0)
    )
    lb.report(ADDRS[0], False)
    picks = {lb.select(key) for key in (b"a", b"b", b"c") for _ in range(30)}
    assert Backend(ADDRS[0]) not in picks
    assert picks <= set(lb.backends)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"choices": 1}, ValueError),
        ({"choices": 2.0}, TypeError),
        ({"bias": -1}, ValueError),
        ({"decay": 0}, ValueError),
    ],
)
def test_least_request_validation(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        LeastRequest(**kwargs)  # type: ignore[arg-type]


def test_peak_ewma_validation() -> None:
    with pytest.raises(ValueError, match="decay"):
        PeakEWMA(decay=-1)
    with pytest.raises(TypeError, match="penalty"):
        PeakEWMA(penalty="1")  # type: ignore[arg-type]


def test_peak_ewma_moves_traffic_off_a_slow_backend() -> None:
    def slow(exchange: Exchange) -> bool:
        exchange.sleep(0.05)
        return exchange.respond()

    with (
        TestServer("slow", name="slow", behaviours={"slow": slow}) as slow_server,
        TestServer(name="fast-1") as fast_1,
        TestServer(name="fast-2") as fast_2,
    ):
        lb = LoadBalancer([slow_server.address, fast_1.address, fast_2.address], PeakEWMA)
        with httpx.Client(transport=LBTransport(lb)) as client:
            served = Counter(client.get("http://users/").json()["server"] for _ in range(150))
        # Round robin would give the slow one 50; peak EWMA measures it once or twice and
        # then sends it little.
        assert served["slow"] < 25
        entry = next(b for b in lb.snapshot().backends if b.backend.address == slow_server.address)
        assert entry.latency is not None
        assert entry.latency >= 0.04


@pytest.mark.parametrize(
    ("make", "addresses"),
    [
        (lambda draw: LeastRequest(random=draw), ADDRS),
        (lambda draw: PeakEWMA(random=draw), ADDRS),
        (lambda draw: LeastRequest(3, random=draw), [f"10.0.1.{i}:80" for i in range(9)]),
        (
            lambda draw: LeastRequest(random=draw),
            [Backend("10.0.2.1:80", 1), Backend("10.0.2.2:80", 5), Backend("10.0.2.3:80", 2)],
        ),
    ],
    ids=["least request", "peak ewma", "three choices", "weighted"],
)
def test_picks_drawn_from_an_injected_source_repeat(make: object, addresses: list[object]) -> None:
    # Two balancers, each with a source seeded alike, drawn in turn: the same picks, whatever
    # else draws from the random module in between.
    import random

    def picks(balancer: LoadBalancer, n: int) -> list[str]:
        out = []
        for i in range(n):
            backend = balancer.select()
            assert backend is not None
            load = balancer.begin(backend)
            assert load is not None
            if i % 3:
                load.end()
            out.append(str(backend.address))
        return out

    one = LoadBalancer(addresses, make(random.Random(3).random), clock=Clock())  # type: ignore[operator, arg-type]
    two = LoadBalancer(addresses, make(random.Random(3).random), clock=Clock())  # type: ignore[operator, arg-type]
    first, second = [], []
    for _ in range(50):
        first += picks(one, 4)
        random.random()  # the module's source moves on between them
        second += picks(two, 4)
    assert first == second
    assert len(set(first)) > 1


def test_the_random_source_must_be_callable() -> None:
    with pytest.raises(TypeError, match="random must be callable"):
        LeastRequest(random=0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="random must be callable"):
        PeakEWMA(random="seeded")  # type: ignore[arg-type]
