"""``python -m lbclient.cli.bench.kube_watch``: how fast Kubernetes discovery is told.

Starts the test Kubernetes API server of lbclient.testing (TLS, bearer token) on loopback, a
balancer watching a Service's slices, then makes ``--changes`` changes one at a time (a pod
turns terminating, or ready again) and times each from the API server taking it to the
balancer's set (what ``select`` reads) showing it. Prints p50, p90, p99 and the worst, in ms.

    python -m lbclient.cli.bench.kube_watch --changes 100
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from lbclient import LoadBalancer
from lbclient.discovery import Kubernetes
from lbclient.testing import KubernetesAPI

E, P = KubernetesAPI.endpoint, KubernetesAPI.port


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbclient.cli.bench.kube_watch")
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--pods", type=int, default=10)
    args = parser.parse_args(argv)
    if args.changes < 2 or args.pods < 1:
        parser.error("--changes must be at least 2 and --pods at least 1")
    with (
        tempfile.TemporaryDirectory() as temporary,
        KubernetesAPI(token="bench-token", tls=True) as api,
    ):
        folder = Path(temporary)
        (folder / "token").write_text("bench-token")
        ca = api.write_ca(folder / "ca.crt")
        pods = [f"10.1.0.{i + 1}" for i in range(args.pods)]
        for i, address in enumerate(pods):
            api.apply(f"bench-{i}", [E(address)], service="bench", ports=[P(8080, "http")])
        source = Kubernetes(
            "bench", server=api.url, token_file=folder / "token", ca_file=ca, port="http"
        )
        delays: list[float] = []
        with LoadBalancer(discovery=source) as lb:
            ready = set(pods)
            for n in range(args.changes):
                i = n % len(pods)
                address = pods[i]
                leaving = address in ready
                started = time.perf_counter()
                api.apply(
                    f"bench-{i}",
                    [E(address, ready=not leaving, terminating=leaving)],
                    service="bench",
                    ports=[P(8080, "http")],
                )
                target = f"{address}:8080"
                while (target in {b.address for b in lb.backends}) == leaving:
                    if time.perf_counter() - started > 5:
                        raise SystemExit(f"change {n} did not reach routing within 5 s")
                    time.sleep(0.0001)
                delays.append(time.perf_counter() - started)
                ready.symmetric_difference_update({address})
            state = lb.snapshot().discovery_watch
    ms = sorted(d * 1000 for d in delays)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    print(f"changes: {len(ms)}; watch: {state}")
    print(
        f"event -> routing: p50 {q[49]:.2f} ms, p90 {q[89]:.2f} ms, p99 {q[98]:.2f} ms, "
        f"max {ms[-1]:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
