"""``python -m lbclient``: see the balancer work.
``bench`` runs the selection and transport benchmarks side by side with their baselines and
prints one table of medians, ratios and floors.
``simulate`` shows how an algorithm spreads keys over weighted backends and how many keys move
when one backend is removed or added, against the ideal.

``demo`` starts local backends on free loopback ports and sends real HTTP traffic through
``LBTransport``: the share of each backend, failover with no failed request when one is killed,
its recovery after a restart, and sticky sessions with ``Consistent``, showing how few users
move when a backend leaves.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence

import httpx

from lbclient import (
    Backend,
    Consistent,
    FNVHash,
    Hash,
    LBTransport,
    LoadBalancer,
    Random,
    RoundRobin,
)
from lbclient.testing import TestServer

ALGORITHMS = {
    "roundrobin": RoundRobin,
    "random": Random,
    "hash": Hash,
    "fnv": FNVHash,
    "consistent": Consistent,
}
COOLDOWN = 1.0  # seconds a failed backend sits out in the demo (10 s by default)


def _table(title: str, lb: LoadBalancer, names: dict[str, str], counts: Counter[str | None]) -> str:
    total = sum(counts.values()) or 1
    lines = [title]
    for backend in lb.backends:
        name = names[backend.address]
        n = counts.get(name, 0)
        state = "ready" if lb.ready(backend) else "DOWN"
        bar = "#" * round(40 * n / total)
        lines.append(
            f"  {name:<10} {backend.address:<16} w={backend.weight:<2} {state:<5} {n:>6}  "
            f"{100 * n / total:5.1f}%  {bar}"
        )
    return "\n".join(lines)


def demo(algorithm: str, backends: int, requests: int) -> int:
    """Run the demo; return the exit status (0 when no request failed)."""
    if backends < 2:
        print("demo: --backends must be at least 2", file=sys.stderr)
        return 2
    if requests < 10:
        print("demo: --requests must be at least 10", file=sys.stderr)
        return 2
    start = time.monotonic()
    events: list[str] = []
    servers = [TestServer(name=f"backend-{i}").start() for i in range(backends)]
    try:
        names = {s.address: s.name for s in servers}
        lb = LoadBalancer(
            [Backend(s.address, weight=1 + i % 3) for i, s in enumerate(servers)],
            ALGORITHMS[algorithm],
            cooldown=COOLDOWN,
            on_change=lambda b, healthy: events.append(
                f"  t={time.monotonic() - start:4.1f}s  {names[b.address]} is now "
                f"{'healthy' if healthy else 'UNHEALTHY'}"
            ),
        )
        failures = 0
        sent = 0

        def send(client: httpx.Client, i: int) -> str | None:
            nonlocal failures, sent
            sent += 1
            try:
                if i % 3 == 0:
                    response = client.post("/orders", json={"order": i})
                else:
                    response = client.get(f"/users/{i}", headers={"x-user-id": f"user-{i}"})
                response.raise_for_status()
                return str(response.json()["server"])
            except httpx.HTTPError as exc:
                failures += 1
                print(f"  request {i} failed: {exc}")
                return None

        print(
            f"lbclient demo: {backends} local backends, algorithm={algorithm}, "
            f"{requests} requests per phase, GETs and POSTs through LBTransport\n"
        )
        transport = LBTransport(lb, key=lambda r: r.headers.get("x-user-id"))
        with httpx.Client(transport=transport, base_url="http://users", timeout=5) as client:
            counts = Counter(send(client, i) for i in range(requests))
            print(_table("1. Traffic by weight:", lb, names, counts))

            victim = servers[0]
            counts = Counter[str | None]()
            for i in range(requests):
                if i == requests // 4:
                    victim.kill()
                counts[send(client, i)] += 1
            print()
            print(
                _table(
                    f"2. {victim.name} killed mid-phase; its connections are refused and "
                    "every request fails over:",
                    lb,
                    names,
                    counts,
                )
            )

            victim.restart()
            time.sleep(COOLDOWN)
            counts = Counter(send(client, i) for i in range(requests))
            print()
            print(
                _table(
                    f"3. {victim.name} restarted; after the {COOLDOWN:g} s cool-down it "
                    "takes traffic again:",
                    lb,
                    names,
                    counts,
                )
            )
            print("   health changes:")
            print("\n".join(events) if events else "  (none)")

        ring = LoadBalancer([s.address for s in servers], Consistent)
        users = [f"user-{n}" for n in range(200)]
        sticky = LBTransport(ring, key=lambda r: r.headers.get("x-user-id"))
        with httpx.Client(transport=sticky, base_url="http://carts", timeout=5) as client:

            def home(user: str) -> str:
                nonlocal sent
                sent += 1
                return str(client.get("/cart", headers={"x-user-id": user}).json()["server"])

            before = {u: home(u) for u in users}
            again = sum(home(u) == before[u] for u in users)
            ring.update([s.address for s in servers[1:]])
            after = {u: home(u) for u in users}
        moved = [u for u in users if after[u] != before[u]]
        stayed_put = all(before[u] == servers[0].name for u in moved)
        print(f"\n4. Sticky sessions with Consistent (nginx's ketama), {len(users)} users:")
        print(f"   same backend when asked twice: {again}/{len(users)}")
        print(
            f"   {servers[0].name} leaves: {len(moved)} users move "
            f"({100 * len(moved) / len(users):.1f}%), all of them from {servers[0].name}; "
            f"the others stay: {stayed_put}"
        )
    finally:
        for server in servers:
            server.close()
    served = Counter(s.name for s in servers for _ in s.requests)
    print(
        f"\nsummary: {sent} requests, {failures} failed, "
        f"{'no request lost' if not failures else 'REQUESTS LOST'} during failover; "
        f"served: {', '.join(f'{n} {c}' for n, c in sorted(served.items()))}; "
        f"{time.monotonic() - start:.1f} s"
    )
    return 0 if not failures and stayed_put else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lbclient``."""
    parser = argparse.ArgumentParser(
        prog="python -m lbclient",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    from lbclient import _simulate
    from lbclient._bench import summary

    summary.add_parser(commands)
    _simulate.add_parser(commands)
    run = commands.add_parser("demo", help="real traffic, failover and sticky sessions")
    run.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="roundrobin")
    run.add_argument("--backends", type=int, default=3)
    run.add_argument("--requests", type=int, default=300)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return summary.command(args)
    if args.command == "simulate":
        return _simulate.command(args)
    return demo(args.algorithm, args.backends, args.requests)


if __name__ == "__main__":
    sys.exit(main())
