"""Balance on the load the servers report: three uvicorn services wrapped in lbclient's
middleware, of capacities 1 : 2 : 4, and an httpx client whose WeightedRoundRobin sends each
the share its reports earn.

Run: python examples/load_reports.py   (needs uvicorn: pip install uvicorn; it starts the
three services on free loopback ports)
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import uvicorn

from lbclient import LBTransport, WeightedRoundRobin
from lbclient.server import LoadReportingASGI, LoadTracker

SERVICE_MS = (8.0, 4.0, 2.0)  # one request at a time each: capacities 125, 250, 500 per second


def service(name: str, service_ms: float) -> tuple[Any, Callable[[], float]]:
    """An ASGI app serving one request at a time for ``service_ms``, and its utilization: the
    share of the last 2 s it spent serving."""
    busy: list[tuple[float, float]] = []  # (start, end) of recent requests
    lock: list[asyncio.Lock] = []

    def utilization() -> float:
        now = time.monotonic()
        recent = [(max(s, now - 2.0), e) for s, e in busy if e > now - 2.0]
        return min(1.0, sum(e - s for s, e in recent) / 2.0)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if not lock:
            lock.append(asyncio.Lock())
        async with lock[0]:
            start = time.monotonic()
            await asyncio.sleep(service_ms / 1000)
            busy.append((start, time.monotonic()))
            del busy[:-1000]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": name.encode()})

    return app, utilization


def serve(app: Any) -> tuple[str, uvicorn.Server, threading.Thread]:
    """``app`` under uvicorn on a free loopback port, in a thread of this process."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return f"127.0.0.1:{sock.getsockname()[1]}", server, thread


services = []
names = {}
for number, ms in enumerate(SERVICE_MS):
    app, utilization = service(f"users-{number}", ms)
    # The middleware answers endpoint-load-metrics-format with rps_fractional, eps, the
    # requests in flight, and the utilization the service measures itself.
    # Rates over the last 2 s, as the utilization (the default window is 10 s).
    tracker = LoadTracker(application_utilization=utilization, rate_window=2)
    services.append(serve(LoadReportingASGI(app, tracker=tracker)))
    names[services[-1][0]] = f"users-{number}"
try:
    # Weights count after 0.5 s of reports (gRPC's default is 10 s), recomputed every 0.2 s.
    algorithm = WeightedRoundRobin(blackout_period=0.5, weight_update_period=0.2)
    transport = LBTransport([address for address, _, _ in services], algorithm=algorithm)
    with httpx.Client(transport=transport, base_url="http://users") as client:
        ended = time.monotonic() + 4.0
        served: Counter[str] = Counter()

        def caller() -> None:
            while time.monotonic() < ended:
                name = client.get("/profile/7").text
                if time.monotonic() > ended - 1.0:  # the last second, weights settled
                    served[name] += 1

        with ThreadPoolExecutor(16) as pool:
            for _ in range(16):
                pool.submit(caller)
        total = sum(served.values())
        shares = {name: f"{100 * n / total:.0f}%" for name, n in sorted(served.items())}
        print("capacities 1 : 2 : 4, shares of the last second:", shares)
        for backend in transport.balancer.snapshot().backends:
            report = backend.report
            if report is not None:
                print(
                    f"  {names[backend.backend.address]}: "
                    f"reported {report.rps_fractional:.0f} req/s "
                    f"at utilization {report.application_utilization:.2f}, "
                    f"{report.rif:.0f} in flight"
                )
finally:
    for _, server, _ in services:
        server.should_exit = True
    for _, _, thread in services:
        thread.join(10)
