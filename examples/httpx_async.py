"""The same with httpx.AsyncClient: 100 concurrent requests over three backends.

Run: python examples/httpx_async.py
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

from lbclient import AsyncLBTransport
from lbclient.testing import TestServer


async def main() -> None:
    backends = [TestServer(name=f"search-{i}").start() for i in range(3)]
    try:
        transport = AsyncLBTransport([b.address for b in backends])
        async with httpx.AsyncClient(transport=transport, base_url="http://search") as client:
            responses = await asyncio.gather(
                *(client.get("/q", params={"term": str(i)}) for i in range(100))
            )
        print("status codes:", Counter(r.status_code for r in responses))
        print("served by:", dict(Counter(r.json()["server"] for r in responses)))
    finally:
        for backend in backends:
            backend.close()


asyncio.run(main())
