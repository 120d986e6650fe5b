"""Transport benchmark: ``python bench/bench_transport.py [--quick]``.

A thin wrapper: the measuring code lives in :mod:`lbclient._bench.transport` (so that an
installed lbclient can run it too, as ``python -m lbclient bench``); see its docstring for the
method.
"""

from __future__ import annotations

import sys

from lbclient._bench.transport import TransportRow, format_table, main, run

__all__ = ["TransportRow", "format_table", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
