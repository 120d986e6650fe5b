"""The server companion's compiled per-request path (lbclient/server/_counting.c): the ASGI
middleware over a tracker that counts in C gives, request by request, what the pure-Python path
gives (the messages sent, the counts, the reports), and the counter shares its count with the
server's other processes as the Python tracker does."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import itertools
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import compiled_module
from hypothesis import given, settings
from hypothesis import strategies as st

import lbclient.server
from lbclient.server import PROBE_PATH, LoadReportingASGI, LoadTracker, _shared, _tracker
from lbclient.server._tracker import FOUND_AGE, MAX_FOUND

counting = compiled_module(
    "lbclient.server._counting", "compiled server path", "the pure-Python path serves"
)

SOURCE = Path(lbclient.server.__file__).parent / "_counting.c"


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trackers made within count in Python (as where the module is not built)."""
    monkeypatch.setattr(_tracker, "COMPILED", False)


def test_the_compiled_module_is_built_from_this_source() -> None:
    if not SOURCE.is_file():
        pytest.skip("not a source checkout: no _counting.c beside the package")
    assert hashlib.sha256(SOURCE.read_bytes()).hexdigest() == counting.SOURCE_SHA256, (
        "the compiled module is older than its source: reinstall (pip install -e .)"
    )
    assert counting.MOST_PER_SLOT == _shared.MOST_PER_SLOT
    assert lbclient.server.COMPILED is True


def test_a_tracker_counts_in_the_compiled_counter_unless_told_not_to(pure: None) -> None:
    assert isinstance(LoadTracker()._flying, list)
    assert LoadReportingASGI(hello)._gate is None


def new_counter(clock: Any = None, origin: float = 100.0) -> Any:
    return counting.Counter(clock, origin, 16, 10, MAX_FOUND, FOUND_AGE)


def test_the_counter_counts_as_a_list_of_one_entry_per_request() -> None:
    clock = Clock()
    counter = new_counter(clock)
    assert len(counter) == 0
    with pytest.raises(IndexError):
        counter.pop()
    counter.append(None)
    counter.append("anything")
    assert len(counter) == 2
    counter.pop()
    assert len(counter) == 1
    assert counter.begin() == (100.0, 1)
    assert len(counter) == 2
    assert counter.others(100.0) == 0
    assert counter.shared is False
    for windows in ((0, 10, 4), (16, 0, 4), (16, 10, -1), (counting.MOST_WINDOW + 1, 10, 4)):
        with pytest.raises(ValueError, match="latency_window must be 1 to"):
            counting.Counter(clock, 100.0, *windows, FOUND_AGE)
    with pytest.raises(TypeError, match="clock"):
        counting.Counter("not callable", 100.0, 16, 10, 4, FOUND_AGE)
    unmade = counting.Counter.__new__(counting.Counter)
    with pytest.raises(RuntimeError, match="not initialised"):
        unmade.rates(1.0)
    with pytest.raises(RuntimeError, match="not initialised"):
        counting.Gate(unmade, None, None, print, {}, 0.01)
    with pytest.raises(RuntimeError, match="made once"):
        counter.__init__(clock, 100.0, 16, 10, 4, FOUND_AGE)


def test_the_default_clock_is_time_monotonic() -> None:
    counter = new_counter()
    before = time.monotonic()
    now, found = counter.begin()
    assert before <= now <= time.monotonic()
    assert found == 0


