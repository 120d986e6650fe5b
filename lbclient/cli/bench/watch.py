"""``python -m lbclient.cli.bench.watch``: how fast etcd discovery is told.

* The delay from a put under the watched prefix to the balancer routing to the new backend,
  over ``--changes`` puts (100), one at a time: p50, p99 and the largest, measured from the put
  sent and from etcd's acknowledgement of it. The balancer runs its watch on its runner thread
  (sync use); the measuring thread looks at ``balancer.backends`` every 0.2 ms.
* How long the first listing of ``--keys`` keys (10,000) takes: ``Etcd.discover()`` alone, and
  a balancer's first ``start()`` (the listing and the update of its set), best and median of
  three.

It starts its own etcd (``--etcd``, ``/usr/bin/etcd``; Debian's etcd-server) on free loopback
ports with its data in a temporary directory, or uses ``--endpoint URL`` (keys are written
under a fresh prefix there, then deleted).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence

import httpx

from lbclient import LoadBalancer
from lbclient.discovery import Etcd


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_etcd(binary: str) -> Iterator[str]:
    """An etcd of our own on loopback, until the block ends."""
    with tempfile.TemporaryDirectory(prefix="lbclient-etcd-") as directory:
        client, peer = f"http://127.0.0.1:{_port()}", f"http://127.0.0.1:{_port()}"
        process = subprocess.Popen(
            [
                binary,
                "--name=bench",
                f"--data-dir={directory}/data",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=bench={peer}",
                "--max-txn-ops=100000",
                "--max-request-bytes=67108864",
                "--log-level=error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            end = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{client}/health", trust_env=False).status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"{binary} did not start")
                time.sleep(0.05)
            yield client
        finally:
            process.kill()
            process.wait()


def _address(i: int) -> str:
    return f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:80"


def _value(i: int) -> str:
    return json.dumps({"Op": 0, "Addr": _address(i)})


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def put_to_routing(endpoint: str, changes: int) -> tuple[list[float], list[float]]:
    """Seconds from each put sent, and from its acknowledgement, to routing."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}/"
    sent: list[float] = []
    acked: list[float] = []
    balancer = LoadBalancer(discovery=Etcd(prefix, endpoints=[endpoint]))
    with httpx.Client(trust_env=False) as client, balancer:
        while not getattr(balancer.snapshot().discovery_watch, "connected", False):
            time.sleep(0.001)
        for i in range(changes):
            address = _address(i)
            start = time.perf_counter()
            client.post(
                f"{endpoint}/v3/kv/put",
                json={"key": _b64(f"{prefix}{i}"), "value": _b64(_value(i))},
            ).raise_for_status()
            ack = time.perf_counter()
            guard = ack + 10.0
            while not any(b.address == address for b in balancer.backends):
                if time.perf_counter() > guard:
                    raise RuntimeError(f"put {i} did not reach routing within 10 s")
                time.sleep(0.0002)
            done = time.perf_counter()
            sent.append(done - start)
            acked.append(done - ack)
        _delete(client, endpoint, prefix)
    return sent, acked


def _delete(client: httpx.Client, endpoint: str, prefix: str) -> None:
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    client.post(
        f"{endpoint}/v3/kv/deleterange", json={"key": _b64(prefix), "range_end": _b64(end)}
    ).raise_for_status()


def first_listing(endpoint: str, keys: int) -> tuple[list[float], list[float]]:
    """Seconds for three listings of ``keys`` keys, alone and as a balancer's first start."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}/"
    with httpx.Client(trust_env=False, timeout=60) as client:
        for start in range(0, keys, 10_000):
            ops = [
                {"request_put": {"key": _b64(f"{prefix}{i}"), "value": _b64(_value(i))}}
                for i in range(start, min(keys, start + 10_000))
            ]
            client.post(f"{endpoint}/v3/kv/txn", json={"success": ops}).raise_for_status()
        alone, started = [], []
        for _ in range(3):
            source = Etcd(prefix, endpoints=[endpoint], timeout=60.0)
            t0 = time.perf_counter()
            found = source.discover()
            alone.append(time.perf_counter() - t0)
            assert len(found.backends) == keys, len(found.backends)
            balancer = LoadBalancer(discovery=Etcd(prefix, endpoints=[endpoint], timeout=60.0))
            t0 = time.perf_counter()
            balancer.start()
            started.append(time.perf_counter() - t0)
            assert len(balancer) == keys, len(balancer)
            balancer.close()
        _delete(client, endpoint, prefix)
    return alone, started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--etcd", default="/usr/bin/etcd", help="the etcd program to start")
    parser.add_argument("--endpoint", help="use this etcd instead of starting one")
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--keys", type=int, default=10_000)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        endpoint = args.endpoint or stack.enter_context(local_etcd(args.etcd))
        sent, acked = put_to_routing(endpoint, args.changes)
        alone, started = first_listing(endpoint, args.keys)
    ms = 1000.0
    print(f"put -> routing over {len(sent)} changes (ms):")
    for name, values in (("from the put sent", sent), ("from etcd's ack", acked)):
        print(
            f"  {name:<18} p50 {percentile(values, 0.5) * ms:7.2f}  "
            f"p99 {percentile(values, 0.99) * ms:7.2f}  max {max(values) * ms:7.2f}"
        )
    print(f"first listing of {args.keys:,} keys (s):")
    for name, values in (("Etcd.discover()", alone), ("balancer.start()", started)):
        print(f"  {name:<18} best {min(values):6.3f}  median {statistics.median(values):6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
