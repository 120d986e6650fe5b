"""Active health checks against real servers on 127.0.0.1, and their runners' life cycle."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
import requests

from lbclient import (
    AsyncLBTransport,
    Backend,
    HttpCheck,
    LBAdapter,
    LBTransport,
    LoadBalancer,
    TcpCheck,
)
from lbclient._background import THREAD_NAME
from lbclient.checks import HealthCheck
from lbclient.errors import CheckFailed
from lbclient.testing import TestServer, TLSCerts, closed_port

FAST = 0.05  # check interval in the runner tests, seconds


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run_check(check: HealthCheck, backend: Backend | str, asynchronous: bool) -> None:
    target = Backend.coerce(backend)
    if asynchronous:
        asyncio.run(check.acheck(target))
    else:
        check.check(target)


both = pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])


@pytest.fixture
def server() -> Iterator[TestServer]:
    with TestServer(name="s") as s:
        yield s


@pytest.fixture(scope="module")
def certs() -> TLSCerts:
    return TLSCerts("users.internal")


def health_threads() -> list[threading.Thread]:
    """The runners' event loop threads (their pools' threads are named lbclient-runner-worker_n)."""
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def no_check_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


def health_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "lbclient-health"]


def eventually(condition: Callable[[], bool], within: float = 20.0) -> None:
    """Wait for ``condition``; the bound only keeps a broken test from hanging."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


