"""Plain-text tables for the benchmarks' detail output: aligned columns, a rule under the head
and one after the last row."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["aligned"]


def aligned(columns: Sequence[tuple[str, bool]], rows: Sequence[Sequence[str]]) -> str:
    """``rows`` under ``columns`` (each a name and whether it is right-aligned), as one table."""
    table = [tuple(name for name, _ in columns), *map(tuple, rows)]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(columns))]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, (_, right) in zip(cells, widths, columns, strict=True)
        ).rstrip()

    rule = "-+-".join("-" * width for width in widths)
    return "\n".join([line(table[0]), rule, *map(line, table[1:]), rule])
