"""Etcd discovery, the whole loop: a service registers itself with a lease, a client watching
the prefix routes to it, and close() takes it out again.

It starts no etcd: start one first (Debian: ``apt-get install etcd-server``, which runs one on
127.0.0.1:2379; or ``etcd --data-dir /tmp/etcd-data`` in a terminal), or point ETCD_ENDPOINT at
yours. Without an etcd it says so and exits.
"""

from __future__ import annotations

import os
import time

import httpx

from lbclient import LBTransport, LoadBalancer
from lbclient.discovery import Etcd
from lbclient.discovery.etcd import register
from lbclient.testing import TestServer

ENDPOINT = os.environ.get("ETCD_ENDPOINT", "http://127.0.0.1:2379")
PREFIX = f"services/users-example-{os.getpid()}/"


def main() -> None:
    try:
        httpx.get(f"{ENDPOINT}/health", timeout=1.0, trust_env=False)
    except httpx.HTTPError:
        print(
            f"no etcd answers at {ENDPOINT}: start one (apt-get install etcd-server, or "
            "`etcd --data-dir /tmp/etcd-data`) or set ETCD_ENDPOINT, then run this again"
        )
        return
    balancer = LoadBalancer(discovery=Etcd(PREFIX, endpoints=[ENDPOINT]))
    with (
        TestServer() as service,  # stands for a service of yours
        balancer,  # lists the prefix (empty), then watches it
        httpx.Client(transport=LBTransport(balancer, hosts=["users"])) as client,
    ):
        with register(PREFIX, service.address, endpoints=[ENDPOINT], ttl=10):
            while not balancer.backends:  # the watch delivers the new key
                time.sleep(0.01)
            print("registered:", [b.address for b in balancer.backends])
            print("GET http://users/ ->", client.get("http://users/").status_code)
            print(balancer.snapshot())  # ends with the watch's state
        while balancer.backends:  # close() revoked the lease: the key is gone
            time.sleep(0.01)
        print("after close():", [b.address for b in balancer.backends])


if __name__ == "__main__":
    main()