async def aeventually(condition: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# -- one check ---------------------------------------------------------------------------------


@both
def test_http_check_sends_method_path_and_host(server: TestServer, asynchronous: bool) -> None:
    check = HttpCheck("/healthz?deep=1", host="users", headers={"x-probe": "1"})
    run_check(check, server.address, asynchronous)
    run_check(HttpCheck(method="head"), server.address, asynchronous)
    first, second = server.requests
    assert (first.method, first.target, first.headers["host"]) == (
        "GET",
        "/healthz?deep=1",
        "users",
    )
    assert first.headers["x-probe"] == "1"
    assert first.headers["connection"] == "close"
    assert (second.method, second.target, second.headers["host"]) == ("HEAD", "/", server.address)


@both
def test_http_check_judges_the_status(server: TestServer, asynchronous: bool) -> None:
    server.mode = "status:503"
    with pytest.raises(CheckFailed, match=r"HTTP 503, expected \[200\]"):
        run_check(HttpCheck(), server.address, asynchronous)
    run_check(HttpCheck(expect=(200, 503)), server.address, asynchronous)
    server.mode = "status:204"
    run_check(HttpCheck(expect=204), server.address, asynchronous)
    seen: list[tuple[int, str]] = []

    def validator(status: int, headers: Any) -> bool:
        seen.append((status, headers["x-test-server"]))
        return False

    with pytest.raises(CheckFailed, match=r"validator rejected the response \(HTTP 204\)"):
        run_check(HttpCheck(validator=validator), server.address, asynchronous)
    assert seen == [(204, "s")]
    with pytest.raises(CheckFailed, match="validator raised KeyError"):
        run_check(HttpCheck(validator=lambda s, h: h["nope"]), server.address, asynchronous)


@both
@pytest.mark.parametrize("mode", ["reset", "close"])
def test_http_check_fails_on_a_broken_response(mode: str, asynchronous: bool) -> None:
    with TestServer(mode) as bad, pytest.raises((CheckFailed, OSError), match=r"closed|reset"):
        run_check(HttpCheck(), bad.address, asynchronous)


@both
def test_checks_fail_on_a_closed_port(asynchronous: bool) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    for check in (HttpCheck(), TcpCheck()):
        with pytest.raises(ConnectionRefusedError):
            run_check(check, dead, asynchronous)


@both
def test_checks_time_out_on_a_server_that_never_answers(asynchronous: bool) -> None:
    with TestServer("hang") as hang, pytest.raises(TimeoutError):
        run_check(HttpCheck(timeout=0.2), hang.address, asynchronous)


@both
def test_tcp_check_connects(server: TestServer, asynchronous: bool) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    run_check(TcpCheck(), server.address, asynchronous)  # passes: returns
    with pytest.raises(ConnectionRefusedError):
        run_check(TcpCheck(), dead, asynchronous)
    # Run by the balancer, the verdicts land in its health.
    lb = LoadBalancer([server.address, dead], health_check=TcpCheck(interval=FAST))

    def verdicts() -> dict[str, bool | None]:
        return {b.backend.address: b.checked for b in lb.snapshot().backends}

    def decided() -> bool:
        return None not in verdicts().values()

    async def run_task() -> None:
        async with lb:
            await aeventually(decided)

    if asynchronous:
        asyncio.run(run_task())
    else:
        with lb:
            eventually(decided)
    assert verdicts() == {server.address: True, dead: False}
    assert lb.ready(server.address)
    assert not lb.ready(dead)


@both
def test_tls_checks_use_the_logical_name(certs: TLSCerts, asynchronous: bool) -> None:
    with TestServer(ssl_context=certs.server_context()) as tls:
        trust = certs.client_context()
        run_check(
            HttpCheck("/h", host="users.internal", tls=True, ssl_context=trust),
            tls.address,
            asynchronous,
        )
        (request,) = tls.requests
        assert request.tls_server_name == "users.internal"
        assert request.headers["host"] == "users.internal"
        run_check(
            TcpCheck(tls=True, server_name="users.internal", ssl_context=trust),
            tls.address,
            asynchronous,
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            run_check(
                HttpCheck(host="orders.internal", tls=True, ssl_context=trust),
                tls.address,
                asynchronous,
            )
        with pytest.raises(ssl.SSLCertVerificationError):  # the system store does not know it
            run_check(TcpCheck(tls=True, server_name="users.internal"), tls.address, asynchronous)


@pytest.mark.parametrize(
    ("make", "error", "fragment"),
    [
        (lambda: HttpCheck("healthz"), ValueError, "path must start with '/'.*'healthz'"),
        (lambda: HttpCheck("/a b"), ValueError, "'/a b'"),
        (lambda: HttpCheck(host="a\r\nb"), ValueError, "host must be"),
        (lambda: HttpCheck(method="GE T"), ValueError, "'GE T'"),
        (lambda: HttpCheck(expect=700), ValueError, "expect must be HTTP statuses.*700"),
        (lambda: HttpCheck(expect=True), ValueError, "True"),
        (lambda: HttpCheck(validator=3), TypeError, "validator must be callable"),
        (lambda: HttpCheck(headers={"x": "a\nb"}), ValueError, "bad header 'x'"),
        (lambda: TcpCheck(interval=0), ValueError, "interval must be a finite number > 0, got 0"),
        (lambda: TcpCheck(timeout="1"), TypeError, "timeout must be a number of seconds, got '1'"),
        (lambda: TcpCheck(consecutive_failures=0), ValueError, "consecutive_failures must be >= 1"),
        (lambda: TcpCheck(consecutive_successes=True), TypeError, "consecutive_successes"),
        (lambda: TcpCheck(ssl_context=ssl.create_default_context()), ValueError, "tls=True"),
        (lambda: TcpCheck(tls=1), TypeError, "tls must be a bool, got 1"),
    ],
)
def test_bad_check_settings_named(
    make: Callable[[], object], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        make()


# -- runners -----------------------------------------------------------------------------------


class Recording(HttpCheck):
    """An HttpCheck that notes every result, in order, per backend, and every check begun
    once the test said the balancer was closed (``closed``): there must be none."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.results: dict[Backend, list[bool]] = {}
        self._lock = threading.Lock()
        self.closed = threading.Event()
        self.late: list[Backend] = []

    def note(self, backend: Backend, ok: bool) -> None:
        with self._lock:
            self.results.setdefault(backend, []).append(ok)

    def begin(self, backend: Backend) -> None:
        if self.closed.is_set():
            self.late.append(backend)

    def check(self, backend: Backend) -> None:
        self.begin(backend)
        try:
            super().check(backend)
        except Exception:
            self.note(backend, False)
            raise
        self.note(backend, True)

    async def acheck(self, backend: Backend) -> None:
        self.begin(backend)
        try:
            await super().acheck(backend)
        except Exception:
            self.note(backend, False)
            raise
        self.note(backend, True)

    def streak(self, backend: Backend) -> tuple[bool, int]:
        """The last result of ``backend`` and how many times in a row it came."""
        with self._lock:
            results = list(self.results.get(backend, []))
        last = results[-1]
        count = 0
        for ok in reversed(results):
            if ok != last:
                break
            count += 1
        return last, count

    def total(self) -> int:
        with self._lock:
            return sum(map(len, self.results.values()))


def watched(check: Recording, servers: list[TestServer]) -> tuple[LoadBalancer, list[Any]]:
    events: list[tuple[str, bool, tuple[bool, int]]] = []
    lb = LoadBalancer(
        [s.address for s in servers],
        health_check=check,
        on_change=lambda b, healthy: events.append((b.address, healthy, check.streak(b))),
    )
    return lb, events


def test_thread_runner_marks_a_stopped_backend_down_and_up_again() -> None:
    with TestServer(name="a") as a, TestServer(name="b") as b:
        check = Recording(
            "/healthz", host="users", interval=FAST, consecutive_failures=2, consecutive_successes=3
        )
        lb, events = watched(check, [a, b])
        assert no_check_threads()
        with lb:
            assert [t.daemon for t in health_threads()] == [True]
            eventually(lambda: len(events) == 2)
            # The first verdicts fire too (Pingora's observer stays silent there).
            assert sorted(events) == sorted(
                [(a.address, True, (True, 1)), (b.address, True, (True, 1))]
            )
            b.kill()
            eventually(lambda: not lb.ready(b.address))
            # Down exactly at the second failed check in a row: within interval x threshold.
            assert events[2] == (b.address, False, (False, 2))
            assert (
                lb.snapshot().backends[[x.address for x in lb.backends].index(b.address)].checked
                is False
            )
            assert {lb.select() for _ in range(6)} == {Backend(a.address)}
            b.restart()
            eventually(lambda: lb.ready(b.address))
            assert events[3] == (b.address, True, (True, 3))
            assert len(events) == 4
        check.closed.set()
        # close() joined the runner's thread and its pool: nothing is left to check anything.
        assert no_check_threads()
        assert check.late == []
        checked = [r for r in a.requests if r.target == "/healthz"]
        assert checked
        assert {r.headers["host"] for r in checked} == {"users"}


def test_task_runner_marks_a_stopped_backend_down_and_up_again() -> None:
    asyncio.run(task_runner_down_and_up())


async def task_runner_down_and_up() -> None:
    with TestServer(name="a") as a, TestServer(name="b") as b:
        check = Recording("/healthz", interval=FAST, consecutive_failures=2)
        lb, events = watched(check, [a, b])
        async with lb:
            tasks = health_tasks()
            assert len(tasks) == 1
            assert no_check_threads()  # a task, not a thread
            await aeventually(lambda: len(events) == 2)
            b.kill()
            await aeventually(lambda: not lb.ready(b.address))
            assert events[2] == (b.address, False, (False, 2))
            b.restart()
            await aeventually(lambda: lb.ready(b.address))
            assert events[3] == (b.address, True, (True, 1))
        check.closed.set()
        # The job's task (and with it every check it ran) has ended: nothing is left to run.
        assert tasks[0].done()
        assert not health_tasks()
        for _ in range(10):
            await asyncio.sleep(0)
        assert check.late == []


def test_checks_run_in_parallel() -> None:
    # Eight backends that never answer, a 1 s timeout: one round ends in about one timeout,
    # so every backend is down after the first round, long before eight timeouts in a row.
    hangs = [TestServer("hang", hang_seconds=5).start() for _ in range(8)]
    try:
        check = Recording(timeout=1.0, interval=60)
        lb, events = watched(check, hangs)
        with lb:
            eventually(lambda: len(events) == 8)
            assert all(not healthy for _, healthy, _ in events)
            assert check.total() == 8  # one round, all eight checked
    finally:
        for s in hangs:
            s.close()


def test_runner_starts_once_and_stops_with_the_last_user() -> None:
    with TestServer() as s:
        lb = LoadBalancer([s.address], health_check=TcpCheck(interval=FAST))
        lb.start()
        lb.start()
        assert len(health_threads()) == 1
        lb.close()
        assert len(health_threads()) == 1
        lb.close()
        assert no_check_threads()
        lb.close()  # one close too many is harmless
        plain = LoadBalancer([s.address])
        with plain:  # no check: nothing runs
            assert no_check_threads()


def test_sync_transport_starts_checks_with_its_first_request_and_stops_on_close() -> None:
    with TestServer(name="a") as a, TestServer(name="b") as b:
        lb = LoadBalancer([a.address, b.address], health_check=TcpCheck(interval=FAST))
        client = httpx.Client(transport=LBTransport(lb), base_url="http://users")
        assert no_check_threads()
        assert client.get("/").status_code == 200
        assert len(health_threads()) == 1
        client.get("/")
        assert len(health_threads()) == 1
        client.close()
        assert no_check_threads()
        with httpx.Client(transport=LBTransport(lb)):  # entering is enough
            assert len(health_threads()) == 1
        assert no_check_threads()


def test_shared_balancer_checks_stop_with_the_last_transport() -> None:
    with TestServer() as s:
        lb = LoadBalancer([s.address], health_check=TcpCheck(interval=FAST))
        one, two = LBTransport(lb), LBTransport(lb)
        with httpx.Client(transport=one), httpx.Client(transport=two) as second:
            second.get("http://users/")
            assert len(health_threads()) == 1
        assert no_check_threads()


def test_requests_adapter_starts_and_stops_checks() -> None:
    with TestServer() as s:
        lb = LoadBalancer([s.address], health_check=HttpCheck(interval=FAST))
        session = requests.Session()
        session.mount("http://users/", LBAdapter(lb))
        assert session.get("http://users/").status_code == 200
        assert len(health_threads()) == 1
        session.close()
        assert no_check_threads()


@pytest.mark.anyio
async def test_async_transport_starts_checks_and_leaves_nothing(anyio_backend: str) -> None:
    with TestServer(name="a") as a, TestServer(name="b") as b:
        check = Recording(interval=FAST)
        lb = LoadBalancer([a.address, b.address], health_check=check)
        client = httpx.AsyncClient(transport=AsyncLBTransport(lb), base_url="http://users")
        assert (await client.get("/")).status_code == 200
        if anyio_backend == "asyncio":
            assert len(health_tasks()) == 1
        else:  # trio: the checks run on a thread
            assert len(health_threads()) == 1
        while check.total() < 4:
            await anyio.sleep(0.01)
        await client.aclose()
        check.closed.set()
        # Its thread joined, or its task ended: nothing is left to run a check.
        assert no_check_threads()
        if anyio_backend == "asyncio":
            assert not health_tasks()
        assert check.late == []


def test_closing_from_on_change_does_not_wait_for_itself() -> None:
    with TestServer() as s:
        closed = threading.Event()
        box: list[LoadBalancer] = []

        def on_change(backend: Backend, healthy: bool) -> None:
            box[0].close()  # runs on a check thread: must not join itself
            closed.set()

        lb = LoadBalancer([s.address], health_check=TcpCheck(interval=FAST), on_change=on_change)
        box.append(lb)
        lb.start()
        assert closed.wait(20)
        eventually(no_check_threads)


def test_checks_go_on_when_the_event_loop_that_started_them_ends() -> None:
    with TestServer() as s:
        check = Recording(interval=FAST)
        lb = LoadBalancer([s.address], health_check=check)

        async def forget() -> None:
            await lb.astart()  # a user that never closes; its loop ends

        async def use() -> None:
            async with lb:
                start = check.total()
                await aeventually(lambda: check.total() > start)

        asyncio.run(forget())
        asyncio.run(use())  # the second loop's user still gets checks
        lb.close()  # the first user's close
        eventually(no_check_threads)


class Stalling(TcpCheck):
    """A check that holds its event loop for a while (a slow, blocking validator, say)."""

    def __init__(self) -> None:
        super().__init__(interval=FAST)
        self.entered = threading.Event()

    async def acheck(self, backend: Backend) -> None:
        self.entered.set()
        time.sleep(0.3)


def test_closing_from_another_thread_stops_a_task_runner_before_returning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with TestServer() as s:
        check = Stalling()
        lb = LoadBalancer([s.address], health_check=check)
        reports: list[bool] = []
        original = lb.report_check

        def counting(backend: Backend | str, ok: bool, detail: str = "", **kw: int) -> bool:
            reports.append(ok)
            return original(backend, ok, detail, **kw)

        monkeypatch.setattr(lb, "report_check", counting)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(lb.astart(), loop).result(10)
            assert check.entered.wait(10)  # a check is running on the loop's thread
            lb.close()
            done = len(reports)
            # When close() returned, the job's task had ended on that loop: nothing is left
            # to report, however many turns the loop takes.
            tasks = asyncio.run_coroutine_threadsafe(_health_tasks(), loop).result(10)
            assert tasks == []
            asyncio.run_coroutine_threadsafe(_turns(10), loop).result(10)
            assert len(reports) == done
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()


async def _health_tasks() -> list[asyncio.Task[Any]]:
    return health_tasks()


async def _turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def test_a_check_keeps_one_deadline_over_every_address(monkeypatch: pytest.MonkeyPatch) -> None:
    # A listener whose accept queue is full: new connections are never answered.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    refused = closed_port()
    real = socket.getaddrinfo

    def two_addresses(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "svc.internal":  # first a silent address, then a refusing one
            return real("127.0.0.1", port, socket.AF_INET, socket.SOCK_STREAM) + real(
                "127.0.0.1", refused, socket.AF_INET, socket.SOCK_STREAM
            )
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    try:
        for check in (TcpCheck(timeout=0.3), HttpCheck(timeout=0.3)):
            # The silent address used up the timeout: no second address is tried.
            with pytest.raises(TimeoutError):
                check.check(Backend(f"svc.internal:{port}"))
    finally:
        for sock in [full, *fillers]:
            sock.close()


def test_request_text_must_be_ascii() -> None:
    with pytest.raises(ValueError, match="gesundheit"):
        HttpCheck("/gesundheit/\u20ac")
    with pytest.raises(ValueError, match="bad header"):
        HttpCheck(headers={"x-name": "caf\u00e9"})
