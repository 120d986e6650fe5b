"""The server companion with plain values: the tracker under an injected clock, the report's
exact text, the CPU metric under injected times, and both middlewares driven by hand (ASGI
messages, WSGI calls), no server. The same middlewares under uvicorn and gunicorn:
test_server_live."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbclient.server import (
    PROBE_PATH,
    CpuUtilization,
    LoadReportingASGI,
    LoadReportingWSGI,
    LoadTracker,
    ServerReport,
    _tracker,
    cpu_utilization,
)
from lbclient.server._report import number, requested_format
from lbclient.server._tracker import FOUND_AGE, MAX_FOUND


@pytest.fixture(autouse=True, params=["compiled", "python"])
def counted_in(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with trackers counting in the compiled counter, and in Python."""
    if request.param == "compiled" and not _tracker.COMPILED:
        assert os.environ.get("LBCLIENT_REQUIRE_COMPILED") != "1", "the compiled path is missing"
        pytest.skip("lbclient was installed without a C compiler: no compiled counter to test")
    if request.param == "python":
        monkeypatch.setattr(_tracker, "COMPILED", False)
    return str(request.param)


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- the tracker ---------------------------------------------------------------------------------


def test_requests_in_flight_are_counted_exactly() -> None:
    tracker = LoadTracker(clock=Clock())
    starts = [tracker.begin() for _ in range(3)]
    assert tracker.rif == tracker.report().rif == 3
    tracker.end(starts[0])
    tracker.end(starts[1], error=True)
    assert tracker.rif == 1
    tracker.drop()
    assert tracker.rif == tracker.report().rif == 0


def test_threads_counting_at_once_lose_no_request() -> None:
    clock = Clock(5.0)
    tracker = LoadTracker(clock=clock, latency_window=16)
    barrier = threading.Barrier(4)

    def serve(index: int) -> None:
        barrier.wait()
        for n in range(2_000):
            started = tracker.begin()
            if n % 3:
                tracker.end(started, error=n % 7 == 0)
            else:
                tracker.drop()

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert tracker.rif == 0
    ended = 4 * sum(1 for n in range(2_000) if n % 3)
    errors = 4 * sum(1 for n in range(2_000) if n % 3 and n % 7 == 0)
    report = tracker.report()
    assert (report.rps_fractional, report.eps) == (ended, errors)  # all in one second
    tracker.end(tracker.begin())
    tracker.end(0.0)  # an end without its begin leaves none in flight, not fewer
    assert tracker.rif == 0


def test_reports_made_while_threads_count_are_whole_and_readable() -> None:
    from lbclient.reports import parse

    clock = Clock(5.0)
    tracker = LoadTracker(clock=clock)
    barrier = threading.Barrier(5)
    seen: list[str] = []
    problems: list[BaseException] = []

    def serve() -> None:
        barrier.wait()
        for n in range(3_000):
            arrival = tracker.begin()
            clock.now += 1e-5  # time moves on as they run (rings turn, renders refresh)
            tracker.end(arrival, error=n % 11 == 0)

    def report() -> None:
        barrier.wait()
        try:
            for n in range(1_500):
                text = tracker.rendered("TEXT" if n % 2 else "JSON")
                seen.append(text)
                parse(text, 0.0)
                tracker.report()
        except BaseException as exc:  # any failure is the test's
            problems.append(exc)

    threads = [threading.Thread(target=serve) for _ in range(4)]
    threads.append(threading.Thread(target=report))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert problems == []
    assert len(seen) == 1_500
    assert tracker.rif == 0
    assert all(len(ring.samples) <= ring.size for ring in tracker._found)
    assert tracker.report().rps_fractional == 4 * 3_000  # all within one second


def test_latency_is_the_median_of_the_last_requests() -> None:
    clock = Clock()
    tracker = LoadTracker(clock=clock, latency_window=4)
    assert tracker.report().latency_ms == 0  # no request yet

    def request(seconds: float) -> None:
        started = tracker.begin()
        clock.now += seconds
        tracker.end(started)

    for seconds in (0.004, 0.001, 0.003):
        request(seconds)
    assert tracker.report().latency_ms == pytest.approx(3.0)
    request(0.002)  # four: the mean of the middle two
    assert tracker.report().latency_ms == pytest.approx(2.5)
    request(0.010)  # the first (4 ms) leaves the window: 1, 3, 2, 10
    assert tracker.report().latency_ms == pytest.approx(2.5)
    request(0.010)
    request(0.010)  # 2, 10, 10, 10
    assert tracker.report().latency_ms == pytest.approx(10.0)
    assert tracker.report().latency_us == 10_000


