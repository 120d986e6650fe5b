"""Transport benchmark: requests per second through ``LBTransport`` / ``AsyncLBTransport`` /
``LBAdapter`` against plain ``httpx.Client`` / ``httpx.AsyncClient`` / ``requests.Session`` to
the same loopback servers.

Run from the repository root::

    python bench/bench_transport.py           # full run
    python bench/bench_transport.py --quick   # a short run

Method: three backend servers run in their own processes (``bench/loopback_server.py``), so the
client process measured here holds only the client. The plain client sends to the same servers in
turn (absolute URLs), the lbclient client to ``http://users`` and lets RoundRobin spread it: the
servers do the same work, only the client differs. The 1-backend rows isolate the transport's
own cost. Requests alternate one by one between the
two clients (each timed on its own), so the machine's slow and fast phases hit both sides alike.
Requests per second are the median rounds; the ratio is the median of the per-round ratios
(plain time / lbclient time). A measurement, not a test: it prints ratios and
never fails on time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import httpx
import requests

from lbclient import AsyncLBTransport, LBAdapter, LBTransport

SERVER = Path(__file__).with_name("loopback_server.py")
FLOOR = 0.95


def start_servers(stack: ExitStack, count: int) -> list[str]:
    addresses = []
    for _ in range(count):
        proc = subprocess.Popen(
            [sys.executable, str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        stack.callback(_stop, proc)
        assert proc.stdout is not None
        addresses.append(f"127.0.0.1:{int(proc.stdout.readline())}")
    return addresses


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _summary(ours: list[float], theirs: list[float]) -> tuple[float, float, float]:
    """Median seconds per request of each side, and the median of the per-round ratios
    (plain time / lbclient time: above 1 means lbclient is faster)."""
    ratios = [t / o for o, t in zip(ours, theirs, strict=True)]
    return statistics.median(ours), statistics.median(theirs), statistics.median(ratios)


def _paired(
    ours: Callable[[], object], theirs: Callable[[], object], count: int
) -> tuple[float, float]:
    """Seconds per request of each side, the two sides alternating request by request."""
    clock = time.perf_counter
    a = b = 0.0
    for _ in range(count):
        t0 = clock()
        ours()
        t1 = clock()
        theirs()
        t2 = clock()
        a += t1 - t0
        b += t2 - t1
    return a / count, b / count


def _per_request(send: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        send()
    return (time.perf_counter() - start) / count


def _measure(
    get_lb: Callable[[], object], get_plain: Callable[[], object], count: int, rounds: int
) -> tuple[float, float, float]:
    """Warm both clients up, then time ``rounds`` paired rounds of ``count`` requests."""
    _per_request(get_lb, count // 4)
    _per_request(get_plain, count // 4)
    ours, theirs = [], []
    for _ in range(rounds):
        mine, plain_time = _paired(get_lb, get_plain, count)
        ours.append(mine)
        theirs.append(plain_time)
    return _summary(ours, theirs)


def bench_sync(addresses: list[str], count: int, rounds: int) -> tuple[float, float, float]:
    urls = itertools.cycle([f"http://{a}/item" for a in addresses])
    with httpx.Client(transport=LBTransport(addresses)) as lb, httpx.Client() as plain:
        get_lb = lambda: lb.get("http://users/item")  # noqa: E731
        get_plain = lambda: plain.get(next(urls))  # noqa: E731
        return _measure(get_lb, get_plain, count, rounds)


def bench_requests(addresses: list[str], count: int, rounds: int) -> tuple[float, float, float]:
    urls = itertools.cycle([f"http://{a}/item" for a in addresses])
    with requests.Session() as lb, requests.Session() as plain:
        lb.mount("http://users/", LBAdapter(addresses))
        get_lb = lambda: lb.get("http://users/item")  # noqa: E731
        get_plain = lambda: plain.get(next(urls))  # noqa: E731
        return _measure(get_lb, get_plain, count, rounds)


async def _per_request_async(client: httpx.AsyncClient, urls: Iterator[str], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        await client.get(next(urls))
    return (time.perf_counter() - start) / count


async def _paired_async(
    lb: httpx.AsyncClient, plain: httpx.AsyncClient, urls: Iterator[str], count: int
) -> tuple[float, float]:
    clock = time.perf_counter
    a = b = 0.0
    for _ in range(count):
        t0 = clock()
        await lb.get("http://users/item")
        t1 = clock()
        await plain.get(next(urls))
        t2 = clock()
        a += t1 - t0
        b += t2 - t1
    return a / count, b / count


async def _bench_async(addresses: list[str], count: int, rounds: int) -> tuple[float, float, float]:
    logical = itertools.repeat("http://users/item")
    urls = itertools.cycle([f"http://{a}/item" for a in addresses])
    async with (
        httpx.AsyncClient(transport=AsyncLBTransport(addresses)) as lb,
        httpx.AsyncClient() as plain,
    ):
        await _per_request_async(lb, logical, count // 4)
        await _per_request_async(plain, urls, count // 4)
        ours, theirs = [], []
        for _ in range(rounds):
            mine, plain_time = await _paired_async(lb, plain, urls, count)
            ours.append(mine)
            theirs.append(plain_time)
    return _summary(ours, theirs)


def bench_async(addresses: list[str], count: int, rounds: int) -> tuple[float, float, float]:
    return asyncio.run(_bench_async(addresses, count, rounds))


def run(quick: bool = False) -> list[tuple[str, float, float, float]]:
    """Rows of (case, lbclient seconds per request, plain httpx seconds per request)."""
    count, rounds = (100, 6) if quick else (200, 40)
    with ExitStack() as stack:
        addresses = start_servers(stack, 3)
        rows = [
            ("sync, 3 backends", *bench_sync(addresses, count, rounds)),
            ("async, 3 backends", *bench_async(addresses, count, rounds)),
            ("requests, 3 backends", *bench_requests(addresses, count, rounds)),
            ("sync, 1 backend", *bench_sync(addresses[:1], count, rounds)),
            ("async, 1 backend", *bench_async(addresses[:1], count, rounds)),
        ]
    return rows


def format_table(rows: Sequence[tuple[str, float, float, float]]) -> str:
    lines = [f"{'case':<20} {'lbclient req/s':>15} {'plain req/s':>12} {'ratio':>7}  floor"]
    for case, ours, theirs, ratio in rows:
        verdict = "MET" if ratio >= FLOOR else "NOT MET"
        lines.append(
            f"{case:<20} {1 / ours:>15,.0f} {1 / theirs:>12,.0f} {ratio:>7.3f}  "
            f">= {FLOOR} {verdict}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args(argv)
    print(f"Python {platform.python_version()} on {platform.platform()}, httpx {httpx.__version__}")
    print(format_table(run(quick=args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
