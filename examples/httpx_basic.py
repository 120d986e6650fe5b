"""Load-balance an httpx.Client over three backends, and fail over when one dies.

Run: python examples/httpx_basic.py   (it starts three local backends on free ports)
"""

from __future__ import annotations

from collections import Counter

import httpx

from lbclient import LBTransport
from lbclient.testing import TestServer

backends = [TestServer(name=f"users-{i}").start() for i in range(3)]
try:
    transport = LBTransport([b.address for b in backends])  # round robin by default
    with httpx.Client(transport=transport, base_url="http://users") as client:
        served = Counter(client.get("/profile/7").json()["server"] for _ in range(9))
        print("spread over the backends:", dict(served))

        backends[0].kill()  # connections to it are now refused...
        served = Counter(
            client.post("/orders", json={"item": 1}).json()["server"] for _ in range(15)
        )
        print("after users-0 died, every POST still succeeded:", dict(served))
        # Five refused connections in a row ejected it: traffic skips it for 30 s, then one
        # probe request decides whether it is back.
        print(transport.balancer.snapshot())
finally:
    for backend in backends:
        backend.close()
