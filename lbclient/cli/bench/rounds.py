"""What the benchmarks that run in rounds share: their command line (``--quick``,
``--seconds`` and ``--rounds``) and how a run's settings are found."""

from __future__ import annotations

import argparse

__all__ = ["round_parser", "round_settings"]


def round_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser with ``--quick``, ``--seconds`` and ``--rounds`` (more rounds narrow a ratio's
    noise; the test suite runs shorter ones, the same code path), described by the first line
    of ``doc``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="seconds a round runs (default: the mode's)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per case (default: the mode's)"
    )
    return parser


def round_settings(
    quick: bool,
    seconds: float | None,
    rounds: int | None,
    quick_mode: tuple[float, int],
    full_mode: tuple[float, int],
) -> tuple[float, int]:
    """(seconds per round, rounds per case): those given, or the mode's; ValueError unless
    seconds > 0 and rounds >= 1."""
    mode_seconds, mode_rounds = quick_mode if quick else full_mode
    seconds = mode_seconds if seconds is None else seconds
    rounds = mode_rounds if rounds is None else rounds
    if not seconds > 0 or rounds < 1:
        raise ValueError(f"need --seconds > 0 and --rounds >= 1, got {seconds}, {rounds}")
    return seconds, rounds
