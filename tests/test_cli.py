"""The command line (:mod:`lbclient.cli`): ``python -m lbclient bench`` and
``python -m lbclient simulate`` run as a user runs them, the benchmarks run alone, and the
library kept apart from the command line. The demo is checked with the README, in test_docs.

The tests that start a real interpreter in a subprocess are marked slow. The bench tests check
the tables' structure only (every row there, every number parses), never a timing or a ratio:
speed is measured by the bench, not asserted by the suite. Each command runs once per test
session: ``python -m lbclient bench --quick``, the README's line, is one run that the README test
and the bench tests here read (made in the background while the other tests run: cli_runs); the
other runs take the smallest sizes that still print every row of what they check (without
uhashring, the selection part alone; the load-aware and concurrency benchmarks alone, rounds of
0.05 s).
"""

from __future__ import annotations

import importlib
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import BENCH_QUICK, lbclient, leaves_no_process, readme_command_lines

from lbclient.cli.bench import fleet

MISSING_UHASHRING = "uhashring not installed (pip install 'lbclient[bench]')"
PLOT_EXTRA = "pip install 'lbclient[plot]'"

# The algorithms of the refresh rows: one of each kind of selector.
SCALE_ALGORITHMS = (
    "RoundRobin",
    "Random",
    "Hash",
    "SmoothRoundRobin",
    "Consistent",
    "Consistent-bounded",
    "LibKetama",
    "Maglev",
    "Rendezvous",
    "LeastRequest",
    "PeakEWMA",
)
# The refresh rows' sizes, as the bench runs them and as the smallest runs here take them.
SCALE_SIZES = (1_000, 10_000)
SMOKE_SCALE_SIZES = (200,)


def bench_rows(scale: tuple[int, ...] = SCALE_SIZES) -> dict[str, str]:
    """The summary's rows, by the benchmark column, and the unit of their figures; the refresh
    rows at each of the sizes ``scale``."""
    largest = max(scale)
    return {
        **{
            f"select {algorithm}, {size} backends": "ns/op"
            for size in ("10", "1,000")
            for algorithm in ("RoundRobin", "Random", "Hash", "FNVHash", "Consistent")
        },
        **{
            f"select {algorithm}, {largest:,} backends": "ns/op"
            for algorithm in ("RoundRobin", "Hash", "Consistent", "Maglev")
        },
        "select Consistent vs uhashring ketama, 10 backends, str keys": "ns/op",
        "select Consistent vs uhashring ketama, 1,000 backends, str keys": "ns/op",
        "build RoundRobin, 10,000 backends, weights 1..100": "ms",
        "build Hash, 10,000 backends, weights 1..100": "ms",
        "build Consistent vs uhashring ketama, 1,000 backends": "ms",
        **{
            f"refresh {algorithm}, {size:,} backends: {figure}": unit
            for size in scale
            for algorithm in SCALE_ALGORITHMS
            for figure, unit in (
                ("build", "ms"),
                ("update, one backend out and one in", "ms"),
                ("memory kept", "MB"),
            )
        },
        "read a load report, ORCA TEXT, 4 fields": "ns/op",
        "LBTransport vs plain httpx.Client, 3 backends": "req/s",
        "LBTransport vs plain httpx.Client, 3 backends, metrics on": "req/s",
        "AsyncLBTransport vs plain httpx.AsyncClient, 3 backends": "req/s",
        "AsyncLBTransport vs plain httpx.AsyncClient, 3 backends, metrics on": "req/s",
        "LBAdapter vs plain requests.Session, 3 backends": "req/s",
        "LBAdapter vs plain requests.Session, 3 backends, metrics on": "req/s",
        "LBTransport vs plain httpx.Client, 1 backend": "req/s",
        "AsyncLBTransport vs plain httpx.AsyncClient, 1 backend": "req/s",
        "AsyncLBTransport p99, 1 of 3 slow, no hedging": "ms",
        "AsyncLBTransport p99, 1 of 3 slow, hedged at 50 ms, hedge budget ratio 0.5": "ms",
        "AsyncLBTransport p99, 1 of 3 slow, hedged at 50 ms, default hedge budget": "ms",
        **{
            f"{algorithm} vs RoundRobin {figure}, {run}, {client}": unit
            for client in ("AsyncLBTransport, 32 tasks", "LBAdapter, 16 threads")
            for algorithm in ("LeastRequest", "PeakEWMA")
            for figure, run, unit in (
                ("req/s", "1 of 4 slow", "req/s"),
                ("p99", "1 of 4 slow", "ms"),
                ("p99", "1 of 4 stalling", "ms"),
                ("503 share", "1 of 4 failing half", "%"),
            )
        },
        **{
            f"{client} vs plain {plain}, {level} {unit}": "req/s"
            for client, plain, unit, levels in (
                ("AsyncLBTransport", "httpx.AsyncClient", "tasks", ("10", "100", "1,000")),
                ("LBTransport", "httpx.Client", "threads", ("4", "64", "256")),
                ("LBAdapter", "requests.Session", "threads", ("4", "64", "256")),
            )
            for level in levels
        },
        "AsyncLBTransport req/s, 1,000 tasks vs 10 tasks": "req/s",
        # A quick run's fleet: the hidden-load setup, so its row only.
        "Prequal vs PeakEWMA p99, fleet, 1 of 4 loaded unseen": "ms",
    }


