"""The server companion under real servers: the ASGI middleware under uvicorn, the WSGI one under
gunicorn (one gthread worker, eight threads), each in a process of its own on a free loopback
port, asked through httpx. Requests are held open in the app until the test releases them (a
second request opens their gate), so that the requests in flight are known exactly.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from lbclient.cli.bench.pyservers import start_gunicorn, start_uvicorn
from lbclient.server import PROBE_PATH

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
#: Requests held open at once.
HELD = 3
#: How long a wait for the server to reach a state may take before the test fails.
PATIENCE = 30.0


@pytest.fixture(scope="module", params=["uvicorn", "gunicorn"])
def base_url(request: pytest.FixtureRequest) -> Iterator[str]:
    with ExitStack() as stack:
        if request.param == "uvicorn":
            server = start_uvicorn(stack, "server_apps:asgi", app_dir=HERE)
        else:
            server = start_gunicorn(stack, "server_apps:wsgi", threads=8, app_dir=HERE)
        yield f"http://{server.address}"


def probe(client: httpx.Client, form: str | None = None) -> httpx.Response:
    headers = {} if form is None else {"endpoint-load-metrics-format": form}
    response = client.get(PROBE_PATH, headers=headers)
    assert response.status_code == 200
    return response


def rif(client: httpx.Client) -> int:
    return int(probe(client).headers["x-prequal-rif"])


def settles(read: Callable[[], int], want: int) -> int:
    """What ``read`` returns once it returns ``want``, or at the end of the test's patience."""
    deadline = time.monotonic() + PATIENCE
    seen = read()
    while seen != want and time.monotonic() < deadline:
        time.sleep(0.01)
        seen = read()
    return seen


def text_fields(value: str) -> dict[str, str]:
    assert value.startswith("TEXT ")
    return dict(pair.split("=", 1) for pair in value[len("TEXT ") :].split(", "))


def test_held_requests_are_in_flight_and_leave_when_released(base_url: str) -> None:
    gate = uuid.uuid4().hex
    answers: list[httpx.Response] = []
    with httpx.Client(base_url=base_url, timeout=PATIENCE) as client:
        assert settles(lambda: rif(client), 0) == 0

        def hold() -> None:
            answers.append(client.get("/hold", params={"gate": gate}))

        holders = [threading.Thread(target=hold) for _ in range(HELD)]
        for holder in holders:
            holder.start()
        try:
            # The probes themselves never count: the count is the held requests exactly.
            assert settles(lambda: rif(client), HELD) == HELD
            text = probe(client)
            assert text.headers["x-prequal-rif"] == str(HELD)
            assert int(text.headers["x-prequal-latency-us"]) >= 0
            report = text.headers["endpoint-load-metrics"]
            assert text.text == report
            fields = text_fields(report)
            assert fields["named_metrics.rif"] == str(HELD)
            assert fields["named_metrics.queue"] == "2"
            assert {"cpu_utilization", "rps_fractional", "eps", "named_metrics.latency_ms"} <= set(
                fields
            )
            for value in fields.values():
                float(value)
            as_json = probe(client, "json")
            assert as_json.headers["x-prequal-rif"] == str(HELD)
            value = as_json.headers["endpoint-load-metrics"]
            assert as_json.text == value
            assert value.startswith("JSON ")
            assert json.loads(value[len("JSON ") :])["named_metrics"]["rif"] == HELD
        finally:
            assert client.get("/release", params={"gate": gate}).text == "released"
            for holder in holders:
                holder.join(PATIENCE)
        assert [(a.status_code, a.text) for a in answers] == [(200, "held")] * HELD
        assert settles(lambda: rif(client), 0) == 0


def test_a_response_carries_the_report_only_when_its_request_asks(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=PATIENCE) as client:
        assert settles(lambda: rif(client), 0) == 0
        asked = client.get("/", headers={"endpoint-load-metrics-format": "JSON"})
        assert asked.text == "hello"
        value = asked.headers["endpoint-load-metrics"]
        assert value.startswith("JSON ")
        report = json.loads(value[len("JSON ") :])
        assert report["named_metrics"]["rif"] == 0  # none besides the request itself
        assert report["named_metrics"]["queue"] == 2
        assert report["rps_fractional"] >= 0
        assert 0 <= report["cpu_utilization"] <= 1
        lower = client.get("/", headers={"endpoint-load-metrics-format": "text"})
        assert text_fields(lower.headers["endpoint-load-metrics"])["named_metrics.rif"] == "0"
        assert "endpoint-load-metrics" not in client.get("/").headers
        unknown = client.get("/", headers={"endpoint-load-metrics-format": "BIN"})
        assert unknown.text == "hello"
        assert "endpoint-load-metrics" not in unknown.headers
        # Nothing asked of the probe: TEXT.
        assert probe(client).headers["endpoint-load-metrics"].startswith("TEXT ")


def test_streaming_responses_still_stream(base_url: str) -> None:
    gate = uuid.uuid4().hex
    headers = {"endpoint-load-metrics-format": "TEXT"}
    with (
        httpx.Client(base_url=base_url, timeout=PATIENCE) as client,
        client.stream("GET", "/stream", params={"gate": gate}, headers=headers) as response,
    ):
        assert response.status_code == 200
        # Its own report counts it out: it leaves as the client reads it.
        assert text_fields(response.headers["endpoint-load-metrics"])["named_metrics.rif"] == "0"
        chunks = response.iter_bytes()
        # The first chunk arrives while the app still waits to send the second.
        assert next(chunks) == b"first"
        with httpx.Client(base_url=base_url, timeout=PATIENCE) as other:
            assert rif(other) == 1  # a probe sees it in flight
            beside = other.get("/", headers=headers)  # a response's report, besides itself
            assert text_fields(beside.headers["endpoint-load-metrics"])["named_metrics.rif"] == "1"
            other.get("/release", params={"gate": gate})
        assert b"".join(chunks) == b"second"
    with httpx.Client(base_url=base_url, timeout=PATIENCE) as client:
        assert settles(lambda: rif(client), 0) == 0


def test_failures_are_counted_as_errors_and_leave_the_flight(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=PATIENCE) as client:
        assert client.get("/fail").status_code == 503
        assert client.get("/boom").status_code == 500
        assert settles(lambda: rif(client), 0) == 0
        fields = text_fields(probe(client).headers["endpoint-load-metrics"])
        assert float(fields["eps"]) > 0
        assert float(fields["rps_fractional"]) >= float(fields["eps"])
