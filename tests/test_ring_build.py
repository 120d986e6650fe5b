"""The ring's build at scale: points made a step of every chain at a time, sorted in runs and
merged by ranges of values into compact arrays, give exactly the ring of one plain sort; rings of
65,536 points and more (values kept as their low 16 bits under a 16-bit bucket index) are rebuilt
as they are built; and a ring of 10,000 backends leaves a fresh interpreter at most 16 MB
bigger, its build's temporaries given back."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

import pytest

from lbclient import Backend, Consistent
from lbclient.selection import LibKetama
from lbclient.selection._ring import (
    _DELETE,
    _INSERT,
    _REPLACE,
    _RUN,
    Ring,
    _repeats,
    _shifted,
    ketama_points,
    ketama_steps,
)
from lbclient.selection.base import prepare_backends
from lbclient.selection.libketama import server_points, server_steps

#: The aim: a 10,000-backend ring grows a fresh interpreter's resident set by 16 MB at most (MB
#: as the bench counts them).
RING_LIMIT = 16_000_000


def per_backend(steps: Any, count: int) -> list[list[int]]:
    """The points of each of ``count`` backends, in order, from a step generator's output."""
    points: list[list[int]] = [[] for _ in range(count)]
    for values, slots in steps:
        assert len(values) == len(slots)
        for value, slot in zip(values, slots, strict=True):
            points[slot].append(value)
    return points


@pytest.mark.parametrize("brackets", [True, False])
def test_steps_make_each_backends_chain(brackets: bool) -> None:
    backends = [
        Backend("10.0.0.1:80", 3),
        Backend("[2001:db8::1]:8080", 1),
        Backend("cache-1.internal:11211", 2),
        Backend("10.0.0.2:443", 1),
    ]
    steps = ketama_steps(backends, 7, brackets)
    assert per_backend(steps, 4) == [ketama_points(b, 7, brackets) for b in backends]


def test_server_steps_make_each_servers_digests() -> None:
    servers = ["10.0.0.1:11211", "10.0.0.2:11211", "[2001:db8::5]:11211", "cache:1"]
    digests = [3, 0, 5, 1]  # a server may have none
    got = per_backend(server_steps(servers, digests), 4)
    assert got == [server_points(s, d) for s, d in zip(servers, digests, strict=True)]


def reference(
    backends: Sequence[Backend], points: Sequence[Sequence[int]], last_wins: bool
) -> tuple[list[tuple[int, Backend]], dict[int, tuple[int, ...]]]:
    """The ring as one plain sort makes it: every value once, owned by the first (last) of its
    backends in sorted order, the others kept aside."""
    slots: dict[int, set[int]] = {}
    for slot, values in enumerate(points):
        for value in values:
            slots.setdefault(value, set()).add(slot)
    ring: list[tuple[int, Backend]] = []
    shadow: dict[int, tuple[int, ...]] = {}
    for value in sorted(slots):
        holders = sorted(slots[value])
        winner = holders[-1] if last_wins else holders[0]
        ring.append((value, backends[winner]))
        if len(holders) > 1:
            shadow[value] = tuple(s for s in holders if s != winner)
    return ring, shadow


@pytest.mark.parametrize("last_wins", [False, True])
def test_runs_and_ranges_merge_as_one_sort(last_wins: bool) -> None:
    # About 200,000 points: some 25 sorted runs, merged in 4 ranges of values; a few hundred
    # values shared by several backends (or twice by one), across runs and at the ends of the
    # range of values.
    rng = random.Random(f"merge-{last_wins}")
    backends = [Backend(f"10.9.{i >> 8}.{i & 255}:80") for i in range(300)]
    shared = [0, 1, 2**16 - 1, 2**16, 2**31, 2**32 - 2, 2**32 - 1]
    shared += [rng.getrandbits(32) for _ in range(200)]
    points = [
        [rng.choice(shared) if rng.random() < 0.01 else rng.getrandbits(32) for _ in range(700)]
        for _ in backends
    ]
    ring = Ring.build(backends, points, last_wins)
    want, shadow = reference(backends, points, last_wins)
    assert sum(map(len, points)) > 3 * _RUN + 2 * 2**16
    assert ring.points() == want
    assert ring.shadow == shadow
    assert ring.lows.typecode == "H"  # 16-bit bucket index, the values' low 16 bits kept
    assert ring.starts[-1] == len(ring) == len(want)
    values = [value for value, _ in want]
    after = [v + 1 for v in shared if v < 2**32 - 1]
    for h in [*shared, *after, *rng.choices(range(2**32), k=500)]:
        assert ring._find(h) == bisect_left(values, h)