BENCH_ROWS = bench_rows()
UHASHRING_ROWS = [name for name in BENCH_ROWS if "uhashring" in name]
# The one refresh row with a floor: a 10,000-backend ring kept in compact arrays, its build's
# temporaries given back (a fresh interpreter's resident set grows by 16 MB at most).
RING_MEMORY_ROW = "refresh Consistent, 10,000 backends: memory kept"
HEDGED_ROWS = [name for name in BENCH_ROWS if "hedged at" in name]
# Rows whose figure may be zero (a share of requests), and then has no ratio.
SHARE_ROWS = [name for name, unit in BENCH_ROWS.items() if unit == "%"]
# The hedging benchmark's cases, its table's columns, and the columns that are counts.
HEDGING_CASES = [
    "no hedging",
    "hedge_after=0.05, hedge_budget=RetryBudget(ratio=0.5)",
    "hedge_after=0.05, default hedge budget",
]
HEDGING_COLUMNS = [
    "case",
    "req/s",
    "p50",
    "p99",
    "p99 ratio",
    "requests",
    "retries",
    "hedges",
    "hedge wins",
    "exhaustions",
    "waited",
]
HEDGING_COUNTS = ["requests", "retries", "hedges", "hedge wins", "exhaustions", "waited"]
QUICK_HEDGING_REQUESTS = 160
# The bench's selection part alone at its smallest (the part that uses uhashring): every one of
# its rows printed, nothing worth measuring.
SMOKE_SELECTION = [
    "bench",
    "--quick",
    "--reps",
    "1",
    "--scale-sizes",
    ",".join(map(str, SMOKE_SCALE_SIZES)),
    "--parts",
    "selection",
]
# The same for a benchmark run alone: rounds of 0.05 s (whole stall periods where one stalls).
SMOKE_ALONE = ["--quick", "--seconds", "0.05"]
# The load-aware benchmark's runs, clients and algorithms, in table order, and its columns.
LOAD_RUNS = ["1 of 4 slow", "1 of 4 stalling", "1 of 4 failing half"]
LOAD_CLIENTS = ["AsyncLBTransport, 32 tasks", "LBAdapter, 16 threads"]
LOAD_ALGORITHMS = ["RoundRobin", "LeastRequest", "PeakEWMA"]
LOAD_COLUMNS = [
    "run",
    "client",
    "algorithm",
    "req/s",
    "req/s x RR",
    "p50",
    "p99",
    "p99 x RR",
    "odd share",
    "odd x RR",
    "503 share",
    "503 x RR",
    "client CPU",
]
LOAD_RATIOS = ["req/s x RR", "p99 x RR", "odd x RR", "503 x RR"]
# The concurrency benchmark's rows (client, callers), in table order, and its columns.
CONCURRENCY_ROWS = [
    (client, f"{level} {unit}")
    for client, unit, levels in (
        ("AsyncLBTransport", "tasks", ("10", "100", "1,000")),
        ("LBTransport", "threads", ("4", "64", "256")),
        ("LBAdapter", "threads", ("4", "64", "256")),
    )
    for level in levels
]
CONCURRENCY_COLUMNS = [
    "client",
    "callers",
    "req/s",
    "p50",
    "p99",
    "p99 / (n / req/s)",
    "plain client",
    "plain req/s",
    "plain p50",
    "plain p99",
    "ratio",
    "errors",
    "client CPU",
]


# -- the package ---------------------------------------------------------------------------------

