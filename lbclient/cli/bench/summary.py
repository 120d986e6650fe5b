"""``python -m lbclient bench``: the selection, transport, hedging, load-aware, concurrency and
fleet benchmarks in one table.

The benchmarks run in this one process, each side by side with its baseline: selection against
uhashring's ketama ring (optional: ``pip install 'lbclient[bench]'``; without it those rows say
so and the rest still runs), the transports against the plain httpx and requests clients, to
loopback servers in their own processes, hedged requests through ``AsyncLBTransport`` against no
hedging, with one backend of three slow, LeastRequest and PeakEWMA against RoundRobin with one
backend of four slow, stalling or failing, and lbclient's clients under 10 to 1,000 concurrent
callers against the plain clients with pools of the same size, the load-aware algorithms and
Prequal over a fleet on one machine (backends of a fixed concurrency, one loaded by another
process the client cannot see; :mod:`lbclient.cli.bench.fleet`); and, for one algorithm of each
kind, a balancer's build, one-change update and memory at 1,000 and 10,000 backends. The table
shows medians (for hedging and the load-aware rows, p99 latencies, throughput and shares of
requests), the ratio (lbclient's speed over the baseline's: above 1 means lbclient is faster, or
the load-aware algorithm does better than RoundRobin; for hedging, the p99 without hedging over
the p99 with it) and the project's performance floors (none on the hedging, load-aware,
concurrency and refresh rows but one: the memory of a 10,000-backend Consistent ring). The
hedging, load-aware, concurrency and fleet cases' figures follow in tables of their own.

A missed floor is reported, never hidden, but the command exits 0: a ratio a few percent from a
floor moves across it from run to run on a shared machine, so one run is a measurement, not a
verdict. ``--strict`` makes a full run exit 1 when a floor is missed (for a performance gate on
a quiet machine).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import sys
import textwrap
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from lbclient.cli import COMMANDS
from lbclient.cli.bench import concurrency, fleet, hedging, loadaware, selection, transport

__all__ = [
    "HEAD",
    "PARTS",
    "SummaryRow",
    "SummaryRun",
    "add_parser",
    "command",
    "command_line",
    "format_summary",
    "run_summary",
]

#: The selection rows shown: these algorithms at these sizes (bytes keys).
SELECT_ALGORITHMS = ("RoundRobin", "Random", "Hash", "FNVHash", "Consistent")
SELECT_SIZES = (10, 1_000)

#: Transport case (as :func:`lbclient.cli.bench.transport.run` names it) -> what is compared.
TRANSPORT_LABELS = {
    "sync, 3 backends": "LBTransport vs plain httpx.Client, 3 backends",
    "sync, 3 backends, metrics": "LBTransport vs plain httpx.Client, 3 backends, metrics on",
    "async, 3 backends": "AsyncLBTransport vs plain httpx.AsyncClient, 3 backends",
    "async, 3 backends, metrics": (
        "AsyncLBTransport vs plain httpx.AsyncClient, 3 backends, metrics on"
    ),
    "requests, 3 backends": "LBAdapter vs plain requests.Session, 3 backends",
    "requests, 3 backends, metrics": (
        "LBAdapter vs plain requests.Session, 3 backends, metrics on"
    ),
    "sync, 1 backend": "LBTransport vs plain httpx.Client, 1 backend",
    "async, 1 backend": "AsyncLBTransport vs plain httpx.AsyncClient, 1 backend",
}

#: Hedging case (as :func:`lbclient.cli.bench.hedging.run` names it) -> what is measured.
HEDGING_LABELS = {
    "no hedging": "AsyncLBTransport p99, 1 of 3 slow, no hedging",
    "hedge_after=0.05, hedge_budget=RetryBudget(ratio=0.5)": (
        "AsyncLBTransport p99, 1 of 3 slow, hedged at 50 ms, hedge budget ratio 0.5"
    ),
    "hedge_after=0.05, default hedge budget": (
        "AsyncLBTransport p99, 1 of 3 slow, hedged at 50 ms, default hedge budget"
    ),
}

#: The benchmarks of the summary, in the order they run and their rows are shown.
PARTS = ("selection", "transports", "hedging", "load-aware", "concurrency", "fleet")

#: The table's columns.
HEAD = ("benchmark", "lbclient", "baseline", "ratio", "floor")


@dataclass(frozen=True)
class SummaryRow:
    """One line of the table, as printed: every cell is text, numbers carry their unit."""

    benchmark: str
    lbclient: str
    baseline: str
    ratio: str
    floor: str
    missed: bool = False  # a floor applies to this row and was not met

    def cells(self) -> tuple[str, str, str, str, str]:
        """The cells in :data:`HEAD` order."""
        return (self.benchmark, self.lbclient, self.baseline, self.ratio, self.floor)


def _ns(value: float) -> str:
    return f"{value:,.0f} ns/op"


def _ms(value: float) -> str:
    return f"{value:,.1f} ms"


def _fine_ms(value: float) -> str:
    """Milliseconds to the hundredth: an update of 1,000 backends takes a fraction of one."""
    return f"{value:,.2f} ms"


def _mb(value: float) -> str:
    return f"{value:,.1f} MB"


#: The refresh rows of each algorithm at each size: (figure, as the row names it, its unit).
REFRESH_FIGURES: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("build", "build", _fine_ms),
    ("update", "update, one backend out and one in", _fine_ms),
    ("memory", "memory kept", _mb),
)


def _per_second(seconds: float) -> str:
    return f"{1 / seconds:,.0f} req/s"


def _floor(verdict: tuple[str, bool] | None) -> tuple[str, bool]:
    """The floor cell and whether the floor was missed."""
    if verdict is None:
        return "-", False
    threshold, met = verdict
    return f"{threshold}: {'met' if met else 'NOT MET'}", not met


def _selection_rows(
    rows: Sequence[selection.Row],
    have_baseline: bool,
    scale_sizes: Sequence[int] = selection.SCALE_SIZES,
) -> list[SummaryRow]:
    """The selection results shown in the summary, in table order; the refresh rows at each
    of ``scale_sizes``."""
    by_id = {r["id"]: r for r in rows}
    out: list[SummaryRow] = []

    def add(label: str, row: selection.Row, unit: Callable[[float], str]) -> None:
        floor, missed = _floor(selection.row_floor(row))
        if row["baseline"] is None or row["ratio"] is None:
            base = "-" if have_baseline or "uhashring" not in label else selection.MISSING_UHASHRING
            out.append(SummaryRow(label, unit(row["lbclient"]), base, "-", floor, missed))
        else:
            out.append(
                SummaryRow(
                    label,
                    unit(row["lbclient"]),
                    unit(row["baseline"]),
                    f"{row['ratio']:.2f}",
                    floor,
                    missed,
                )
            )

    for n in SELECT_SIZES:
        for name in SELECT_ALGORITHMS:
            add(f"select {name}, {n:,} backends", by_id[f"select/{name}/{n}/bytes"], _ns)
    largest = max(scale_sizes)
    for name in selection.SCALE_SELECT_ALGORITHMS:
        add(f"select {name}, {largest:,} backends", by_id[f"select/{name}/{largest}/bytes"], _ns)
    for n in SELECT_SIZES:
        # Like for like: str keys on both sides. Without uhashring the lbclient side is still
        # measured (the same str-key select), and the baseline cell says what to install.
        row = by_id.get(f"compare/ketama/{n}/str") or by_id[f"select/Consistent/{n}/str"]
        add(f"select Consistent vs uhashring ketama, {n:,} backends, str keys", row, _ns)
    count = selection.WEIGHTED_BUILD_BACKENDS
    for name in ("RoundRobin", "Hash"):
        add(
            f"build {name}, {count:,} backends, weights 1..100", by_id[f"build/{name}/{count}"], _ms
        )
    count = selection.CONSISTENT_BUILD_BACKENDS
    add(
        f"build Consistent vs uhashring ketama, {count:,} backends",
        by_id[f"build/Consistent/{count}"],
        _ms,
    )
    for n in scale_sizes:
        for name, _ in selection.SCALE_ALGORITHMS:
            for figure, what, unit in REFRESH_FIGURES:
                add(
                    f"refresh {name}, {n:,} backends: {what}",
                    by_id[f"scale/{figure}/{name}/{n}"],
                    unit,
                )
    add("read a load report, ORCA TEXT, 4 fields", by_id[selection.REPORT_TEXT_ID], _ns)
    return out


def _transport_rows(rows: Sequence[transport.TransportRow]) -> list[SummaryRow]:
    """The transport results, as requests per second."""
    out = []
    for row in rows:
        met = row.ratio >= transport.FLOOR
        floor, missed = _floor((f">= {transport.FLOOR:.2f}", met))
        out.append(
            SummaryRow(
                TRANSPORT_LABELS.get(row.case, row.case),
                _per_second(row.lbclient),
                _per_second(row.plain),
                f"{row.ratio:.2f}",
                floor,
                missed,
            )
        )
    return out


def _hedging_rows(rows: Sequence[hedging.HedgingRow]) -> list[SummaryRow]:
    """The hedging results as p99 latencies: each hedged case against the case without."""
    reference = rows[0]
    out = [
        SummaryRow(
            HEDGING_LABELS.get(reference.case, reference.case),
            _ms(reference.p99 * 1000),
            "-",
            "-",
            "-",
        )
    ]
    for row in rows[1:]:
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
        out.append(
            SummaryRow(
                HEDGING_LABELS.get(row.case, row.case),
                _ms(row.p99 * 1000),
                _ms(reference.p99 * 1000),
                ratio,
                "-",
            )
        )
    return out


#: The load-aware rows: (run, figure, how it is named in the row), for every client and every
#: load-aware algorithm.
LOAD_FIGURES = (
    ("1 of 4 slow", "req/s", "req/s"),
    ("1 of 4 slow", "p99", "p99"),
    ("1 of 4 stalling", "p99", "p99"),
    ("1 of 4 failing half", "503s", "503 share"),
)


def _load_cell(row: loadaware.LoadRow, figure: str) -> str:
    if figure == "req/s":
        return f"{row.per_second:,.0f} req/s"
    if figure == "p99":
        return _ms(row.p99 * 1000)
    return f"{row.failed_share:.1%}"


def _load_rows(rows: Sequence[loadaware.LoadRow]) -> list[SummaryRow]:
    """Each load-aware algorithm against RoundRobin, same run and client: throughput and p99
    with one backend slow, p99 with one stalling, the 503s callers saw with one failing. The
    ratio is the algorithm's gain: above 1, it does better than RoundRobin."""
    out = []
    for client in loadaware.CLIENTS:
        for name, _ in loadaware.ALGORITHMS[1:]:
            for run, figure, label in LOAD_FIGURES:
                row = next(
                    (
                        r
                        for r in rows
                        if r.run == run and r.client == client and r.algorithm == name
                    ),
                    None,
                )
                if row is None:
                    continue
                base = loadaware.reference(rows, row)
                gain = loadaware.ratios(rows, row)[figure]
                if gain is not None and figure != "req/s":
                    gain = 1 / gain if gain > 0 else None
                out.append(
                    SummaryRow(
                        f"{name} vs RoundRobin {label}, {run}, {client}",
                        _load_cell(row, figure),
                        _load_cell(base, figure),
                        "-" if gain is None else f"{gain:.2f}",
                        "-",
                    )
                )
    return out


