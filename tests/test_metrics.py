"""Prometheus metrics (:mod:`lbclient.metrics`): real traffic through the three clients,
scraped over HTTP from prometheus-client's own exposition server, every count checked against
the traffic sent and the servers' own logs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import httpx
import pytest
import requests

pytest.importorskip("prometheus_client")
import prometheus_client
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from lbclient import (
    AsyncLBTransport,
    HealthPolicy,
    LBAdapter,
    LBTransport,
    LoadBalancer,
    RetryBudget,
)
from lbclient._config import config_of
from lbclient._observe import WatchedPlan
from lbclient._plan import RequestPlan
from lbclient.metrics import register
from lbclient.testing import TestServer, closed_port

#: Two connection failures in a row eject a backend for 10 s of the test's clock.
POLICY = HealthPolicy(consecutive_failures=2, consecutive_5xx=2, base_ejection_time=10)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample at ``url``, parsed by prometheus-client's own parser, by (name, labels)."""
    text = httpx.get(url, trust_env=False, timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def backends_of(samples: Samples, service: str) -> set[str]:
    return {
        dict(labels)["backend"]
        for (_, labels), _v in samples.items()
        if dict(labels).get("service") == service and "backend" in dict(labels)
    }


@pytest.fixture
def exposition() -> Iterator[tuple[CollectorRegistry, str]]:
    """A registry served by prometheus-client's HTTP server on a free loopback port."""
    registry = CollectorRegistry()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield registry, f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class Clock:
    """The balancers' clock: health time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scenario(
    servers: list[TestServer],
    clock: Clock,
    send: Callable[[int], list[int]],
    scraped: Callable[[], Samples],
    service: str,
) -> None:
    """Traffic with a kill, an ejection, retries, a probe and a restoration."""
    victim = servers[0]
    assert send(6) == [200] * 6  # round robin: two each
    victim.kill()
    # The victim's two turns fail (refused: never sent) and are retried on the next backend;
    # the second failure in a row ejects it.
    assert send(6) == [200] * 6
    mid = scraped()
    assert value(mid, "lbclient_backend_ejected", service=service, backend=victim.address) == 1
    assert value(mid, "lbclient_backend_healthy", service=service, backend=victim.address) == 0
    assert value(mid, "lbclient_backend_ready", service=service, backend=victim.address) == 0
    victim.restart()
    clock.now = 10.0  # the ejection is over: the next request routed there is its probe
    assert send(3) == [200] * 3


def check(samples: Samples, servers: list[TestServer], service: str, sent: int) -> None:
    victim = servers[0]
    mine = {"service": service}
    assert total(samples, "lbclient_requests_total", **mine) == sent
    assert total(samples, "lbclient_requests_total", result="success", **mine) == sent
    for server in servers:
        where = {"service": service, "backend": server.address}
        served = server.count("GET")
        assert (
            value(samples, "lbclient_requests_total", result="success", sent="yes", **where)
            == served
        )
        assert (
            value(samples, "lbclient_attempts_total", result="success", sent="yes", **where)
            == served
        )
        failed = 2 if server is victim else 0
        assert total(samples, "lbclient_attempts_total", **where) == served + failed
        assert value(samples, "lbclient_attempt_duration_seconds_count", **where) == (
            served + failed
        )
        assert (
            value(samples, "lbclient_attempt_duration_seconds_bucket", le="+Inf", **where)
            == served + failed
        )
        assert value(samples, "lbclient_attempt_duration_seconds_sum", **where) > 0
        assert value(samples, "lbclient_hedges_total", **where) == 0
        assert value(samples, "lbclient_retry_budget_exhausted_total", **where) == 0
        ejected = 1 if server is victim else 0
        assert (
            value(samples, "lbclient_ejections_total", reason="consecutive_failures", **where)
            == ejected
        )
        assert value(samples, "lbclient_ejections_total", reason="consecutive_5xx", **where) == 0
        assert value(samples, "lbclient_ejections_total", reason="probe_failed", **where) == 0
        assert value(samples, "lbclient_probes_total", **where) == ejected
        assert value(samples, "lbclient_restorations_total", **where) == ejected
        for gauge in ("healthy", "enabled", "ready"):
            assert value(samples, f"lbclient_backend_{gauge}", **where) == 1
        assert value(samples, "lbclient_backend_ejected", **where) == 0
        assert value(samples, "lbclient_backend_in_flight", **where) == 0
    where = {"service": service, "backend": victim.address}
    assert (
        value(
            samples, "lbclient_attempts_total", result="connection_failure", sent="never", **where
        )
        == 2
    )
    assert total(samples, "lbclient_retries_total", **mine) == 2  # each refused one, once
    assert value(samples, "lbclient_retries_total", **where) == 0  # never a retry's target
    assert value(samples, "lbclient_requests_unavailable_total", **mine) == 0
    assert value(samples, "lbclient_panic", **mine) == 0
    # All that was sent, as the servers saw it: every success once.
    assert sum(s.count() for s in servers) == sent


def test_scraped_counts_match_the_traffic_of_all_three_clients(
    exposition: tuple[CollectorRegistry, str],
) -> None:
    registry, url = exposition
    with ExitStack() as stack:
        groups = {
            name: [stack.enter_context(TestServer(name=f"{name}-{i}")) for i in range(3)]
            for name in ("sync", "async", "requests")
        }
        clocks = {name: Clock() for name in groups}
        balancers = {
            name: LoadBalancer([s.address for s in servers], health=POLICY, clock=clocks[name])
            for name, servers in groups.items()
        }

        # httpx, sync: the transport registered.
        transport = LBTransport(balancers["sync"])
        register(transport, service="sync", registry=registry)
        client = stack.enter_context(httpx.Client(transport=transport, base_url="http://users"))

        def send_sync(n: int) -> list[int]:
            return [client.get(f"/items/{i}").status_code for i in range(n)]

        scenario(groups["sync"], clocks["sync"], send_sync, lambda: scrape(url), "sync")

        # httpx, async: the balancer registered, which counts every transport using it, the
        # one made before the registration as well as those made after (one per event loop).
        made = [AsyncLBTransport(balancers["async"])]
        register(balancers["async"], service="async", registry=registry)

        def send_async(n: int) -> list[int]:
            async def main() -> list[int]:
                async_transport = made.pop() if made else AsyncLBTransport(balancers["async"])
                async with httpx.AsyncClient(
                    transport=async_transport, base_url="http://users"
                ) as aclient:
                    return [(await aclient.get(f"/items/{i}")).status_code for i in range(n)]

            return asyncio.run(main())

        scenario(groups["async"], clocks["async"], send_async, lambda: scrape(url), "async")

        # requests: the adapter registered.
        adapter = LBAdapter(balancers["requests"])
        register(adapter, service="requests", registry=registry)
        session = stack.enter_context(requests.Session())
        session.mount("http://users/", adapter)

        def send_requests(n: int) -> list[int]:
            return [session.get(f"http://users/items/{i}").status_code for i in range(n)]

        scenario(
            groups["requests"], clocks["requests"], send_requests, lambda: scrape(url), "requests"
        )

        samples = scrape(url)
        for name, servers in groups.items():
            check(samples, servers, name, sent=15)

        # A backend that leaves the set leaves the metrics; the others keep their counts.
        balancers["sync"].update([s.address for s in groups["sync"][1:]])
        after = scrape(url)
        assert backends_of(after, "sync") == {s.address for s in groups["sync"][1:]}
        kept = groups["sync"][1]
        assert (
            value(
                after,
                "lbclient_requests_total",
                service="sync",
                backend=kept.address,
                result="success",
                sent="yes",
            )
            == kept.count()
        )


def metrics_of(registry: CollectorRegistry) -> Samples:
    text = prometheus_client.generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_failures_timeouts_server_errors_and_budget_exhaustion_are_counted() -> None:
    registry = CollectorRegistry()
    with (
        TestServer("status:503", name="failing") as failing,
        TestServer("hang", name="hanging", hang_seconds=5) as hanging,
    ):
        dead = f"127.0.0.1:{closed_port()}"
        # One attempt per request: what each backend did is what each request ended with.
        lb = LoadBalancer(
            [failing.address, hanging.address, dead],
            health=HealthPolicy(consecutive_5xx=None, consecutive_failures=None),
        )
        transport = LBTransport(lb, max_attempts=1, attempt_timeout=0.2)
        register(transport, service="users", registry=registry)
        with httpx.Client(transport=transport, base_url="http://users") as client:
            outcomes: list[int | str] = []
            for _ in range(6):
                try:
                    outcomes.append(client.get("/").status_code)
                except httpx.HTTPError as exc:
                    outcomes.append(type(exc).__name__)
        samples = metrics_of(registry)
        assert sorted(map(str, outcomes)) == sorted(
            ["503", "503", "ConnectError", "ConnectError", "ReadTimeout", "ReadTimeout"]
        )
        for address, result, sent in [
            (failing.address, "server_error", "yes"),
            (hanging.address, "timeout", "maybe"),
            (dead, "connection_failure", "never"),
        ]:
            where = {"service": "users", "backend": address, "result": result, "sent": sent}
            assert value(samples, "lbclient_attempts_total", **where) == 2
            assert value(samples, "lbclient_requests_total", **where) == 2
        assert failing.count() == 2
        assert hanging.count() == 2

    # An empty budget keeps every retry back: counted against the backend it would have hit.
    # (Backends that close without answering: a retry of a refused connection, which reached
    # no server, spends no budget.)
    registry = CollectorRegistry()
    with TestServer("close") as one, TestServer("close") as two:
        stingy = LBTransport([one.address, two.address], budget=RetryBudget(0, 0))
        register(stingy, service="stingy", registry=registry)
        with httpx.Client(transport=stingy, base_url="http://users") as client:
            for _ in range(3):
                with pytest.raises(httpx.RemoteProtocolError, match="retry budget is exhausted"):
                    client.get("/")
    samples = metrics_of(registry)
    assert total(samples, "lbclient_retry_budget_exhausted_total", service="stingy") == 3
    assert total(samples, "lbclient_retries_total", service="stingy") == 0
    assert (
        total(
            samples,
            "lbclient_requests_total",
            service="stingy",
            result="connection_failure",
            sent="maybe",
        )
        == 3
    )
    assert stingy.stats().exhaustions == 3


def test_no_backend_and_hedges_are_counted() -> None:
    registry = CollectorRegistry()
    empty = LBTransport([])
    register(empty, service="empty", registry=registry)
    with (
        httpx.Client(transport=empty, base_url="http://users") as client,
        pytest.raises(httpx.ConnectError, match="no backend available"),
    ):
        client.get("/")
    assert value(metrics_of(registry), "lbclient_requests_unavailable_total", service="empty") == 1

    with TestServer(name="slow", delay=1.0) as slow, TestServer(name="fast") as fast:
        lb = LoadBalancer([slow.address, fast.address])
        transport = AsyncLBTransport(lb, hedge_after=0.05)
        register(transport, service="hedged", registry=registry)

        async def main() -> list[str]:
            async with httpx.AsyncClient(transport=transport, base_url="http://users") as client:
                return [str((await client.get("/")).json()["server"]) for _ in range(4)]

        served = asyncio.run(main())
        assert served == ["fast"] * 4
        samples = metrics_of(registry)
        where = {"service": "hedged"}
        # Round robin sends two first attempts to the slow backend; each is hedged to the fast
        # one, which wins; the slow attempts are cancelled.
        assert value(samples, "lbclient_hedges_total", backend=fast.address, **where) == 2
        assert (
            value(
                samples,
                "lbclient_attempts_total",
                backend=slow.address,
                result="cancelled",
                sent="maybe",
                **where,
            )
            == 2
        )
        assert (
            value(
                samples,
                "lbclient_requests_total",
                backend=fast.address,
                result="success",
                sent="yes",
                **where,
            )
            == 4
        )
        assert total(samples, "lbclient_requests_total", **where) == 4
        assert fast.count() == 4


def test_registration_is_explicit_and_undone() -> None:
    registry = CollectorRegistry()
    with TestServer() as server:
        lb = LoadBalancer([server.address])
        plain = LBTransport(lb)
        watched = LBTransport(lb)
        assert plain._config.observers == ()
        registration = register(watched, service="users", registry=registry)
        assert plain._config.observers == ()  # nothing global
        plan, _ = watched._config.start(Request())
        assert type(plan) is WatchedPlan
        plan, _ = plain._config.start(Request())
        assert type(plan) is RequestPlan  # nothing watched: nothing paid
        with pytest.raises(ValueError, match="already registered"):
            register(plain, service="users", registry=registry)
        registration.unregister()
        registration.unregister()
        assert watched._config.observers == ()
        assert b"lbclient_" not in prometheus_client.generate_latest(registry)
        with pytest.raises(TypeError, match="LBTransport"):
            register(object(), service="x", registry=registry)
        with pytest.raises(ValueError, match="service"):
            register(lb, service="", registry=registry)


@pytest.mark.parametrize("registry", ["x", 42, {}, object()])
def test_a_registry_that_is_not_one_is_named(registry: object) -> None:
    lb = LoadBalancer(["127.0.0.1:80"])
    with pytest.raises(TypeError) as caught:
        register(lb, service="users", registry=registry)  # type: ignore[arg-type]
    message = str(caught.value)
    assert message.startswith("registry must be a prometheus_client.CollectorRegistry")
    assert f"got {registry!r} ({type(registry).__name__})" in message
    assert "weak reference" not in message
    assert lb.snapshot() is not None  # nothing was attached
    assert config_of(LBTransport(lb)).observers == ()  # type: ignore[union-attr]


class Request:
    """What an adapter's configuration reads of a request's wire to start its plan."""

    request = None
    method = "GET"
    url = "http://users/"
    replayable = True
    options = None


def test_without_the_extras_lbclient_works_and_imports_neither() -> None:
    code = """
import sys
sys.modules["prometheus_client"] = None
sys.modules["opentelemetry"] = None
import asyncio, httpx, requests, lbclient
from lbclient import AsyncLBTransport, LBAdapter, LBTransport
from lbclient.testing import TestServer

with TestServer() as server:
    with httpx.Client(transport=LBTransport([server.address]), base_url="http://users") as c:
        assert c.get("/").status_code == 200
    async def main():
        async with httpx.AsyncClient(transport=AsyncLBTransport([server.address]),
                                     base_url="http://users") as c:
            assert (await c.get("/")).status_code == 200
    asyncio.run(main())
    with requests.Session() as s:
        s.mount("http://users/", LBAdapter([server.address]))
        assert s.get("http://users/").status_code == 200
    assert server.count() == 3
loaded = [m for m in sys.modules if m.split(".")[0] in ("prometheus_client", "opentelemetry")]
assert all(sys.modules[m] is None for m in loaded), loaded
for name, extra in (("lbclient.metrics", "lbclient[metrics]"), ("lbclient.otel", "lbclient[otel]")):
    try:
        __import__(name)
    except ImportError as error:
        assert extra in str(error), error
    else:
        raise AssertionError(name + " imported without its extra")
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


def test_requests_counted_while_nobody_scrapes_stay_bounded_and_exact(
    exposition: tuple[CollectorRegistry, str],
) -> None:
    # Requests answered at their first attempt wait in a queue until a scrape; with nobody
    # scraping, the queue is counted whenever it grows past its batch, and nothing is lost.
    registry, url = exposition
    with TestServer() as server, httpx.Client(transport=LBTransport([server.address])) as client:
        registration = register(client._transport, service="quiet", registry=registry)
        meter = registration._source.meter
        meter.BATCH = 7
        for _ in range(50):
            assert client.get("http://users/").status_code == 200
            assert len(meter._done) <= 8
        samples = scrape(url)
    mine = {"service": "quiet", "backend": server.address}
    assert total(samples, "lbclient_requests_total", result="success", **mine) == 50
    assert total(samples, "lbclient_attempts_total", result="success", **mine) == 50
    assert value(samples, "lbclient_attempt_duration_seconds_count", **mine) == 50
    assert len(server.requests) == 50