def test_latency_is_counted_by_the_load_each_request_found() -> None:
    clock = Clock()
    tracker = LoadTracker(clock=clock, latency_window=4, named_metrics={"queue": lambda: 1.5})

    def request(seconds: float) -> None:
        started = tracker.begin()
        clock.now += seconds
        tracker.end(started)

    def carried(form: str) -> str:
        """The report a response carries (its request in flight as it starts)."""
        answered = tracker.begin()
        try:
            return tracker.rendered(form)
        finally:
            tracker.drop()
            assert answered[1] == tracker.rif

    for _ in range(3):
        request(0.002)  # each found none in flight
    held = tracker.begin()  # found none
    joined = tracker.begin()  # found one: it waits behind it
    assert joined[1] == 1
    clock.now += 0.008
    tracker.end(joined)
    # One in flight: a request arriving now meets one, as the 8 ms one did (the median of all
    # four requests ended, 2 ms, would hide the wait).
    assert tracker.report().latency_ms == pytest.approx(8.0)
    assert "named_metrics.rif=1, named_metrics.latency_ms=8," in carried("TEXT")
    assert carried("TEXT").endswith("latency_ms=8, named_metrics.queue=1.5")
    assert '"rif": 1, "latency_ms": 8, "queue": 1.5}}' in carried("JSON")
    tracker.end(held)  # 8 ms, having found none: 2, 2, 2, 8
    assert tracker.report().latency_ms == pytest.approx(2.0)
    # The same refresh period (the rates' text is reused), the estimate still follows the RIF.
    assert "named_metrics.rif=0, named_metrics.latency_ms=2," in carried("TEXT")
    holding = [tracker.begin() for _ in range(3)]  # found 0, 1, 2
    # Three in flight, none ended having found three (nor two): the nearest fewer, one.
    assert tracker.report().latency_ms == pytest.approx(8.0)
    assert "named_metrics.rif=3, named_metrics.latency_ms=8," in carried("TEXT")
    for arrival in holding:
        tracker.end(arrival)
    assert tracker.rif == 0


def test_a_stale_estimate_gives_way_to_a_fresh_neighbour() -> None:
    clock = Clock()
    tracker = LoadTracker(clock=clock)
    first = tracker.begin()
    second = tracker.begin()  # found one
    clock.now += 0.050
    tracker.end(second)  # found one: 50 ms
    tracker.end(first)  # found none: 50 ms
    clock.now += FOUND_AGE + 1  # both old
    assert tracker.report().latency_ms == pytest.approx(50.0)  # old, but all there is
    tracker.begin()  # found none; dropped below, never ended
    for _ in range(3):
        tracker.end(tracker.begin())  # found one, at once: 50, 0, 0, 0
    tracker.drop()
    assert tracker.rif == 0
    # None in flight: the found-none latency is old; the nearest fresh (found one) stands in.
    assert tracker.report().latency_ms == pytest.approx(0.0)
    clock.now += FOUND_AGE + 1
    assert tracker.report().latency_ms == pytest.approx(50.0)  # all old: its own


def test_a_ring_of_old_latencies_starts_afresh_with_a_new_one() -> None:
    clock = Clock()
    tracker = LoadTracker(clock=clock)

    def found(count: int, seconds: float) -> None:
        """A request that finds ``count`` in flight (held for it) and takes ``seconds``."""
        held = [tracker.begin() for _ in range(count)]
        arrival = tracker.begin()
        assert arrival[1] == count
        clock.now += seconds
        tracker.end(arrival)
        for _ in held:
            tracker.drop()

    for _ in range(16):
        found(3, 0.500)  # a slow spell at three in flight
    clock.now += 3600.0
    found(2, 0.005)
    found(3, 0.005)  # an hour on: the old 500 ms are not its company
    held = [tracker.begin() for _ in range(3)]
    assert tracker.report().latency_ms == pytest.approx(5.0)
    for _ in held:
        tracker.drop()
    # Rings with nothing in them stand in for nothing, however far the search goes.
    fresh = LoadTracker(clock=clock)
    first = fresh.begin()  # found none
    clock.now += 0.007
    fresh.end(first)
    clock.now += FOUND_AGE + 1
    crowd = [fresh.begin() for _ in range(5)]
    assert fresh.report().latency_ms == pytest.approx(7.0)  # the only latency there is
    for arrival in crowd:
        fresh.end(arrival)


