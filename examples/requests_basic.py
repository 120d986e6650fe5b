"""Load-balance a requests.Session over three backends with LBAdapter.

Run: python examples/requests_basic.py   (it starts three local backends on free ports)
"""

from __future__ import annotations

from collections import Counter

import requests

from lbclient import LBAdapter
from lbclient.testing import TestServer

backends = [TestServer(name=f"inventory-{i}").start() for i in range(3)]
try:
    session = requests.Session()
    adapter = LBAdapter([b.address for b in backends])
    session.mount("http://inventory/", adapter)  # end the prefix with "/": prefixes match as text

    served = Counter(session.get("http://inventory/items/1").json()["server"] for _ in range(9))
    print("spread:", dict(served))

    backends[1].kill()
    statuses = Counter(
        session.post("http://inventory/items", json={"sku": n}).status_code for n in range(6)
    )
    print("after inventory-1 died:", dict(statuses), "- no POST lost, none sent twice")
    session.close()
finally:
    for backend in backends:
        backend.close()
