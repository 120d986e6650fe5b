"""Hedging benchmark: tail latency through ``AsyncLBTransport`` when one backend of three is
slow, without hedged requests and with them, under two hedge budgets.

Run it alone::

    python -m lbclient.cli.bench.hedging           # 1,000 requests per case (about 10 s)
    python -m lbclient.cli.bench.hedging --quick   # 160 requests per case (a few seconds)

or as part of ``python -m lbclient bench`` (extra rows of the summary, and this table under it).

Method: three backend servers run in their own processes (``lbclient/cli/bench/server.py``); one
of them answers every request 300 ms after reading it (``--delay 0.3``), the other two at once.
Each case gets a fresh ``AsyncLBTransport`` with RoundRobin over the three, so a third of the
first attempts go to the slow one, and a fresh ``httpx.AsyncClient(base_url="http://users")``
over it; 16 asyncio tasks then send the case's GETs between them, each task one request at a
time, as fast as the answers come. The cases, in this order:

* no hedging (the transport's defaults);
* ``hedge_after=0.05`` with ``hedge_budget=RetryBudget(ratio=0.5)``: room for every slow
  first attempt to be hedged;
* ``hedge_after=0.05`` with the default hedge budget, ``RetryBudget()`` (20% of requests plus
  10 per second over 10 s): its reserve of 100 covers the hedges of a quick run, not those of a
  full run.

Every latency is one ``client.get`` from the call to the body read, connection setup included
(the pools start cold). p50 and p99 are nearest-rank percentiles of all the case's latencies;
requests per second are the case's requests over its wall time; the counts come from the
transport's ``stats()`` after the case, and "waited" counts the requests that took the slow
backend's full delay or longer. The ratio is the no-hedging case's p99 over the case's own:
above 1, hedging cut the tail. A measurement, not a test: nothing here fails on time.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import platform
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import NamedTuple

import httpx

from lbclient import AsyncLBTransport, RetryBudget, RoundRobin
from lbclient.cli.bench.transport import launch_servers

__all__ = [
    "CASES",
    "DELAY",
    "HEDGE_AFTER",
    "NOTES",
    "TASKS",
    "HedgingRow",
    "format_table",
    "main",
    "percentile",
    "requests_per_case",
    "run",
    "setup",
]

#: Seconds the slow backend waits before each answer.
DELAY = 0.3
#: Seconds without a response head before a hedge.
HEDGE_AFTER = 0.05
#: Concurrent asyncio tasks sending the requests.
TASKS = 16
FULL_REQUESTS = 1_000
QUICK_REQUESTS = 160

Make = Callable[[Sequence[str]], AsyncLBTransport]

#: Each case: its name, and how its transport is made from the backends' addresses. The first
#: is the reference the others' ratios are taken against.
CASES: tuple[tuple[str, Make], ...] = (
    ("no hedging", lambda backends: AsyncLBTransport(backends, algorithm=RoundRobin)),
    (
        f"hedge_after={HEDGE_AFTER:g}, hedge_budget=RetryBudget(ratio=0.5)",
        lambda backends: AsyncLBTransport(
            backends,
            algorithm=RoundRobin,
            hedge_after=HEDGE_AFTER,
            hedge_budget=RetryBudget(ratio=0.5),
        ),
    ),
    (
        f"hedge_after={HEDGE_AFTER:g}, default hedge budget",
        lambda backends: AsyncLBTransport(backends, algorithm=RoundRobin, hedge_after=HEDGE_AFTER),
    ),
)


class HedgingRow(NamedTuple):
    """One case: its latencies (in seconds), throughput and what the transport sent."""

    case: str
    requests: int  # requests the transport started (stats().requests)
    seconds: float  # wall time of the whole case
    p50: float
    p99: float
    waited: int  # requests that took DELAY or longer: they waited for the slow backend
    retries: int  # attempts after a request's first, hedges included
    hedges: int
    hedge_wins: int  # requests answered by their hedge
    exhaustions: int  # the budget's refusals, as stats() counts them
    ratio: float | None  # the no-hedging case's p99 / this one's; None for that case

    @property
    def per_second(self) -> float:
        """Requests per second over the case's wall time."""
        return self.requests / self.seconds


