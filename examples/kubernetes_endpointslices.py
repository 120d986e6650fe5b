"""Follow a Kubernetes Service's EndpointSlices: a pod that terminates gets no new request.

Run: python examples/kubernetes_endpointslices.py

No Kubernetes API server runs here, so the example starts lbclient.testing's KubernetesAPI (a
test API server speaking the documented EndpointSlice list and watch protocol, over TLS with a
bearer token) and three local backends as the Service's pods. Inside a real pod the source
needs no more than ``Kubernetes("users", port="http")``: the API server, the token (re-read as
it rotates), the CA and the namespace come from the pod's service account.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from lbclient import LBTransport, LoadBalancer
from lbclient.discovery import Kubernetes
from lbclient.testing import KubernetesAPI, TestServer

folder = Path(tempfile.mkdtemp())
(folder / "token").write_text("example-token")
pods = [TestServer(name=f"users-{i}").start() for i in range(3)]
api = KubernetesAPI(token="example-token", tls=True).start()


def pod(i: int, **conditions: bool) -> None:
    """Pod ``i`` of Service ``users``, in a slice of its own (each listens on its own port)."""
    api.apply(
        f"users-{i}",
        [api.endpoint("127.0.0.1", zone=f"zone-{'ab'[i % 2]}", node=f"node-{i}", **conditions)],
        service="users",
        ports=[api.port(pods[i].port, "http")],
    )


try:
    for i in range(3):
        pod(i)
    source = Kubernetes(
        "users",
        port="http",
        server=api.url,
        token_file=folder / "token",
        ca_file=api.write_ca(folder / "ca.crt"),
    )
    balancer = LoadBalancer(discovery=source)
    with balancer, httpx.Client(transport=LBTransport(balancer), base_url="http://users") as c:
        served = Counter(c.get("/").json()["server"] for _ in range(9))
        print("three ready pods:", dict(served))
        print("metadata of one:", dict(balancer.backends[0].metadata))

        pod(0, ready=False, terminating=True)  # users-0 shuts down: serving, terminating
        deadline = time.monotonic() + 5.0
        while len(balancer.backends) == 3 and time.monotonic() < deadline:
            time.sleep(0.001)  # the watch delivers it within milliseconds
        served = Counter(c.get("/").json()["server"] for _ in range(9))
        print("users-0 terminating, no new request goes to it:", dict(served))
        print(balancer.snapshot().discovery_watch)
finally:
    api.close()
    for server in pods:
        server.close()
