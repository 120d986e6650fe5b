"""Transport benchmark: requests per second through ``LBTransport`` / ``AsyncLBTransport`` /
``LBAdapter`` against plain ``httpx.Client`` / ``httpx.AsyncClient`` / ``requests.Session`` to
the same loopback servers.

Run it alone::

    python -m lbclient.cli.bench.transport           # full run
    python -m lbclient.cli.bench.transport --quick   # a short run

or as part of ``python -m lbclient bench`` (a summary, side by side with the selection
benchmark).

Method: three backend servers run in their own processes (``lbclient/cli/bench/server.py``, which
needs nothing but the standard library), so the client process measured here holds only the
client. The plain client sends to the same servers in
turn (absolute URLs), the lbclient client to ``http://users`` and lets RoundRobin spread it: the
servers do the same work, only the client differs. The 1-backend rows isolate the transport's
own cost. Requests alternate one by one between the
two clients (each timed on its own, the two taking turns going first), so the machine's slow and
fast phases hit both sides alike; the plain client follows lbclient's rotation over the
servers, and the garbage collector is paused in timed rounds (see :func:`_collected`).
Requests per second are the median rounds; the ratio is the median of the per-round ratios
(plain time / lbclient time). A measurement, not a test: it prints ratios and
never fails on time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple, TypeVar

import httpx
import requests

from lbclient import AsyncLBTransport, LBAdapter, LBTransport
from lbclient.cli.bench import server
from lbclient.cli.bench.processes import reap

__all__ = [
    "FLOOR",
    "TransportRow",
    "format_table",
    "launch_servers",
    "main",
    "run",
    "settings",
    "start_servers",
]

_T = TypeVar("_T")

#: The server script, run by path: it imports only the standard library, so it starts fast and
#: does not depend on which ``lbclient`` the current directory would shadow.
SERVER = Path(server.__file__)
#: The floor for every row: lbclient's requests per second at least 98% of the plain client's.
FLOOR = 0.98
FULL_COUNT, FULL_ROUNDS = 200, 40
QUICK_COUNT, QUICK_ROUNDS = 40, 3


class TransportRow(NamedTuple):
    """One case: median seconds per request of each side and the median per-round ratio."""

    case: str
    lbclient: float  # seconds per request through lbclient
    plain: float  # seconds per request through the plain client
    ratio: float  # plain time / lbclient time: above 1 means lbclient is faster


def start_servers(stack: ExitStack, count: int) -> list[str]:
    """Start ``count`` plain loopback servers in their own processes (see
    :func:`launch_servers`, which also makes them slow, stalling or failing); return their
    addresses once they listen."""
    return launch_servers(stack, count)()


def launch_servers(
    stack: ExitStack,
    count: int,
    *,
    delay: float = 0.0,
    stall_every: float | None = None,
    stall_for: float = 0.0,
    fail_every: int | None = None,
) -> Callable[[], list[str]]:
    """Start ``count`` loopback servers in their own processes, without waiting: they are started
    (all at once, their interpreters starting side by side), and the function returned gives
    their addresses once they listen. Several groups launched before any is waited for start
    together.

    Each one answers ``delay`` seconds after each request (none by default), stops answering
    for ``stall_for`` seconds every ``stall_every`` seconds (never by default), answers every
    ``fail_every``-th request with a fast 503 (none by default), is stopped when ``stack``
    closes, and exits by itself if this process dies.
    """
    command = [sys.executable, str(SERVER)]
    if delay > 0:
        command += ["--delay", repr(delay)]
    if stall_every is not None:
        command += ["--stall-every", repr(stall_every), "--stall-for", repr(stall_for)]
    if fail_every is not None:
        command += ["--fail-every", str(fail_every)]
    procs: list[subprocess.Popen[str]] = []
    stack.callback(_stop, procs)
    for _ in range(count):
        procs.append(
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )

    def addresses() -> list[str]:
        found = []
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.strip().isdigit():
                raise RuntimeError(f"the loopback server {SERVER} did not print its port: {line!r}")
            found.append(f"127.0.0.1:{int(line)}")
        return found

    return addresses


def _stop(procs: Sequence[subprocess.Popen[str]]) -> None:
    """Stop the servers ``procs``: every one told at once (its standard input closed), then
    each waited for, killed if it still runs 5 s later."""
    for proc in procs:
        if proc.stdin is not None:
            proc.stdin.close()
    for proc in procs:
        reap(proc, 5)
        if proc.stdout is not None:
            proc.stdout.close()


def _summary(ours: list[float], theirs: list[float]) -> tuple[float, float, float]:
    """Median seconds per request of each side, and the median of the per-round ratios
    (plain time / lbclient time: above 1 means lbclient is faster)."""
    ratios = [t / o for o, t in zip(ours, theirs, strict=True)]
    return statistics.median(ours), statistics.median(theirs), statistics.median(ratios)


def _paired(
    ours: Callable[[], object], theirs: Callable[[], object], count: int
) -> tuple[float, float]:
    """Seconds per request of each side, the two sides alternating request by request and
    taking turns going first (whichever goes second finds the first one's work still settling
    in the caches and the kernel, which alone reads as a 2-4% difference between two identical
    clients)."""
    clock = time.perf_counter
    ours()  # untimed: the first request after a collection finds the caches cold
    theirs()
    a = b = 0.0
    for i in range(count):
        swapped = i & 1
        first, second = (theirs, ours) if swapped else (ours, theirs)
        t0 = clock()
        first()
        t1 = clock()
        second()
        t2 = clock()
        mine, plain_time = (t2 - t1, t1 - t0) if swapped else (t1 - t0, t2 - t1)
        a += mine
        b += plain_time
    return a / count, b / count


def _per_request(send: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        send()
    return (time.perf_counter() - start) / count


@contextlib.contextmanager
def _collected() -> Iterator[None]:
    """A timed round with the garbage collector paused, and collected before it (as ``timeit``
    does). Left on, its collections fall in step with the pairs of requests and land on one
    side: two identical clients then read 0.96 or 1.04 at random."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _served(addresses: Sequence[str]) -> list[int]:
    return [server.served(address) for address in addresses]


