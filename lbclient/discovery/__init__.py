"""Service discovery: where a balancer's backends come from, kept current in the background.

Sources (each a :class:`ServiceDiscovery`, Pingora's trait of that name):

* :class:`Static`: a fixed set.
* :class:`DNS`: A and AAAA records (``DNS("users.internal", port=8080)``) or SRV records
  (``DNS.srv("_http._tcp.users.service.consul")``), refreshed as the TTL says; needs dnspython
  (``pip install 'lbclient[dns]'``).
* :class:`File`: ``host:port [weight]`` lines or JSON, read again when the file changes.
* :class:`Function`: a function of your own (sync or async) returning backends.
* :class:`Etcd`: the keys under a prefix in etcd, listed, then watched: each change reaches the
  balancer as etcd tells it (no polling interval); :func:`lbclient.discovery.etcd.register`
  is a service's side, a key held by a lease.
* :class:`Kubernetes`: a Service's EndpointSlices, listed, then watched: each change reaches the
  balancer as the API server tells it (``Kubernetes("users", port="http")``).

Sources that are told of each change (:class:`Etcd`, :class:`Kubernetes`, the base in
:mod:`lbclient.discovery._watch`) list the set once, then follow a stream of changes on the
balancer's runner; a broken stream or an unreachable store keeps the last good set while they
reconnect (backing off, trying each endpoint) and resume from the last revision seen; a
revision the store no longer has makes them list again. ``balancer.snapshot().discovery_watch``
shows how they fare (connected, revision, reconnects, listings, changes, values skipped, the
latest error).

Give one to ``LoadBalancer(discovery=..., refresh=...)``. Started with the balancer (``with
balancer:``, ``async with balancer:``), it looks the source up once before ``start()`` returns
(waiting at most the source's ``timeout``), then keeps looking on the balancer's runner (one
thread with its event loop, or a task of the running asyncio loop), handing each answer to
``balancer.update()``: backends that stay keep their health and load. A transport's first
request waits for the first answer at most the smaller of the source's ``timeout`` and its own.

A failed lookup never takes traffic down: the last good set stays, the failure is logged on the
``lbclient`` logger and counted in ``balancer.snapshot()`` (``discovery_failures``,
``discovery_error``), and the next lookup comes sooner, backing off (1 s, 2 s, 4 s... up to the
refresh interval). A lookup that fails in part (a DNS record type) answers with the rest, the
part counted (``discovery_part_failures``). An answer with no backends empties the set only
once it has repeated and held (``empty_after``, 3 answers in a row, over ``empty_for``, 10 s).

Priority groups (DNS SRV, or any backend whose metadata has an int ``"priority"``): the balancer
gets only the lowest group, while any of its backends is usable. When every one of them is
ejected or failing its active checks, as ``balancer.snapshot()`` shows (backends switched off
by hand aside), the next group takes over; the group that failed is probed (with the
balancer's active check, or a TCP connect) every ``failover_interval`` seconds and takes over
again once a probe succeeds, its backends starting afresh. Within a group, the weights are the
backends' weights.
"""

from lbclient.discovery.base import Discovered, Function, ServiceDiscovery, Static
from lbclient.discovery.dns import DNS
from lbclient.discovery.etcd import Etcd
from lbclient.discovery.file import File
from lbclient.discovery.kubernetes import Kubernetes

__all__ = [
    "DNS",
    "Discovered",
    "Etcd",
    "File",
    "Function",
    "Kubernetes",
    "ServiceDiscovery",
    "Static",
]
