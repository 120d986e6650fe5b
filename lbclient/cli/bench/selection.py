"""Selection benchmark: the cost of ``LoadBalancer.select`` per algorithm, lbclient's ketama
against uhashring, and build times. A measurement, not a test: it never fails on time.

Run it alone, with every row::

    python -m lbclient.cli.bench.selection           # full run (about a minute)
    python -m lbclient.cli.bench.selection --quick   # fewer repetitions (a few seconds)

or as part of ``python -m lbclient bench`` (a summary, side by side with the transport
benchmark), or import it: ``from lbclient.cli.bench.selection import run;
rows = run(quick=True)``. uhashring, the baseline, comes with ``pip install 'lbclient[bench]'``.

Method: every per-call figure is the median, over R repetitions, of one timed Python ``for``
loop over the same 1,000 precomputed keys, divided by 1,000. Nothing is subtracted: each figure
includes the loop and the call through a local name (the "loop floor" row shows that part alone).
All per-call cases are timed interleaved in one process (one pass of A, one of B, one of C, ...,
then again), so the machine's slow and fast phases hit every case alike, and each timed pass
follows an untimed pass of the same case (hot caches, as in a tight loop). The rows marked
"cold" skip that pass: at 1,000 backends the ring (160,000 Python ints) no longer fits the CPU's
L2 cache and the cost roughly doubles. The garbage collector is off while timing, as in timeit.
Rendezvous hashes the key once per backend, so at 1,000 backends its passes go over the first
100 keys only (its figure is per call all the same).

Refresh at scale, at 1,000 and 10,000 backends of weight 1 (Backend objects made beforehand),
for one algorithm of each kind of selector: the build of a ``LoadBalancer`` (ms, median of
runs), one ``update()`` that takes one backend out and puts another in (ms, median of 21
updates, 3 with ``--quick``, alternating between the two sets), and the memory the balancer
keeps once built (MB): how much the resident set of a fresh interpreter grows from before the
build to after it, after a collection, read from ``/proc/self/statm`` (tracemalloc's count of
the bytes kept where there is no ``/proc``), each in an interpreter of its own, as a process
sees it: what the allocators keep of the build's temporaries counts. ``select`` is timed at
10,000 backends as well (RoundRobin, Hash, Consistent, Maglev); ``--ketama-10k`` adds
uhashring's ring of 10,000 nodes (its build takes about two minutes).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from bisect import bisect_left
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from types import ModuleType
from typing import Any, TypedDict, TypeVar

import lbclient
from lbclient import Backend, Consistent, FNVHash, Hash, LoadBalancer, Random, RoundRobin
from lbclient.hashing import crc32, xxh3_64
from lbclient.reports import COMPILED, LoadReport, parse_prequal, python_parse
from lbclient.reports import parse as parse_report
from lbclient.selection import (
    LeastRequest,
    LibKetama,
    Maglev,
    PeakEWMA,
    Rendezvous,
    SmoothRoundRobin,
    WeightedRoundRobin,
)
from lbclient.selection.base import AlgorithmLike

__all__ = [
    "KETAMA",
    "MISSING_UHASHRING",
    "MissingBaselineError",
    "Row",
    "floors",
    "format_table",
    "grown_mb",
    "has_uhashring",
    "load_uhashring",
    "main",
    "repetitions",
    "row_floor",
    "run",
]

NUM_KEYS = 1_000
FULL_REPS = 75
QUICK_REPS = 5
FULL_BUILD_RUNS = 7
QUICK_BUILD_RUNS = 1
FULL_BASELINE_BUILD_RUNS = 3  # uhashring's ketama build of 1,000 nodes takes seconds
QUICK_BASELINE_BUILD_RUNS = 1
SIZES = (10, 1_000)
WEIGHTED_BUILD_BACKENDS = 10_000
CONSISTENT_BUILD_BACKENDS = 1_000
SCALE_SIZES = (1_000, 10_000)
#: The refresh rows' algorithms: one of each kind of selector (FNVHash builds as Hash does).
SCALE_ALGORITHMS: tuple[tuple[str, AlgorithmLike], ...] = (
    ("RoundRobin", RoundRobin),
    ("Random", Random),
    ("Hash", Hash),
    ("SmoothRoundRobin", SmoothRoundRobin),
    ("Consistent", Consistent),
    ("Consistent-bounded", Consistent(balance_factor=1.25)),
    ("LibKetama", LibKetama),
    ("Maglev", Maglev),
    ("Rendezvous", Rendezvous),
    ("LeastRequest", LeastRequest),
    ("PeakEWMA", PeakEWMA),
)
#: The algorithms whose first update after a build makes a record the next ones replay: their
#: first update and their memory after it get rows of their own (at the largest size: a record
#: is kept for large sets only).
SCALE_RECORDED = ("Maglev",)
#: The row of the memory floor.
RING_MEMORY_ID = f"scale/memory/Consistent/{max(SCALE_SIZES)}"
#: The algorithms whose select is timed at the largest refresh size (Rendezvous's select, at
#: O(backends), would take minutes there).
SCALE_SELECT_ALGORITHMS = ("RoundRobin", "Hash", "Consistent", "Maglev")
FULL_UPDATE_RUNS = 21
QUICK_UPDATE_RUNS = 3
FULL_SCALE_BUILD_RUNS = 3
QUICK_SCALE_BUILD_RUNS = 1
FLOOR_NS = 1_000.0  # "< 1 us"
FLOOR_BUILD_MS = 1_000.0  # "< 1 s"
FLOOR_KETAMA_RATIO = 2.0
FLOOR_RING_MB = 16.0  # RSS growth of a balancer with a Consistent ring of the largest size

MISSING_UHASHRING = "uhashring not installed (pip install 'lbclient[bench]')"
KETAMA = "uhashring ketama"  # baseline_name of the rows against HashRing(hash_fn="ketama")

ALGORITHMS: tuple[tuple[str, type], ...] = (
    ("RoundRobin", RoundRobin),
    ("SmoothRoundRobin", SmoothRoundRobin),
    ("Random", Random),
    ("Hash", Hash),
    ("FNVHash", FNVHash),
    ("Consistent", Consistent),
    ("Maglev", Maglev),
    ("Rendezvous", Rendezvous),
    ("LibKetama", LibKetama),
    ("LeastRequest", LeastRequest),
    ("PeakEWMA", PeakEWMA),
    # Without load reports (none here) its picks are plain round robin.
    ("WeightedRoundRobin", WeightedRoundRobin),
)
#: The algorithms whose select is O(backends), and the keys their 1,000-backend passes use.
LINEAR_ALGORITHMS = ("Rendezvous",)
LINEAR_KEYS = 100


class Row(TypedDict):
    """One result line. ``lbclient``/``baseline`` are in ``unit`` (ns/op or ms).

    ``id`` names the measurement for code that picks rows: ``select/<algorithm>/<backends>/<keys>``
    (``<backends>`` is ``10``, ``10-weighted``, ``1000`` or ``10000``; ``<keys>`` is ``bytes`` or
    ``str``), ``compare/<ketama|md5>/<nodes>/<keys>``, ``compare-cold/ketama/<nodes>/str``,
    ``build/<algorithm>/<backends>[/md5]``, ``scale/<build|update|memory>/<algorithm>/<backends>``
    and ``breakdown/<n>``.
    """

    id: str
    section: str
    # "select", "compare", "compare-cold", "build", "scale-build", "scale-update",
    # "scale-memory" or "breakdown"
    kind: str
    algorithm: str
    case: str
    unit: str
    lbclient: float
    baseline: float | None
    baseline_name: str | None
    ratio: float | None  # baseline / lbclient: > 1 means lbclient is faster


class MissingBaselineError(RuntimeError):
    """uhashring, the baseline, is not importable."""


Call = Callable[[Any], object]
T = TypeVar("T")


class _Case:
    """One timed per-call case: ``fn`` over ``keys``."""

    __slots__ = ("fn", "keys", "name", "warm")

    def __init__(self, name: str, fn: Call, keys: Sequence[Any], warm: bool = True) -> None:
        self.name = name
        self.fn = fn
        self.keys = keys
        self.warm = warm  # run an untimed pass right before each timed pass


class _Plan:
    """Every per-call case of the run, and the rows to make from their medians."""

    def __init__(self) -> None:
        self.cases: list[_Case] = []
        # (id, section, kind, algorithm, row label, case index, baseline case index,
        #  baseline name)
        self.rows: list[tuple[str, str, str, str, str, int, int | None, str | None]] = []

    def case(self, name: str, fn: Call, keys: Sequence[Any], warm: bool = True) -> int:
        self.cases.append(_Case(name, fn, keys, warm))
        return len(self.cases) - 1

    def row(
        self,
        row_id: str,
        section: str,
        kind: str,
        algorithm: str,
        label: str,
        index: int,
        baseline: int | None = None,
        baseline_name: str | None = None,
    ) -> None:
        self.rows.append((row_id, section, kind, algorithm, label, index, baseline, baseline_name))

    def measure(self, reps: int) -> list[Row]:
        medians = _interleaved(self.cases, reps)
        return [
            _row(
                row_id,
                section,
                kind,
                algorithm,
                label,
                "ns/op",
                medians[index],
                None if baseline is None else medians[baseline],
                baseline_name,
            )
            for row_id, section, kind, algorithm, label, index, baseline, baseline_name in self.rows
        ]


# -- timing ------------------------------------------------------------------------------------


def _loop(fn: Call, keys: Sequence[Any]) -> int:
    """Nanoseconds for one pass of ``fn`` over ``keys``; ``fn`` is a local in the loop."""
    start = time.perf_counter_ns()
    for key in keys:
        fn(key)
    return time.perf_counter_ns() - start


def _interleaved(cases: Sequence[_Case], reps: int) -> list[float]:
    """Median ns per call of each case, repetitions interleaved A, B, C, ..., A, B, C, ...

    Every case gets one timed pass per round, so slow and fast phases of the machine (some
    machines have phases of a few hundred ms) are spread over all cases alike. A ``warm`` case
    makes an untimed pass right before each timed one, so its figure is the hot-cache cost
    whatever ran before it. Cold cases run first in each round, right after the warm cases of
    the previous round, whose data has evicted part of theirs from the CPU caches.
    """
    for case in cases:  # warm-up, untimed
        _loop(case.fn, case.keys)
    samples: list[list[float]] = [[] for _ in cases]
    order = [i for i, c in enumerate(cases) if not c.warm] + [
        i for i, c in enumerate(cases) if c.warm
    ]
    for _ in range(reps):
        for i in order:
            case = cases[i]
            fn = case.fn
            keys = case.keys
            if case.warm:
                _loop(fn, keys)
            samples[i].append(_loop(fn, keys) / len(keys))
    return [statistics.median(s) for s in samples]


def _build_ms(build: Callable[[], T], runs: int) -> tuple[float, T]:
    """Median wall time of ``build()`` in ms over ``runs`` (>= 1) runs, and the last result."""
    times: list[float] = []
    for _ in range(runs - 1):
        start = time.perf_counter_ns()
        build()
        times.append((time.perf_counter_ns() - start) / 1e6)
    start = time.perf_counter_ns()
    result = build()
    times.append((time.perf_counter_ns() - start) / 1e6)
    return statistics.median(times), result


# -- inputs ------------------------------------------------------------------------------------


def _address(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:80"


def _addresses(n: int) -> list[str]:
    return [_address(i) for i in range(n)]


def _backends(n: int, weight: Callable[[int], int]) -> list[Backend]:
    return [Backend(_address(i), weight(i)) for i in range(n)]


def _noop(_key: object) -> None:
    return None


def load_uhashring() -> ModuleType:
    """Import uhashring lazily; MissingBaselineError if it is not installed."""
    try:
        return importlib.import_module("uhashring")
    except ImportError:
        raise MissingBaselineError(MISSING_UHASHRING) from None


def _row(
    row_id: str,
    section: str,
    kind: str,
    algorithm: str,
    case: str,
    unit: str,
    value: float,
    baseline: float | None = None,
    baseline_name: str | None = None,
) -> Row:
    ratio = baseline / value if baseline is not None and value > 0 else None
    return Row(
        id=row_id,
        section=section,
        kind=kind,
        algorithm=algorithm,
        case=case,
        unit=unit,
        lbclient=value,
        baseline=baseline,
        baseline_name=baseline_name,
        ratio=ratio,
    )


# -- the benchmark -----------------------------------------------------------------------------


def _plan_select(plan: _Plan, bkeys: list[bytes], skeys: list[str], detail: bool) -> None:
    """Section 1: LoadBalancer.select per algorithm and backend set."""
    variants: list[tuple[str, str, int, Callable[[int], int]]] = [
        ("10", "10 backends", 10, lambda _i: 1),
        ("10-weighted", "10 backends, weights 1..5", 10, lambda i: 1 + i % 5),
        ("1000", "1,000 backends", 1_000, lambda _i: 1),
    ]
    for size_id, label, n, weight in variants:
        if "weighted" in size_id and not detail:
            continue
        backends = _backends(n, weight)
        section = f"LoadBalancer.select per algorithm, {label}"
        for name, algorithm in ALGORITHMS:
            select = LoadBalancer(backends, algorithm=algorithm).select
            case = f"{name} select, {label}, bytes"
            keys = bkeys[:LINEAR_KEYS] if name in LINEAR_ALGORITHMS and n > 10 else bkeys
            plan.row(
                f"select/{name}/{size_id}/bytes",
                section,
                "select",
                name,
                case,
                plan.case(case, select, keys),
            )
            if name in ("Hash", "Consistent") and "weighted" not in size_id:
                case = f"{name} select, {label}, str"
                plan.row(
                    f"select/{name}/{size_id}/str",
                    section,
                    "select",
                    name,
                    case,
                    plan.case(case, select, skeys),
                )


def _plan_compare(
    plan: _Plan,
    uhashring: ModuleType,
    bkeys: list[bytes],
    skeys: list[str],
    build_runs: int,
    detail: bool,
) -> dict[int, tuple[float, float | None]]:
    """Section 2: Consistent against uhashring; returns {nodes: (ketama ms, md5 ms)} builds.

    Without ``detail`` only the like-for-like comparison is planned (str keys, ketama) and the
    md5 ring is neither built nor timed (its build time is None).
    """
    builds: dict[int, tuple[float, float | None]] = {}
    for n in SIZES:
        nodes = _addresses(n)
        select = LoadBalancer(nodes, algorithm=Consistent).select
        ketama_ms, ketama = _build_ms(
            partial(uhashring.HashRing, nodes, hash_fn="ketama"), build_runs
        )
        ketama_get: Call = ketama.get_node
        md5_ms: float | None = None
        md5_get: Call | None = None
        if detail:
            md5_ms, md5 = _build_ms(partial(uhashring.HashRing, nodes), build_runs)
            md5_get = md5.get_node
        builds[n] = (ketama_ms, md5_ms)
        for key in skeys[:3]:  # sanity: every side answers (no timing involved)
            answers = [select(key), ketama_get(key)] + ([md5_get(key)] if md5_get else [])
            if any(answer is None for answer in answers):
                raise RuntimeError(f"a ring returned no node for {key!r} at {n} nodes")
        section = f"Consistent LoadBalancer.select vs uhashring get_node, {n:,} nodes"
        # A, B, A, B: lbclient str, ketama, lbclient bytes, md5 (each pass over 1,000 keys).
        lb_str = plan.case("lbclient str", select, skeys)
        ketama_i = plan.case(KETAMA, ketama_get, skeys)
        baselines = [(ketama_i, KETAMA, "ketama", "HashRing(hash_fn='ketama')")]
        keyed = [("str", lb_str)]
        if md5_get is not None:
            keyed.append(("bytes", plan.case("lbclient bytes", select, bkeys)))
            baselines.append(
                (
                    plan.case("uhashring md5", md5_get, skeys),
                    "uhashring md5",
                    "md5",
                    "HashRing() md5, 160 vnodes",
                )
            )
        for base_i, base_name, base_id, what in baselines:
            for keys_label, lb_i in keyed:
                plan.row(
                    f"compare/{base_id}/{n}/{keys_label}",
                    section,
                    "compare",
                    "Consistent",
                    f"Consistent {keys_label} keys vs {what}, {n:,} nodes",
                    lb_i,
                    base_i,
                    base_name,
                )
        if detail and n == max(SIZES):
            # The same rings, timed cold: no warm-up pass, every other case ran in between.
            lb_cold = plan.case("lbclient str, cold", select, skeys, warm=False)
            ketama_cold = plan.case("uhashring ketama, cold", ketama_get, skeys, warm=False)
            plan.row(
                f"compare-cold/ketama/{n}/str",
                section,
                "compare-cold",
                "Consistent",
                f"Consistent str keys vs HashRing(hash_fn='ketama'), {n:,} nodes, cold",
                lb_cold,
                ketama_cold,
                KETAMA,
            )
    return builds


def _plan_breakdown(plan: _Plan, bkeys: list[bytes]) -> None:
    """Where the time of one select goes: loop floor, bare hash, selector vs LoadBalancer."""
    big = _backends(1_000, lambda _i: 1)
    small = _backends(10, lambda _i: 1)
    section = "Breakdown: what one select is made of"
    cases: list[tuple[str, Call, Sequence[Any], bool]] = [
        ("loop floor: loop + call of a no-op Python function", _noop, bkeys, True),
        ("zlib.crc32(key) alone (Consistent's hash)", crc32, bkeys, True),
        ("xxh3_64(key) alone (Hash's hash)", xxh3_64, bkeys, True),
        ("Hash selector.first, 10 backends, bytes", Hash.build(small).first, bkeys, True),
        (
            "Hash LoadBalancer.select, 10 backends, bytes",
            LoadBalancer(small, algorithm=Hash).select,
            bkeys,
            True,
        ),
    ]
    ring = Consistent.build(big)
    hashes = [h for h, _ in ring.points()]
    crcs = [crc32(key) for key in bkeys]
    bisect = partial(bisect_left, hashes)
    select = LoadBalancer(big, algorithm=Consistent).select
    cases += [
        (
            f"bisect_left over the {len(hashes):,} ring hashes alone (crc32 precomputed)",
            bisect,
            crcs,
            True,
        ),
        ("Consistent selector.first, 1,000 backends, bytes", ring.first, bkeys, True),
        ("Consistent LoadBalancer.select, 1,000 backends, bytes", select, bkeys, True),
        (
            "same, cold: own ring, no warm-up pass, all other cases ran since",
            LoadBalancer(big, algorithm=Consistent).select,
            bkeys,
            False,
        ),
        ("Consistent selector.first, cold (as above)", Consistent.build(big).first, bkeys, False),
    ]
    for n, (name, fn, keys, warm) in enumerate(cases):
        plan.row(f"breakdown/{n}", section, "breakdown", "-", name, plan.case(name, fn, keys, warm))


#: Typical load reports: what vLLM and the server companion send, and Prequal's headers.
REPORT_TEXT = (
    "TEXT cpu_utilization=0.3, rps_fractional=120, eps=0.5, named_metrics.kv_cache_usage_perc=0.4"
)
REPORT_JSON = (
    'JSON {"cpu_utilization": 0.3, "rps_fractional": 120, "eps": 0.5, '
    '"named_metrics": {"kv_cache_usage_perc": 0.4}}'
)
FLOOR_REPORT_NS = 2_000.0  # "at most 2 us" for a typical TEXT header
REPORT_TEXT_ID = "report/text"
REPORT_FLOATS_ID = "report/floats"
#: REPORT_TEXT's four values, as a parser hands them to ``float()``.
REPORT_VALUES = ("0.3", "120", "0.5", "0.4")


def _parse_at_zero(header: str) -> LoadReport:
    return parse_report(header, 0.0)


def _python_parse_at_zero(header: str) -> LoadReport:
    return python_parse(header, 0.0)


def _prequal_at_zero(values: tuple[str, str]) -> LoadReport:
    return parse_prequal(values[0], values[1], 0.0)


def _floats(values: tuple[str, str, str, str]) -> tuple[float, float, float, float]:
    return float(values[0]), float(values[1]), float(values[2]), float(values[3])


def _plan_reports(plan: _Plan) -> None:
    """Reading one load report: a typical ORCA header in each format, and Prequal's."""
    section = "Load reports: read one (the header's value into a LoadReport)"
    reader = "compiled reader" if COMPILED else "pure Python: built without a C compiler"
    for row_id, label, fn, header in (
        (
            REPORT_TEXT_ID,
            f"parse ORCA TEXT, 4 fields (vLLM's kind; {reader})",
            _parse_at_zero,
            REPORT_TEXT,
        ),
        (
            "report/text-python",
            "the same, by the pure-Python reader",
            _python_parse_at_zero,
            REPORT_TEXT,
        ),
        ("report/json", "parse ORCA JSON, the same 4 fields", _parse_at_zero, REPORT_JSON),
        ("report/prequal", "parse x-prequal-rif and x-prequal-latency-us", _prequal_at_zero, None),
    ):
        keys: Sequence[Any] = [header] * NUM_KEYS if header else [("7", "2500")] * NUM_KEYS
        plan.row(row_id, section, "report", "-", label, plan.case(label, fn, keys))
    # What any Python parser of the TEXT report pays before reading a name: its four numbers.
    label = "float() of the TEXT report's 4 values alone (the floor of any Python parser)"
    values: Sequence[Any] = [REPORT_VALUES] * NUM_KEYS
    plan.row(REPORT_FLOATS_ID, section, "report", "-", label, plan.case(label, _floats, values))