def test_arrivals_beyond_max_found_count_as_max_found() -> None:
    clock = Clock()
    tracker = LoadTracker(clock=clock)
    crowd = [tracker.begin() for _ in range(MAX_FOUND + 10)]
    assert crowd[-1][1] == MAX_FOUND + 9
    clock.now += 0.030
    tracker.end(crowd.pop())  # found MAX_FOUND + 9: kept as MAX_FOUND
    assert tracker.rif == MAX_FOUND + 9
    assert tracker.report().latency_ms == pytest.approx(30.0)
    for arrival in crowd:
        tracker.end(arrival)
    assert tracker.rif == 0


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["begin", "end", "error", "drop", "report", "wait"]),
            st.integers(min_value=0, max_value=10**6),
        ),
        max_size=400,
    )
)
def test_ends_counted_in_batches_report_as_ends_counted_one_by_one(
    steps: list[tuple[str, int]],
) -> None:
    # Ends are counted in batches (every FOLD_EVERY, or when a report is made); a tracker whose
    # every end is followed by a report counts them one by one. Both report alike throughout.
    clock = Clock(1000.0)
    batched, each = LoadTracker(clock=clock), LoadTracker(clock=clock)
    flights: list[tuple[tuple[float, int], tuple[float, int]]] = []
    for action, amount in steps:
        if action == "begin":
            flights.append((batched.begin(), each.begin()))
        elif action == "wait":
            clock.now += amount / 10**6 * (40.0 if amount % 7 == 0 else 0.05)
        elif action == "report":
            # The header first: made without a report, it counts what has ended by itself.
            assert batched.rendered("TEXT") == each.rendered("TEXT")
            assert batched.report() == each.report()
        elif flights:
            first, second = flights.pop(amount % len(flights))
            if action == "drop":
                batched.drop()
                each.drop()
            else:
                batched.end(first, error=action == "error")
                each.end(second, error=action == "error")
                each.report()
    assert batched.report() == each.report()
    assert batched.rif == each.rif == len(flights)


def test_an_end_given_a_start_time_alone_counts_what_is_in_flight_beside_it() -> None:
    clock = Clock()
    tracker = LoadTracker(clock=clock)
    started = clock.now
    tracker.begin()  # the arrival itself is dropped: only its time is given back
    other = tracker.begin()
    clock.now += 0.004
    tracker.end(started)  # one beside it still in flight: counted as having found one
    assert tracker.report().latency_ms == pytest.approx(4.0)  # one in flight now
    tracker.end(other)  # found one as well (8 ms... from its own start)
    assert tracker.rif == 0


def test_requests_and_errors_per_second_over_the_rate_window() -> None:
    clock = Clock(50.0)
    tracker = LoadTracker(clock=clock, rate_window=10)
    report = tracker.report()
    assert (report.rps_fractional, report.eps) == (0, 0)
    # Second 0 (since the tracker was made): 20 requests, 5 of them errors.
    for i in range(20):
        tracker.end(tracker.begin(), error=i < 5)
    clock.now = 50.5  # less than a second: counted over one second
    assert (tracker.report().rps_fractional, tracker.report().eps) == (20, 5)
    clock.now = 54.0  # four seconds since the tracker was made
    assert (tracker.report().rps_fractional, tracker.report().eps) == (5, 1.25)
    for _ in range(10):
        tracker.end(tracker.begin())  # second 4
    clock.now = 59.5  # seconds 0 to 9 all count, over 9.5 s
    assert tracker.report().rps_fractional == pytest.approx(30 / 9.5)
    clock.now = 60.0  # second 10: second 0 has left the window (1 to 10, over 9 s)
    assert tracker.report().rps_fractional == pytest.approx(10 / 9)
    assert tracker.report().eps == 0
    clock.now = 74.2  # everything has left
    assert (tracker.report().rps_fractional, tracker.report().eps) == (0, 0)
    tracker.end(tracker.begin(), error=True)  # a bucket reused ten seconds on starts afresh
    assert tracker.report().eps == pytest.approx(1 / 9.2)


def test_the_windows_are_checked() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        LoadTracker(latency_window=0)
    with pytest.raises(TypeError, match="rate_window"):
        LoadTracker(rate_window=1.5)  # type: ignore[arg-type]


def test_named_metrics_are_checked() -> None:
    with pytest.raises(ValueError, match="tracker's own"):
        LoadTracker(named_metrics={"rif": lambda: 1.0})
    with pytest.raises(ValueError, match="metric name"):
        LoadTracker(named_metrics={"a b": lambda: 1.0})
    with pytest.raises(TypeError, match="callable"):
        LoadTracker(named_metrics={"q": 2.0})  # type: ignore[dict-item]


