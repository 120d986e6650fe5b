"""``python -m lbclient``: see the balancer work, measure it, and simulate key spread.

``demo`` starts local backends on free loopback ports and sends real HTTP traffic through
``LBTransport``: the share of each backend, failover with no failed request when one is killed,
its ejection and its return through one probe, and sticky sessions with ``Consistent``, showing
how few users move when a backend leaves.
``bench`` runs the benchmarks (selection, transports, hedging, load-aware algorithms,
concurrency) side by side with their baselines and prints one table of medians, ratios and
floors.
``simulate`` shows how an algorithm spreads keys over weighted backends and how many keys move
when one backend is removed or added, against the ideal; for the algorithms that ignore the key,
a simulated run with one slow backend instead.

This package holds the command-line tools, apart from the library's modules: the argument parser
here, :mod:`lbclient.cli.demo`, :mod:`lbclient.cli.bench` (the benchmarks) and
:mod:`lbclient.cli.simulate`. They use the library through its public names only, and the library
never imports this package. Its modules are not public API: their names may change.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main"]

#: ``--help``'s description: what the commands do (the docstring but its last paragraph).
DESCRIPTION = (__doc__ or "").rpartition("\n\n")[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lbclient``: parse ``argv`` (default ``sys.argv[1:]``) and run
    the command; return the exit status."""
    # Imported here, not above: ``python -m lbclient.cli.bench.selection`` (and the other modules
    # run alone) load this package first, and need none of the commands.
    from lbclient.cli import simulate
    from lbclient.cli.bench import summary
    from lbclient.cli.demo import ALGORITHMS, demo

    parser = argparse.ArgumentParser(
        prog="python -m lbclient",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="real traffic, failover and sticky sessions")
    run.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="roundrobin")
    run.add_argument("--backends", type=int, default=3)
    run.add_argument("--requests", type=int, default=300)
    run.add_argument("--plain", action="store_true", help="plain text, even on a terminal")
    run.add_argument(
        "--metrics-port", type=int, metavar="N", default=None,
        help="serve Prometheus metrics on http://127.0.0.1:N/metrics while the demo runs "
        "(0: a free port; needs lbclient[metrics])",
    )
    summary.add_parser(commands)
    simulate.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return summary.command(args)
    if args.command == "simulate":
        return simulate.command(args)
    return demo(args.algorithm, args.backends, args.requests, args.plain, args.metrics_port)