def _build_rows(runs: int, ring_builds: dict[int, tuple[float, float | None]] | None) -> list[Row]:
    """Section 3: build times in ms (median of ``runs``); baselines from ``ring_builds``."""
    rows: list[Row] = []
    section = "Build, ms (median of runs; prebuilt Backend objects; prepare + sort included)"
    weighted = _backends(WEIGHTED_BUILD_BACKENDS, lambda i: 1 + i % 100)
    total = sum(b.weight for b in weighted)
    for name, build in (("RoundRobin", RoundRobin.build), ("Hash", Hash.build)):
        ms, _ = _build_ms(partial(build, weighted), runs)
        rows.append(
            _row(
                f"build/{name}/{WEIGHTED_BUILD_BACKENDS}",
                section,
                "build",
                name,
                f"{name}.build, {WEIGHTED_BUILD_BACKENDS:,} backends, weights 1..100 "
                f"(total weight {total:,})",
                "ms",
                ms,
            )
        )
    ring = _backends(CONSISTENT_BUILD_BACKENDS, lambda _i: 1)
    ms, selector = _build_ms(partial(Consistent.build, ring), runs)
    case = (
        f"Consistent.build, {CONSISTENT_BUILD_BACKENDS:,} backends ({selector.ring_size:,} points)"
    )
    row_id = f"build/Consistent/{CONSISTENT_BUILD_BACKENDS}"
    if ring_builds is None:
        rows.append(_row(row_id, section, "build", "Consistent", case, "ms", ms))
        return rows
    ketama_ms, md5_ms = ring_builds[CONSISTENT_BUILD_BACKENDS]
    rows.append(
        _row(
            row_id,
            section,
            "build",
            "Consistent",
            f"{case} vs uhashring ketama",
            "ms",
            ms,
            ketama_ms,
            KETAMA,
        )
    )
    if md5_ms is not None:
        rows.append(
            _row(
                f"{row_id}/md5",
                section,
                "build",
                "Consistent",
                f"{case} vs uhashring md5",
                "ms",
                ms,
                md5_ms,
                "uhashring md5",
            )
        )
    return rows


