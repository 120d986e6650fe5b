"""``python -m lbclient bench``: lbclient's benchmarks, inside the package so that an installed
lbclient can measure itself.

* :mod:`lbclient.cli.bench.selection`: ``LoadBalancer.select`` per algorithm, the ketama ring
  against uhashring's, build times;
* :mod:`lbclient.cli.bench.transport`: requests per second through ``LBTransport``,
  ``AsyncLBTransport`` and ``LBAdapter`` against the plain clients, to loopback servers
  (:mod:`lbclient.cli.bench.server`) in their own processes;
* :mod:`lbclient.cli.bench.hedging`: p50 and p99 latency of concurrent GETs through
  ``AsyncLBTransport`` when one backend of three is slow, without hedged requests and with
  them under two retry budgets, and the attempts each sent;
* :mod:`lbclient.cli.bench.summary`: ``python -m lbclient bench``, all three in one table.

The first three also run alone, with more detail: ``python -m lbclient.cli.bench.selection``,
``python -m lbclient.cli.bench.transport`` and ``python -m lbclient.cli.bench.hedging``
(``--quick`` for a short run). :mod:`lbclient.cli.bench.server` is the loopback backend they
start, optionally slow (``--delay``). This package is not public API: its names may change.
"""