def percentile(samples: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of ``samples`` (not empty)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def requests_per_case(quick: bool) -> int:
    """How many GETs each case sends."""
    return QUICK_REQUESTS if quick else FULL_REQUESTS


async def _send(transport: AsyncLBTransport, count: int) -> tuple[list[float], float]:
    """``count`` GETs from :data:`TASKS` tasks; each one's latency, and the wall time."""
    clock = time.perf_counter
    latencies: list[float] = []
    numbers = iter(range(count))  # shared: each task takes the next request as it gets free

    async with httpx.AsyncClient(transport=transport, base_url="http://users") as client:

        async def task() -> None:
            for _ in numbers:
                start = clock()
                response = await client.get("/item")
                latencies.append(clock() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"a backend answered {response.status_code}, not 200")

        start = clock()
        await asyncio.gather(*(task() for _ in range(TASKS)))
        seconds = clock() - start
    return latencies, seconds


def _case(name: str, make: Make, backends: Sequence[str], count: int) -> HedgingRow:
    transport = make(backends)
    latencies, seconds = asyncio.run(_send(transport, count))
    stats = transport.stats()
    return HedgingRow(
        case=name,
        requests=stats.requests,
        seconds=seconds,
        p50=percentile(latencies, 50),
        p99=percentile(latencies, 99),
        waited=sum(latency >= DELAY for latency in latencies),
        retries=stats.retries,
        hedges=stats.hedges,
        hedge_wins=stats.hedge_wins,
        exhaustions=stats.exhaustions,
        ratio=None,
    )


def run(quick: bool = False, *, count: int | None = None) -> list[HedgingRow]:
    """Every case of :data:`CASES`, in order; ``count`` (GETs per case) overrides the mode's."""
    count = count if count is not None else requests_per_case(quick)
    if count < 1:
        raise ValueError(f"need count >= 1, got {count}")
    with ExitStack() as stack:
        fast, slow = launch_servers(stack, 2), launch_servers(stack, 1, delay=DELAY)
        backends = fast() + slow()
        rows = [_case(name, make, backends, count) for name, make in CASES]
    reference = rows[0].p99
    return [rows[0]] + [row._replace(ratio=reference / row.p99) for row in rows[1:]]


#: The detail table's columns, and whether each is right-aligned.
COLUMNS = (
    ("case", False),
    ("req/s", True),
    ("p50", True),
    ("p99", True),
    ("p99 ratio", True),
    ("requests", True),
    ("retries", True),
    ("hedges", True),
    ("hedge wins", True),
    ("exhaustions", True),
    ("waited", True),
)


def _cells(row: HedgingRow) -> tuple[str, ...]:
    return (
        row.case,
        f"{row.per_second:,.0f}",
        f"{row.p50 * 1000:,.1f} ms",
        f"{row.p99 * 1000:,.1f} ms",
        "-" if row.ratio is None else f"{row.ratio:.2f}",
        f"{row.requests:,}",
        f"{row.retries:,}",
        f"{row.hedges:,}",
        f"{row.hedge_wins:,}",
        f"{row.exhaustions:,}",
        f"{row.waited:,}",
    )


def format_table(rows: Sequence[HedgingRow]) -> str:
    """Every case with its figures and counts: one aligned plain-text table."""
    table = [tuple(name for name, _ in COLUMNS), *map(_cells, rows)]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(COLUMNS))]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, (_, right) in zip(cells, widths, COLUMNS, strict=True)
        ).rstrip()

    rule = "-+-".join("-" * width for width in widths)
    return "\n".join([line(table[0]), rule, *map(line, table[1:]), rule])


def setup(count: int) -> str:
    """One line on what every case sends, and where."""
    return (
        f"{count:,} GETs per case from {TASKS} asyncio tasks through AsyncLBTransport "
        f"(RoundRobin) to 3 loopback backends, 1 of them answering after {DELAY * 1000:.0f} ms"
    )


NOTES = (
    "p50, p99: nearest-rank percentiles of every request's latency (call to body read); req/s: "
    "requests over the case's wall time; p99 ratio: the no-hedging p99 / the case's (above 1, "
    "hedging cut the tail); retries: attempts after a request's first, hedges included; hedge "
    "wins: requests answered by their hedge; exhaustions: the budgets' refusals, as stats() "
    "counts them; waited: requests that took the slow backend's "
    f"{DELAY * 1000:.0f} ms or longer (slow first attempts left unhedged)."
)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; 0 whatever the figures (a measurement, not a test)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args(argv)
    count = requests_per_case(args.quick)
    print(f"Python {platform.python_version()} on {platform.platform()}, httpx {httpx.__version__}")
    print(setup(count), flush=True)
    print(format_table(run(count=count)))
    print(textwrap.fill(NOTES, width=100, subsequent_indent="  "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