def _resident() -> int | None:
    """This process's resident set in bytes, from ``/proc/self/statm``; None without it."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _scale_sets(n: int) -> tuple[list[Backend], list[Backend]]:
    """The refresh rows' two sets of ``n`` backends: the first ``n``, and the same with the
    middle one out and one more in."""
    everyone = _backends(n + 1, lambda _i: 1)
    return everyone[:n], everyone[: n // 2] + everyone[n // 2 + 1 :]


def grown_mb(name: str, n: int, refreshed: bool = False) -> float:
    """How much this process keeps (MB) of a ``LoadBalancer`` over ``n`` backends with the
    refresh rows' algorithm ``name`` (updated once to the second set if ``refreshed``): its
    resident set's growth, after a collection (tracemalloc's count where there is no
    ``/proc/self/statm``). Meant for a fresh interpreter: see :func:`_kept_mb`."""
    algorithm = dict(SCALE_ALGORITHMS)[name]
    first, second = _scale_sets(n)
    gc.collect()
    before = _resident()
    if before is None:
        tracemalloc.start()
    balancer = LoadBalancer(first, algorithm)
    if refreshed:
        balancer.update(second)
    gc.collect()
    after = _resident()
    if before is None or after is None:
        kept, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return kept / 1e6
    return max(0, after - before) / 1e6  # a small balancer may fit in pages already there


#: What a fresh interpreter runs to measure one balancer's memory (its arguments: the directory
#: of the lbclient copy to import, the algorithm, the backends, "refreshed" or "built").
_KEPT = (
    "import sys\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "from lbclient.cli.bench.selection import grown_mb\n"
    "print(grown_mb(sys.argv[2], int(sys.argv[3]), sys.argv[4] == 'refreshed'))\n"
)


def _kept_mb(name: str, n: int, refreshed: bool = False) -> float:
    """:func:`grown_mb` measured in an interpreter of its own (this one's, importing this copy
    of lbclient), where no earlier build has left memory to reuse."""
    home = os.path.dirname(os.path.dirname(os.path.abspath(lbclient.__file__)))
    state = "refreshed" if refreshed else "built"
    done = subprocess.run(
        [sys.executable, "-c", _KEPT, home, name, str(n), state],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"measuring {name}'s memory at {n:,} backends failed: {done.stderr}")
    return float(done.stdout)


def _kept_all(sizes: Sequence[int]) -> dict[tuple[str, int, bool], float]:
    """:func:`_kept_mb` of every balancer the refresh rows report, by (algorithm, backends,
    refreshed): as many interpreters at a time as there are CPUs, before anything is timed
    (each measures its own resident set, which the others do not touch)."""
    top = max(sizes)
    jobs = [(name, n, False) for n in sizes for name, _ in SCALE_ALGORITHMS]
    jobs += [(name, top, True) for name, _ in SCALE_ALGORITHMS if name in SCALE_RECORDED]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        kept = pool.map(lambda job: _kept_mb(*job), jobs)
        return dict(zip(jobs, kept, strict=True))


def _update_ms(
    balancer: LoadBalancer, sets: tuple[list[Backend], list[Backend]], runs: int
) -> tuple[float, float]:
    """Median wall time in ms of ``balancer.update()``, alternating between the two ``sets``
    (the balancer holds the second one to begin with), and that of the first update; it ends
    on the second set."""
    times: list[float] = []
    for i in range(runs + runs % 2):  # an even number: back to the set it started with
        target = list(sets[i % 2])
        start = time.perf_counter_ns()
        changed = balancer.update(target)
        elapsed = time.perf_counter_ns() - start
        if not changed:
            raise RuntimeError("an update of the scale benchmark changed nothing")
        times.append(elapsed / 1e6)
    return statistics.median(times), times[0]


def _scale_rows(
    build_runs: int, update_runs: int, sizes: Sequence[int] = SCALE_SIZES
) -> tuple[list[Row], dict[str, LoadBalancer]]:
    """Refresh at scale: each algorithm's balancer build, one-change update and memory at
    every one of ``sizes``; and the balancers of :data:`SCALE_SELECT_ALGORITHMS` built at the
    largest size (holding its first set)."""
    rows: list[Row] = []
    largest: dict[str, LoadBalancer] = {}
    top = max(sizes)
    memories = _kept_all(sizes)
    for n in sizes:
        first, second = _scale_sets(n)  # one out (the middle one), one in (the last one)
        section = (
            f"Refresh at {n:,} backends (weight 1, Backend objects made beforehand): build and "
            "update ms (median), memory kept MB (RSS growth in a fresh interpreter)"
        )
        for name, algorithm in SCALE_ALGORITHMS:
            build_ms, balancer = _build_ms(partial(LoadBalancer, first, algorithm), build_runs)
            memory = memories[name, n, False]
            update_ms, first_ms = _update_ms(balancer, (second, first), update_runs)
            rows += [
                _row(
                    f"scale/build/{name}/{n}",
                    section,
                    "scale-build",
                    name,
                    f"LoadBalancer({name}) build, {n:,} backends",
                    "ms",
                    build_ms,
                ),
                _row(
                    f"scale/update/{name}/{n}",
                    section,
                    "scale-update",
                    name,
                    f"{name} update(), one backend out and one in, {n:,} backends",
                    "ms",
                    update_ms,
                ),
            ]
            rows.append(
                _row(
                    f"scale/memory/{name}/{n}",
                    section,
                    "scale-memory",
                    name,
                    f"{name} balancer memory (RSS growth), {n:,} backends",
                    "MB",
                    memory,
                )
            )
            if name in SCALE_RECORDED and n == top:
                rows += _recorded_rows(name, n, section, first_ms, memories[name, n, True])
            if n == top and name in SCALE_SELECT_ALGORITHMS:
                largest[name] = balancer
            del balancer
    return rows, largest


def _recorded_rows(name: str, n: int, section: str, first_ms: float, memory: float) -> list[Row]:
    """The first update after a build, which makes the record the next ones replay, and the
    ``memory`` of a balancer refreshed once, record and all."""
    return [
        _row(
            f"scale/first-update/{name}/{n}",
            section,
            "scale-update",
            name,
            f"{name} first update() after a build (makes the fill's record), {n:,} backends",
            "ms",
            first_ms,
        ),
        _row(
            f"scale/memory-refreshed/{name}/{n}",
            section,
            "scale-memory",
            name,
            f"{name} balancer memory (RSS growth) after one refresh (with the record), "
            f"{n:,} backends",
            "MB",
            memory,
        ),
    ]


def _plan_scale_select(
    plan: _Plan,
    balancers: dict[str, LoadBalancer],
    n: int,
    bkeys: list[bytes],
    skeys: list[str],
    uhashring: ModuleType | None,
) -> None:
    """LoadBalancer.select at the largest scale size, ``n``, by the ``balancers`` of that many
    backends; against uhashring's ketama ring of as many nodes when ``uhashring`` is given."""
    section = f"LoadBalancer.select per algorithm, {n:,} backends"
    for name, balancer in balancers.items():
        case = f"{name} select, {n:,} backends, bytes"
        plan.row(
            f"select/{name}/{n}/bytes",
            section,
            "select",
            name,
            case,
            plan.case(case, balancer.select, bkeys),
        )
    ring = balancers.get("Consistent")
    if ring is None:
        return
    case = f"Consistent select, {n:,} backends, str"
    lb_str = plan.case(case, ring.select, skeys)
    plan.row(f"select/Consistent/{n}/str", section, "select", "Consistent", case, lb_str)
    if uhashring is not None:
        nodes = [b.address for b in ring.backends]
        ketama = plan.case(KETAMA, uhashring.HashRing(nodes, hash_fn="ketama").get_node, skeys)
        plan.row(
            f"compare/ketama/{n}/str",
            f"{section}, vs uhashring",
            "compare",
            "Consistent",
            f"Consistent str keys vs HashRing(hash_fn='ketama'), {n:,} nodes",
            lb_str,
            ketama,
            KETAMA,
        )


