"""``python -m lbclient``: see the balancer work.

``demo`` runs in memory, no network: traffic shares per algorithm, failover when a backend fails,
recovery after the cool-down (on a simulated clock), and how few keys move under ``Consistent``
when a backend leaves.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence

from lbclient import Backend, Consistent, FNVHash, Hash, LoadBalancer, Random, RoundRobin

ALGORITHMS = {
    "roundrobin": RoundRobin,
    "random": Random,
    "hash": Hash,
    "fnv": FNVHash,
    "consistent": Consistent,
}


class _Clock:
    """A clock the demo moves by hand, so the cool-down needs no waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _shares(lb: LoadBalancer, requests: int, keyed: bool) -> Counter[Backend | None]:
    return Counter(lb.select(f"user-{i}" if keyed else b"") for i in range(requests))


def _table(title: str, backends: Sequence[Backend], counts: Counter[Backend | None]) -> str:
    total = sum(counts.values()) or 1
    lines = [title]
    for b in backends:
        n = counts.get(b, 0)
        bar = "#" * round(40 * n / total)
        lines.append(f"  {b.address:<18} w={b.weight:<3} {n:>6}  {100 * n / total:5.1f}%  {bar}")
    if counts.get(None):
        lines.append(f"  {'(no backend)':<24} {counts[None]:>6}")
    return "\n".join(lines)


def demo(algorithm: str, backends: int, requests: int) -> int:
    """Print the demo; return the exit status."""
    if backends < 2:
        print("demo: --backends must be at least 2", file=sys.stderr)
        return 2
    if requests < 1:
        print("demo: --requests must be at least 1", file=sys.stderr)
        return 2
    pool = [Backend(f"10.0.0.{i + 1}:8080", weight=1 + i % 3) for i in range(backends)]
    clock = _Clock()
    events: list[str] = []
    lb = LoadBalancer(
        pool,
        ALGORITHMS[algorithm],
        cooldown=10.0,
        clock=clock,
        on_change=lambda b, healthy: events.append(
            f"  t={clock.now:4.1f}s  {b.address} is now {'healthy' if healthy else 'UNHEALTHY'}"
        ),
    )
    keyed = algorithm in ("hash", "fnv", "consistent")
    print(f"lbclient demo: {backends} backends, algorithm={algorithm}, {requests} requests/phase\n")
    print(_table("1. Traffic by weight:", lb.backends, _shares(lb, requests, keyed)))

    victim = lb.backends[0]
    lb.report(victim, False)
    failed = _shares(lb, requests, keyed)
    print()
    print(_table(f"2. {victim.address} fails; traffic moves to the others:", lb.backends, failed))
    clock.now += 10.0
    recovered = lb.select_with(b"", 256, lambda b, ready: b == victim and ready)
    lb.report(victim, True)
    print()
    print(
        _table(
            "3. After the 10 s cool-down one request succeeds; it is back:",
            lb.backends,
            _shares(lb, requests, keyed),
        )
    )
    print("   health changes:")
    print("\n".join(events))

    keys = [f"session-{i}" for i in range(max(requests, 1000))]
    ring = LoadBalancer(pool, Consistent)
    before = {k: ring.select(k) for k in keys}
    again = {k: ring.select(k) for k in keys}
    ring.update(pool[1:])
    after = {k: ring.select(k) for k in keys}
    moved = sum(before[k] != after[k] for k in keys)
    stayed_put = all(after[k] == before[k] for k in keys if before[k] != pool[0])
    print(f"\n4. Consistent hashing over {len(keys)} session keys:")
    print(
        f"   same backend when asked twice: {sum(before[k] == again[k] for k in keys)}/{len(keys)}"
    )
    print(
        f"   {pool[0].address} leaves: {moved} keys move ({100 * moved / len(keys):.1f}%), "
        f"all of them from {pool[0].address}; the others stay: {stayed_put}"
    )
    ok = failed.get(victim, 0) == 0 and failed.get(None, 0) == 0 and recovered == victim
    print(
        f"\nsummary: {4 * requests} selections, "
        f"{'no request lost' if ok else 'UNEXPECTED RESULT'} during failover"
    )
    return 0 if ok and stayed_put else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lbclient``."""
    parser = argparse.ArgumentParser(
        prog="python -m lbclient",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="show selection, failover and consistent hashing")
    run.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="roundrobin")
    run.add_argument("--backends", type=int, default=4)
    run.add_argument("--requests", type=int, default=1200)
    args = parser.parse_args(argv)
    return demo(args.algorithm, args.backends, args.requests)


if __name__ == "__main__":
    sys.exit(main())