def test_the_report_holds_the_metrics_given() -> None:
    tracker = LoadTracker(
        clock=Clock(),
        cpu_utilization=lambda: 0.25,
        application_utilization=lambda: 0.5,
        named_metrics={"queue": lambda: 7, "kv_cache_usage_perc": lambda: 0.4},
    )
    report = tracker.report()
    assert report.cpu_utilization == 0.25
    assert report.application_utilization == 0.5
    assert dict(report.named_metrics) == {"queue": 7.0, "kv_cache_usage_perc": 0.4}


@pytest.mark.parametrize(
    "bad",
    [
        lambda: 1 / 0,
        lambda: math.nan,
        lambda: math.inf,
        lambda: -0.1,
        lambda: "0.5",
        lambda: True,
        lambda: 2.5e9,
        lambda: 10**10,
    ],
    ids=["raises", "nan", "inf", "negative", "str", "bool", "above-max-float", "above-max-int"],
)
def test_a_bad_metric_is_left_out_and_logged_once(
    bad: Any, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = LoadTracker(
        clock=Clock(), cpu_utilization=bad, application_utilization=bad, named_metrics={"q": bad}
    )
    with caplog.at_level(logging.WARNING, logger="lbclient.server"):
        for _ in range(3):
            report = tracker.report()
            assert report.cpu_utilization is None
            assert report.application_utilization is None
            assert dict(report.named_metrics) == {}
            assert report.text() == (
                "TEXT rps_fractional=0, eps=0, named_metrics.rif=0, named_metrics.latency_ms=0"
            )
    logged = [record.getMessage() for record in caplog.records]
    assert len(logged) == 3  # once per metric
    assert all("left out of the report" in line for line in logged)


# -- the report's text ---------------------------------------------------------------------------

REPORT = ServerReport(
    rif=3,
    latency_ms=4.2,
    rps_fractional=120.0,
    eps=0.5,
    cpu_utilization=0.3,
    named_metrics={"kv_cache_usage_perc": 0.4},
)


def test_text_and_json_are_written_as_vllm_and_triton_write_them() -> None:
    assert REPORT.text() == (
        "TEXT cpu_utilization=0.3, rps_fractional=120, eps=0.5, named_metrics.rif=3, "
        "named_metrics.latency_ms=4.2, named_metrics.kv_cache_usage_perc=0.4"
    )
    assert REPORT.json() == (
        'JSON {"cpu_utilization": 0.3, "rps_fractional": 120, "eps": 0.5, "named_metrics": '
        '{"rif": 3, "latency_ms": 4.2, "kv_cache_usage_perc": 0.4}}'
    )
    assert json.loads(REPORT.render("JSON")[5:]) == {
        "cpu_utilization": 0.3,
        "rps_fractional": 120,
        "eps": 0.5,
        "named_metrics": {"rif": 3, "latency_ms": 4.2, "kv_cache_usage_perc": 0.4},
    }
    assert REPORT.render("TEXT") == REPORT.text()
    application = REPORT._replace(cpu_utilization=None, application_utilization=0.7)
    assert application.text().startswith("TEXT application_utilization=0.7, rps_fractional=120")
    with pytest.raises(ValueError, match="BIN"):
        REPORT.render("BIN")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (120.0, "120"),
        (0.0, "0"),
        (0.3, "0.3"),
        (4.2, "4.2"),
        (1e-05, "1e-05"),
        (1e-9, "1e-09"),
        (2 / 3, "0.666667"),
        (1234.5678, "1234.57"),
        (1234567.891, "1.23457e+06"),
        (0.0042 * 1000, "4.2"),
    ],
)
def test_numbers_are_written_compactly_and_read_back_by_float(value: float, text: str) -> None:
    assert number(value) == text
    assert float(text) == pytest.approx(value, rel=1e-5)


@pytest.mark.parametrize(
    ("value", "form"),
    [
        ("TEXT", "TEXT"),
        ("text", "TEXT"),
        (" Json ", "JSON"),
        (b"json", "JSON"),
        ("BIN", None),
        ("", None),
        ("TEXT, JSON", None),
        (None, None),
    ],
)
def test_the_format_asked_is_read_in_any_case(value: str | bytes | None, form: str | None) -> None:
    assert requested_format(value) == form


# -- the CPU metric ------------------------------------------------------------------------------


class Times:
    def __init__(self) -> None:
        self.user = self.system = 0.0

    def __call__(self) -> SimpleNamespace:
        return SimpleNamespace(user=self.user, system=self.system)