def repetitions(quick: bool, reps: int | None = None) -> int:
    """The repetitions of the per-call figures: ``reps``, or the mode's; at least 1."""
    reps = reps if reps is not None else QUICK_REPS if quick else FULL_REPS
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps!r}")
    return reps


def has_uhashring() -> bool:
    """Whether uhashring, the baseline of the ring rows, can be imported."""
    try:
        load_uhashring()
    except MissingBaselineError:
        return False
    return True


def run(
    quick: bool = False,
    *,
    detail: bool = True,
    baseline: bool = True,
    reps: int | None = None,
    scale: bool | None = None,
    ketama_10k: bool = False,
    scale_sizes: Sequence[int] = SCALE_SIZES,
) -> list[Row]:
    """Run every measurement and return the rows.

    ``detail=False`` leaves out what the ``python -m lbclient bench`` summary does not show (the
    weighted 10-backend set, the md5 ring, the cold rows and the breakdown). ``baseline=False``
    runs without uhashring (no comparison rows); with ``baseline=True`` a missing uhashring raises
    MissingBaselineError. ``reps`` overrides the number of repetitions of the per-call figures.
    ``scale`` adds the refresh rows at each of ``scale_sizes`` (1,000 and 10,000 backends) and
    the selects at the largest (None: with ``detail``); ``ketama_10k`` compares with uhashring at
    that size too.
    """
    uhashring = load_uhashring() if baseline else None
    reps = repetitions(quick, reps)
    build_runs = QUICK_BUILD_RUNS if quick else FULL_BUILD_RUNS
    baseline_runs = QUICK_BASELINE_BUILD_RUNS if quick else FULL_BASELINE_BUILD_RUNS
    bkeys = [b"user-%d" % i for i in range(NUM_KEYS)]
    skeys = [f"user-{i}" for i in range(NUM_KEYS)]
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        scaled: list[Row] = []
        plan = _Plan()
        if detail if scale is None else scale:
            scaled, balancers = _scale_rows(
                QUICK_SCALE_BUILD_RUNS if quick else FULL_SCALE_BUILD_RUNS,
                QUICK_UPDATE_RUNS if quick else FULL_UPDATE_RUNS,
                scale_sizes,
            )
            _plan_scale_select(
                plan, balancers, max(scale_sizes), bkeys, skeys, uhashring if ketama_10k else None
            )
            gc.collect()
        _plan_select(plan, bkeys, skeys, detail)
        ring_builds = None
        if uhashring is not None:
            ring_builds = _plan_compare(plan, uhashring, bkeys, skeys, baseline_runs, detail)
        _plan_reports(plan)
        if detail:
            _plan_breakdown(plan, bkeys)
        gc.collect()
        timed = plan.measure(reps)
        gc.collect()
        builds = _build_rows(build_runs, ring_builds)
    finally:
        if was_enabled:
            gc.enable()
    # Table order: select, comparison, build, refresh at scale, breakdown.
    return (
        [r for r in timed if r["kind"] in ("select", "compare", "compare-cold")]
        + builds
        + scaled
        + [r for r in timed if r["kind"] in ("report", "breakdown")]
    )