#: Clock steps: within a request's time, within a second, across seconds and rate windows, and
#: past FOUND_AGE.
WAITS = st.sampled_from([0.0, 0.0003, 0.004, 0.02, 0.3, 0.7, 1.0, 2.5, 11.0, 31.0, 40.0])


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.sampled_from(["end", "error", "alone", "drop"]), st.integers(0, 50)),
            st.tuples(st.sampled_from(["wait", "cycle"]), WAITS),
            st.tuples(st.sampled_from(["begin", "report"]), st.just(0)),
        ),
        max_size=300,
    ),
    windows=st.tuples(st.integers(1, 20), st.sampled_from([1, 2, 3, 10])),
)
def test_a_tracker_counting_in_c_reports_as_one_counting_in_python(
    steps: list[tuple[str, Any]], windows: tuple[int, int]
) -> None:
    clock = Clock(1000.0)
    latency_window, rate_window = windows
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_tracker, "COMPILED", False)
        python = LoadTracker(clock=clock, latency_window=latency_window, rate_window=rate_window)
    compiled = LoadTracker(clock=clock, latency_window=latency_window, rate_window=rate_window)
    assert isinstance(python._flying, list)
    assert not isinstance(compiled._flying, list)
    flights: list[tuple[Any, Any]] = []
    for action, amount in steps:
        if action == "begin":
            flights.append((compiled.begin(), python.begin()))
        elif action == "wait":
            clock.now += amount
        elif action == "cycle":  # a request begun and ended after a wait: rings fill
            first, second = compiled.begin(), python.begin()
            clock.now += amount
            compiled.end(first, error=amount == 0.004)
            python.end(second, error=amount == 0.004)
        elif action == "report":
            assert compiled.rendered("TEXT") == python.rendered("TEXT")
            assert compiled.encoded("JSON") == python.encoded("JSON")
            assert compiled.report() == python.report()
        elif flights:
            first, second = flights.pop(amount % len(flights))
            assert first == second
            if action == "drop":
                compiled.drop()
                python.drop()
            elif action == "alone":  # an end given the start time alone
                compiled.end(first[0])
                python.end(second[0])
            else:
                compiled.end(first, error=action == "error")
                python.end(second, error=action == "error")
        assert compiled.rif == python.rif
    assert compiled.report() == python.report()


# -- the middleware, both paths side by side -----------------------------------------------------


async def hello(where: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
    await send({"type": "http.response.body", "body": b"hello"})


KINDS = ("ok", "fail", "raise", "silent", "own", "cancel", "probe", "odd", "head_probe")
ASKED = (None, b"TEXT", b"json", b" Text ", b"BIN", b"")


async def scripted(where: Any, receive: Any, send: Any) -> None:
    """The app: does what the request's scope says, once its release is set."""
    where["seen"].append(type(send).__name__)
    await where["release"].wait()
    kind = where["kind"]
    if kind == "cancel":
        await asyncio.Event().wait()
    if kind == "silent":
        return
    headers = [(b"x-app", b"1")]
    if kind == "own":
        headers.append((b"Endpoint-Load-Metrics", b"TEXT cpu_utilization=0.9"))
    status = 503 if kind == "fail" else 200
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if kind == "raise":
        raise RuntimeError("boom")
    await send({"type": "http.response.body", "body": b"done"})


class Side:
    """One middleware, its clock, and its requests under way."""

    def __init__(self, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clock = Clock()
        with monkeypatch.context() as patch:
            patch.setattr(_tracker, "COMPILED", compiled)
            tracker = LoadTracker(clock=self.clock, share_in_flight=False)
        self.app = LoadReportingASGI(scripted, tracker=tracker)
        self.open: list[tuple[asyncio.Task[None], dict[str, Any]]] = []
        self.sent: list[Any] = []
        self.seen: list[str] = []

    async def start(self, kind: str, asked: bytes | None) -> None:
        headers = [(b"host", b"service")]
        if asked is not None:
            headers.append((b"endpoint-load-metrics-format", asked))
        where: dict[str, Any] = {
            "type": "http",
            "method": "HEAD" if kind == "head_probe" else "GET",
            "path": PROBE_PATH if kind in ("probe", "head_probe") else "/work",
            "headers": [list(pair) for pair in headers] if kind == "odd" else headers,
            "kind": kind,
            "release": asyncio.Event(),
            "seen": self.seen,
        }
        sent = self.sent

        async def send(message: Any) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        task = asyncio.ensure_future(self.app(where, receive, send))
        await asyncio.sleep(0)  # it runs up to the app's wait (a probe: to its end)
        await asyncio.sleep(0)
        self.open.append((task, where))

    async def finish(self, index: int) -> str:
        task, where = self.open.pop(index % len(self.open))
        if where["kind"] == "cancel":
            task.cancel()
        where["release"].set()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        except RuntimeError as error:
            return f"raised {error}"
        return "returned"

    def state(self) -> tuple[Any, ...]:
        tracker = self.app.tracker
        return (
            tracker.rif,
            tracker.report(),
            tracker.rendered("TEXT"),
            tracker.encoded("JSON"),
        )


STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("start"), st.sampled_from(KINDS), st.sampled_from(ASKED)),
        st.tuples(st.just("finish"), st.integers(0, 50)),
        st.tuples(st.just("tick"), st.sampled_from([0.0003, 0.004, 0.02, 0.7, 3.0, 40.0])),
        st.tuples(st.just("look")),
    ),
    max_size=60,
)


