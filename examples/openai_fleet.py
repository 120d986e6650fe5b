"""An OpenAI-compatible fleet balanced on its KV cache: three stand-ins for vLLM replicas answer
/v1/chat/completions and report ``named_metrics.kv_cache_usage_perc`` as vLLM does; one has
half the cache of the others. WeightedRoundRobin takes that metric as the utilization.

Run: python examples/openai_fleet.py   (needs uvicorn: pip install uvicorn; it starts the
three stand-ins on free loopback ports)

Against real vLLM replicas, only the client part is needed: vLLM answers
``endpoint-load-metrics-format`` with ``kv_cache_usage_perc`` among its named metrics.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import uvicorn

from lbclient import LBTransport, WeightedRoundRobin
from lbclient.server import LoadReportingASGI

CACHE_BLOCKS = (64, 64, 32)  # replica 2 has half the KV cache
BLOCKS_PER_REQUEST = 8
GENERATE_MS = 20.0


def replica(name: str, blocks: int) -> LoadReportingASGI:
    """A stand-in that holds ``BLOCKS_PER_REQUEST`` cache blocks per request while it generates
    and reports the cache's use; requests beyond the cache wait for blocks."""
    used = [0]
    freed: list[asyncio.Condition] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if not freed:
            freed.append(asyncio.Condition())
        async with freed[0]:
            await freed[0].wait_for(lambda: used[0] + BLOCKS_PER_REQUEST <= blocks)
            used[0] += BLOCKS_PER_REQUEST
        await asyncio.sleep(GENERATE_MS / 1000)  # generating
        async with freed[0]:
            used[0] -= BLOCKS_PER_REQUEST
            freed[0].notify_all()
        body = {"object": "chat.completion", "model": name, "choices": [{"index": 0}]}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    # At least one block's worth, so an idle replica still reports a utilization.
    usage = {"kv_cache_usage_perc": lambda: max(used[0], 1) / blocks}
    return LoadReportingASGI(app, named_metrics=usage)


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


replicas = [serve(replica(f"replica-{i}", blocks)) for i, blocks in enumerate(CACHE_BLOCKS)]
try:
    algorithm = WeightedRoundRobin(
        metric_names=("named_metrics.kv_cache_usage_perc",),
        blackout_period=0.5,  # gRPC's default is 10 s
        weight_update_period=0.2,
    )
    transport = LBTransport([address for address, _, _ in replicas], algorithm=algorithm)
    with httpx.Client(transport=transport, base_url="http://llm") as client:
        ended = time.monotonic() + 4.0
        served: Counter[str] = Counter()
        request = {"model": "any", "messages": [{"role": "user", "content": "hello"}]}

        def caller() -> None:
            while time.monotonic() < ended:
                answer = client.post("/v1/chat/completions", json=request).json()
                if time.monotonic() > ended - 2.0:  # weights settled
                    served[answer["model"]] += 1

        with ThreadPoolExecutor(16) as pool:
            for _ in range(16):
                pool.submit(caller)
    total = sum(served.values())
    print(
        "KV cache blocks 64 : 64 : 32, shares of the last 2 s:",
        {name: f"{100 * n / total:.0f}%" for name, n in sorted(served.items())},
    )
finally:
    for _, server, _ in replicas:
        server.should_exit = True
    for _, _, thread in replicas:
        thread.join(10)
