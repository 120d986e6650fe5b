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
* :mod:`lbclient.cli.bench.loadaware`: RoundRobin, LeastRequest and PeakEWMA side by side
  through ``AsyncLBTransport`` and ``LBAdapter`` when one backend of four is slow, stalls or
  fails half its requests: throughput, p50, p99, its share of requests, the 503s callers see;
* :mod:`lbclient.cli.bench.concurrency`: throughput, p50 and p99 through ``AsyncLBTransport``
  (10 to 1,000 tasks), ``LBTransport`` and ``LBAdapter`` (4 to 256 threads) against the plain
  clients with pools of the same size;
* :mod:`lbclient.cli.bench.summary`: ``python -m lbclient bench``, all five in one table.

The first five also run alone, with more detail: ``python -m lbclient.cli.bench.selection``,
``python -m lbclient.cli.bench.transport``, ``python -m lbclient.cli.bench.hedging``,
``python -m lbclient.cli.bench.loadaware`` and ``python -m lbclient.cli.bench.concurrency``
(``--quick`` for a short run). :mod:`lbclient.cli.bench.server` is the loopback backend they
start (one event loop per process), optionally slow (``--delay``), stalling (``--stall-every``,
``--stall-for``) or failing (``--fail-every``); :mod:`lbclient.cli.bench.tables` lays out their
detail tables. This package is not public API: its names may change.
"""
