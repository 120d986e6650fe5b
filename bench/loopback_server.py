"""The benchmarks' loopback HTTP server: ``python bench/loopback_server.py``.

A thin wrapper around :mod:`lbclient._bench.server` (see there); the transport benchmark starts
that module itself.
"""

from __future__ import annotations

from lbclient._bench.server import main

if __name__ == "__main__":
    main()
