"""A refresh costs what changed: a change of a few backends in a large set reads the health of
those backends alone and compares no backend of the set one by one; the counts and the index by
address it carries over equal fresh ones; and Maglev's fill, whose table depends on the whole
set, makes exactly the table of the documented walk, however its phases are split."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from lbclient import (
    Backend,
    Consistent,
    HealthPolicy,
    LoadBalancer,
    RoundRobin,
)
from lbclient._book import Cell, Tally
from lbclient.health import HealthState
from lbclient.selection import Maglev, MaglevSelector
from lbclient.selection.maglev import _fill, permutation_start

#: Health states of every kind the counts tell apart.
STATES = [
    HealthState(),
    HealthState(enabled=False),
    HealthState(ejected_until=50.0, ejections=1),
    HealthState(enabled=False, ejected_until=50.0, ejections=1),
    HealthState(checked=False),
    HealthState(enabled=False, checked=False),
    HealthState(checked=True),
    HealthState(consecutive_failures=2),
]


def counts(tally: Tally) -> tuple[int, int, int, int, bool]:
    return tally.disabled, tally.unhealthy, tally.ejected, tally.impaired, tally.panic


def addresses(count: int, start: int = 0) -> list[str]:
    return [
        f"10.{i >> 8 & 255}.{i & 255}.{i >> 16 & 255 or 1}:8080"
        for i in range(start, start + count)
    ]


@pytest.mark.parametrize("seed", range(5))
def test_tally_from_the_previous_one_equals_a_recount(seed: int) -> None:
    rng = random.Random(seed)
    policy = HealthPolicy(panic_threshold=rng.choice([0, 30, 50, 90]))
    spare = iter(Backend(a) for a in addresses(10_000))
    cells = {next(spare): Cell(rng.choice(STATES)) for _ in range(200)}
    tally = Tally(cells, policy)
    for _ in range(30):
        cells = dict(cells)
        removed = rng.sample(list(cells), rng.randint(0, 6))
        left = [cells.pop(b) for b in removed]
        joined = []
        again = list(left)
        for _ in range(rng.randint(0, 6)):
            # Some cells join again with an equal backend made afresh: in both lists.
            cell = again.pop() if again and rng.random() < 0.3 else Cell(rng.choice(STATES))
            cells[next(spare)] = cell
            joined.append(cell)
        tally = Tally(cells, policy, tally, left, joined)
        assert counts(tally) == counts(Tally(cells, policy))
        for cell in rng.sample(list(cells.values()), 5):  # changes between refreshes
            tally.store(cell, rng.choice(STATES), policy)


def test_balancer_view_after_updates_equals_a_fresh_one() -> None:
    rng = random.Random(3)
    everyone = [Backend(a) for a in addresses(400)]
    lb = LoadBalancer(
        everyone[:300], Consistent, health=HealthPolicy(consecutive_failures=1, panic_threshold=0)
    )
    for _ in range(25):
        for b in rng.sample(lb.backends, 3):
            lb.report(b, False)
        lb.set_enabled(rng.choice(lb.backends), rng.random() < 0.5)
        wanted: list[Backend | str] = list(lb.backends)
        for b in rng.sample(wanted, rng.randint(1, 4)):
            wanted.remove(b)
        taken = {b.address for b in lb.backends}
        wanted += rng.sample([b for b in everyone if b.address not in taken], rng.randint(0, 4))
        if rng.random() < 0.4:  # an equal backend with other metadata: leaves and joins
            i = rng.randrange(len(wanted))
            b = wanted[i]
            assert isinstance(b, Backend)
            wanted[i] = Backend(b.address, b.weight, {"zone": rng.choice("abc")})
        rng.shuffle(wanted)
        lb.update(wanted)
        view = lb._view
        fresh = type(view)(view.backends, view.selector, view.cells, view.loads, lb.policy)
        assert counts(view) == counts(fresh)
        assert view.by_address == {b.address: b for b in view.backends}
        assert all(view.by_address[b.address] is b for b in view.backends)


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[int]:
    """Count the calls of ``owner.name`` (a method or a property) from now on."""
    calls = [0]
    real = owner.__dict__[name]
    if isinstance(real, property):
        getter = real.fget
        assert getter is not None

        def counted_get(self: Any) -> Any:
            calls[0] += 1
            return getter(self)

        monkeypatch.setattr(owner, name, property(counted_get))
    else:

        def counted(self: Any, *args: Any) -> Any:
            calls[0] += 1
            return real(self, *args)

        monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("algorithm", [RoundRobin, Consistent])
def test_one_change_reads_the_moved_backends_alone(
    monkeypatch: pytest.MonkeyPatch, algorithm: type
) -> None:
    everyone = [Backend(a) for a in addresses(2_001)]
    lb = LoadBalancer(
        everyone[:2_000], algorithm, health=HealthPolicy(consecutive_failures=1, panic_threshold=0)
    )
    for b in everyone[:2_000:97]:
        lb.report(b, False)  # some counts to carry over
    second = everyone[:1_000] + everyone[1_001:]
    healthy = _count_calls(monkeypatch, HealthState, "healthy")
    equal = _count_calls(monkeypatch, Backend, "__eq__")
    hashed = _count_calls(monkeypatch, Backend, "__hash__")
    for target in (second, everyone[:2_000]):
        before = (healthy[0], equal[0], hashed[0])
        assert lb.update(list(target))
        # A recount would read 2,000 states; comparing or rehashing the set, 2,000 backends.
        assert healthy[0] - before[0] <= 4
        assert equal[0] - before[1] <= 4
        assert hashed[0] - before[2] <= 16
    assert counts(lb._view) == counts(Tally(lb._view.cells, lb.policy))


# -- Maglev: the fill in phases is the walk -------------------------------------------------------


def walked(backends: Sequence[Backend], size: int) -> list[int]:
    """The table as owners' indexes, by the documented walk alone: the backends take turns in
    sorted order (weights divided by their gcd, that many turns in a row), each turn claiming the
    next free slot of its permutation, until every slot is claimed."""
    backends = sorted(backends)
    divisor = math.gcd(*(b.weight for b in backends))
    turns = [i for i, b in enumerate(backends) for _ in range(b.weight // divisor)]
    starts = [permutation_start(b.address, size) for b in backends]
    place = [offset for offset, _ in starts]
    owners = [-1] * size
    left = size
    while left:
        for i in turns:
            skip = starts[i][1]
            while owners[place[i]] >= 0:
                place[i] = (place[i] + skip) % size
            owners[place[i]] = i
            place[i] = (place[i] + skip) % size
            left -= 1
            if not left:
                break
    return owners


def fleet(rng: random.Random, count: int, weights: Callable[[], int]) -> list[Backend]:
    return sorted(Backend(a, weights()) for a in rng.sample(addresses(20_000), count))


CASES = [
    # (table size, backends, weights): small tables reach every phase with few turns.
    (2, 1, (1,)),
    (13, 5, (1,)),
    (101, 7, (1, 2, 3)),
    (1_009, 40, (1,)),
    (1_009, 30, (2, 4, 6)),
    (10_007, 300, (1, 1, 2, 5)),
]


@pytest.mark.parametrize(("size", "count", "weights"), CASES)
def test_maglev_fill_in_any_phases_is_the_walk(
    size: int, count: int, weights: tuple[int, ...]
) -> None:
    rng = random.Random(size * 31 + count)
    backends = tuple(fleet(rng, count, lambda: rng.choice(weights)))
    expected = walked(backends, size)
    starts = [permutation_start(b.address, size) for b in backends]
    offsets, skips = [o for o, _ in starts], [k for _, k in starts]
    assert _fill(backends, size, offsets, skips) == expected
    # The last phase costs (turns x free slots): up to 1,500 of its turns.
    tail = min(size, 1_500)
    splits = [
        (0, 0),
        (size, 0),
        (size, tail),
        (size // 2, size // 5),
        (size // 3, 1),
        (rng.randrange(size + 1), rng.randrange(tail + 1)),
    ]
    for dense, tail in splits:
        assert _fill(backends, size, offsets, skips, dense=dense, tail=tail) == expected, (
            dense,
            tail,
        )


@pytest.mark.parametrize("seed", range(3))
def test_maglev_default_table_is_the_walk(seed: int) -> None:
    rng = random.Random(seed)
    count = [50, 1_000, 3_000][seed]
    backends = fleet(rng, count, lambda: 1 if seed != 1 else rng.choice((1, 2, 3)))
    selector = Maglev().build(backends)
    assert isinstance(selector, MaglevSelector)
    indexes = {b: i for i, b in enumerate(backends)}
    assert [indexes[b] for b in selector.table] == walked(backends, selector.table_size)


def test_maglev_table_after_a_refresh_is_a_full_build() -> None:
    rng = random.Random(5)
    everyone = fleet(rng, 2_100, lambda: 1)
    lb = LoadBalancer(everyone[:2_000], Maglev)
    for _ in range(3):
        wanted = list(lb.backends)
        for b in rng.sample(wanted, 2):
            wanted.remove(b)
        taken = {b.address for b in wanted}
        wanted += rng.sample([b for b in everyone if b.address not in taken], 2)
        assert lb.update(wanted)
        rebuilt = lb._view.selector
        assert isinstance(rebuilt, MaglevSelector)
        assert rebuilt.table == Maglev().build(lb.backends).table
        indexes = {b: i for i, b in enumerate(lb.backends)}
        assert [indexes[b] for b in rebuilt.table] == walked(lb.backends, rebuilt.table_size)