def _concurrency_rows(rows: Sequence[concurrency.ConcurrencyRow]) -> list[SummaryRow]:
    """Each lbclient client against the plain one at each level of concurrency, as requests
    per second; then AsyncLBTransport's throughput at the most tasks against the fewest."""
    out = [
        SummaryRow(
            f"{row.client} vs plain {row.plain}, {row.level:,} {row.unit}",
            _per_second(1 / row.ours.per_second),
            _per_second(1 / row.theirs.per_second),
            f"{row.ratio:.2f}",
            "-",
        )
        for row in rows
    ]
    tasks = {row.level: row for row in rows if row.client == "AsyncLBTransport"}
    low, high = min(concurrency.TASK_LEVELS), max(concurrency.TASK_LEVELS)
    if low in tasks and high in tasks:
        most, fewest = tasks[high].ours.per_second, tasks[low].ours.per_second
        out.append(
            SummaryRow(
                f"AsyncLBTransport req/s, {high:,} tasks vs {low:,} tasks",
                _per_second(1 / most),
                _per_second(1 / fewest),
                f"{most / fewest:.2f}",
                "-",
            )
        )
    return out


@dataclass(frozen=True)
class SummaryRun:
    """What :func:`run_summary` measured."""

    rows: list[SummaryRow]  # the table's rows, in order
    seconds: dict[str, float]  # the seconds each part took, by part
    hedged: list[hedging.HedgingRow]  # the hedging cases in full
    loads: list[loadaware.LoadRow]  # the load-aware cases in full
    concurrent: list[concurrency.ConcurrencyRow]  # the concurrency cases in full
    fleets: list[fleet.FleetRow] = field(default_factory=list)  # the fleet's cases in full


