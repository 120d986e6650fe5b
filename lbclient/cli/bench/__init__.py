"""``python -m lbclient bench``: lbclient's benchmarks, inside the package so that an installed
lbclient can measure itself.

* :mod:`lbclient.cli.bench.selection`: ``LoadBalancer.select`` per algorithm, the ketama ring
  against uhashring's, build times;
* :mod:`lbclient.cli.bench.transport`: requests per second through ``LBTransport``,
  ``AsyncLBTransport`` and ``LBAdapter`` against the plain clients, to loopback servers
  (:mod:`lbclient.cli.bench.server`) in their own processes;
* :mod:`lbclient.cli.bench.summary`: ``python -m lbclient bench``, both in one table.

The first two also run alone, with more detail: ``python -m lbclient.cli.bench.selection`` and
``python -m lbclient.cli.bench.transport`` (``--quick`` for a short run). This package is not
public API: its names may change.
"""
