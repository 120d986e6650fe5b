"""Kubernetes discovery against the test API server of lbclient.testing (real HTTP and TLS on
loopback; no Kubernetes API server can run here), routing to real loopback backends."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from lbclient import LoadBalancer
from lbclient.discovery import Kubernetes
from lbclient.health import WatchState
from lbclient.httpx_transport import AsyncLBTransport, LBTransport
from lbclient.testing import Exchange, KubernetesAPI, TestServer, TLSCerts, serve

E, P = KubernetesAPI.endpoint, KubernetesAPI.port
TOKEN = "test-token"


@dataclass
class Cluster:
    api: KubernetesAPI
    ca: Path
    token: Path

    def source(self, service: str, **options: Any) -> Kubernetes:
        given: dict[str, Any] = {
            "server": self.api.url,
            "token_file": self.token,
            "ca_file": self.ca,
            "port": "http",
            "backoff": 0.02,
            "backoff_max": 0.2,
            "service_account": self.ca.parent / "no-pod",
            **options,
        }
        return Kubernetes(service, **given)

    def pod(self, name: str, server: TestServer, service: str, **conditions: Any) -> None:
        """One pod behind ``service``: a slice of its own (each backend has its own port)."""
        zone = conditions.pop("zone", None)
        self.api.apply(
            name,
            [E(server.host, zone=zone, node=f"node-{name}", **conditions)],
            service=service,
            ports=[P(server.port, "http")],
            address_type="IPv6" if ":" in server.host else "IPv4",
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("kube")
    (folder / "token").write_text(TOKEN + "\n")
    with KubernetesAPI(token=TOKEN, tls=True) as api:
        yield Cluster(api, api.write_ca(folder / "ca.crt"), folder / "token")


def until(check: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Wait for ``check()`` (a hang guard, not a time limit under test)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.002)


def addresses(lb: LoadBalancer) -> set[str]:
    return {b.address for b in lb.backends}


def watch(lb: LoadBalancer) -> WatchState:
    state = lb.snapshot().discovery_watch
    assert state is not None
    return state


@contextlib.contextmanager
def watched(
    cluster: Cluster, service: str, **options: Any
) -> Iterator[tuple[LoadBalancer, TestServer, TestServer]]:
    """A balancer watching ``service``, whose one pod ``a`` is in the set, its watch open; pod
    ``b`` is up, for the test to add."""
    with TestServer() as a, TestServer() as b:
        cluster.pod(f"{service}-a", a, service)
        with LoadBalancer(discovery=cluster.source(service, **options)) as lb:
            until(lambda: watch(lb).connected, "the watch is open")
            yield lb, a, b


# -- a rolling update under traffic --------------------------------------------------------------


@dataclass
class Traffic:
    """What the request loops saw: each remembers which pods had left the set when it began a
    request, so a request that reached one of those is caught."""

    workers: int
    removed: set[int] = field(default_factory=set)
    done: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    stop: bool = False

    def __post_init__(self) -> None:
        self.done = [0] * self.workers

    def begin(self) -> frozenset[int]:
        return frozenset(self.removed)

    def end(self, worker: int, gone: frozenset[int], response: httpx.Response | None) -> None:
        if response is None or response.status_code != 200:
            self.failures.append(repr(response))
        elif response.json()["port"] in gone:
            self.late.append(response.json()["port"])
        self.done[worker] += 1

    def drain(self) -> None:
        """Wait until every loop has finished a request begun after now."""
        marks = list(self.done)
        until(
            lambda: all(d >= m + 2 for d, m in zip(self.done, marks, strict=True)), "requests go on"
        )


def roll(
    cluster: Cluster,
    lb: LoadBalancer,
    old: list[TestServer],
    new: list[TestServer],
    traffic: Traffic,
    service: str,
) -> None:
    """Replace each old pod by a new one as a Deployment's rolling update does: the new pod
    starts (not ready), becomes ready; the old one terminates (serving, then not), is deleted,
    and dies."""
    for i, (leaving, coming) in enumerate(zip(old, new, strict=True)):
        cluster.pod(f"{service}-new-{i}", coming, service, ready=False)
        cluster.pod(f"{service}-new-{i}", coming, service)
        until(lambda a=coming.address: a in addresses(lb), "the new pod takes requests")
        cluster.pod(f"{service}-old-{i}", leaving, service, ready=False, terminating=True)
        until(lambda a=leaving.address: a not in addresses(lb), "the terminating pod leaves")
        traffic.removed.add(leaving.port)
        traffic.drain()
        cluster.pod(
            f"{service}-old-{i}", leaving, service, ready=False, serving=False, terminating=True
        )
        cluster.api.delete(f"{service}-old-{i}")
        leaving.kill()
    until(lambda: all(s.count() for s in new), "every new pod served")
    traffic.drain()


def _pods(service: str) -> tuple[list[TestServer], list[TestServer]]:
    old = [TestServer(name=f"{service}-old-{i}") for i in range(6)]
    new = [TestServer(name=f"{service}-new-{i}") for i in range(6)]
    return old, new


def test_rolling_update_of_six_pods_under_traffic(cluster: Cluster) -> None:
    old, new = _pods("roll")
    with serve(*old, *new):
        for i, pod in enumerate(old):
            cluster.pod(f"roll-old-{i}", pod, "roll")
        traffic = Traffic(workers=2)
        with (
            LoadBalancer(discovery=cluster.source("roll")) as lb,
            httpx.Client(transport=LBTransport(lb), base_url="http://roll") as client,
        ):
            assert addresses(lb) == {p.address for p in old}

            def loop(worker: int) -> None:
                while not traffic.stop:
                    gone = traffic.begin()
                    try:
                        response: httpx.Response | None = client.get("/")
                    except httpx.HTTPError as exc:
                        traffic.failures.append(repr(exc))
                        response = None
                    traffic.end(worker, gone, response)

            threads = [threading.Thread(target=loop, args=(w,)) for w in range(2)]
            for thread in threads:
                thread.start()
            try:
                roll(cluster, lb, old, new, traffic, "roll")
            finally:
                traffic.stop = True
                for thread in threads:
                    thread.join(10)
            assert addresses(lb) == {p.address for p in new}
    assert traffic.failures == []
    assert traffic.late == []
    assert sum(traffic.done) > 12


def test_rolling_update_of_six_pods_under_async_traffic(cluster: Cluster) -> None:
    old, new = _pods("aroll")
    traffic = Traffic(workers=2)

    async def main() -> None:
        lb = LoadBalancer(discovery=cluster.source("aroll"))
        async with (
            lb,
            httpx.AsyncClient(transport=AsyncLBTransport(lb), base_url="http://aroll") as client,
        ):
            assert addresses(lb) == {p.address for p in old}

            async def loop(worker: int) -> None:
                while not traffic.stop:
                    gone = traffic.begin()
                    try:
                        response: httpx.Response | None = await client.get("/")
                    except httpx.HTTPError as exc:
                        traffic.failures.append(repr(exc))
                        response = None
                    traffic.end(worker, gone, response)

            tasks = [asyncio.create_task(loop(w)) for w in range(2)]
            try:
                await asyncio.to_thread(roll, cluster, lb, old, new, traffic, "aroll")
            finally:
                traffic.stop = True
                await asyncio.wait_for(asyncio.gather(*tasks), 10)
            assert addresses(lb) == {p.address for p in new}

    with serve(*old, *new):
        for i, pod in enumerate(old):
            cluster.pod(f"aroll-old-{i}", pod, "aroll")
        asyncio.run(main())
    assert traffic.failures == []
    assert traffic.late == []


def test_a_request_in_flight_on_a_terminating_pod_finishes(cluster: Cluster) -> None:
    gate = threading.Event()

    def held(exchange: Exchange) -> bool:
        gate.wait(5)
        return exchange.respond()

    results: list[httpx.Response] = []
    with TestServer("held", behaviours={"held": held}) as pod:
        cluster.pod("drain-0", pod, "drain")
        with (
            LoadBalancer(discovery=cluster.source("drain")) as lb,
            httpx.Client(transport=LBTransport(lb), base_url="http://drain") as client,
        ):
            request = threading.Thread(target=lambda: results.append(client.get("/")))
            request.start()
            until(lambda: pod.count() == 1, "the request reached the pod")
            cluster.pod("drain-0", pod, "drain", ready=False, terminating=True)
            until(lambda: not lb.backends, "the terminating pod leaves the set")
            gate.set()
            request.join(5)
    assert [r.status_code for r in results] == [200]
    assert results[0].json()["port"] == pod.port


# -- the watch's life ------------------------------------------------------------------------------


def test_410_relists_and_bookmarks_keep_the_version_fresh(cluster: Cluster) -> None:
    api = cluster.api
    with TestServer() as c, watched(cluster, "fresh") as (lb, a, b):
        assert watch(lb).relists == 1
        # Other services change: this watch sees none of it and its version grows old.
        api.apply("other-x", [E("10.0.0.9")], service="other", ports=[P(80)])
        api.expire()
        api.end_watches()
        until(lambda: watch(lb).relists == 2, "a 410 Gone lists again")
        cluster.pod("fresh-b", b, "fresh")
        until(lambda: b.address in addresses(lb), "the change after the relist")
        # A bookmark moves the version on: the next watch resumes without a 410.
        version = api.bookmark()
        until(lambda: watch(lb).revision == str(version), "the bookmark is taken")
        api.expire()
        api.end_watches()
        until(lambda: watch(lb).reconnects >= 2 and watch(lb).connected, "resumed")
        cluster.pod("fresh-c", c, "fresh")
        until(lambda: c.address in addresses(lb), "the change after the resume")
        assert watch(lb).relists == 2
        # An ERROR event with a 410 Status, in the middle of a watch.
        api.gone()
        until(lambda: watch(lb).relists == 3, "the ERROR 410 event lists again")
        # A watch refused with an HTTP 410 answer.
        until(lambda: watch(lb).connected, "the watch is open again")
        api.apply("other-y", [E("10.0.0.8")], service="other", ports=[P(80)])
        api.expire()
        api.gone_status = True
        try:
            api.end_watches()
            until(lambda: watch(lb).relists == 4, "a 410 answer lists again")
        finally:
            api.gone_status = False
        assert addresses(lb) == {a.address, b.address, c.address}


def test_a_dropped_watch_resumes_and_misses_nothing(cluster: Cluster) -> None:
    api = cluster.api
    with watched(cluster, "drop") as (lb, _a, b):
        lists = api.lists
        api.drop_watches()
        cluster.pod("drop-b", b, "drop")  # while the watch is down, perhaps
        api.delete("drop-a")
        until(lambda: addresses(lb) == {b.address}, "both changes arrive")
        assert api.lists == lists  # resumed from the version seen, not listed again
        assert watch(lb).reconnects >= 1


def test_garbage_and_a_line_that_never_ends(cluster: Cluster) -> None:
    api = cluster.api
    with watched(cluster, "junk", max_line=4096) as (lb, a, b):
        api.send_raw(b"this is not json\n")
        until(lambda: watch(lb).skipped == 1, "the garbage line is skipped")
        api.send_raw(b'{"type": "ADDED", "object": "' + b"x" * 10_000)
        until(lambda: watch(lb).reconnects == 1, "the endless line breaks the stream")
        assert addresses(lb) == {a.address}
        cluster.pod("junk-b", b, "junk")
        until(lambda: b.address in addresses(lb), "the watch goes on")


def test_an_error_status_keeps_the_set_and_backs_off(cluster: Cluster) -> None:
    api = cluster.api
    with watched(cluster, "sick") as (lb, a, b):
        api.fail_next(500, 3)
        api.end_watches()
        until(lambda: "500" in str(watch(lb).error), "the error is shown")
        assert addresses(lb) == {a.address}
        cluster.pod("sick-b", b, "sick")
        until(lambda: b.address in addresses(lb), "the watch recovers")
        assert lb.snapshot().discovery_failures >= 3


def test_a_wrong_ca_is_refused_and_the_set_kept(cluster: Cluster, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(cluster.ca.read_bytes())
    with watched(cluster, "trust", ca_file=ca) as (lb, a, b):
        TLSCerts("127.0.0.1").write_ca(ca)  # a CA that did not sign the server's cert
        cluster.api.drop_watches()
        until(
            lambda: "CERTIFICATE_VERIFY_FAILED" in str(watch(lb).error),
            "the reconnect is refused, saying why",
        )
        assert not watch(lb).connected
        assert addresses(lb) == {a.address}
        ca.write_bytes(cluster.ca.read_bytes())
        cluster.pod("trust-b", b, "trust")
        until(lambda: b.address in addresses(lb), "trusted again, the watch resumes")
    TLSCerts("127.0.0.1").write_ca(ca)
    refused = cluster.source("trust", ca_file=ca)
    with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        refused.discover()


def test_inside_a_pod_with_a_rotated_token(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = cluster.api
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "ca.crt").write_bytes(cluster.ca.read_bytes())
    (tmp_path / "namespace").write_text("team-a")
    host, port = api.server.host, api.server.port
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
    with TestServer() as a, TestServer() as b:
        api.apply("pod-a", [E(a.host)], service="inpod", ports=[P(a.port)], namespace="team-a")
        source = Kubernetes("inpod", service_account=tmp_path, backoff=0.02, backoff_max=0.2)
        assert source.namespace == "team-a"
        assert source.credentials.origin == "pod"
        try:
            with LoadBalancer(discovery=source) as lb:
                assert addresses(lb) == {a.address}
                until(lambda: watch(lb).connected, "the watch is open")
                watches = api.watches
                (tmp_path / "token").write_text("rotated-token")
                api.token = "rotated-token"
                api.end_watches()
                until(lambda: api.watches > watches and watch(lb).connected, "resumed")
                seen = api.server.requests[-1].headers["authorization"]
                assert seen == "Bearer rotated-token"
                api.apply(
                    "pod-b", [E(b.host)], service="inpod", ports=[P(b.port)], namespace="team-a"
                )
                until(lambda: b.address in addresses(lb), "the change arrives")
        finally:
            api.token = TOKEN


def test_zones_named_ports_and_ipv6_reach_routing(cluster: Cluster) -> None:
    with TestServer(host="::1") as six, TestServer() as four:
        cluster.api.apply(
            "mixed-v6",
            [E("::1", zone="zone-b", node="n6")],
            service="mixed",
            ports=[P(1, "metrics"), P(six.port, "http")],
            address_type="IPv6",
        )
        cluster.api.apply(
            "mixed-v4",
            [E("127.0.0.1", zone="zone-a", node="n4")],
            service="mixed",
            ports=[P(four.port, "http"), P(2, "metrics")],
        )

        async def main() -> list[int]:
            lb = LoadBalancer(discovery=cluster.source("mixed"))
            async with (
                lb,
                httpx.AsyncClient(transport=AsyncLBTransport(lb), base_url="http://m") as client,
            ):
                found = {b.address: dict(b.metadata) for b in lb.backends}
                assert found == {
                    f"[::1]:{six.port}": {"zone": "zone-b", "node": "n6"},
                    f"127.0.0.1:{four.port}": {"zone": "zone-a", "node": "n4"},
                }
                return [(await client.get("/")).json()["port"] for _ in range(4)]

        ports = asyncio.run(main())
    assert set(ports) == {six.port, four.port}


def test_a_kubeconfig_read_by_the_official_loader(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip(
        "kubernetes", reason="the kubernetes package (extra 'kubernetes') is absent"
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        f"- name: test\n  cluster:\n    server: {cluster.api.url}\n"
        f"    certificate-authority: {cluster.ca}\n"
        f"users:\n- name: tester\n  user:\n    token: {TOKEN}\n"
        "contexts:\n- name: ctx\n  context:\n    cluster: test\n    user: tester\n"
        "    namespace: team\n"
        "current-context: ctx\n"
    )
    with TestServer() as pod:
        cluster.api.apply(
            "kc-a", [E(pod.host)], service="kc", ports=[P(pod.port, "http")], namespace="team"
        )
        source = Kubernetes(
            "kc", kubeconfig=str(kubeconfig), port="http", service_account=tmp_path / "no-pod"
        )
        with (
            LoadBalancer(discovery=source) as lb,
            httpx.Client(transport=LBTransport(lb), base_url="http://kc") as client,
        ):
            assert addresses(lb) == {pod.address}  # the context's namespace, its CA and token
            assert client.get("/").json()["port"] == pod.port


def test_a_kubeconfig_token_renewal_runs_off_the_loop(cluster: Cluster) -> None:
    """A kubeconfig's Authorization is asked for in a thread (an exec plugin renewing it may
    run for seconds): the loop runs other tasks meanwhile, for the listing and for the watch
    request alike."""
    with TestServer() as pod:
        cluster.pod("renew-a", pod, "renew")
        source = cluster.source("renew")
        asked = threading.Event()  # the authorization has been asked for
        released = threading.Event()  # a task of the loop let it go on
        waits: list[bool] = []

        def authorization() -> str:
            asked.set()
            waits.append(released.wait(timeout=5.0))  # False: the loop never ran meanwhile
            asked.clear()
            released.clear()
            return f"Bearer {TOKEN}"

        source.credentials = replace(
            source.credentials, token_file=None, authorization=authorization, origin="kubeconfig"
        )

        async def release() -> None:
            while True:
                if asked.is_set():
                    released.set()
                await asyncio.sleep(0.001)

        async def main() -> tuple[set[str], str | None]:
            helper = asyncio.create_task(release())
            try:
                async with source.client() as client:
                    listing = await source.alist(client, cluster.api.url)
                    request = await source.watch_request(client, cluster.api.url, "1")
            finally:
                helper.cancel()
            found = {b.address for backends in listing.items.values() for b in backends}
            return found, request.headers.get("authorization")

        found, header = asyncio.run(main())
    assert waits == [True, True]
    assert found == {pod.address}
    assert header == f"Bearer {TOKEN}"


def test_the_event_delay_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from lbclient.cli.bench import kube_watch

    assert kube_watch.main(["--changes", "4", "--pods", "2"]) == 0
    out = capsys.readouterr().out
    assert "changes: 4;" in out
    assert "event -> routing: p50 " in out