def run_summary(
    quick: bool = False,
    *,
    reps: int | None = None,
    rounds: int | None = None,
    requests: int | None = None,
    seconds: float | None = None,
    scale_sizes: Sequence[int] | None = None,
    parts: Collection[str] = PARTS,
) -> SummaryRun:
    """Run the benchmarks; return the table's rows, the seconds each part took, and the
    hedging, load-aware and concurrency cases in full (for their own tables).

    ``reps`` (selection repetitions), ``rounds`` and ``requests`` (transport rounds, and requests
    per round and side), ``seconds`` (per round of a load-aware or concurrency case) and
    ``scale_sizes`` (the backends of the refresh rows) override the mode's; the measuring code
    is the same whatever they are. ``parts`` (of :data:`PARTS`) are the benchmarks run: those
    left out have no rows, and no cases.
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"no such part of the bench: {', '.join(sorted(unknown))}")
    have_baseline = selection.has_uhashring()
    sizes = tuple(scale_sizes or selection.SCALE_SIZES)
    clock = time.perf_counter
    took: dict[str, float] = {}
    rows: list[SummaryRow] = []
    hedged: list[hedging.HedgingRow] = []
    loads: list[loadaware.LoadRow] = []
    concurrent: list[concurrency.ConcurrencyRow] = []
    fleets: list[fleet.FleetRow] = []
    if "selection" in parts:
        start = clock()
        picked = selection.run(
            quick, detail=False, baseline=have_baseline, reps=reps, scale=True, scale_sizes=sizes
        )
        took["selection"] = clock() - start
        rows += _selection_rows(picked, have_baseline, sizes)
    if "transports" in parts:
        start = clock()
        sent = transport.run(quick, count=requests, rounds=rounds)
        took["transports"] = clock() - start
        rows += _transport_rows(sent)
    if "hedging" in parts:
        start = clock()
        hedged = hedging.run(quick)
        took["hedging"] = clock() - start
        rows += _hedging_rows(hedged)
    if "load-aware" in parts:
        start = clock()
        loads = loadaware.run(quick, seconds=seconds)
        took["load-aware"] = clock() - start
        rows += _load_rows(loads)
    if "concurrency" in parts:
        start = clock()
        concurrent = concurrency.run(quick, seconds=seconds)
        took["concurrency"] = clock() - start
        rows += _concurrency_rows(concurrent)
    if "fleet" in parts:
        start = clock()
        fleets = fleet.run(*fleet.settings(quick, seconds), setups=fleet.summary_setups(quick))
        took["fleet"] = clock() - start
        rows += [SummaryRow(*cells) for cells in fleet.summary_cells(fleets)]
    return SummaryRun(rows, took, hedged, loads, concurrent, fleets)


def format_summary(rows: Sequence[SummaryRow]) -> str:
    """One aligned plain-text table: text columns left-aligned, numbers right-aligned."""
    table = [HEAD, *(row.cells() for row in rows)]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(HEAD))]
    right = (False, True, True, True, False)

    def line(cells: Sequence[str]) -> str:
        return " | ".join(
            cell.rjust(width) if align else cell.ljust(width)
            for cell, width, align in zip(cells, widths, right, strict=True)
        ).rstrip()

    rule = "-+-".join("-" * width for width in widths)
    return "\n".join([line(HEAD), rule, *(line(row.cells()) for row in rows), rule])


def _version(dist: str) -> str:
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} (version unknown)"


def _versions() -> str:
    """The versions that matter; for uhashring, whether it can be imported at all."""
    uhashring = _version("uhashring") if selection.has_uhashring() else selection.MISSING_UHASHRING
    return ", ".join([*map(_version, ("lbclient", "httpx", "requests")), uhashring])


def _cpus() -> str:
    total = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return f"{total} CPUs"
    return f"{total} CPUs ({usable} usable by this process)"


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, with the interpreter that ran it."""
    words = [sys.executable, "-m", "lbclient", "bench"]
    if args.quick:
        words.append("--quick")
    for option in ("reps", "rounds", "requests", "seconds"):
        value = getattr(args, option)
        if value is not None:
            words += [f"--{option}", str(value)]
    if args.scale_sizes is not None:
        words += ["--scale-sizes", ",".join(map(str, args.scale_sizes))]
    if args.parts is not None:
        words += ["--parts", ",".join(args.parts)]
    return shlex.join(words)