def run_both(steps: list[tuple[Any, ...]], monkeypatch: pytest.MonkeyPatch) -> list[Side]:
    sides = [Side(True, monkeypatch), Side(False, monkeypatch)]

    async def main() -> None:
        for step in [*steps, ("drain",)]:
            if step[0] == "start":
                for side in sides:
                    await side.start(step[1], step[2])
            elif step[0] == "finish" and sides[0].open:
                outcomes = [await side.finish(step[1]) for side in sides]
                assert outcomes[0] == outcomes[1]
            elif step[0] == "tick":
                for side in sides:
                    side.clock.now += step[1]
            elif step[0] == "drain":
                while sides[0].open:
                    outcomes = [await side.finish(0) for side in sides]
                    assert outcomes[0] == outcomes[1]
            assert sides[0].sent == sides[1].sent
            assert sides[0].state() == sides[1].state()

    asyncio.run(main())
    return sides


@settings(max_examples=150, deadline=None)
@given(steps=STEPS)
def test_the_compiled_path_sends_and_counts_as_the_python_path(
    steps: list[tuple[Any, ...]],
) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        compiled, python = run_both(steps, monkeypatch)
    assert isinstance(python.app.tracker._flying, list)
    assert not isinstance(compiled.app.tracker._flying, list)
    assert "Reply" not in python.seen
    # Every request of the usual path reached the app through the compiled path; the rest
    # (headers not pairs of bytes) through the Python one.
    usual = [s for s in steps if s[0] == "start" and s[1] not in ("probe", "head_probe", "odd")]
    assert compiled.seen.count("Reply") == len(usual)


def test_every_kind_of_request_takes_both_paths_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    # The script above, every kind and format once, some held while others run.
    steps: list[tuple[Any, ...]] = []
    for kind in KINDS:
        for asked in ASKED:
            steps += [("start", kind, asked), ("tick", 0.004)]
        steps += [("finish", 3), ("tick", 0.02), ("look",), ("finish", 0)]
    compiled, _ = run_both(steps, monkeypatch)
    reported = [m for m in compiled.sent if m["type"] == "http.response.start"]
    assert any(
        dict(m["headers"]).get(b"endpoint-load-metrics", b"").startswith(b"JSON {")
        for m in reported
    )
    assert compiled.app.tracker.report().eps > 0
    assert compiled.app.tracker.rif == 0


def test_a_reply_ends_once() -> None:
    tracker = LoadTracker(clock=Clock(), share_in_flight=False)
    gate = counting.Gate(tracker._flying, tracker, PROBE_PATH, lambda value: None, {}, 0.01)
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    reply = gate.enter({"type": "http", "path": "/", "headers": []}, send)
    assert reply is not None
    assert reply.status == 500  # no response yet: what its server would answer
    assert tracker.rif == 1
    asyncio.run(reply({"type": "http.response.start", "status": 404, "headers": []}))
    assert reply.status == 404
    reply.end(False)
    reply.end(True)
    reply.drop()
    assert tracker.rif == 0
    report = tracker.report()
    assert (report.rps_fractional, report.eps) == (1, 0)
    for odd in ([], {"type": "websocket", "path": "/", "headers": []}, {"type": "http"}):
        assert gate.enter(odd, send) is None  # type: ignore[arg-type]
    assert gate.enter({"type": "http", "path": PROBE_PATH, "headers": []}, send) is None
    assert tracker.rif == 0
    with pytest.raises(TypeError, match="probe_path"):
        counting.Gate(tracker._flying, tracker, b"/load", print, {}, 0.01)


# -- shared with the server's other processes ----------------------------------------------------