# -- reporting ---------------------------------------------------------------------------------


def floors(rows: Sequence[Row]) -> list[tuple[str, bool, str]]:
    """The spec's floors as (statement, met, evidence), judged on the worst relevant row."""

    def worst(kind: str, algorithms: tuple[str, ...]) -> float:
        values = [r["lbclient"] for r in rows if r["kind"] == kind and r["algorithm"] in algorithms]
        return max(values) if values else float("inf")

    def ketama_ratios(kind: str) -> list[float]:
        return [
            r["ratio"]
            for r in rows
            if r["kind"] == kind and r["baseline_name"] == KETAMA and r["ratio"]
        ]

    ratios = ketama_ratios("compare")
    ketama = min(ratios) if ratios else 0.0
    cold = ", ".join(f"{r:.2f}x" for r in ketama_ratios("compare-cold")) or "-"
    rr = worst("select", ("RoundRobin",))
    hs = worst("select", ("Hash",))
    wb = worst("build", ("RoundRobin", "Hash"))
    cb = worst("build", ("Consistent",))
    ring = [r for r in rows if r["id"] == RING_MEMORY_ID]
    floats = next((r["lbclient"] for r in rows if r["id"] == REPORT_FLOATS_ID), None)
    reports = [
        (
            f"a typical ORCA TEXT report parses in < {FLOOR_REPORT_NS / 1000:,.0f} us",
            r["lbclient"] < FLOOR_REPORT_NS,
            f"{r['lbclient']:,.0f} ns"
            + ("" if floats is None else f"; its 4 float() calls alone {floats:,.0f} ns"),
        )
        for r in rows
        if r["id"] == REPORT_TEXT_ID
    ]
    memory = [
        (
            f"Consistent balancer of {max(SCALE_SIZES):,} backends grows the RSS by <= "
            f"{FLOOR_RING_MB:,.0f} MB",
            r["lbclient"] <= FLOOR_RING_MB,
            f"{r['lbclient']:,.1f} MB",
        )
        for r in ring
    ]
    return [
        (
            "Consistent >= 2x faster than uhashring ketama",
            ketama >= FLOOR_KETAMA_RATIO,
            f"worst {ketama:.2f}x over {len(ratios)} warm comparisons; "
            f"cold 1,000-node row, not counted: {cold}",
        ),
        ("RoundRobin select < 1 us", rr < FLOOR_NS, f"worst {rr:,.0f} ns"),
        ("Hash select < 1 us", hs < FLOOR_NS, f"worst {hs:,.0f} ns"),
        (
            f"weighted build of {WEIGHTED_BUILD_BACKENDS:,} backends < 1 s",
            wb < FLOOR_BUILD_MS,
            f"worst {wb:,.1f} ms",
        ),
        (
            f"Consistent build of {CONSISTENT_BUILD_BACKENDS:,} backends < 1 s",
            cb < FLOOR_BUILD_MS,
            f"{cb:,.1f} ms",
        ),
        *memory,
        *reports,
    ]


