"""Etcd discovery and registration against a real etcd started here (one per module), with
real HTTP servers behind the balancer. Every wait is a hang guard; none measures time (the
delays are measured by ``python -m lbclient.cli.bench.watch``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from etcd_process import Cut, EtcdProcess, addresses, connected, naming, wait_until

from lbclient import AsyncLBTransport, LBTransport, LoadBalancer
from lbclient.discovery import Etcd
from lbclient.discovery.etcd import aregister, register
from lbclient.health import WatchState
from lbclient.testing import TestServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    with EtcdProcess(tmp_path_factory.mktemp("etcd")) as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}/"


def quick(prefix: str, *endpoints: str) -> Etcd:
    return Etcd(prefix, endpoints=list(endpoints), backoff=0.05, backoff_max=0.3)


def watch_state(balancer: LoadBalancer) -> WatchState:
    state = balancer.snapshot().discovery_watch
    assert state is not None
    return state


def test_puts_and_deletes_reach_routing_and_bad_values_are_skipped(
    etcd: EtcdProcess, prefix: str
) -> None:
    etcd.put(prefix + "a", naming("10.0.0.1:80", zone="a", weight=2))
    etcd.put(prefix + "junk", "not json at all")
    etcd.put(prefix.rstrip("/") + "x/other", naming("10.9.9.9:80"))  # not under the prefix
    balancer = LoadBalancer(discovery=quick(prefix, etcd.url))
    with balancer:
        # The first listing is done when the start returns.
        (first,) = balancer.backends
        assert (first.address, first.weight, first.metadata["zone"]) == ("10.0.0.1:80", 2, "a")
        etcd.put(prefix + "b", json.dumps({"address": "10.0.0.2:80", "weight": 3}))
        wait_until(lambda: "10.0.0.2:80" in addresses(balancer), what="a put")
        etcd.put(prefix + "c", "{broken")
        deleted = etcd.delete(prefix + "a")
        wait_until(lambda: addresses(balancer) == {"10.0.0.2:80"}, what="a delete")
        state = balancer.snapshot().discovery_watch
        assert state is not None
        assert state.connected
        assert state.relists == 1
        assert state.error is None
        assert state.skipped == 2  # one in the listing, one on the watch
        assert state.revision == str(deleted)


def test_register_close_end_to_end_sync(etcd: EtcdProcess, prefix: str) -> None:
    balancer = LoadBalancer(discovery=quick(prefix, etcd.url))
    with (
        TestServer() as server,
        balancer,
        httpx.Client(transport=LBTransport(balancer, hosts=["users"])) as client,
    ):
        registration = register(prefix, server.address, endpoints=[etcd.url], ttl=5)
        wait_until(lambda: server.address in addresses(balancer), what="the registration")
        assert client.get("http://users/x").status_code == 200
        assert server.requests  # it went to the registered server
        registration.close()
        wait_until(lambda: not balancer.backends, what="the revoke")
        assert registration.lease is None


def test_register_close_end_to_end_async(etcd: EtcdProcess, prefix: str) -> None:
    async def go() -> None:
        balancer = LoadBalancer(discovery=quick(prefix, etcd.url))
        with TestServer() as server:
            async with (
                balancer,
                httpx.AsyncClient(transport=AsyncLBTransport(balancer, hosts=["users"])) as client,
            ):
                async with await aregister(prefix, server.address, endpoints=[etcd.url], ttl=5):
                    while server.address not in addresses(balancer):
                        await asyncio.sleep(0.005)
                    assert (await client.get("http://users/")).status_code == 200
                while balancer.backends:
                    await asyncio.sleep(0.005)

    asyncio.run(asyncio.wait_for(go(), 20))  # the timeout is a hang guard


def test_a_killed_registered_process_expires(etcd: EtcdProcess, prefix: str) -> None:
    code = (
        "import sys, time; from lbclient.discovery.etcd import register; "
        f"register({prefix!r}, '10.1.1.1:80', endpoints=[{etcd.url!r}], ttl=2); "
        "print('registered', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        balancer = LoadBalancer(discovery=quick(prefix, etcd.url))
        with balancer:
            assert child.stdout is not None
            assert child.stdout.readline() == b"registered\n"
            wait_until(lambda: addresses(balancer) == {"10.1.1.1:80"}, what="the registration")
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            wait_until(lambda: not balancer.backends, what="the lease's expiry")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        if child.stdout is not None:
            child.stdout.close()


def test_disconnected_and_restarted_etcd_resumes_without_missing_a_change(
    etcd: EtcdProcess, prefix: str
) -> None:
    cut = Cut(etcd.port)
    balancer = LoadBalancer(discovery=quick(prefix, cut.url))
    try:
        etcd.put(prefix + "a", naming("10.0.0.1:80"))
        etcd.put(prefix + "b", naming("10.0.0.2:80"))
        with balancer:
            assert addresses(balancer) == {"10.0.0.1:80", "10.0.0.2:80"}
            wait_until(lambda: connected(balancer), what="the stream")
            cut.cut()
            etcd.kill()
            wait_until(lambda: not connected(balancer), what="the lost stream")
            assert addresses(balancer) == {"10.0.0.1:80", "10.0.0.2:80"}  # the last good set
            etcd.start()
            etcd.delete(prefix + "a")  # made while the client cannot reach etcd
            etcd.put(prefix + "c", naming("10.0.0.3:80"))
            assert addresses(balancer) == {"10.0.0.1:80", "10.0.0.2:80"}
            cut.mend()
            wait_until(
                lambda: addresses(balancer) == {"10.0.0.2:80", "10.0.0.3:80"},
                what="the changes made while disconnected",
            )
            state = balancer.snapshot().discovery_watch
            assert state is not None
            assert state.relists == 1
            assert state.reconnects >= 1
            assert state.connected
    finally:
        cut.close()


def test_a_compacted_revision_lists_again(etcd: EtcdProcess, prefix: str) -> None:
    cut = Cut(etcd.port)
    balancer = LoadBalancer(discovery=quick(prefix, cut.url))
    try:
        etcd.put(prefix + "a", naming("10.0.0.1:80"))
        with balancer:
            wait_until(lambda: connected(balancer), what="the stream")
            cut.cut()
            etcd.put(prefix + "b", naming("10.0.0.2:80"))
            etcd.delete(prefix + "a")
            etcd.compact()
            cut.mend()
            wait_until(lambda: addresses(balancer) == {"10.0.0.2:80"}, what="the relisting")
            state = balancer.snapshot().discovery_watch
            assert state is not None
            assert state.relists == 2
    finally:
        cut.close()


def test_a_wiped_etcd_whose_revision_went_back_is_listed_again(tmp_path: Path, prefix: str) -> None:
    with EtcdProcess(tmp_path) as etcd:
        for _ in range(30):  # the revision well above what the wiped etcd will be at
            etcd.put("noise/k", "x")
        etcd.put(prefix + "a", naming("10.0.0.1:80"))
        etcd.put(prefix + "b", naming("10.0.0.2:80"))
        cluster = etcd.header()["cluster_id"]
        balancer = LoadBalancer(discovery=quick(prefix, etcd.url))
        with balancer:
            wait_until(lambda: connected(balancer), what="the stream")
            held = watch_state(balancer).revision
            assert held == etcd.header()["revision"]
            assert held is not None
            assert int(held) > 30
            etcd.wipe()
            # The same cluster ID: only the revision, back below the one held, tells.
            assert etcd.header()["cluster_id"] == cluster
            etcd.put(prefix + "n0", naming("10.0.1.1:80"))
            last = etcd.put(prefix + "n1", naming("10.0.1.2:80"))
            wait_until(
                lambda: addresses(balancer) == {"10.0.1.1:80", "10.0.1.2:80"},
                what="the set the wiped etcd holds (not the keys it lost)",
            )
            wait_until(lambda: connected(balancer), what="the stream on the wiped etcd")
            state = watch_state(balancer)
            assert state.revision == str(last)
            assert state.relists >= 2
            # The watch follows the new store: past the old revision, and below it.
            for _ in range(40):
                etcd.put("noise/k", "x")
            etcd.put(prefix + "n2", naming("10.0.1.3:80"))
            etcd.delete(prefix + "n0")
            wait_until(
                lambda: addresses(balancer) == {"10.0.1.2:80", "10.0.1.3:80"},
                what="changes after the wipe",
            )


def test_another_cluster_behind_the_same_address_is_listed_again(
    tmp_path: Path, prefix: str
) -> None:
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with EtcdProcess(tmp_path / "first") as first, EtcdProcess(tmp_path / "second") as second:
        second.put(prefix + "new", naming("10.0.1.1:80"))
        for _ in range(30):  # the second's revision above the first's
            second.put("noise/k", "x")
        first.put(prefix + "old", naming("10.0.0.1:80"))
        assert first.header()["cluster_id"] != second.header()["cluster_id"]
        cut = Cut(first.port)
        try:
            balancer = LoadBalancer(discovery=quick(prefix, cut.url))
            with balancer:
                wait_until(lambda: connected(balancer), what="the stream")
                held = watch_state(balancer).revision
                # Only the cluster ID tells: the second's revision is above the one held.
                assert held is not None
                assert int(second.header()["revision"]) > int(held)
                cut.point(second.port)
                cut.cut()
                cut.mend()
                wait_until(
                    lambda: addresses(balancer) == {"10.0.1.1:80"},
                    what="the second cluster's set",
                )
                second.put(prefix + "more", naming("10.0.1.2:80"))
                wait_until(
                    lambda: addresses(balancer) == {"10.0.1.1:80", "10.0.1.2:80"},
                    what="the second cluster's changes",
                )
                assert watch_state(balancer).relists >= 2
        finally:
            cut.close()


def test_an_unreachable_first_endpoint_is_passed_over(etcd: EtcdProcess, prefix: str) -> None:
    etcd.put(prefix + "a", naming("10.0.0.1:80"))
    dead = Cut(etcd.port)
    dead.cut()
    try:
        balancer = LoadBalancer(discovery=quick(prefix, dead.url, etcd.url))
        with balancer:
            assert addresses(balancer) == {"10.0.0.1:80"}
            state = balancer.snapshot().discovery_watch
            assert state is not None
            assert state.endpoint == etcd.url
    finally:
        dead.close()


def test_ten_thousand_keys_are_listed_and_watched(etcd: EtcdProcess, prefix: str) -> None:
    def address(i: int) -> str:
        return f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:80"

    etcd.put_many({f"{prefix}{i}": naming(address(i)) for i in range(10_000)})
    balancer = LoadBalancer(discovery=Etcd(prefix, endpoints=[etcd.url], timeout=20.0))
    with balancer:
        assert len(balancer) == 10_000
        etcd.put_many({f"{prefix}{i}": naming(address(i)) for i in range(10_000, 12_000)})
        etcd.put(prefix + "last", naming("10.200.0.1:80"))
        wait_until(lambda: len(balancer) == 12_001, what="2,001 changes")
