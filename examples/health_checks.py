"""Active health checks and outlier detection, watched through on_change and snapshot().

Run: python examples/health_checks.py   (it starts three local backends on free ports)
"""

from __future__ import annotations

import logging
import time

import httpx

from lbclient import HealthPolicy, HttpCheck, LBTransport, LoadBalancer
from lbclient.testing import TestServer

logging.basicConfig(format="  log: %(message)s")
logging.getLogger("lbclient").setLevel(logging.INFO)  # ejections, probes, checks, panic mode

servers = [TestServer(name=f"users-{i}").start() for i in range(3)]
names = {s.address: s.name for s in servers}
try:
    balancer = LoadBalancer(
        [s.address for s in servers],
        # Three 5xx in a row eject a backend, for 1 s at first (30 s by default).
        health=HealthPolicy(consecutive_5xx=3, base_ejection_time=1.0),
        # GET /healthz with Host: users every 0.2 s; two failures in a row take it out.
        health_check=HttpCheck("/healthz", host="users", interval=0.2, consecutive_failures=2),
        on_change=lambda b, healthy: print(f"  on_change: {names[b.address]} healthy={healthy}"),
    )
    with httpx.Client(transport=LBTransport(balancer), base_url="http://users") as client:
        client.get("/")  # the first request starts the checks (one verdict per backend)
        time.sleep(0.5)

        print("users-0 starts answering 503: passive outlier detection ejects it")
        servers[0].mode = "status:503"
        codes = [client.get("/").status_code for _ in range(12)]
        print("  statuses seen:", codes)

        print("users-1 stops: its health check takes it out; with 2 of 3 out, panic mode")
        servers[1].kill()
        while balancer.health(servers[1].address).checked is not False:
            time.sleep(0.05)
        print(balancer.snapshot())

        print("both come back: a passing check ends the ejection of users-0 too")
        servers[0].mode = "ok"
        servers[1].restart()
        while not all(balancer.health(s.address).healthy for s in servers):
            time.sleep(0.05)
        print(balancer.snapshot())
finally:
    for server in servers:
        server.close()
