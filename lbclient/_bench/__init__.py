"""lbclient's benchmarks, inside the package so that an installed lbclient can measure itself.

* :mod:`lbclient._bench.selection`: ``LoadBalancer.select`` per algorithm, the ketama ring
  against uhashring's, build times;
* :mod:`lbclient._bench.transport`: requests per second through ``LBTransport``,
  ``AsyncLBTransport`` and ``LBAdapter`` against the plain clients, to loopback servers
  (:mod:`lbclient._bench.server`) in their own processes;
* :mod:`lbclient._bench.summary`: ``python -m lbclient bench``, both in one table.

The scripts in the repository's ``bench/`` folder are thin wrappers around the first two. This
package is not public API: its names may change.
"""