# Imports lbclient and every module of the library (all but lbclient.cli and lbclient.__main__),
# then prints the lbclient.cli modules that got imported along the way.
IMPORT_LIBRARY = """
import importlib, pkgutil, sys
import lbclient

def walk(package):
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name in ("lbclient.cli", "lbclient.__main__"):
            continue
        module = importlib.import_module(info.name)
        if info.ispkg:
            walk(module)

walk(lbclient)
print(sorted(m for m in sys.modules if m == "lbclient.cli" or m.startswith("lbclient.cli.")))
"""


@pytest.mark.slow
def test_help_names_the_three_commands() -> None:
    done = lbclient("--help")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("usage: python -m lbclient [-h] {demo,bench,simulate}")
    for command in ("demo", "bench", "simulate"):
        assert f"``{command}``" in done.stdout  # the description says what each one does
    assert not done.stderr


@pytest.mark.slow
def test_the_library_never_imports_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_LIBRARY],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.parametrize(
    "module", ["selection", "transport", "hedging", "loadaware", "concurrency"]
)
def test_each_benchmark_runs_alone(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"lbclient.cli.bench.{module}", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--quick" in done.stdout
    assert not done.stderr  # no warning about a module imported twice


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [[], ["--delay", "0.1"], ["--stall-every", "1", "--stall-for", "0.2"], ["--fail-every", "3"]],
    ids=["plain", "delayed", "stalling", "failing"],
)
def test_the_loopback_server_runs_as_a_module_and_exits_with_its_stdin(options: list[str]) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "lbclient.cli.bench.server", *options],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        assert port.isdigit(), port
        # A client that hangs up before its answer, as a hedge's loser does: ended quietly.
        with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as gone:
            gone.sendall(b"GET /item HTTP/1.1\r\nHost: users\r\n\r\n")
        with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as conn:
            conn.sendall(b"GET /item HTTP/1.1\r\nHost: users\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        assert server.stdin is not None
        server.stdin.close()
        try:
            server.wait(timeout=10)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    assert server.returncode == 0
    assert server.stderr is not None
    assert not server.stderr.read()


@pytest.mark.slow
def test_the_loopback_server_fails_every_nth_request_and_counts_them() -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "lbclient.cli.bench.server", "--fail-every", "2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        heads = []
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            for _ in range(4):  # one connection, kept alive
                conn.sendall(b"GET /item HTTP/1.1\r\nHost: users\r\n\r\n")
                heads.append(conn.recv(65536).split(b"\r\n")[0])
            conn.sendall(b"GET /_served HTTP/1.1\r\nHost: users\r\n\r\n")
            counted = conn.recv(65536)
        assert heads == [b"HTTP/1.1 200 OK", b"HTTP/1.1 503 Service Unavailable"] * 2
        assert counted.startswith(b"HTTP/1.1 200 OK\r\n")
        assert counted.endswith(b"\r\n\r\n4")  # the four requests, not the count's own
    finally:
        assert server.stdin is not None
        server.stdin.close()
        try:
            server.wait(timeout=10)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    assert server.returncode == 0


# -- bench ---------------------------------------------------------------------------------------


def _number(cell: str, unit: str, zero: bool = False) -> float:
    """The figure in ``cell`` ("1,234.5 ms", or "12.5%"): above 0, or at least 0 with ``zero``."""
    match = re.fullmatch(rf"([\d,]+(?:\.\d+)?) ?{re.escape(unit)}", cell)
    assert match, f"{cell!r} is not a figure in {unit}"
    value = float(match.group(1).replace(",", ""))
    assert value >= 0 if zero else value > 0, cell
    return value


def bench_table(stdout: str) -> dict[str, list[str]]:
    """The table's rows by benchmark name, each as its five cells."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("benchmark "))
    assert [c.strip() for c in lines[head].split(" | ")] == [
        "benchmark",
        "lbclient",
        "baseline",
        "ratio",
        "floor",
    ]
    assert set(lines[head + 1]) <= {"-", "+"}
    rows: dict[str, list[str]] = {}
    for line in lines[head + 2 :]:
        if set(line) <= {"-", "+"}:
            break
        cells = [c.strip() for c in line.split(" | ")]
        assert len(cells) == 5, line
        assert cells[0] not in rows, f"row {cells[0]!r} printed twice"
        rows[cells[0]] = cells
    else:
        pytest.fail("the table has no closing rule")
    return rows


def selection_rows(rows: dict[str, str]) -> dict[str, str]:
    """Of the summary's ``rows``, those of the selection benchmark."""
    return {
        name: unit
        for name, unit in rows.items()
        if name.startswith(("select ", "build ", "refresh ", "read a load report"))
    }


def check_bench_table(out: str, expected: dict[str, str], *, uhashring: bool) -> None:
    """The summary table of ``out`` has exactly the rows ``expected``, in order, and every
    figure, baseline, ratio and floor cell of each parses; the detail tables follow where
    ``expected`` has their rows."""
    rows = bench_table(out)
    assert list(rows) == list(expected), "rows missing, extra or out of order"
    for name, unit in expected.items():
        _, ours, baseline, ratio, floor = rows[name]
        share = name in SHARE_ROWS
        # A balancer of a few hundred backends may fit in memory the interpreter already has.
        figure = _number(ours, unit, zero=share or name.endswith(": memory kept"))
        if name in UHASHRING_ROWS and not uhashring:
            assert baseline == MISSING_UHASHRING, name  # lbclient's side is still measured
            assert ratio == "-", name
        elif baseline == "-":
            assert ratio == "-", name
        else:
            _number(baseline, unit)
            if share and figure == 0:
                assert ratio == "-", name  # no ratio to a share of nothing
            else:
                assert float(ratio) > 0, name
        assert floor == "-" or re.fullmatch(r"[<>]=? [\d,.]+( \S+)?: (met|NOT MET)", floor), floor
    baselines = HEDGED_ROWS + [n for n, unit in expected.items() if unit == "req/s"]
    for name in baselines + (UHASHRING_ROWS if uhashring else []):
        if name in expected:
            assert rows[name][2] != "-", f"{name} has no baseline"
    for name in [
        n
        for n in expected
        if "p99" in n or " vs RoundRobin " in n or "tasks" in n or "threads" in n
    ]:
        assert rows[name][4] == "-", f"{name} has a floor"  # a measurement only
    for name in [n for n in expected if n.startswith("refresh ")]:
        assert rows[name][2] == "-", f"{name} has a baseline"
        if name == RING_MEMORY_ROW:
            # RSS growth of a fresh interpreter, a memory figure: no clock in it.
            assert rows[name][4] == "<= 16 MB: met", rows[name]
        else:
            assert rows[name][4] == "-", f"{name} has a floor"
    if expected != selection_rows(expected):
        # The hedging, load-aware and concurrency cases in detail follow the table.
        assert list(hedging_table(out)) == HEDGING_CASES
        assert list(load_table(out)) == LOAD_CASES
        assert list(concurrency_table(out)) == CONCURRENCY_ROWS
    assert re.search(r"^floors missed: \d+", out, re.M)
    # The footnote on missed floors (wrapped at 100 columns wherever its words fall).
    assert "--strict makes a full run exit 1" in " ".join(out.split())


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(900)
def test_the_readmes_bench_quick_prints_every_table(tmp_path: Path) -> None:
    """The README's ``python -m lbclient bench --quick``, run once: one summary table with every
    row, then the hedging, load-aware and concurrency cases, and no process left behind. (The
    README test of test_docs leaves this line to this test.)"""
    pytest.importorskip("uhashring", reason="uhashring (in the dev extra) is the ring baseline")
    assert f"python {' '.join(BENCH_QUICK)}" in readme_command_lines()
    with leaves_no_process() as env:
        done = subprocess.run(
            [sys.executable, *BENCH_QUICK],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp_path,
            env=env,
            check=False,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(r"^Python 3\.\d+\.\d+ .*; \d+ CPUs", out, re.M), out
    assert re.search(
        rf"^lbclient bench \(quick run\): {re.escape(sys.executable)} -m lbclient "
        r"bench --quick$",
        out,
        re.M,
    ), out
    check_bench_table(out, BENCH_ROWS, uhashring=True)
    check_hedging(out)  # the same cases as the benchmark run alone
    check_load_aware(out, measured=True)
    check_concurrency(out)
    check_fleet(out)


def check_fleet(stdout: str) -> None:
    """The fleet's table, after the summary: a quick run's setup (the hidden load), every
    algorithm, and the hidden load's aim."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("setup "))
    assert [c.strip() for c in lines[head].split("|")] == [name for name, _ in fleet.COLUMNS]
    cases = []
    for line in lines[head + 2 :]:
        if set(line) <= {"-", "+"}:
            break
        cells = [c.strip() for c in line.split("|")]
        cases.append((cells[0], cells[1]))
        _number(cells[5], "ms")
    expected = [
        (setup.name, name)
        for setup in fleet.summary_setups(quick=True)
        for name, _ in fleet.ALGORITHMS
    ]
    assert cases == expected
    assert re.search(r"^  hidden load: Prequal p99 <= 0\.60x PeakEWMA's: [\d.]+x, ", stdout, re.M)


@pytest.mark.slow
def test_bench_without_uhashring_says_so_and_exits_0(tmp_path: Path) -> None:
    # The selection part, the one with uhashring rows, at its smallest (the other parts never
    # use uhashring: they run in the README's run above).
    done = lbclient(*SMOKE_SELECTION, without="uhashring", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"-m lbclient {' '.join(SMOKE_SELECTION)}\n" in done.stdout  # the sizes are told
    # The uhashring rows say what to install; every other row is measured as usual.
    check_bench_table(done.stdout, selection_rows(bench_rows(SMOKE_SCALE_SIZES)), uhashring=False)
    assert "uhashring not installed" in done.stdout.split("\n\n")[0]  # the header says it too
    # The selection part alone ran.
    assert re.search(r"^total run time [\d.]+ s \(selection [\d.]+ s\)$", done.stdout, re.M)


def hedging_table(stdout: str) -> dict[str, dict[str, str]]:
    """The hedging benchmark's table: each case's cells by column."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("case "))
    assert [c.strip() for c in lines[head].split(" | ")] == HEDGING_COLUMNS
    assert set(lines[head + 1]) <= {"-", "+"}
    rows: dict[str, dict[str, str]] = {}
    for line in lines[head + 2 :]:
        if set(line) <= {"-", "+"}:
            break
        cells = [c.strip() for c in line.split(" | ")]
        assert len(cells) == len(HEDGING_COLUMNS), line
        assert cells[0] not in rows, f"case {cells[0]!r} printed twice"
        rows[cells[0]] = dict(zip(HEDGING_COLUMNS, cells, strict=True))
    else:
        pytest.fail("the hedging table has no closing rule")
    return rows


def check_hedging(stdout: str) -> None:
    """The hedging table of ``stdout``: every case, its attempts counted, and hedges sent where
    the budget has room for them."""
    rows = hedging_table(stdout)
    assert list(rows) == HEDGING_CASES, "cases missing, extra or out of order"
    counts: dict[str, dict[str, int]] = {}
    for case, cells in rows.items():
        for column in HEDGING_COUNTS:
            assert re.fullmatch(r"\d[\d,]*", cells[column]), (case, column, cells[column])
        counts[case] = {column: int(cells[column].replace(",", "")) for column in HEDGING_COUNTS}
        _number(cells["p50"], "ms")
        _number(cells["p99"], "ms")
        assert float(cells["req/s"].replace(",", "")) > 0, case
        assert counts[case]["requests"] == QUICK_HEDGING_REQUESTS, case
        assert counts[case]["hedge wins"] <= counts[case]["hedges"] <= counts[case]["retries"]
    plain, roomy, default = (counts[case] for case in HEDGING_CASES)
    assert rows["no hedging"]["p99 ratio"] == "-"  # the reference of the others
    assert plain["retries"] == plain["hedges"] == plain["hedge wins"] == 0
    assert plain["exhaustions"] == 0
    for case in HEDGING_CASES[1:]:
        assert float(rows[case]["p99 ratio"]) > 0, case
    # A third of the first attempts go to the backend that answers after 300 ms: with room in
    # the budget, those are hedged.
    assert roomy["hedges"] > 0
    assert default["hedges"] + default["exhaustions"] > 0


@pytest.mark.slow
def test_hedging_benchmark_runs_alone_and_counts_the_attempts(tmp_path: Path) -> None:
    with leaves_no_process() as env:
        done = subprocess.run(
            [sys.executable, "-m", "lbclient.cli.bench.hedging", "--quick"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=env,
            check=False,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not done.stderr  # nor from the servers, which hedges' losers hang up on
    check_hedging(done.stdout)


LOAD_CASES = [
    (run, client, algorithm)
    for run in LOAD_RUNS
    for client in LOAD_CLIENTS
    for algorithm in LOAD_ALGORITHMS
]


def detail_table(
    stdout: str, columns: list[str], key: int
) -> dict[tuple[str, ...], dict[str, str]]:
    """The detail table whose head is ``columns``: each row's cells by column, keyed by its
    first ``key`` cells."""
    lines = stdout.splitlines()
    head = next(
        i for i, line in enumerate(lines) if [c.strip() for c in line.split(" | ")] == columns
    )
    assert set(lines[head + 1]) <= {"-", "+"}
    rows: dict[tuple[str, ...], dict[str, str]] = {}
    for line in lines[head + 2 :]:
        if set(line) <= {"-", "+"}:
            break
        cells = [c.strip() for c in line.split(" | ")]
        assert len(cells) == len(columns), line
        assert tuple(cells[:key]) not in rows, f"row {cells[:key]} printed twice"
        rows[tuple(cells[:key])] = dict(zip(columns, cells, strict=True))
    else:
        pytest.fail(f"the table under {columns[:3]} has no closing rule")
    return rows


def load_table(stdout: str) -> dict[tuple[str, ...], dict[str, str]]:
    """The load-aware benchmark's table, by (run, client, algorithm)."""
    return detail_table(stdout, LOAD_COLUMNS, 3)


def concurrency_table(stdout: str) -> dict[tuple[str, ...], dict[str, str]]:
    """The concurrency benchmark's table, by (client, callers)."""
    return detail_table(stdout, CONCURRENCY_COLUMNS, 2)


def check_load_aware(stdout: str, *, measured: bool) -> None:
    """The load-aware table of ``stdout``: every case in order, every figure and ratio parses,
    503s only where a backend fails, and the aims. With ``measured`` (rounds of 0.2 s, as
    ``--quick`` runs them), RoundRobin sends the odd backend about a quarter of the requests."""
    rows = load_table(stdout)
    assert list(rows) == LOAD_CASES, "cases missing, extra or out of order"
    for (run, _, algorithm), cells in rows.items():
        assert float(cells["req/s"].replace(",", "")) > 0
        _number(cells["p50"], "ms")
        _number(cells["p99"], "ms")
        odd = _number(cells["odd share"], "%", zero=True)
        failed = _number(cells["503 share"], "%", zero=True)
        _number(cells["client CPU"], "%", zero=True)
        if algorithm == "RoundRobin":  # the reference: no ratio, a quarter of the requests each
            assert [cells[column] for column in LOAD_RATIOS] == ["-"] * len(LOAD_RATIOS)
            assert odd > 0, run
            if measured:
                assert 20 <= odd <= 30, (run, odd)
        else:
            assert float(cells["req/s x RR"]) > 0
            assert float(cells["p99 x RR"]) > 0
            assert float(cells["odd x RR"]) >= 0
        if run == "1 of 4 failing half":
            if algorithm == "RoundRobin":
                assert failed > 0  # every other answer of one backend in four
            else:
                assert float(cells["503 x RR"]) >= 0
        else:
            assert failed == 0, (run, algorithm)
            assert cells["503 x RR"] == "-"
    aims = re.findall(
        r"^  (1 of 4 [a-z ]+), (AsyncLBTransport, 32 tasks|LBAdapter, 16 threads): "
        r"(\w+) .+: [\d.]+x, (met|NOT MET)$",
        stdout,
        re.M,
    )
    assert len(aims) == 14, stdout  # 7 aims per client


def check_concurrency(stdout: str) -> None:
    """The concurrency table of ``stdout``: every level in order, every figure parses, and the
    aims."""
    rows = concurrency_table(stdout)
    assert list(rows) == CONCURRENCY_ROWS, "levels missing, extra or out of order"
    plains = {
        "AsyncLBTransport": "httpx.AsyncClient",
        "LBTransport": "httpx.Client",
        "LBAdapter": "requests.Session",
    }
    for (client, _), cells in rows.items():
        assert cells["plain client"] == plains[client]
        for column in ("req/s", "plain req/s"):
            assert float(cells[column].replace(",", "")) > 0, column
        for column in ("p50", "p99", "plain p50", "plain p99"):
            _number(cells[column], "ms")
        assert float(cells["ratio"]) > 0
        assert float(cells["p99 / (n / req/s)"]) > 0
        assert re.fullmatch(r"\d[\d,]* / \d[\d,]*", cells["errors"]), cells["errors"]
        assert re.fullmatch(r"\d+% / \d+%", cells["client CPU"]), cells["client CPU"]
    assert re.search(
        r"^  AsyncLBTransport, 1,000 tasks / 10 tasks, req/s: [\d.]+ \(aim >= 0.7\): "
        r"(met|NOT MET)$",
        stdout,
        re.M,
    ), stdout
    tails = re.findall(
        r"^  \w+, [\d,]+ tasks: p99 .+ \(aim <= 2x\): (?:met|NOT MET)$", stdout, re.M
    )
    threads = re.findall(
        r"^  \w+, [\d,]+ threads: p99 .+ \(the plain client's: [\d.]+x\): "
        r"for information$",
        stdout,
        re.M,
    )
    assert len(tails) == 3  # the task levels
    assert len(tails) + len(threads) == len(CONCURRENCY_ROWS)


def run_alone(module: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``python -m lbclient.cli.bench.MODULE`` at its smallest, checked to leave no process
    behind."""
    with leaves_no_process() as env:
        return subprocess.run(
            [sys.executable, "-m", f"lbclient.cli.bench.{module}", *SMOKE_ALONE],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env=env,
            check=False,
        )


@pytest.mark.slow
def test_loadaware_benchmark_runs_alone_and_prints_every_case(tmp_path: Path) -> None:
    done = run_alone("loadaware", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not done.stderr  # nor from the servers
    assert "1 round of 0.05 s per case" in done.stdout  # as the run was asked for
    check_load_aware(done.stdout, measured=False)


@pytest.mark.slow
def test_concurrency_benchmark_runs_alone_and_prints_every_level(tmp_path: Path) -> None:
    done = run_alone("concurrency", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not done.stderr
    assert "1 round of 0.05 s per side and level" in done.stdout  # as the run was asked for
    check_concurrency(done.stdout)


@pytest.mark.parametrize("module", ["loadaware", "concurrency"])
@pytest.mark.parametrize("args", [["--seconds", "0"], ["--rounds", "0"], ["--seconds", "x"]])
def test_the_benchmarks_alone_reject_bad_round_settings(
    module: str, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    main = importlib.import_module(f"lbclient.cli.bench.{module}").main
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert "error:" in err
    assert not out


# -- simulate ------------------------------------------------------------------------------------

ROW = re.compile(
    r"^  (?P<address>\S+:\d+) +(?P<weight>\d+) +(?P<keys>[\d,]+) +(?P<share>[\d.]+)% +"
    r"(?P<fair>[\d.]+)% +(?P<load>[\d.]+)",
    re.M,
)
MOVE = re.compile(
    r"^  (?P<change>remove|add) (?P<address>\S+) \(weight (?P<weight>\d+)\): "
    r"(?P<moved>[\d.]+)% of keys move \((?P<moved_keys>[\d,]+)\); "
    r"ideal minimum (?P<ideal>[\d.]+)% \((?P<ideal_keys>[\d,]+), [^)]*\); "
    r"its fair share (?P<fair>[\d.]+)%",
    re.M,
)


def run_simulate(*args: str) -> str:
    done = lbclient("simulate", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _distribution(out: str) -> list[dict[str, float]]:
    return [
        {k: float(v.replace(",", "")) for k, v in m.groupdict().items() if k != "address"}
        for m in ROW.finditer(out)
    ]


def _moves(out: str) -> dict[str, dict[str, float]]:
    return {
        m["change"]: {
            k: float(v.replace(",", ""))
            for k, v in m.groupdict().items()
            if k not in ("change", "address")
        }
        for m in MOVE.finditer(out)
    }


def _max_mean(out: str) -> float:
    match = re.search(r"max/mean load ratio: ([\d.]+)", out)
    assert match, out
    return float(match.group(1))


@pytest.mark.slow
def test_simulate_consistent_moves_only_the_keys_that_must_move() -> None:
    out = run_simulate()  # defaults: consistent, 10 backends, 100,000 keys
    rows = _distribution(out)
    assert len(rows) == 10
    assert sum(r["keys"] for r in rows) == 100_000
    assert all(r["weight"] == 1 and r["fair"] == 10.0 for r in rows)
    assert sum(r["share"] for r in rows) == pytest.approx(100, abs=0.05)
    ratio = _max_mean(out)
    assert ratio == pytest.approx(max(r["load"] for r in rows), abs=0.001)
    assert 1 <= ratio < 1.25  # 160 points per backend keep every share near its fair one
    moves = _moves(out)
    assert set(moves) == {"remove", "add"}
    for change, fair in (("remove", 1 / 10), ("add", 1 / 11)):
        move = moves[change]
        assert move["fair"] == pytest.approx(100 * fair, abs=0.01)
        # The ketama property: exactly the keys that must move do (the removed backend's, or
        # the ones the new backend takes), about the backend's fair share of all keys.
        assert move["moved_keys"] == move["ideal_keys"]
        assert move["ideal"] <= move["moved"] <= 100 * fair * 1.3


@pytest.mark.slow
def test_simulate_consistent_with_weights() -> None:
    out = run_simulate("--backends", "4", "--weights", "1,1,2,4", "--keys", "20000")
    rows = _distribution(out)
    assert [r["weight"] for r in rows] == [1, 1, 2, 4]
    assert [r["fair"] for r in rows] == [12.5, 12.5, 25.0, 50.0]
    assert 1 <= _max_mean(out) < 1.3
    removal = _moves(out)["remove"]  # the weight-4 backend leaves: half the keys must move
    assert removal["fair"] == 50.0
    assert removal["ideal"] <= removal["moved"] <= 50 * 1.3


@pytest.mark.slow
def test_simulate_hash_moves_far_more_keys_than_consistent() -> None:
    hashed = _moves(run_simulate("--algorithm", "hash", "--keys", "20000"))
    ring = _moves(run_simulate("--algorithm", "consistent", "--keys", "20000"))
    for change in ("remove", "add"):
        assert hashed[change]["moved"] > 50  # modulo over a new table: most keys move
        assert hashed[change]["moved"] > 4 * ring[change]["moved"]
        assert hashed[change]["moved_keys"] > hashed[change]["ideal_keys"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["roundrobin", "random"])
def test_simulate_says_keys_do_not_move_for_algorithms_that_ignore_the_key(algorithm: str) -> None:
    out = run_simulate("--algorithm", algorithm, "--backends", "3", "--keys", "3000")
    assert f"n/a: {algorithm} does not map keys to backends" in out
    assert "of keys move" not in out
    rows = _distribution(out)
    assert len(rows) == 3
    assert sum(r["keys"] for r in rows) == 3000


@pytest.mark.slow
def test_simulate_is_deterministic_and_seeded() -> None:
    args = ("--algorithm", "fnv", "--keys", "5000")
    first = run_simulate(*args).split("\ntook")[0]
    assert run_simulate(*args).split("\ntook")[0] == first
    assert run_simulate(*args, "--seed", "7").split("\ntook")[0] != first


@pytest.mark.slow
def test_simulate_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip(
        "matplotlib", reason="matplotlib (the 'plot' extra, also in 'dev') draws the charts"
    )
    path = tmp_path / "x.png"
    out = run_simulate(
        "--algorithm", "consistent", "--backends", "10", "--keys", "20000", "--plot", str(path)
    )
    assert str(path) in out
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


@pytest.mark.slow
def test_simulate_plot_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    done = lbclient("simulate", "--keys", "1000", "--plot", str(path), without="matplotlib")
    assert done.returncode == 2, done.stdout + done.stderr
    assert PLOT_EXTRA in done.stderr
    assert "matplotlib" in done.stderr
    assert not path.exists()
    # Arguments are checked first: a bad one is reported as such, matplotlib or not.
    done = lbclient("simulate", "--backends", "0", "--plot", str(path), without="matplotlib")
    assert done.returncode == 2
    assert "--backends" in done.stderr
    assert "got 0" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param(["--algorithm", "ketama"], "'ketama'", id="unknown-algorithm"),
        pytest.param(["--backends", "0"], "got 0", id="no-backends"),
        pytest.param(["--backends", "ten"], "'ten'", id="backends-not-a-number"),
        pytest.param(["--keys", "0"], "got 0", id="no-keys"),
        pytest.param(["--keys", "-5"], "got -5", id="negative-keys"),
        pytest.param(["--weights", "1,2,3"], "'1,2,3'", id="weights-for-3-of-10"),
        pytest.param(["--backends", "3", "--weights", "1,0,2"], "got 0", id="weight-0"),
        pytest.param(["--backends", "3", "--weights", "1,x,2"], "'x'", id="weight-not-a-number"),
        pytest.param(["--backends", "3", "--weights", "1,70000,2"], "70000", id="weight-too-big"),
        pytest.param(["--backends", "2", "--weights", "1,2.5"], "'2.5'", id="weight-not-whole"),
        pytest.param(["--plot", "ring.svg"], "'ring.svg'", id="plot-not-png"),
    ],
)
def test_simulate_rejects_bad_input_naming_the_value(args: list[str], named: str) -> None:
    done = lbclient("simulate", *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error:" in done.stderr
    assert named in done.stderr
    assert not done.stdout
