"""``python -m lbclient bench``: the selection, transport and hedging benchmarks in one table.

The benchmarks run in this one process, each side by side with its baseline: selection against
uhashring's ketama ring (optional: ``pip install 'lbclient[bench]'``; without it those rows say
so and the rest still runs), the transports against the plain httpx and requests clients, to
loopback servers in their own processes, and hedged requests through ``AsyncLBTransport``
against no hedging, with one backend of three slow. The table shows medians (for hedging, p99
latencies), the ratio (lbclient's speed over the baseline's: above 1 means lbclient is faster;
for hedging, the p99 without hedging over the p99 with it) and the project's performance floors
(none on the hedging rows). The hedging cases' figures and counts follow in a second table.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lbclient.cli.bench import hedging, selection, transport

__all__ = [
    "HEAD",
    "SummaryRow",
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
    "async, 3 backends": "AsyncLBTransport vs plain httpx.AsyncClient, 3 backends",
    "requests, 3 backends": "LBAdapter vs plain requests.Session, 3 backends",
    "sync, 1 backend": "LBTransport vs plain httpx.Client, 1 backend",
    "async, 1 backend": "AsyncLBTransport vs plain httpx.AsyncClient, 1 backend",
}

#: Hedging case (as :func:`lbclient.cli.bench.hedging.run` names it) -> what is measured.
HEDGING_LABELS = {
    "no hedging": "AsyncLBTransport p99, 1 of 3 slow, no hedging",
    "hedge_after=0.05, RetryBudget(ratio=0.5)":
        "AsyncLBTransport p99, 1 of 3 slow, hedged at 50 ms, budget ratio 0.5",
    "hedge_after=0.05, default RetryBudget()":
        "AsyncLBTransport p99, 1 of 3 slow, hedged at 50 ms, default budget",
}

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


def _per_second(seconds: float) -> str:
    return f"{1 / seconds:,.0f} req/s"


def _floor(verdict: tuple[str, bool] | None) -> tuple[str, bool]:
    """The floor cell and whether the floor was missed."""
    if verdict is None:
        return "-", False
    threshold, met = verdict
    return f"{threshold}: {'met' if met else 'NOT MET'}", not met


def _selection_rows(rows: Sequence[selection.Row], have_baseline: bool) -> list[SummaryRow]:
    """The selection results shown in the summary, in table order."""
    by_id = {r["id"]: r for r in rows}
    out: list[SummaryRow] = []

    def add(label: str, row: selection.Row, unit: Callable[[float], str]) -> None:
        floor, missed = _floor(selection.row_floor(row))
        if row["baseline"] is None or row["ratio"] is None:
            base = "-" if have_baseline or "uhashring" not in label else selection.MISSING_UHASHRING
            out.append(SummaryRow(label, unit(row["lbclient"]), base, "-", floor, missed))
        else:
            out.append(SummaryRow(label, unit(row["lbclient"]), unit(row["baseline"]),
                                  f"{row['ratio']:.2f}", floor, missed))

    for n in SELECT_SIZES:
        for name in SELECT_ALGORITHMS:
            add(f"select {name}, {n:,} backends", by_id[f"select/{name}/{n}/bytes"], _ns)
    for n in SELECT_SIZES:
        # Like for like: str keys on both sides. Without uhashring the lbclient side is still
        # measured (the same str-key select), and the baseline cell says what to install.
        row = by_id.get(f"compare/ketama/{n}/str") or by_id[f"select/Consistent/{n}/str"]
        add(f"select Consistent vs uhashring ketama, {n:,} backends, str keys", row, _ns)
    count = selection.WEIGHTED_BUILD_BACKENDS
    for name in ("RoundRobin", "Hash"):
        add(f"build {name}, {count:,} backends, weights 1..100", by_id[f"build/{name}/{count}"],
            _ms)
    count = selection.CONSISTENT_BUILD_BACKENDS
    add(f"build Consistent vs uhashring ketama, {count:,} backends",
        by_id[f"build/Consistent/{count}"], _ms)
    return out


def _transport_rows(rows: Sequence[transport.TransportRow]) -> list[SummaryRow]:
    """The transport results, as requests per second."""
    out = []
    for row in rows:
        met = row.ratio >= transport.FLOOR
        floor, missed = _floor((f">= {transport.FLOOR:.2f}", met))
        out.append(SummaryRow(TRANSPORT_LABELS.get(row.case, row.case), _per_second(row.lbclient),
                              _per_second(row.plain), f"{row.ratio:.2f}", floor, missed))
    return out


def _hedging_rows(rows: Sequence[hedging.HedgingRow]) -> list[SummaryRow]:
    """The hedging results as p99 latencies: each hedged case against the case without."""
    reference = rows[0]
    out = [SummaryRow(HEDGING_LABELS.get(reference.case, reference.case),
                      _ms(reference.p99 * 1000), "-", "-", "-")]
    for row in rows[1:]:
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
        out.append(SummaryRow(HEDGING_LABELS.get(row.case, row.case), _ms(row.p99 * 1000),
                              _ms(reference.p99 * 1000), ratio, "-"))
    return out


def run_summary(
    quick: bool = False,
    *,
    reps: int | None = None,
    rounds: int | None = None,
    requests: int | None = None,
) -> tuple[list[SummaryRow], dict[str, float], list[hedging.HedgingRow]]:
    """Run the benchmarks; return the table's rows, the seconds each part took, and the
    hedging cases in full (for their table of counts).

    ``reps`` (selection repetitions), ``rounds`` and ``requests`` (transport rounds, and requests
    per round and side) override the mode's; the measuring code is the same whatever they are.
    """
    have_baseline = selection.has_uhashring()
    start = time.perf_counter()
    picked = selection.run(quick, detail=False, baseline=have_baseline, reps=reps)
    middle = time.perf_counter()
    sent = transport.run(quick, count=requests, rounds=rounds)
    after_transports = time.perf_counter()
    hedged = hedging.run(quick)
    end = time.perf_counter()
    rows = _selection_rows(picked, have_baseline) + _transport_rows(sent) + _hedging_rows(hedged)
    seconds = {
        "selection": middle - start,
        "transports": after_transports - middle,
        "hedging": end - after_transports,
    }
    return rows, seconds, hedged


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
    for option in ("reps", "rounds", "requests"):
        value = getattr(args, option)
        if value is not None:
            words += [f"--{option}", str(value)]
    return shlex.join(words)


def command(args: argparse.Namespace) -> int:
    """Run ``python -m lbclient bench``; 0, or 1 when a full run missed a floor."""
    quick = bool(args.quick)
    reps = selection.repetitions(quick, args.reps)
    count, rounds = transport.settings(quick, args.requests, args.rounds)
    print(f"lbclient bench ({'quick' if quick else 'full'} run): {command_line(args)}")
    print(f"Python {platform.python_version()} ({platform.python_implementation()}) on "
          f"{platform.platform()}; {_cpus()}")
    print(_versions())
    print(f"selection: median of {reps} interleaved passes over {selection.NUM_KEYS:,} keys; "
          f"transports: median of {rounds} rounds of {count} requests per side; "
          f"hedging: {hedging.requests_per_case(quick):,} GETs per case from {hedging.TASKS} "
          "tasks")
    print(flush=True)
    rows, seconds, hedged = run_summary(quick, reps=args.reps, rounds=args.rounds,
                                        requests=args.requests)
    print(format_summary(rows))
    print()
    print(f"hedging, in detail: {hedging.setup(hedging.requests_per_case(quick))}")
    print(hedging.format_table(hedged))
    print()
    missed = [row.benchmark for row in rows if row.missed]
    notes = [
        "ns/op: one LoadBalancer.select (or uhashring get_node) in a Python loop over keys "
        "b'user-N' (str 'user-N' on both sides of the uhashring rows), loop included; ms: one "
        "build; req/s: sequential GETs to loopback servers in their own processes, alternating "
        "request by request with the plain client; hedging rows: the p99 latency of concurrent "
        f"GETs with one backend of three answering after {hedging.DELAY * 1000:.0f} ms, hedged "
        f"after {hedging.HEDGE_AFTER * 1000:.0f} ms, against the p99 without hedging.",
        "ratio: lbclient's speed / the baseline's (baseline time / lbclient time; transports: "
        "median of the per-round ratios; hedging: p99 without hedging / p99 with it); above 1 "
        "means lbclient is faster.",
        hedging.NOTES,
        "floor: the project's performance floors (none on the hedging rows). "
        + "A missed floor is reported; runs vary by a few percent, so confirm a miss with "
        "another full run. --strict makes a full run exit 1 when a floor is missed.",
        f"floors missed: {len(missed)}" + (f" ({'; '.join(missed)})" if missed else ""),
        f"total run time {sum(seconds.values()):.1f} s (selection {seconds['selection']:.1f} s, "
        f"transports {seconds['transports']:.1f} s, hedging {seconds['hedging']:.1f} s)",
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


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``bench`` subcommand on ``python -m lbclient``'s subparsers."""
    bench = commands.add_parser(
        "bench",
        help="selection, transport and hedging benchmarks against their baselines, in one table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--quick", action="store_true",
                       help="a short run (seconds, not minutes)")
    bench.add_argument("--strict", action="store_true",
                       help="exit 1 when a full run misses a floor")
    # For the test suite: fewer repetitions, the same code path. Not part of the interface.
    bench.add_argument("--reps", type=_at_least(1), default=None, help=argparse.SUPPRESS)
    bench.add_argument("--rounds", type=_at_least(1), default=None, help=argparse.SUPPRESS)
    bench.add_argument("--requests", type=_at_least(4), default=None, help=argparse.SUPPRESS)
