"""Sticky sessions: every request of one user goes to the same backend (nginx-compatible ketama),
and when a backend leaves, only its own users move.

Run: python examples/sticky_sessions.py
"""

from __future__ import annotations

import httpx

from lbclient import Consistent, LBTransport, LoadBalancer
from lbclient.testing import TestServer


def user_id(request: httpx.Request) -> str | None:
    return request.headers.get("x-user-id")


backends = [TestServer(name=f"carts-{i}").start() for i in range(4)]
try:
    balancer = LoadBalancer([b.address for b in backends], algorithm=Consistent)
    transport = LBTransport(balancer, key=user_id)
    users = [f"user-{n}" for n in range(40)]
    with httpx.Client(transport=transport, base_url="http://carts") as client:

        def home(user: str) -> str:
            response = client.get("/cart", headers={"x-user-id": user})
            return str(response.json()["server"])

        before = {u: home(u) for u in users}
        assert all(home(u) == before[u] for u in users), "a user changed backend"
        print("every user stays on one backend:", before["user-1"], "serves user-1")

        balancer.update([b.address for b in backends[1:]])  # carts-0 leaves the pool
        after = {u: home(u) for u in users}
    moved = [u for u in users if after[u] != before[u]]
    assert all(before[u] == "carts-0" for u in moved), "a user of another backend moved"
    print(f"carts-0 left: {len(moved)} of {len(users)} users moved, all of them from carts-0")
finally:
    for backend in backends:
        backend.close()