def _which(before: list[int], after: list[int], addresses: Sequence[str]) -> str:
    grown = [a for a, old, new in zip(addresses, before, after, strict=True) if new != old]
    if len(grown) != 1:
        raise RuntimeError(f"expected one server to answer, but {len(grown)} did")
    return grown[0]


def _rotation(send: Callable[[], object], addresses: Sequence[str]) -> list[str]:
    """The URLs of lbclient's next ``len(addresses)`` requests, in order, found by sending that
    many and asking the servers which one answered each; RoundRobin repeats them from here."""
    order = []
    for _ in addresses:
        before = _served(addresses)
        send()
        order.append(_which(before, _served(addresses), addresses))
    return [f"http://{a}/item" for a in order]


def _measure(
    get_lb: Callable[[], object],
    get_plain: Callable[[str], object],
    addresses: Sequence[str],
    count: int,
    rounds: int,
) -> tuple[float, float, float]:
    """Warm both clients up, then time ``rounds`` paired rounds of ``count`` requests.

    The plain client follows lbclient's rotation, so the two requests of each pair go to the
    same server: on a machine with fewer cores than processes, a request to the server that
    has just answered is quicker than one to a server that must be woken, and two clients out
    of step would read that as a difference between them.
    """
    urls = itertools.cycle(_rotation(get_lb, addresses))
    _per_request(get_lb, count // 4 * len(addresses))
    _per_request(lambda: get_plain(next(urls)), count // 4 * len(addresses))
    ours, theirs = [], []
    for _ in range(rounds):
        with _collected():
            mine, plain_time = _paired(get_lb, lambda: get_plain(next(urls)), count)
        ours.append(mine)
        theirs.append(plain_time)
    return _summary(ours, theirs)


def has_metrics() -> bool:
    """Whether the metrics rows can run (prometheus-client, from ``lbclient[metrics]``)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def _metered(target: _T, metrics: bool) -> _T:
    """``target`` (a transport or an adapter), its requests counted by :mod:`lbclient.metrics`
    when ``metrics`` is true."""
    if metrics:
        from prometheus_client import CollectorRegistry

        from lbclient.metrics import register

        register(target, service="users", registry=CollectorRegistry())
    return target


def bench_sync(
    addresses: list[str], count: int, rounds: int, metrics: bool = False
) -> tuple[float, float, float]:
    """``httpx.Client`` with ``LBTransport`` against a plain ``httpx.Client``."""
    transport = _metered(LBTransport(addresses), metrics)
    with httpx.Client(transport=transport) as lb, httpx.Client() as plain:
        get_lb = lambda: lb.get("http://users/item")  # noqa: E731
        return _measure(get_lb, plain.get, addresses, count, rounds)


def bench_requests(
    addresses: list[str], count: int, rounds: int, metrics: bool = False
) -> tuple[float, float, float]:
    """``requests.Session`` with ``LBAdapter`` against a plain ``requests.Session``."""
    with requests.Session() as lb, requests.Session() as plain:
        lb.mount("http://users/", _metered(LBAdapter(addresses), metrics))
        get_lb = lambda: lb.get("http://users/item")  # noqa: E731
        return _measure(get_lb, plain.get, addresses, count, rounds)


async def _per_request_async(client: httpx.AsyncClient, urls: Iterator[str], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        await client.get(next(urls))
    return (time.perf_counter() - start) / count


async def _paired_async(
    lb: httpx.AsyncClient, plain: httpx.AsyncClient, urls: Iterator[str], count: int
) -> tuple[float, float]:
    """As :func:`_paired`: alternating, taking turns going first."""
    clock = time.perf_counter
    await lb.get("http://users/item")  # untimed, as in _paired
    await plain.get(next(urls))
    a = b = 0.0
    for i in range(count):
        swapped = i & 1
        first, second = (plain, lb) if swapped else (lb, plain)
        t0 = clock()
        await first.get("http://users/item" if first is lb else next(urls))
        t1 = clock()
        await second.get("http://users/item" if second is lb else next(urls))
        t2 = clock()
        mine, plain_time = (t2 - t1, t1 - t0) if swapped else (t1 - t0, t2 - t1)
        a += mine
        b += plain_time
    return a / count, b / count


async def _bench_async(
    addresses: list[str], count: int, rounds: int, metrics: bool
) -> tuple[float, float, float]:
    logical = itertools.repeat("http://users/item")
    async with (
        httpx.AsyncClient(transport=_metered(AsyncLBTransport(addresses), metrics)) as lb,
        httpx.AsyncClient() as plain,
    ):
        order = []  # as _rotation, awaiting each request
        for _ in addresses:
            before = _served(addresses)
            await lb.get("http://users/item")
            order.append(f"http://{_which(before, _served(addresses), addresses)}/item")
        urls = itertools.cycle(order)
        await _per_request_async(lb, logical, count // 4 * len(addresses))
        await _per_request_async(plain, urls, count // 4 * len(addresses))
        ours, theirs = [], []
        for _ in range(rounds):
            with _collected():
                mine, plain_time = await _paired_async(lb, plain, urls, count)
            ours.append(mine)
            theirs.append(plain_time)
    return _summary(ours, theirs)


def bench_async(
    addresses: list[str], count: int, rounds: int, metrics: bool = False
) -> tuple[float, float, float]:
    """``httpx.AsyncClient`` with ``AsyncLBTransport`` against a plain ``httpx.AsyncClient``."""
    return asyncio.run(_bench_async(addresses, count, rounds, metrics))


def settings(quick: bool, count: int | None = None, rounds: int | None = None) -> tuple[int, int]:
    """(requests per round and side, rounds): the given ones, or the mode's."""
    count = count if count is not None else QUICK_COUNT if quick else FULL_COUNT
    rounds = rounds if rounds is not None else QUICK_ROUNDS if quick else FULL_ROUNDS
    if count < 4 or rounds < 1:
        raise ValueError(f"need count >= 4 and rounds >= 1, got count={count}, rounds={rounds}")
    return count, rounds


def run(
    quick: bool = False, *, count: int | None = None, rounds: int | None = None
) -> list[TransportRow]:
    """Every case, in this order: sync, async and requests with 3 backends, each followed by
    the same with :mod:`lbclient.metrics` counting (where prometheus-client is installed), then
    sync and async with 1 backend. ``count`` (requests per round and side) and ``rounds``
    override the mode's."""
    count, rounds = settings(quick, count, rounds)
    metered = has_metrics()
    with ExitStack() as stack:
        addresses = start_servers(stack, 3)
        rows = []
        for case, bench in (
            ("sync, 3 backends", bench_sync),
            ("async, 3 backends", bench_async),
            ("requests, 3 backends", bench_requests),
        ):
            rows.append(TransportRow(case, *bench(addresses, count, rounds)))
            if metered:
                rows.append(
                    TransportRow(f"{case}, metrics", *bench(addresses, count, rounds, metrics=True))
                )
        rows += [
            TransportRow("sync, 1 backend", *bench_sync(addresses[:1], count, rounds)),
            TransportRow("async, 1 backend", *bench_async(addresses[:1], count, rounds)),
        ]
    return rows


def format_table(rows: Sequence[TransportRow]) -> str:
    """The rows as requests per second, with the ratio and the floor."""
    width = max([20, *(len(row.case) for row in rows)])
    lines = [f"{'case':<{width}} {'lbclient req/s':>15} {'plain req/s':>12} {'ratio':>7}  floor"]
    for case, ours, theirs, ratio in rows:
        verdict = "MET" if ratio >= FLOOR else "NOT MET"
        lines.append(
            f"{case:<{width}} {1 / ours:>15,.0f} {1 / theirs:>12,.0f} {ratio:>7.3f}  "
            f">= {FLOOR} {verdict}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; 0 whether or not the floor is met (a measurement, not a test)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args(argv)
    print(f"Python {platform.python_version()} on {platform.platform()}, httpx {httpx.__version__}")
    print(format_table(run(quick=args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