def test_cpu_utilization_is_cpu_time_over_wall_time_per_cpu() -> None:
    clock, times = Clock(10.0), Times()
    metric = cpu_utilization(cpus=2, clock=clock, times=times)
    assert isinstance(metric, CpuUtilization)
    assert metric.cpus == 2
    times.user, times.system = 0.3, 0.2
    clock.now = 10.5
    assert metric() == 0  # less than an interval since it was made
    clock.now = 11.0
    assert metric() == 0.25  # 0.5 s of CPU over 1 s on 2 CPUs
    times.user = 0.5
    clock.now = 11.5
    assert metric() == 0.25  # the last measurement until the next interval
    clock.now = 12.0
    assert metric() == pytest.approx(0.1)  # 0.2 s over the second since the last
    times.user = 10.0
    clock.now = 13.0
    assert metric() == 1.0  # clamped
    times.user = 0.0  # a counter that went back (it cannot, but never below 0)
    clock.now = 14.0
    assert metric() == 0.0


def test_cpu_utilization_measures_this_process() -> None:
    metric = CpuUtilization(interval=1e-9)
    sum(i * i for i in range(200_000))
    assert 0 <= metric() <= 1
    assert metric.cpus >= 1
    with pytest.raises(ValueError, match="cpus"):
        CpuUtilization(cpus=0)
    with pytest.raises(ValueError, match="interval"):
        CpuUtilization(interval=0)


# -- the ASGI middleware, by hand ----------------------------------------------------------------