@pytest.mark.parametrize("count", [0, 1, 3, 50, 200])
def test_small_rings_merge_as_one_sort(count: int) -> None:
    rng = random.Random(count)
    backends = [Backend(f"10.7.0.{i}:80") for i in range(count)]
    points = [[rng.getrandbits(rng.choice((4, 32))) for _ in range(160)] for _ in backends]
    ring = Ring.build(backends, points, False)
    assert (ring.points(), ring.shadow) == reference(backends, points, False)


@pytest.mark.parametrize("algorithm", [Consistent(), LibKetama()], ids=["Consistent", "LibKetama"])
def test_rings_of_65536_points_and_more_are_rebuilt_as_built(
    algorithm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(type(algorithm).__name__)
    everyone = [Backend(f"10.8.{i >> 8}.{i & 255}:80") for i in range(460)]
    current = prepare_backends(everyone[:420])  # 67,200 points
    selector = algorithm.build(current)
    assert selector._ring.lows.typecode == "H"
    assert isinstance(selector._ring.starts, array)
    builds: list[int] = []
    build = Ring.from_steps.__func__  # type: ignore[attr-defined]

    def counted(cls: type[Ring], *args: Any, **kwargs: Any) -> Ring:
        builds.append(1)
        ring: Ring = build(cls, *args, **kwargs)
        return ring

    keys = [f"key-{i}".encode() for i in range(2_000)]
    for _ in range(5):
        spare = [b for b in everyone if b not in current]
        leaving = rng.sample(list(current), 3)
        wanted = prepare_backends([b for b in current if b not in leaving] + rng.sample(spare, 2))
        with monkeypatch.context() as patched:
            patched.setattr(Ring, "from_steps", classmethod(counted))
            rebuilt = algorithm.rebuild(selector, wanted)
        assert builds == []  # rebuilt in place
        full = algorithm.build(wanted)
        assert rebuilt.points() == full.points()
        assert rebuilt._ring.shadow == full._ring.shadow
        assert (rebuilt._ring.lows, rebuilt._ring.starts) == (full._ring.lows, full._ring.starts)
        assert [rebuilt.first(k) for k in keys] == [full.first(k) for k in keys]
        selector, current = rebuilt, wanted


@pytest.mark.parametrize("kind", [list, array])
def test_bucket_starts_move_with_the_points_added_and_taken_out(kind: type) -> None:
    rng = random.Random(kind.__name__)
    for _ in range(200):
        bits = rng.randint(1, 16)
        shift = 32 - bits
        counts = [rng.randint(0, 30) for _ in range(1 << bits)]
        starts = [0, *accumulate(counts)]
        edits = []
        for _ in range(rng.randint(0, 60)):
            bucket = rng.randrange(1 << bits)
            what = rng.choice((_INSERT, _DELETE, _REPLACE))
            if what == _DELETE and not counts[bucket]:
                continue
            counts[bucket] += {_INSERT: 1, _DELETE: -1, _REPLACE: 0}[what]
            edits.append((0, what, bucket << shift | rng.getrandbits(shift), 0))
        given = starts if kind is list else array("I", starts)
        moved = _shifted(given, shift, edits)
        assert type(moved) is kind
        assert list(moved) == [0, *accumulate(counts)]


def test_repeated_values_are_found_wherever_they_are() -> None:
    rng = random.Random(5)
    for _ in range(2_000):
        pool = [rng.getrandbits(rng.choice((1, 3, 8, 16, 24, 32))) for _ in range(30)]
        values = array("I", sorted(rng.choice(pool) for _ in range(rng.randint(0, 50))))
        first = rng.randint(0, 10)
        with memoryview(values) as view:
            found = _repeats(view, first)
        assert found == [first + i for i in range(1, len(values)) if values[i] == values[i - 1]]


MEASURE = """
import gc, os, sys
from lbclient import Backend, Consistent, LoadBalancer
from lbclient.selection import LibKetama

def resident():
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

algorithm = {"Consistent": Consistent, "LibKetama": LibKetama}[sys.argv[1]]
backends = [Backend(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:80") for i in range(10_000)]
gc.collect()
before = resident()
balancer = LoadBalancer(backends, algorithm)
gc.collect()
print(resident() - before, balancer.select(b"key") in backends)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("name", ["Consistent", "LibKetama"])
def test_a_10000_backend_ring_grows_a_fresh_interpreter_by_16_mb_at_most(
    name: str, tmp_path: Path
) -> None:
    # The ring's arrays take 6.7 MB and the balancer's cells and loads about 4 MB; what the
    # allocators keep of the build's temporaries counts too (a memory figure: no clock in it).
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, name],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    grown, selects = done.stdout.split()
    assert selects == "True"
    assert int(grown) <= RING_LIMIT, f"{name}: {int(grown) / 1e6:.1f} MB"
