"""OpenTelemetry tracing (:mod:`lbclient.otel`): one client span per attempt, as the SDK's
in-memory exporter receives them, and trace context sent to the backends only when asked."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
import requests

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

from lbclient import (
    AsyncLBTransport,
    HealthPolicy,
    LBAdapter,
    LBTransport,
    LoadBalancer,
    RetryPolicy,
)
from lbclient.otel import instrument
from lbclient.requests_adapter import mount
from lbclient.testing import TestServer

SECRETS = ("s3cret-password", "s3cret-token", "s3cret-signature")
URL = f"http://alice:{SECRETS[0]}@users/items?sig={SECRETS[2]}&page=2"
HEADERS = {"Authorization": f"Bearer {SECRETS[1]}"}


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def attempts_of(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    """The attempt spans, in the order they started."""
    found = [
        s
        for s in exporter.get_finished_spans()
        if s.instrumentation_scope is not None and s.instrumentation_scope.name == "lbclient"
    ]
    return sorted(found, key=lambda s: s.start_time or 0)


def assert_no_secret(finished: list[ReadableSpan], *servers: TestServer) -> None:
    """No password, signature or ``Authorization`` value (those the servers received
    included) in any span's name, status, attributes or events."""
    secrets = [*SECRETS, *(r.headers["authorization"] for s in servers for r in s.requests)]
    assert len(secrets) > len(SECRETS)
    for span in finished:
        texts = [span.name, str(span.status.description)]
        texts += [f"{k}={v!r}" for k, v in (span.attributes or {}).items()]
        for event in span.events:
            texts.append(event.name)
            texts += [f"{k}={v!r}" for k, v in (event.attributes or {}).items()]
        for text in texts:
            assert not any(secret in text for secret in secrets), (span.name, text)
            assert "authorization" not in text.lower(), (span.name, text)


