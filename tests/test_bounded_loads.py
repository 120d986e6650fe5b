"""Consistent hashing with bounded loads: no backend holds more than balance_factor x its share
of the requests in flight; without a factor, nginx's exact routing."""

from __future__ import annotations

import math
import random

import httpx
import pytest

from lbclient import Backend, Consistent, LBTransport, LoadBalancer
from lbclient.testing import TestServer

BACKENDS = [f"10.0.0.{i}:80" for i in range(1, 11)]


def keys(count: int, hot_share: float = 0.2, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [
        "hot" if rng.random() < hot_share else f"user-{rng.randrange(10**9)}" for _ in range(count)
    ]


def hold(lb: LoadBalancer, mix: list[str]) -> dict[Backend, int]:
    """Send every key of ``mix`` and keep them all in flight; return the loads."""
    for key in mix:
        backend = lb.select(key)
        assert backend is not None
        lb.begin(backend)
    return {b: lb.load(b).in_flight for b in lb.backends}


def test_bounded_loads_cap_the_hot_keys_backend() -> None:
    mix = keys(2_000)
    bounded = hold(LoadBalancer(BACKENDS, Consistent(balance_factor=1.25)), mix)
    mean = sum(bounded.values()) / len(bounded)
    assert max(bounded.values()) <= math.ceil(1.25 * mean)
    plain = hold(LoadBalancer(BACKENDS, Consistent), mix)
    assert max(plain.values()) > 1.25 * mean  # the hot key's backend, unbounded


def test_weights_bound_each_backend_by_its_share() -> None:
    weighted = [Backend(a, weight=1 + i % 3) for i, a in enumerate(BACKENDS)]
    lb = LoadBalancer(weighted, Consistent(balance_factor=1.5))
    loads = hold(lb, keys(3_000))
    total_weight = sum(b.weight for b in weighted)
    for backend, load in loads.items():
        assert load <= math.ceil(1.5 * 3_000 * backend.weight / total_weight)


def test_without_load_a_bounded_ring_routes_as_nginx_does() -> None:
    plain = LoadBalancer(BACKENDS, Consistent)
    bounded = LoadBalancer(BACKENDS, Consistent(balance_factor=1.25))
    for i in range(2_000):
        assert plain.select(f"k{i}") == bounded.select(f"k{i}")


def test_fallbacks_stay_the_ring_walk() -> None:
    plain = LoadBalancer(BACKENDS, Consistent)
    bounded = LoadBalancer(BACKENDS, Consistent(balance_factor=1.25))
    for i in range(200):
        assert list(plain.iter(f"k{i}")) == list(bounded.iter(f"k{i}"))


@pytest.mark.parametrize(
    ("factor", "error"),
    [
        (0.9, ValueError),
        (float("nan"), ValueError),
        ("1.2", TypeError),
        (True, TypeError),
    ],
)
def test_balance_factor_validation(factor: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        Consistent(balance_factor=factor)  # type: ignore[arg-type]


def test_bounded_loads_through_a_transport() -> None:
    with TestServer(name="a") as a, TestServer(name="b") as b:
        lb = LoadBalancer([a.address, b.address], Consistent(balance_factor=1.0))
        with httpx.Client(transport=LBTransport(lb, key=lambda r: "hot")) as client:
            owner = lb.select("hot")
            assert owner is not None
            # A streamed (unbuffered) response holds its backend: the next hot request moves on.
            with client.stream("POST", "http://users/one", content=b"x") as held:
                assert lb.load(owner).in_flight == 1
                other = client.get("http://users/two").json()["server"]
                held.read()
        assert {other} != {next(s.name for s in (a, b) if s.address == owner.address)}
