"""With backends unavailable, the available ones share the traffic by their weights: nothing
of an unavailable backend's share is handed to the backend after it in sorted order.

Through a real ``LBTransport`` and real servers on loopback, each on an address of its own
(127.0.0.1, 127.0.0.2, ...) so that the sorted order, and with it each backend's neighbour, is
the test's to choose; a dead backend is an address where nothing listens, ejected after its
first failure. Ejections run on an injected clock that never moves, so no probe comes due
while a test runs. Random draws from a seeded source: its counts are the same on every run.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import httpx
import pytest

from lbclient import (
    Backend,
    HealthPolicy,
    LBTransport,
    LoadBalancer,
    Random,
    RoundRobin,
    SmoothRoundRobin,
)
from lbclient.testing import TestServer, closed_port

pytestmark = pytest.mark.timeout(180)

#: A tolerance for the algorithms that follow weights exactly: the transient before the dead
#: backends are ejected (one failed-over request each) and nothing else.
EXACT = 0.01


class Clock:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Fleet:
    """Backends in sorted order (address 127.0.0.<i+1>), each live one a server named by its
    index, each dead one an address nothing listens on."""

    backends: tuple[Backend, ...]
    dead: frozenset[int]
    servers: dict[int, TestServer]

    def live(self) -> list[int]:
        return [i for i in range(len(self.backends)) if i not in self.dead]

    def shares(self, total: int) -> dict[str, float]:
        """Each live backend's name and its share of ``total`` requests by weight."""
        weights = {str(i): self.backends[i].weight for i in self.live()}
        whole = sum(weights.values())
        return {name: total * weight / whole for name, weight in weights.items()}


@contextlib.contextmanager
def fleet(weights: Sequence[int], dead: Sequence[int], **modes: str) -> Iterator[Fleet]:
    """Servers for ``weights`` (in sorted order) but those at the ``dead`` indexes; ``modes``
    maps an index (as text) to its server's mode."""
    with contextlib.ExitStack() as stack:
        servers: dict[int, TestServer] = {}
        backends = []
        for i, weight in enumerate(weights):
            host = f"127.0.0.{i + 1}"
            if i in dead:
                backends.append(Backend(f"{host}:{closed_port(host)}", weight))
                continue
            server = TestServer(modes.get(str(i), "ok"), name=str(i), host=host)
            servers[i] = stack.enter_context(server)
            backends.append(Backend(server.address, weight))
        assert backends == sorted(backends)
        yield Fleet(tuple(backends), frozenset(dead), servers)


def balancer(found: Fleet, algorithm: object, **policy: object) -> LoadBalancer:
    settings: dict[str, object] = {
        "consecutive_failures": 1,
        "max_ejection_percent": 50,
        **policy,
    }
    return LoadBalancer(
        found.backends,
        algorithm,  # type: ignore[arg-type]
        health=HealthPolicy(**settings),  # type: ignore[arg-type]
        clock=Clock(),
    )


def served(lb: LoadBalancer, count: int, **options: object) -> Counter[str]:
    """The name of the server that answered each of ``count`` sequential GETs."""
    names: Counter[str] = Counter()
    transport = LBTransport(lb, **options)  # type: ignore[arg-type]
    with httpx.Client(transport=transport, base_url="http://users", timeout=5.0) as client:
        for _ in range(count):
            response = client.get("/")
            assert response.status_code == 200, response.text
            names[response.json()["server"]] += 1
    return names


def tolerance(algorithm: object, total: int, share: float) -> float:
    """How far a live backend's count may be from its share: 1% of the requests for the
    exact algorithms; for Random, three standard deviations of the binomial count."""
    if isinstance(algorithm, Random):
        p = share / total
        return 3 * math.sqrt(total * p * (1 - p))
    return EXACT * total + 1


def algorithms() -> list[object]:
    return [RoundRobin(), SmoothRoundRobin(), Random(seed=7)]


def assert_shared_by_weight(found: Fleet, algorithm: object, counts: Counter[str]) -> None:
    total = sum(counts.values())
    expected = found.shares(total)
    assert set(counts) <= set(expected), counts
    for name, share in expected.items():
        assert abs(counts[name] - share) <= tolerance(algorithm, total, share), (
            f"backend {name}: {counts[name]} of {total}, its share by weight {share:.0f}; "
            f"all: {dict(sorted(counts.items()))}"
        )


@pytest.mark.parametrize("algorithm", algorithms(), ids=repr)
def test_one_of_four_dead_its_share_spread_over_the_other_three(algorithm: object) -> None:
    with fleet([1, 1, 1, 1], dead=[1]) as found:
        lb = balancer(found, algorithm)
        counts = served(lb, 600)
        assert lb.health(found.backends[1]).ejected
        # Before: 150, 300 (the dead one's neighbour), 150.
        assert_shared_by_weight(found, algorithm, counts)


@pytest.mark.parametrize("algorithm", algorithms(), ids=repr)
def test_three_of_six_down_in_a_row_the_other_three_share_evenly(algorithm: object) -> None:
    with fleet([1] * 6, dead=[1, 2, 3]) as found:
        lb = balancer(found, algorithm)
        counts = served(lb, 600, max_attempts=4)  # past three dead ones before their ejection
        assert not lb.panic  # three of six healthy: at the threshold, not below it
        assert all(lb.health(found.backends[i]).ejected for i in (1, 2, 3))
        # Before: 100, 400 (the next one after the three), 100.
        assert_shared_by_weight(found, algorithm, counts)


@pytest.mark.parametrize("algorithm", algorithms(), ids=repr)
def test_a_dead_backend_of_weight_two_its_share_goes_by_weight(algorithm: object) -> None:
    # Weights 1, 2, 3 live and a dead one of weight 2: the live ones get 1/6, 2/6, 3/6. Before,
    # Random gave the weight-1 backend about 500 of 2,400 (the dead share fell through
    # uniformly), round robin 900 (every turn of the dead one went to the next).
    with fleet([1, 2, 3, 2], dead=[3]) as found:
        lb = balancer(found, algorithm)
        counts = served(lb, 2_400)
        assert lb.health(found.backends[3]).ejected
        assert_shared_by_weight(found, algorithm, counts)


@pytest.mark.parametrize("algorithm", algorithms(), ids=repr)
def test_a_failing_backend_after_an_ejected_one_gets_its_own_share_of_first_attempts(
    algorithm: object,
) -> None:
    # Two good backends, a dead one (ejected), and after it one that answers 503 without ever
    # being ejected (5xx streaks are not counted): every GET it gets is retried elsewhere.
    # Its first attempts are its own third, not the dead one's turns as well (half, before).
    with fleet([1, 1, 1, 1], dead=[2], **{"3": "status:503"}) as found:
        lb = balancer(found, algorithm, consecutive_5xx=None)
        failing = found.servers[3]
        counts = served(lb, 600, retry_statuses={503}, budget=None)
        assert lb.health(found.backends[2]).ejected
        assert not lb.health(found.backends[3]).ejected
        assert "3" not in counts  # every GET it answered with a 503 was saved by a retry
        share = 600 / 3
        first_attempts = failing.count()
        assert abs(first_attempts - share) <= tolerance(algorithm, 600, share), first_attempts