def test_each_attempt_is_a_client_span_under_the_application_span(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    clock = Clock()
    with TestServer(name="victim") as victim, TestServer(name="live") as live:
        lb = LoadBalancer(
            [victim.address, live.address],
            health=HealthPolicy(
                consecutive_failures=2,
                base_ejection_time=10,
                max_ejection_percent=50,
                panic_threshold=0,
            ),
            clock=clock,
        )
        transport = LBTransport(lb)
        instrument(transport, tracer_provider=provider)
        app = provider.get_tracer("app")
        victim.kill()
        with (
            app.start_as_current_span("checkout") as parent,
            httpx.Client(transport=transport) as client,
        ):
            # Round robin: the victim's turns are refused and retried on the live backend;
            # its second failure in a row ejects it.
            statuses = [client.get(URL, headers=HEADERS).status_code for _ in range(4)]
            victim.restart()
            clock.now = 10.0  # its probe is due; round robin sends the next request there
            statuses += [client.get(URL, headers=HEADERS).status_code for _ in range(2)]
            live.mode = "status:503"
            statuses += [client.get(URL, headers=HEADERS).status_code for _ in range(2)]
        assert sorted(statuses) == [200] * 7 + [503]  # the live backend's turn: not retried

        finished = attempts_of(exporter)
        # One span per attempt: those the servers answered, and the two refused ones.
        assert len(finished) == victim.count() + live.count() + 2
        context = parent.get_span_context()
        failed = []
        for span in finished:
            attributes = dict(span.attributes or {})
            assert span.kind is SpanKind.CLIENT
            assert span.name == "GET"
            assert span.parent is not None
            assert span.parent.span_id == context.span_id
            assert span.context is not None
            assert span.context.trace_id == context.trace_id
            assert span.end_time is not None
            address = f"{attributes['server.address']}:{attributes['server.port']}"
            assert address in (victim.address, live.address)
            assert attributes["http.request.method"] == "GET"
            assert attributes["url.full"] == f"http://{address}/items?sig=REDACTED&page=2"
            assert attributes["lbclient.host"] == "users"
            assert attributes["lbclient.algorithm"] == "RoundRobin"
            if "error.type" in attributes and attributes["error.type"] == "httpx.ConnectError":
                failed.append(span)
                assert address == victim.address
                assert span.status.status_code is StatusCode.ERROR
                assert "http.response.status_code" not in attributes
            else:
                status = attributes["http.response.status_code"]
                assert status in (200, 503)
                if status == 503:
                    assert attributes["error.type"] == "503"
                    assert span.status.status_code is StatusCode.ERROR
                else:
                    assert "error.type" not in attributes
                    assert span.status.status_code is StatusCode.UNSET
            if attributes["lbclient.attempt.kind"] == "first":
                assert "http.request.resend_count" not in attributes
            else:
                assert attributes["lbclient.attempt.kind"] == "retry"
                assert attributes["http.request.resend_count"] == 1
        assert len(failed) == 2
        retries = [s for s in finished if (s.attributes or {})["lbclient.attempt.kind"] == "retry"]
        assert len(retries) == 2  # each refused attempt, once, on the live backend
        # The ejection is an event on the span of the attempt whose failure caused it; the
        # restoration one on the probe's span.
        ejected = [
            (s, e) for s in finished for e in s.events if e.name == "lbclient.backend.ejected"
        ]
        assert [(s, dict(e.attributes or {})) for s, e in ejected] == [
            (
                failed[1],
                {"lbclient.backend": victim.address, "lbclient.reason": "consecutive_failures"},
            )
        ]
        restored = [
            (s, e) for s in finished for e in s.events if e.name == "lbclient.backend.restored"
        ]
        assert len(restored) == 1
        probe, event = restored[0]
        assert dict(event.attributes or {}) == {
            "lbclient.backend": victim.address,
            "lbclient.reason": "probe_succeeded",
        }
        assert (probe.attributes or {})["lbclient.probe"] is True
        assert (probe.attributes or {})["server.port"] == int(victim.address.rpartition(":")[2])
        assert_no_secret(list(exporter.get_finished_spans()), victim, live)
        # Not asked to propagate: lbclient added no trace header.
        for server in (victim, live):
            assert all("traceparent" not in r.headers for r in server.requests)


def traceparent(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def test_trace_context_reaches_the_backend_only_when_asked(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    app = provider.get_tracer("app")
    # The caller's own traceparent, as an instrumentation of the client would have set it.
    theirs = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    policy = RetryPolicy(retry_statuses={503}, max_attempts=2)

    def received(*servers: TestServer) -> list[str]:
        return sorted(r.headers.get("traceparent", "-") for s in servers for r in s.requests)

    with TestServer("status:503") as failing, TestServer() as live:
        lb = LoadBalancer([failing.address, live.address])
        propagating = LBTransport(lb, policy=policy)
        instrument(propagating, propagate=True, tracer_provider=provider)
        with app.start_as_current_span("app"), httpx.Client(transport=propagating) as client:
            for _ in range(2):
                assert client.get("http://users/", headers=theirs).status_code == 200
        finished = attempts_of(exporter)
        # Round robin: one request went to the failing backend first and was retried.
        assert failing.count() == 1
        assert live.count() == 2
        assert len(finished) == 3
        # Each attempt carried its own span's context, in place of the caller's.
        assert sorted(value.split("-")[1:3] for value in received(failing, live)) == sorted(
            list(traceparent(s)) for s in finished
        )
        resent = [s for s in finished if (s.attributes or {}).get("http.request.resend_count")]
        assert [(s.attributes or {})["http.request.resend_count"] for s in resent] == [1]

    with TestServer("status:503") as failing, TestServer() as live:
        lb = LoadBalancer([failing.address, live.address])
        quiet = LBTransport(lb, policy=policy)
        instrument(quiet, tracer_provider=provider)
        with app.start_as_current_span("app"), httpx.Client(transport=quiet) as client:
            for _ in range(2):
                assert client.get("http://users/", headers=theirs).status_code == 200
        # Not asked: the caller's header went through untouched on every attempt.
        assert received(failing, live) == [theirs["traceparent"]] * 3
        assert len(attempts_of(exporter)) == 6


def test_requests_adapter_spans_and_propagation(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    app = provider.get_tracer("app")
    with TestServer() as server:
        adapter = LBAdapter([server.address], hosts=["users"])
        instrument(adapter, propagate=True, tracer_provider=provider)
        with app.start_as_current_span("app") as parent, requests.Session() as session:
            mount(session, adapter)  # every spelling of the URL, user information included
            response = session.post(URL, data=b"x", headers=HEADERS)
            assert response.status_code == 200
        (span,) = attempts_of(exporter)
        attributes = dict(span.attributes or {})
        assert span.name == "POST"
        assert span.parent is not None
        assert span.parent.span_id == parent.get_span_context().span_id
        assert attributes["url.full"] == f"http://{server.address}/items?sig=REDACTED&page=2"
        assert attributes["http.response.status_code"] == 200
        (recorded,) = server.requests
        assert recorded.headers["traceparent"].split("-")[1:3] == list(traceparent(span))
        assert_no_secret(list(exporter.get_finished_spans()), server)


def test_hedges_are_spans_and_the_loser_is_cancelled(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    app = provider.get_tracer("app")
    with TestServer(name="slow", delay=1.0) as slow, TestServer(name="fast") as fast:
        lb = LoadBalancer([slow.address, fast.address])
        transport = AsyncLBTransport(lb, hedge_after=0.05)
        instrument(transport, tracer_provider=provider)

        async def main() -> list[str]:
            with app.start_as_current_span("app"):
                async with httpx.AsyncClient(transport=transport, base_url="http://users") as c:
                    return [str((await c.get("/")).json()["server"]) for _ in range(2)]

        assert asyncio.run(main()) == ["fast", "fast"]
        finished = attempts_of(exporter)
        (parent,) = [s for s in exporter.get_finished_spans() if s.name == "app"]
        assert all(
            s.parent is not None and s.parent.span_id == parent.context.span_id for s in finished
        )
        kinds = sorted(str((s.attributes or {})["lbclient.attempt.kind"]) for s in finished)
        assert kinds == ["first", "first", "hedge"]
        (hedge,) = [s for s in finished if (s.attributes or {})["lbclient.attempt.kind"] == "hedge"]
        assert (hedge.attributes or {})["http.request.resend_count"] == 1
        assert (hedge.attributes or {})["server.port"] == int(fast.address.rpartition(":")[2])
        (loser,) = [s for s in finished if (s.attributes or {}).get("lbclient.attempt.cancelled")]
        assert (loser.attributes or {})["server.port"] == int(slow.address.rpartition(":")[2])
        assert "http.response.status_code" not in (loser.attributes or {})


def test_instrumenting_is_explicit_and_undone(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    with TestServer() as server:
        lb = LoadBalancer([server.address])
        traced, plain = LBTransport(lb), LBTransport(lb)
        done = instrument(traced, tracer_provider=provider)
        with pytest.raises(ValueError, match="already instrumented"):
            instrument(traced, tracer_provider=provider)
        with pytest.raises(TypeError, match="LBTransport"):
            instrument(lb, tracer_provider=provider)  # per transport or adapter, nothing global
        with httpx.Client(transport=plain) as client:
            client.get("http://users/")
        assert attempts_of(exporter) == []
        with httpx.Client(transport=traced) as client:
            client.get("http://users/")
            assert len(attempts_of(exporter)) == 1
            done.uninstrument()
            done.uninstrument()
            client.get("http://users/")
        assert len(attempts_of(exporter)) == 1
        assert traced._config.observers == ()
