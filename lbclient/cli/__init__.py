"""``python -m lbclient``: see the balancer work, measure it, and simulate key spread.

``demo`` starts local backends on free loopback ports and sends real HTTP traffic through
``LBTransport``: the share of each backend, failover with no failed request when one is killed,
its ejection and its return through one probe, and sticky sessions with ``Consistent``, showing
how few users move when a backend leaves.
``bench`` runs the benchmarks (selection, transports, hedging, load-aware algorithms,
concurrency, a fleet on one machine) side by side with their baselines and prints one table of
medians, ratios and floors.
``simulate`` shows how an algorithm spreads keys over weighted backends and how many keys move
when one backend is removed or added, against the ideal; for the algorithms that ignore the key,
a simulated run with one slow backend instead; ``simulate --fleet``, a fleet of clients with
subsets and zones on a virtual clock.

This package holds the command-line tools, apart from the library's modules: the argument parser
here, :mod:`lbclient.cli.demo`, :mod:`lbclient.cli.bench` (the benchmarks) and
:mod:`lbclient.cli.simulate` (its fleet in :mod:`lbclient.cli.fleet_sim`). They use the library
through its public names only, and the library never imports this package. Its modules are not
public API: their names may change.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main"]

#: ``--help``'s description: what the commands do (the docstring but its last paragraph).
DESCRIPTION = (__doc__ or "").rpartition("\n\n")[0]

#: The commands, each with its line in ``--help``.
COMMANDS = {
    "demo": "real traffic, failover and sticky sessions",
    "bench": "selection, transport, hedging, load-aware, concurrency and fleet benchmarks against "
    "their baselines, in one table",
    "simulate": "key distribution per backend, and keys moved when a backend leaves or joins; "
    "load runs with one slow backend for the algorithms that ignore the key; --fleet: many "
    "clients with subsets and zones",
}


def _demo_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from lbclient.cli.demo import ALGORITHMS

    run = commands.add_parser("demo", help=COMMANDS["demo"])
    run.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="roundrobin")
    run.add_argument("--backends", type=int, default=3)
    run.add_argument("--requests", type=int, default=300)
    run.add_argument("--plain", action="store_true", help="plain text, even on a terminal")
    run.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        default=None,
        help="serve Prometheus metrics on http://127.0.0.1:N/metrics while the demo runs "
        "(0: a free port; needs lbclient[metrics])",
    )


def _bench_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from lbclient.cli.bench import summary

    summary.add_parser(commands)


def _simulate_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from lbclient.cli import simulate

    simulate.add_parser(commands)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lbclient``: parse ``argv`` (default ``sys.argv[1:]``) and run
    the command; return the exit status.

    Only the command asked for is imported (the benchmarks import much that ``simulate`` does
    not need); the others are listed in ``--help`` by name.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    chosen = next((word for word in words if not word.startswith("-")), None)
    parser = argparse.ArgumentParser(
        prog="python -m lbclient",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    adders = {"demo": _demo_parser, "bench": _bench_parser, "simulate": _simulate_parser}
    for name, help_line in COMMANDS.items():
        if name == chosen:
            adders[name](commands)
        else:  # not run: named in --help, its options left out
            commands.add_parser(name, help=help_line)
    args = parser.parse_args(words)
    if args.command == "bench":
        from lbclient.cli.bench import summary

        return summary.command(args)
    if args.command == "simulate":
        from lbclient.cli import simulate

        return simulate.command(args)
    from lbclient.cli.demo import demo

    return demo(args.algorithm, args.backends, args.requests, args.plain, args.metrics_port)