def test_the_counter_publishes_in_its_slot_and_adds_the_others_as_shared_does(
    tmp_path: Path,
) -> None:
    words = memoryview(bytearray(_shared._SIZE)).cast("q")
    mine = 2 * _shared._WORDS + _shared._COUNT
    others = (3 * _shared._WORDS + _shared._COUNT, 5 * _shared._WORDS + _shared._COUNT)
    checks: list[float] = []

    def check(now: float) -> tuple[int, float, tuple[int, ...], int]:
        checks.append(now)
        return (words[_shared._GENERATION], now + 1.0, others, 2 * _shared.MOST_PER_SLOT)

    counter = new_counter(Clock())
    counter.append(None)
    counter.share(words, mine, check)
    assert counter.shared is True
    assert words[mine] == 1  # published as it joins
    words[others[0]] = 4
    words[others[1]] = 3
    assert counter.begin() == (100.0, 1 + 7)
    assert words[mine] == 2
    assert checks == [100.0]
    assert counter.others(100.5) == 7
    assert checks == [100.0]  # checked again a second on, or when the generation moves
    words[_shared._GENERATION] += 1
    assert counter.others(100.5) == 7
    assert checks == [100.0, 100.5]
    words[others[1]] = -5  # a slot not believed: the others, each checked
    assert counter.others(100.6) == 4
    words[others[1]] = 2 * _shared.MOST_PER_SLOT  # more than one slot may hold
    assert counter.others(100.6) == 4
    counter.pop()
    assert words[mine] == 2  # pop and append are the list's: the tracker publishes those
    counter.share(None)
    assert counter.shared is False
    counter.begin()
    assert words[mine] == 2  # no longer written
    with pytest.raises(ValueError, match="64-bit words"):
        counter.share(memoryview(bytearray(64)), 2, check)
    with pytest.raises(ValueError, match="64-bit words"):
        counter.share(words, len(words), check)
    with pytest.raises(TypeError, match="callable"):
        counter.share(words, mine, None)
    with pytest.raises(BufferError):
        counter.share(b"read only", mine, check)


def test_a_counter_stops_writing_when_its_tracker_leaves_the_shared_file(
    free_port_listener: int,
) -> None:
    tracker = LoadTracker(clock=Clock())
    tracker.listening(free_port_listener, exact=True)
    assert tracker.shared
    counter = tracker._flying
    assert not isinstance(counter, list)
    assert counter.shared
    shared = tracker._shared
    assert shared is not None
    words = shared._words
    place = shared._count
    arrival = counter.begin()
    assert words[place] == 1
    tracker.end(arrival)
    assert words[place] == 0
    shared.leave()
    assert not counter.shared
    counter.begin()
    assert words[place] == 0
    del tracker, counter
    gc.collect()