def _detail(heading: str, table: str, aims_heading: str, aims: str) -> None:
    """One part's cases in full, after the summary: what it ran, its table, its aims."""
    print(textwrap.fill(heading, width=100, subsequent_indent="  "))
    print(table)
    print(aims_heading)
    print(aims)
    print()


def command(args: argparse.Namespace) -> int:
    """Run ``python -m lbclient bench``; 0, or 1 when a full run missed a floor."""
    quick = bool(args.quick)
    reps = selection.repetitions(quick, args.reps)
    count, rounds = transport.settings(quick, args.requests, args.rounds)
    load_seconds, load_rounds = loadaware.settings(quick, args.seconds)
    busy_seconds, busy_rounds = concurrency.settings(quick, args.seconds)
    fleet_seconds, fleet_rounds = fleet.settings(quick, args.seconds)
    print(f"lbclient bench ({'quick' if quick else 'full'} run): {command_line(args)}")
    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}) on "
        f"{platform.platform()}; {_cpus()}"
    )
    print(_versions())
    parts = args.parts or PARTS
    settings = {
        "selection": f"median of {reps} interleaved passes over {selection.NUM_KEYS:,} keys",
        "transports": f"median of {rounds} rounds of {count} requests per side",
        "hedging": f"{hedging.requests_per_case(quick):,} GETs per case from {hedging.TASKS} tasks",
        "load-aware": f"{load_rounds} x {load_seconds:g} s per case",
        "concurrency": f"{busy_rounds} x {busy_seconds:g} s per side and level",
        "fleet": f"{fleet_rounds} x {fleet_seconds:g} s per case, "
        + ", ".join(setup.name for setup in fleet.summary_setups(quick)),
    }
    print("; ".join(f"{part}: {what}" for part, what in settings.items() if part in parts))
    print(flush=True)
    done = run_summary(
        quick,
        reps=args.reps,
        rounds=args.rounds,
        requests=args.requests,
        seconds=args.seconds,
        scale_sizes=args.scale_sizes,
        parts=parts,
    )
    rows, seconds = done.rows, done.seconds
    print(format_summary(rows))
    print()
    if done.hedged:
        print(f"hedging, in detail: {hedging.setup(hedging.requests_per_case(quick))}")
        print(hedging.format_table(done.hedged))
        print()
    if done.loads:
        _detail(
            f"load-aware, in detail: {loadaware.setup(load_seconds, load_rounds)}",
            loadaware.format_table(done.loads),
            "load-aware aims (ratios to RoundRobin's):",
            loadaware.format_aims(loadaware.aims(done.loads)),
        )
    if done.concurrent:
        _detail(
            f"concurrency, in detail: {concurrency.setup(busy_seconds, busy_rounds)}",
            concurrency.format_table(done.concurrent),
            "concurrency aims:",
            concurrency.format_aims(concurrency.aims(done.concurrent)),
        )
    if done.fleets:
        _detail(
            "fleet, in detail: " + fleet.describe(fleet_seconds, fleet_rounds, None),
            fleet.format_table(done.fleets),
            "fleet aims:",
            fleet.format_aims(fleet.aims(done.fleets)),
        )
    missed = [row.benchmark for row in rows if row.missed]
    notes = [
        "ns/op: one LoadBalancer.select (or uhashring get_node) in a Python loop over keys "
        "b'user-N' (str 'user-N' on both sides of the uhashring rows), loop included; ms: one "
        "build; refresh rows: a LoadBalancer of that many backends of weight 1 built (median), "
        "one update() that takes one backend out and puts another in (median of "
        f"{selection.QUICK_UPDATE_RUNS if quick else selection.FULL_UPDATE_RUNS}), and the "
        "memory the balancer keeps (how much a fresh interpreter's resident set grows with "
        "the build, after a collection: what the allocators keep of its temporaries counts); "
        "req/s: sequential GETs to loopback servers in their own processes, alternating "
        "request by request with the plain client (concurrency rows: concurrent GETs from that "
        "many callers, each one at a time); hedging rows: the p99 latency of concurrent "
        f"GETs with one backend of three answering after {hedging.DELAY * 1000:.0f} ms, hedged "
        f"after {hedging.HEDGE_AFTER * 1000:.0f} ms, against the p99 without hedging; "
        "load-aware rows: the algorithm's figure against RoundRobin's, same client, with one "
        "backend of four slow, stalling or failing half its requests.",
        "ratio: lbclient's speed / the baseline's (baseline time / lbclient time; transports: "
        "median of the per-round ratios; hedging: p99 without hedging / p99 with it; "
        "load-aware: the algorithm's req/s / RoundRobin's, RoundRobin's p99 or 503 share / "
        "the algorithm's, '-' where the algorithm's is zero); above 1 means lbclient (or the "
        "load-aware algorithm) is faster.",
        hedging.NOTES,
        loadaware.NOTES,
        concurrency.NOTES,
        fleet.NOTES,
        "floor: the project's performance floors (none on the hedging, load-aware, "
        "concurrency, fleet and refresh rows, but the memory of a Consistent ring of "
        f"{max(selection.SCALE_SIZES):,} backends). "
        + "A missed floor is reported; runs vary by a few percent, so confirm a miss with "
        "another full run. --strict makes a full run exit 1 when a floor is missed.",
        f"floors missed: {len(missed)}" + (f" ({'; '.join(missed)})" if missed else ""),
        f"total run time {sum(seconds.values()):.1f} s ("
        + ", ".join(f"{part} {took:.1f} s" for part, took in seconds.items())
        + ")",
    ]
    for note in notes:
        print(textwrap.fill(note, width=100, subsequent_indent="  "))
    return 1 if missed and args.strict and not quick else 0


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def _sizes(text: str) -> tuple[int, ...]:
    """Backend counts, comma-separated, ascending and apart from the select rows' sizes."""
    try:
        sizes = tuple(int(word) for word in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole numbers") from None
    if any(n < 2 for n in sizes) or list(sizes) != sorted(set(sizes)):
        raise argparse.ArgumentTypeError(f"need ascending sizes of at least 2, got {text}")
    if max(sizes) in SELECT_SIZES:  # its select rows would be named like those
        raise argparse.ArgumentTypeError(
            f"the largest size may not be one of {', '.join(map(str, SELECT_SIZES))}"
        )
    return sizes


def _parts(text: str) -> tuple[str, ...]:
    """Parts of the bench, comma-separated, each one of :data:`PARTS`."""
    parts = tuple(text.split(","))
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{', '.join(map(repr, unknown))}: the parts are {', '.join(PARTS)}"
        )
    return parts


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``bench`` subcommand on ``python -m lbclient``'s subparsers."""
    bench = commands.add_parser(
        "bench",
        help=COMMANDS["bench"],
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--quick", action="store_true", help="a short run (about a minute and a half on two CPUs)"
    )
    bench.add_argument(
        "--strict", action="store_true", help="exit 1 when a full run misses a floor"
    )
    # For the test suite: fewer repetitions, fewer backends, some parts only; the same code
    # path. Not part of the interface.
    bench.add_argument("--reps", type=_at_least(1), default=None, help=argparse.SUPPRESS)
    bench.add_argument("--rounds", type=_at_least(1), default=None, help=argparse.SUPPRESS)
    bench.add_argument("--requests", type=_at_least(4), default=None, help=argparse.SUPPRESS)
    bench.add_argument("--seconds", type=_positive, default=None, help=argparse.SUPPRESS)
    bench.add_argument("--scale-sizes", type=_sizes, default=None, help=argparse.SUPPRESS)
    bench.add_argument("--parts", type=_parts, default=None, help=argparse.SUPPRESS)
