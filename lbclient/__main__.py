"""``python -m lbclient``: see the balancer work, measure it, and simulate key spread.

``demo`` starts local backends on free loopback ports and sends real HTTP traffic through
``LBTransport``: the share of each backend, failover with no failed request when one is killed,
its ejection and its return through one probe, and sticky sessions with ``Consistent``, showing
how few users move when a backend leaves.
``bench`` runs the selection and transport benchmarks side by side with their baselines and
prints one table of medians, ratios and floors.
``simulate`` shows how an algorithm spreads keys over weighted backends and how many keys move
when one backend is removed or added, against the ideal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lbclient import _simulate
from lbclient._bench import summary
from lbclient._demo import ALGORITHMS, demo


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lbclient``."""
    parser = argparse.ArgumentParser(
        prog="python -m lbclient",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="real traffic, failover and sticky sessions")
    run.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="roundrobin")
    run.add_argument("--backends", type=int, default=3)
    run.add_argument("--requests", type=int, default=300)
    run.add_argument("--plain", action="store_true", help="plain text, even on a terminal")
    summary.add_parser(commands)
    _simulate.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return summary.command(args)
    if args.command == "simulate":
        return _simulate.command(args)
    return demo(args.algorithm, args.backends, args.requests, args.plain)


if __name__ == "__main__":
    sys.exit(main())
