"""Pick backends with the pure core: weights, sticky keys, failover and health.

Run: python examples/core_selection.py
"""

from __future__ import annotations

from collections import Counter

from lbclient import Backend, Consistent, LoadBalancer, RoundRobin

backends = [Backend("10.0.0.1:8080", weight=3), "10.0.0.2:8080", "[fd00::3]:8080"]

# Round robin by weight: over 5 picks, 10.0.0.1 gets 3, the others one each.
rr = LoadBalancer(backends, RoundRobin)
print(Counter(rr.select().address for _ in range(5)))  # type: ignore[union-attr]

# Sticky sessions: the same key always lands on the same backend, as nginx would route it.
ring = LoadBalancer(backends, Consistent)
home = ring.select("user-42")
assert home is not None
assert ring.select("user-42") == home
print("user-42 ->", home.address)

# Failover: five connection failures in a row eject a backend (for 30 s at first), and the
# key moves to its next backend on the ring...
for _ in range(5):
    ring.report(home, False)
fallback = ring.select("user-42")
assert fallback is not None
assert fallback != home
print("user-42 while", home.address, "is ejected ->", fallback.address)
print(ring.snapshot())

# ...and the fallback order for retries is there to walk.
print("candidates:", [b.address for b in ring.iter("user-42")])