@pytest.fixture
def free_port_listener() -> Iterator[int]:
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        yield port
        _shared.discard(port)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_write_its_parents_slot(free_port_listener: int) -> None:
    tracker = LoadTracker(clock=Clock())
    tracker.listening(free_port_listener, exact=True)
    shared = tracker._shared
    assert shared is not None
    words, place = shared._words, shared._count
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            counter = tracker._flying
            counter.begin()
            counter.begin()
            os.write(write, f"{int(tracker.shared)} {int(counter.shared)}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        said = pipe.read()
    os.waitpid(child, 0)
    assert said == "0 0"
    assert words[place] == 0
    shared.leave()


# -- what the Python path does with odd input, the compiled one does too --------------------------


def test_trackers_with_windows_larger_than_the_counter_keeps_count_in_python() -> None:
    wide = LoadTracker(latency_window=counting.MOST_WINDOW + 1)
    assert isinstance(wide._flying, list)
    assert isinstance(LoadTracker(rate_window=counting.MOST_RATE_WINDOW + 1)._flying, list)
    assert not isinstance(LoadTracker(latency_window=counting.MOST_WINDOW)._flying, list)
    assert LoadReportingASGI(hello, tracker=wide)._gate is None


def test_objects_made_without_their_init_refuse_rather_than_crash() -> None:
    gate = counting.Gate.__new__(counting.Gate)
    with pytest.raises(RuntimeError, match="not initialised"):
        gate.enter({"type": "http", "path": "/", "headers": []}, print)
    counter = counting.Counter.__new__(counting.Counter)
    for call in (lambda: counter.end((1.0, 0), False), lambda: counter.samples(0, 1.0)):
        with pytest.raises(RuntimeError, match="not initialised"):
            call()


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize(
    "arrival", [(1.0,), (1.0, 2, 3), ("soon", 0), (1.0, 1.5), [1.0, 0], "1.0", None]
)
def test_an_end_given_no_arrival_leaves_flight_and_names_it(
    compiled: bool, arrival: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = counting_in(compiled, monkeypatch, Clock())
    assert isinstance(tracker._flying, list) is not compiled
    tracker.begin()
    with pytest.raises(TypeError, match="an arrival is") as raised:
        tracker.end(arrival)
    assert repr(arrival) in str(raised.value)
    assert tracker.rif == 0
    assert tracker.report().rps_fractional == 0  # not counted, and reports go on


def counting_in(
    compiled: bool, monkeypatch: pytest.MonkeyPatch, clock: Clock | Failing
) -> LoadTracker:
    """A tracker of ``clock`` counting alone, in C or in Python."""
    monkeypatch.setattr(_tracker, "COMPILED", compiled)
    tracker = LoadTracker(clock=clock, share_in_flight=False)
    assert isinstance(tracker._flying, list) is not compiled
    return tracker


class Failing:
    """A clock that raises once told to."""

    def __init__(self) -> None:
        self.now = 100.0
        self.fail: BaseException | None = None

    def __call__(self) -> float:
        if self.fail is not None:
            raise self.fail
        return self.now


@pytest.mark.parametrize("compiled", [True, False])
def test_a_clock_that_raises_leaves_nothing_in_flight(
    compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Failing()
    tracker = counting_in(compiled, monkeypatch, clock)
    arrival = tracker.begin()
    clock.fail = OSError("no clock")
    with pytest.raises(OSError, match="no clock"):
        tracker.begin()
    with pytest.raises(OSError, match="no clock"):
        tracker.end(arrival)
    clock.fail = None
    assert tracker.rif == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300])
def test_the_compiled_counter_refuses_a_clock_far_from_its_origin(value: float) -> None:
    clock = Clock()
    counter = new_counter(clock)
    clock.now = value
    with pytest.raises(ValueError, match="the clock returned"):
        counter.begin()
    assert len(counter) == 0
    for call in (lambda: counter.rates(value), lambda: counter.samples(0, value)):
        with pytest.raises(ValueError, match="not a finite number"):
            call()


def test_other_slots_are_added_up_exactly_whatever_they_hold() -> None:
    words = memoryview(bytearray(_shared._SIZE)).cast("q")
    places = tuple(slot * _shared._WORDS + _shared._COUNT for slot in (3, 4, 5))
    mine = 2 * _shared._WORDS + _shared._COUNT
    counter = new_counter(Clock())
    most = 3 * _shared.MOST_PER_SLOT
    counter.share(words, mine, lambda now: (words[_shared._GENERATION], now + 1.0, places, most))
    for held in ([2**63 - 1, 2**63 - 1, 5], [2**63 - 1, 1, -(2**63)], [-(2**63), 7, 0]):
        for place, count in zip(places, held, strict=True):
            words[place] = count
        exact = sum(held)
        believed = sum(c for c in held if 0 < c <= _shared.MOST_PER_SLOT)
        assert counter.others(100.0) == (exact if 0 <= exact <= most else believed)
    counter.share(None)


def test_a_failing_check_is_reported_and_tried_again_a_second_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    words = memoryview(bytearray(_shared._SIZE)).cast("q")
    mine = 2 * _shared._WORDS + _shared._COUNT
    calls: list[float] = []
    failure: list[BaseException] = [RuntimeError("no /proc")]

    def check(now: float) -> tuple[int, float, tuple[int, ...], int]:
        calls.append(now)
        raise failure[0]

    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    clock = Clock()
    counter = new_counter(clock)
    counter.share(words, mine, check)
    assert counter.begin() == (100.0, 0)  # the request is served, the others counted as none
    assert len(reported) == 1
    assert "no /proc" in str(reported[0].exc_value)
    assert counter.others(100.5) == 0
    assert calls == [100.0]  # not again within the second
    failure[0] = KeyboardInterrupt()
    clock.now = 101.0
    with pytest.raises(KeyboardInterrupt):
        counter.begin()  # a second on: tried again, and what is not an Exception goes on up
    assert len(counter) == 1  # the request that raised is not counted
    counter.share(None)


class NotADict(dict):  # type: ignore[type-arg]
    """A message mapping of another type (its reads go through its methods)."""


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize(
    "status",
    [200, 200.0, 503.0, float("nan"), True, 10**30, -(10**30), "200", None],
)
def test_any_status_is_counted_alike(
    compiled: bool, status: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = counting_in(compiled, monkeypatch, Clock())

    async def app(where: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})

    async def main() -> None:
        async def send(message: Any) -> None:
            pass

        await LoadReportingASGI(app, tracker=tracker)(
            {"type": "http", "path": "/", "headers": []}, send, send
        )

    asyncio.run(main())
    try:
        expected = 1.0 if status >= 500 else 0.0
    except TypeError:
        expected = 1.0
    assert (tracker.rif, tracker.report().eps) == (0, expected)


@pytest.mark.parametrize(
    "headers",
    [
        [(bytearray(b"Endpoint-Load-Metrics"), b"TEXT eps=1")],  # the app's own, any type
        [("endpoint-load-metrics", "TEXT eps=1")],  # a str is not a header name here
        [(7, b"x")],
        [(b"x",)],
        [itertools.count()],  # unpacked as Python unpacks it: three items read, not all
        None,
    ],
)
def test_odd_response_headers_are_read_alike(headers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def outcome(compiled: bool) -> tuple[Any, int]:
        monkeypatch.setattr(_tracker, "COMPILED", compiled)
        tracker = LoadTracker(clock=Clock(), share_in_flight=False)
        sent: list[Any] = []

        async def app(where: Any, receive: Any, send: Any) -> None:
            await send(NotADict(type="http.response.start", status=200, headers=headers))

        async def main() -> None:
            async def send(message: Any) -> None:
                sent.append(dict(message))

            asked = [(b"endpoint-load-metrics-format", b"TEXT")]
            await LoadReportingASGI(app, tracker=tracker)(
                {"type": "http", "path": "/", "headers": asked}, send, send
            )

        try:
            asyncio.run(main())
        except Exception as error:  # what the app would see: the same class either way
            return type(error), tracker.rif
        return sent, tracker.rif

    assert outcome(True) == outcome(False)


@pytest.mark.parametrize("compiled", [True, False])
def test_odd_requests_are_read_alike(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tracker, "COMPILED", compiled)

    async def main() -> list[Any]:
        async def send(message: Any) -> None:
            pass

        outcomes: list[Any] = []
        for probe_path, where in (
            (None, {"type": "http", "headers": []}),  # no path: a KeyError, probe or not
            (PROBE_PATH, {"type": "http", "headers": []}),
            (
                None,
                {
                    "type": "http",
                    "path": "/",
                    "headers": [(b"endpoint-load-metrics-format", bytearray(b"TEXT"))],
                },
            ),
        ):
            tracker = LoadTracker(clock=Clock(), share_in_flight=False)
            app = LoadReportingASGI(hello, tracker=tracker, probe_path=probe_path)
            try:
                await app(where, send, send)
                outcomes.append(("served", tracker.rif))
            except Exception as error:
                outcomes.append((type(error), tracker.rif))
        return outcomes

    assert asyncio.run(main()) == [(KeyError, 0), (KeyError, 0), (TypeError, 0)]


class Counting(Clock):
    """A clock that counts its reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


class Tagged(LoadTracker):
    """A tracker whose reports say who made them."""

    def encoded(self, form: str) -> bytes:
        return b"tagged; " + super().encoded(form)


@pytest.mark.parametrize("tracker_type", [LoadTracker, Tagged])
def test_a_report_asked_reads_the_clock_and_the_tracker_as_the_python_path_does(
    tracker_type: type[LoadTracker], monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(compiled: bool) -> tuple[list[Any], int]:
        monkeypatch.setattr(_tracker, "COMPILED", compiled)
        clock = Counting()
        tracker = tracker_type(clock=clock, share_in_flight=False)
        assert isinstance(tracker._flying, list) is not compiled
        app = LoadReportingASGI(hello, tracker=tracker)
        sent: list[Any] = []

        async def main() -> None:
            async def send(message: Any) -> None:
                sent.append(message)

            asked = [(b"endpoint-load-metrics-format", b"TEXT")]
            for step in range(6):  # within a line's 10 ms, and across
                clock.now += 0.004 * step
                await app({"type": "http", "path": "/", "headers": asked}, send, send)

        asyncio.run(main())
        return sent, clock.reads

    compiled, python = run(True), run(False)
    assert compiled == python
    if tracker_type is Tagged:
        starts = [m for m in compiled[0] if m["type"] == "http.response.start"]
        assert all(
            dict(m["headers"])[b"endpoint-load-metrics"].startswith(b"tagged; ") for m in starts
        )


class Stop(BaseException):
    """Not an Exception: what a KeyboardInterrupt is to a request."""


class Unsure:
    """A status that cannot say whether it is 500 or more."""

    def __ge__(self, other: object) -> bool:
        raise Stop


@pytest.mark.parametrize("compiled", [True, False])
def test_a_status_whose_comparison_stops_everything_reaches_the_app(
    compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = counting_in(compiled, monkeypatch, Clock())

    async def app(where: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": Unsure(), "headers": []})

    async def main() -> None:
        async def send(message: Any) -> None:
            pass

        await LoadReportingASGI(app, tracker=tracker)(
            {"type": "http", "path": "/", "headers": []}, send, send
        )

    with pytest.raises(Stop):
        asyncio.run(main())
    assert (tracker.rif, tracker.report().rps_fractional) == (0, 0)  # dropped, not counted


@pytest.mark.parametrize("compiled", [True, False])
def test_an_arrival_that_found_more_than_any_count_counts_as_the_most(
    compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    tracker = counting_in(compiled, monkeypatch, clock)
    for found in (2**70, -(2**70)):
        tracker.begin()
        clock.now += 0.002
        tracker.end((clock.now - 0.002, found))
    assert tracker.rif == 0
    assert tracker.report().rps_fractional == 2


def test_an_arrival_the_shared_file_refuses_is_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tracker, "COMPILED", False)
    tracker = LoadTracker(clock=Clock())

    class Refusing:
        def arrived(self, flying: Any, now: float) -> int:
            raise Stop

        def track(self, flying: Any) -> None:
            pass

    tracker._shared = Refusing()  # type: ignore[assignment]
    with pytest.raises(Stop):
        tracker.begin()
    assert len(tracker._flying) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shared count needs /proc")
def test_a_report_from_the_lines_in_c_adds_the_other_workers_as_python_does(
    free_port_listener: int,
) -> None:
    # Another live process's slot (this one's parent, as a server's other worker would be),
    # holding 5: the header value the compiled path takes from the tracker's lines, and the one
    # the tracker makes itself, both count them.
    clock = Clock()
    tracker = LoadTracker(clock=clock)
    tracker.listening(free_port_listener, exact=True)
    shared = tracker._shared
    assert shared is not None
    words = shared._words
    parent = os.getppid()
    started = _shared._started(parent)
    assert started is not None
    other = next(
        slot * _shared._WORDS
        for slot in range(1, _shared.SLOTS + 1)
        if words[slot * _shared._WORDS + _shared._PID] == 0
    )
    words[other + _shared._SERVER] = shared._server
    words[other + _shared._START] = started
    words[other + _shared._COUNT] = 5
    words[other + _shared._PID] = parent
    words[_shared._GENERATION] += 1
    try:
        gate = tracker.compiled_gate(PROBE_PATH)
        assert gate is not None
        held = tracker.begin()  # one more in flight here
        sent: list[Any] = []

        async def send(message: Any) -> None:
            sent.append(message)

        asked = [(b"endpoint-load-metrics-format", b"TEXT")]
        reply = gate.enter({"type": "http", "path": "/", "headers": asked}, send)
        assert reply is not None
        made = tracker.encoded("TEXT")  # the line rendered, with the value for 6 in flight
        assert b"named_metrics.rif=6," in made  # the one held, and the other worker's 5
        # Marked, so that only a value taken from the line, for 6, can carry the mark; and the
        # tracker's own making watched, so that the value is seen taken in C.
        tracker._lines["TEXT"][5][6] = b"TEXT named_metrics.rif=6, marked"
        made_by_python: list[str] = []
        making = tracker._encoded_at

        def watched(form: str, now: float) -> bytes:
            made_by_python.append(form)
            return making(form, now)

        tracker._encoded_at = watched  # type: ignore[method-assign]
        asyncio.run(reply({"type": "http.response.start", "status": 200, "headers": []}))
        assert dict(sent[0]["headers"])[b"endpoint-load-metrics"].endswith(b"marked")
        assert made_by_python == []
        reply.end(False)
        tracker.end(held)
    finally:
        words[other + _shared._PID] = 0
        words[_shared._GENERATION] += 1
        shared.leave()
