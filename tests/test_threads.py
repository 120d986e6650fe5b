"""Readers select while a writer updates: no exception, and only backends of installed sets."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from lbclient import Backend, Consistent, Hash, HealthPolicy, LoadBalancer, RoundRobin


@pytest.mark.parametrize("algorithm", [RoundRobin, Hash, Consistent])
def test_select_during_updates(algorithm: type) -> None:
    # Every set has its own addresses, so a result names the set it came from.
    sets = [[Backend(f"10.{v}.0.{i}:80", 1 + i % 3) for i in range(1, 6)] for v in range(1, 9)]
    lb = LoadBalancer(
        sets[0], algorithm, health=HealthPolicy(consecutive_failures=1, base_ejection_time=0)
    )
    installed: set[int] = {0}
    origin = {b: v for v, s in enumerate(sets) for b in s}
    errors: list[BaseException] = []
    stop = threading.Event()
    results: list[list[Backend]] = [[] for _ in range(8)]

    def reader(slot: int) -> None:
        out = results[slot]
        try:
            i = 0
            while not stop.is_set():
                key = f"key-{slot}-{i}"
                b = lb.select(key)
                assert b is not None
                out.append(b)
                if i % 7 == 0:
                    lb.report(b, i % 2 == 0)
                    lb.ready(b)
                    walk = list(lb.iter(key))
                    assert len(walk) == len(set(walk)) == 5
                    assert len({origin[x] for x in walk}) == 1
                i += 1
                if i % 64 == 0:
                    time.sleep(0)  # let the writer in: the GIL favours the busy readers
        except BaseException as exc:
            errors.append(exc)

    def writer() -> None:
        try:
            for round_ in range(60):
                v = round_ % len(sets)
                installed.add(v)  # recorded before the swap can be observed
                lb.update(sets[v])
                time.sleep(0.002)  # let readers see this set
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    picked = [b for out in results for b in out]
    assert picked
    assert {origin[b] for b in picked} <= installed
    assert len({origin[b] for b in picked}) > 1  # readers really ran across updates


def test_round_robin_exact_quarters_across_threads() -> None:
    backends = [f"10.0.0.{i}:80" for i in range(1, 5)]
    lb = LoadBalancer(backends, RoundRobin)
    per_thread = 25_000
    counts: list[Counter[Backend]] = [Counter() for _ in range(8)]
    barrier = threading.Barrier(8)

    def run(slot: int) -> None:
        barrier.wait()
        c = counts[slot]
        select = lb.select
        for _ in range(per_thread):
            c[select()] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total: Counter[Backend] = Counter()
    for c in counts:
        total.update(c)
    assert total == {Backend(a): 8 * per_thread // 4 for a in backends}