def scope(path: str = "/", headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": path, "headers": headers or []}


def call_asgi(app: LoadReportingASGI, where: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(app(where, receive, send))
    return sent


def headers_of(message: dict[str, Any]) -> dict[bytes, bytes]:
    return dict(message["headers"])


async def hello(where: Any, receive: Any, send: Any) -> None:
    assert where["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
    await send({"type": "http.response.body", "body": b"hel", "more_body": True})
    await send({"type": "http.response.body", "body": b"lo"})


def test_asgi_adds_the_report_only_when_asked() -> None:
    app = LoadReportingASGI(hello, tracker=LoadTracker(clock=Clock()))
    start, *body = call_asgi(app, scope(headers=[(b"endpoint-load-metrics-format", b"Text")]))
    assert headers_of(start) == {
        b"x-app": b"1",
        b"endpoint-load-metrics": (
            b"TEXT rps_fractional=0, eps=0, named_metrics.rif=0, named_metrics.latency_ms=0"
        ),  # the request answered is not counted: it leaves as the client reads the report
    }
    # The body passes through, message by message.
    chunks = [(m["body"], m.get("more_body", False)) for m in body]
    assert chunks == [(b"hel", True), (b"lo", False)]
    for asked in (None, b"BIN"):
        headers = [] if asked is None else [(b"endpoint-load-metrics-format", asked)]
        sent = call_asgi(app, scope(headers=headers))
        assert headers_of(sent[0]) == {b"x-app": b"1"}
    json_start = call_asgi(app, scope(headers=[(b"endpoint-load-metrics-format", b"json")]))[0]
    assert headers_of(json_start)[b"endpoint-load-metrics"].startswith(b'JSON {"rps_fractional": ')
    assert app.tracker.rif == 0
    assert app.tracker.report().rps_fractional == 4


def test_asgi_keeps_a_report_the_app_wrote_itself() -> None:
    async def own(where: Any, receive: Any, send: Any) -> None:
        headers = [(b"endpoint-load-metrics", b"TEXT cpu_utilization=0.9")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    app = LoadReportingASGI(own)
    start = call_asgi(app, scope(headers=[(b"endpoint-load-metrics-format", b"TEXT")]))[0]
    assert start["headers"] == [(b"endpoint-load-metrics", b"TEXT cpu_utilization=0.9")]


async def never(where: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the probe reached the app")


@pytest.mark.parametrize(("asked", "form"), [(None, "TEXT"), (b"JSON", "JSON"), (b"BIN", "TEXT")])
def test_asgi_answers_the_probe_without_the_app_and_without_counting_it(
    asked: bytes | None, form: str
) -> None:
    clock = Clock()
    app = LoadReportingASGI(never, tracker=LoadTracker(clock=clock), named_metrics=None)
    started = app.tracker.begin()
    clock.now += 0.0042
    app.tracker.end(started)
    held = app.tracker.begin()
    headers = [] if asked is None else [(b"endpoint-load-metrics-format", asked)]
    for _ in range(3):
        start, body = call_asgi(app, scope(PROBE_PATH, headers))
        assert start["status"] == 200
        found = headers_of(start)
        assert found[b"x-prequal-rif"] == b"1"
        assert found[b"x-prequal-latency-us"] == b"4200"
        assert found[b"endpoint-load-metrics"] == body["body"]
        assert body["body"].decode().startswith(form + " ")
        assert b"latency_ms" in body["body"]
        assert b"rps_fractional" in body["body"]
    assert app.tracker.rif == 1
    app.tracker.end(held)
    assert app.tracker.report().rps_fractional == 2  # the probes counted nowhere


def test_asgi_probe_path_is_configurable_and_can_be_off() -> None:
    moved = LoadReportingASGI(hello, probe_path="/load")
    assert headers_of(call_asgi(moved, scope("/load"))[0])[b"x-prequal-rif"] == b"0"
    assert call_asgi(moved, scope(PROBE_PATH))[1]["body"] == b"hel"
    off = LoadReportingASGI(hello, probe_path=None)
    assert call_asgi(off, scope(PROBE_PATH))[1]["body"] == b"hel"
    head = LoadReportingASGI(never)
    start, body = call_asgi(head, {**scope(PROBE_PATH), "method": "HEAD"})
    assert body["body"] == b""
    assert int(headers_of(start)[b"content-length"]) > 0


def test_asgi_app_raising_or_cancelled_leaves_the_flight() -> None:
    async def boom(where: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    tracker = LoadTracker(clock=Clock())
    with pytest.raises(RuntimeError, match="boom"):
        call_asgi(LoadReportingASGI(boom, tracker=tracker), scope())
    assert tracker.rif == 0
    assert (tracker.report().rps_fractional, tracker.report().eps) == (1, 1)

    async def failing(where: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    call_asgi(LoadReportingASGI(failing, tracker=tracker), scope())
    assert (tracker.report().rps_fractional, tracker.report().eps) == (2, 2)

    async def cancelled() -> None:
        entered = asyncio.Event()

        async def waits(where: Any, receive: Any, send: Any) -> None:
            entered.set()
            await asyncio.Event().wait()

        async def send(message: Any) -> None:
            pass

        async def receive() -> dict[str, Any]:
            return {}

        app = LoadReportingASGI(waits, tracker=tracker)
        task = asyncio.ensure_future(app(scope(), receive, send))
        await entered.wait()
        assert tracker.rif == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert tracker.rif == 0
    assert (tracker.report().rps_fractional, tracker.report().eps) == (2, 2)  # not counted


def test_asgi_passes_other_scopes_through() -> None:
    seen: list[str] = []

    async def lifespan(where: Any, receive: Any, send: Any) -> None:
        seen.append(where["type"])

    app = LoadReportingASGI(lifespan)
    call_asgi(app, {"type": "lifespan"})
    call_asgi(app, {"type": "websocket", "path": PROBE_PATH, "headers": []})
    assert seen == ["lifespan", "websocket"]
    assert app.tracker.report().rps_fractional == 0


def test_asgi_tracker_and_metrics_are_given_one_way() -> None:
    with pytest.raises(TypeError, match="LoadTracker"):
        LoadReportingASGI(hello, tracker=LoadTracker(), cpu_utilization=lambda: 0.1)
    with pytest.raises(TypeError, match="LoadTracker"):
        LoadReportingWSGI(lambda e, s: [], tracker=LoadTracker(), named_metrics={})


# -- the WSGI middleware, by hand ----------------------------------------------------------------


class Started:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]]]] = []

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.calls.append((status, headers))
        return lambda data: None


def environ(path: str = "/", asked: str | None = None) -> dict[str, Any]:
    found = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    if asked is not None:
        found["HTTP_ENDPOINT_LOAD_METRICS_FORMAT"] = asked
    return found


class Body:
    """An app's iterable that says whether it was closed."""

    def __init__(self, chunks: list[bytes], fail: bool = False) -> None:
        self.chunks, self.fail, self.closed = chunks, fail, False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.fail:
            raise OSError("lost")

    def close(self) -> None:
        self.closed = True


def wsgi_app(body: Body, status: str = "200 OK") -> Any:
    def app(env: Any, start_response: Any) -> Body:
        start_response(status, [("Content-Type", "text/plain")])
        return body

    return app


def test_wsgi_request_is_in_flight_until_its_iterable_is_closed() -> None:
    body = Body([b"a", b"b"])
    app = LoadReportingWSGI(wsgi_app(body), tracker=LoadTracker(clock=Clock()))
    started = Started()
    result = app(environ(), started)
    assert app.tracker.rif == 1
    iterator = iter(result)
    assert next(iterator) == b"a"  # lazily, chunk by chunk
    assert app.tracker.rif == 1
    result.close()  # type: ignore[attr-defined]  # a client gone: closed before the end
    assert body.closed
    assert app.tracker.rif == 0
    assert app.tracker.report().rps_fractional == 1
    result.close()  # type: ignore[attr-defined]  # counted once
    assert app.tracker.report().rps_fractional == 1
    assert started.calls == [("200 OK", [("Content-Type", "text/plain")])]


def test_wsgi_request_ends_when_its_iterable_is_exhausted() -> None:
    app = LoadReportingWSGI(lambda env, start: (start("200 OK", []), [b"x"])[1])
    result = app(environ(), Started())
    assert list(result) == [b"x"]
    assert app.tracker.rif == 0
    result.close()  # type: ignore[attr-defined]  # a list has no close: nothing more
    assert app.tracker.report().rps_fractional == 1


def test_wsgi_errors_count_from_the_call_the_iteration_and_the_status() -> None:
    tracker = LoadTracker(clock=Clock())

    def raising(env: Any, start: Any) -> list[bytes]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        LoadReportingWSGI(raising, tracker=tracker)(environ(), Started())
    assert (tracker.rif, tracker.report().eps) == (0, 1)
    body = Body([b"a"], fail=True)
    result = LoadReportingWSGI(wsgi_app(body), tracker=tracker)(environ(), Started())
    with pytest.raises(OSError, match="lost"):
        list(result)
    result.close()  # type: ignore[attr-defined]
    assert body.closed
    assert (tracker.rif, tracker.report().eps) == (0, 2)
    failing = LoadReportingWSGI(wsgi_app(Body([b""]), "503 Busy"), tracker=tracker)
    list(failing(environ(), Started()))
    assert (tracker.rif, tracker.report().rps_fractional, tracker.report().eps) == (0, 3, 3)


def test_wsgi_adds_the_report_only_when_asked() -> None:
    app = LoadReportingWSGI(wsgi_app(Body([b"x"])), tracker=LoadTracker(clock=Clock()))
    for asked, expected in (
        ("json", 'JSON {"rps_fractional": 0, "eps": 0, "named_metrics": '),
        ("TEXT", "TEXT rps_fractional=1, eps=0, named_metrics.rif=0, named_metrics.latency_ms=0"),
    ):
        started = Started()
        app(environ(asked=asked), started).close()  # type: ignore[attr-defined]
        ((_, headers),) = started.calls
        assert headers[0] == ("Content-Type", "text/plain")
        assert headers[1][0] == "endpoint-load-metrics"
        assert headers[1][1].startswith(expected)
    for asked in (None, "BIN"):
        started = Started()
        app(environ(asked=asked), started).close()  # type: ignore[attr-defined]
        assert started.calls == [("200 OK", [("Content-Type", "text/plain")])]


def test_wsgi_answers_the_probe_without_the_app() -> None:
    def never_wsgi(env: Any, start: Any) -> list[bytes]:
        raise AssertionError("the probe reached the app")

    app = LoadReportingWSGI(never_wsgi, tracker=LoadTracker(clock=Clock()))
    held = app.tracker.begin()
    started = Started()
    (body,) = app(environ(PROBE_PATH, "json"), started)
    ((status, headers),) = started.calls
    found = dict(headers)
    assert status == "200 OK"
    assert found["x-prequal-rif"] == "1"
    assert found["x-prequal-latency-us"] == "0"
    assert found["endpoint-load-metrics"] == body.decode()
    assert body.startswith(b"JSON {")
    assert app.tracker.rif == 1
    assert list(app({**environ(PROBE_PATH), "REQUEST_METHOD": "HEAD"}, Started())) == []
    app.tracker.end(held)
    assert app.tracker.report().rps_fractional == 1


# -- the layering --------------------------------------------------------------------------------


def test_the_companion_imports_no_client_and_lbclient_does_not_import_it() -> None:
    code = (
        "import sys\n"
        "import lbclient\n"
        "assert 'lbclient.server' not in sys.modules\n"
        "sys.modules['httpx'] = sys.modules['requests'] = None\n"
        "import lbclient.server\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'httpx', 'httpcore', 'requests', 'urllib3', 'tenacity', 'anyio', 'h11'}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['httpx', 'requests']"  # the two blocked entries only


@pytest.mark.parametrize("form", ["TEXT", "JSON"])
def test_the_most_a_tracker_may_report_the_clients_read(form: str) -> None:
    # As many named metrics as a client reads, with the longest names that fit, every value
    # the longest written: what the tracker writes, a client keeps.
    from lbclient.reports import MAX_LENGTH, MAX_NAMED, MAX_VALUE, parse

    def largest() -> float:
        return 1.2345678e-100  # written "1.23457e-100", as long as a value is written

    names = [f"m{i:02d}" for i in range(MAX_NAMED - 2)]

    refusals: set[str] = set()

    def fits(length: int) -> bool:
        try:
            LoadTracker(named_metrics=dict.fromkeys(["x" * length, *names[1:]], largest))
        except ValueError as error:
            refusals.add(str(error))
            return False
        return True

    low, high = 3, MAX_LENGTH  # the first name as long as the others allow: fits(low) holds
    assert fits(low)
    assert not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    longest = ["x" * low, *names[1:]]
    assert refusals
    assert all(f"clients read at most {MAX_LENGTH}" in refusal for refusal in refusals)
    tracker = LoadTracker(
        clock=Clock(),
        cpu_utilization=largest,
        application_utilization=largest,
        named_metrics=dict.fromkeys(longest, largest),
    )
    for _ in range(3):
        tracker.end(tracker.begin())
    written = tracker.rendered(form)
    assert MAX_LENGTH - 80 < len(written) <= MAX_LENGTH or form == "JSON"  # short rates here
    read = parse(written, 1.0)
    assert len(read.named_metrics) == MAX_NAMED
    assert read.cpu_utilization == pytest.approx(1.23457e-100)
    assert len(f"{MAX_VALUE * 0.999:.6g}") < len(f"{largest():.6g}")
    with pytest.raises(ValueError, match=f"at most {MAX_NAMED - 2} of your own"):
        LoadTracker(named_metrics=dict.fromkeys([*names, "one_more"], largest))


@pytest.mark.parametrize("form", ["text", "json"])
def test_what_the_companion_writes_the_clients_read_back(form: str) -> None:
    from lbclient.reports import parse, parse_prequal

    sent = ServerReport(
        rif=7,
        latency_ms=4.25,
        rps_fractional=1234.5,
        eps=0.5,
        cpu_utilization=0.375,
        application_utilization=0.5,
        named_metrics={"kv_cache_usage_perc": 0.25},
    )
    read = parse(getattr(sent, form)(), 9.0)
    assert read.at == 9.0
    assert (read.rif, read.latency) == (7.0, pytest.approx(0.00425))
    assert (read.rps_fractional, read.eps) == (1234.5, 0.5)
    assert (read.cpu_utilization, read.application_utilization) == (0.375, 0.5)
    assert read.named_metrics["kv_cache_usage_perc"] == 0.25
    probe = parse_prequal(str(sent.rif), str(sent.latency_us), 9.0)
    assert (probe.rif, probe.latency) == (7.0, 0.00425)


def test_a_rendered_report_keeps_rif_exact_and_the_rest_for_ten_ms() -> None:
    from lbclient.reports import parse

    clock = Clock()
    calls = [0]

    def utilization() -> float:
        calls[0] += 1
        return 0.25 * calls[0]

    tracker = LoadTracker(clock=clock, application_utilization=utilization)
    answered = tracker.begin()  # the request whose response carries the report
    first = parse(tracker.rendered("TEXT"), 0.0)
    assert (first.rif, first.application_utilization) == (0.0, 0.25)
    started = tracker.begin()
    clock.now += 0.009  # within REFRESH: the same rates and metrics, RIF as of now
    again = parse(tracker.rendered("TEXT"), 0.0)
    assert (again.rif, again.application_utilization) == (1.0, 0.25)
    assert parse(tracker.rendered("JSON"), 0.0).rif == 1.0
    tracker.end(started)
    tracker.end(answered)
    clock.now += 0.002  # past REFRESH: made afresh
    fresh = parse(tracker.rendered("TEXT"), 0.0)
    assert fresh.rif == 0.0
    assert fresh.application_utilization == calls[0] * 0.25
    assert calls[0] >= 3
    assert parse(tracker.rendered("TEXT"), 0.0) == fresh  # the cache again


def test_the_encoded_report_is_the_rendered_one_as_bytes() -> None:
    # What the ASGI middleware writes (made once a value, kept as bytes) is rendered() encoded,
    # whatever was made before it: fresh, kept, for another RIF, after the other form, made anew.
    clock = Clock()
    tracker = LoadTracker(clock=clock, application_utilization=lambda: 0.5)
    for latency in (0.001, 0.002, 0.004):
        started = tracker.begin()
        clock.now += latency
        tracker.end(started)
    held = [tracker.begin()]
    for step in range(24):
        form = "JSON" if step % 3 == 2 else "TEXT"
        if step % 2:
            encoded = tracker.encoded(form)
            assert encoded == tracker.rendered(form).encode("latin-1")
        else:
            rendered = tracker.rendered(form)
            assert tracker.encoded(form) == rendered.encode("latin-1")
        if step % 4 == 1:
            held.append(tracker.begin())  # another RIF
        if step % 5 == 4:
            clock.now += 0.006  # past REFRESH, now and then
    assert b"named_metrics.rif=" in tracker.encoded("TEXT")
    for started in held:
        tracker.end(started)
    assert tracker.encoded("JSON") == tracker.rendered("JSON").encode("latin-1")