def row_floor(row: Row) -> tuple[str, bool] | None:
    """The floor of :func:`floors` that applies to ``row`` alone, as (threshold, met), or None.

    RoundRobin and Hash selects stay under 1 us, builds under 1 s, Consistent is at least 2x
    faster than uhashring's ketama in every warm comparison (the cold row is not held to it), and
    a balancer with a Consistent ring of the largest scale size grows a fresh interpreter's
    resident set by 16 MB at most.
    """
    kind = row["kind"]
    if kind == "select" and row["algorithm"] in ("RoundRobin", "Hash"):
        return f"< {FLOOR_NS:,.0f} ns/op", row["lbclient"] < FLOOR_NS
    if kind == "compare" and row["baseline_name"] == KETAMA:
        return f">= {FLOOR_KETAMA_RATIO:.2f}", (row["ratio"] or 0.0) >= FLOOR_KETAMA_RATIO
    if kind == "build":
        return f"< {FLOOR_BUILD_MS:,.0f} ms", row["lbclient"] < FLOOR_BUILD_MS
    if row["id"] == RING_MEMORY_ID:
        return f"<= {FLOOR_RING_MB:,.0f} MB", row["lbclient"] <= FLOOR_RING_MB
    if row["id"] == REPORT_TEXT_ID:
        return f"< {FLOOR_REPORT_NS:,.0f} ns/op", row["lbclient"] < FLOOR_REPORT_NS
    return None


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if unit == "ns/op" else f"{value:,.1f}"


def _fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    if ratio >= 1:
        return f"lbclient is {ratio:.1f}x faster"
    return f"lbclient is {1 / ratio:.1f}x slower"


def format_table(rows: Sequence[Row]) -> str:
    """One plain-text table of ``rows``, by section."""
    head = ("case", "unit", "lbclient", "baseline", "ratio")
    body = [
        (
            r["case"],
            r["unit"],
            _fmt(r["lbclient"], r["unit"]),
            _fmt(r["baseline"], r["unit"]),
            _fmt_ratio(r["ratio"]),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        first, unit, *numbers, ratio = cells
        return "  ".join(
            [first.ljust(widths[0]), unit.ljust(widths[1])]
            + [n.rjust(w) for n, w in zip(numbers, widths[2:4], strict=True)]
            + [ratio]
        ).rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    out = [line(head), rule]
    section = None
    for r, cells in zip(rows, body, strict=True):
        if r["section"] != section:
            section = r["section"]
            out.append(f"[{section}]")
        out.append(line(cells))
    out.append(rule)
    return "\n".join(out)


def _versions() -> str:
    import importlib.metadata  # here only: the memory measurements' interpreters need not load it

    parts = []
    for dist in ("lbclient", "uhashring", "xxhash"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist} ?")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table and the floors; 0 whether or not the floors are met, 2 without uhashring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a few seconds)")
    parser.add_argument(
        "--ketama-10k",
        action="store_true",
        help="compare with uhashring at 10,000 nodes too (about two minutes more)",
    )
    args = parser.parse_args(argv)
    try:
        load_uhashring()
    except MissingBaselineError as exc:
        print(exc, file=sys.stderr)
        return 2
    reps = QUICK_REPS if args.quick else FULL_REPS
    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}) "
        f"on {platform.platform()}, {platform.machine()}"
    )
    print(f"{_versions()}; mode: {'quick' if args.quick else 'full'}")
    print(
        f"per-call figures: median of {reps} interleaved repetitions of a Python loop over "
        f"{NUM_KEYS:,} keys (b'user-N' / 'user-N'),"
    )
    print(
        "  per call, loop and call overhead included (nothing subtracted), each timed pass "
        "after an untimed one (hot caches) unless marked cold, GC off"
    )
    print()
    start = time.perf_counter()
    rows = run(quick=args.quick, ketama_10k=args.ketama_10k)
    elapsed = time.perf_counter() - start
    print(format_table(rows))
    print("floors (from the spec; a measurement, not a test):")
    for statement, met, evidence in floors(rows):
        print(f"  {statement}: {'MET' if met else 'NOT MET'} ({evidence})")
    print(f"total run time {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
