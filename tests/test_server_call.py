"""Calling LoadReportingASGI where its call is compiled (Middleware and Call of
lbclient/server/_counting.c): what the call makes is driven as the ``async def`` it stands for
would be. Stepped, thrown into, closed, collected unfinished or never started, it yields,
returns, raises, warns and counts as the middleware's Python path (a real coroutine over a
tracker counting in Python) does, step by step; and servers take the middleware for an ASGI 3
app."""

from __future__ import annotations

import asyncio
import collections.abc
import functools
import gc
import importlib.metadata
import inspect
import sys
import types
import warnings
from collections.abc import Callable, Generator
from typing import Any

import pytest
from conftest import compiled_module
from hypothesis import given, settings
from hypothesis import strategies as st

from lbclient.server import LoadReportingASGI, LoadTracker, _tracker

counting = compiled_module(
    "lbclient.server._counting",
    "compiled server path",
    "the middleware's call is its async def",
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Stop(BaseException):
    """Neither an Exception nor a cancellation: a request it ends is dropped."""


class Token:
    """An awaitable that yields its name to whoever drives the call, and returns what is sent
    back."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __await__(self) -> Generator[str, Any, Any]:
        received = yield self.name
        return received


def scripted_app(script: list[tuple[Any, ...]], record: list[Any], holder: dict[str, Any]) -> Any:
    """An app doing ``script``'s actions in order, writing what it sees to ``record``."""

    async def app(scope: Any, receive: Any, send: Any) -> Any:
        for action in script:
            kind = action[0]
            if kind == "wait":
                record.append(("got", await Token(action[1])))
            elif kind == "catch":
                try:
                    record.append(("got", await Token(action[1])))
                except Exception as error:
                    record.append(("caught", type(error).__name__, str(error)))
            elif kind == "start":
                await send({"type": "http.response.start", "status": action[1], "headers": []})
            elif kind == "body":
                await send({"type": "http.response.body", "body": b"ok"})
            elif kind == "raise":
                raise RuntimeError("from the app")
            elif kind == "raise stop":  # a coroutine turns it into a RuntimeError
                raise StopIteration("from the app")
            elif kind == "stop":
                raise Stop("stopped")
            elif kind == "return":
                return action[1]
            elif kind == "stubborn":  # waits on whatever is thrown in, GeneratorExit too
                try:
                    record.append(("got", await Token(action[1])))
                except BaseException as error:
                    record.append(("ignored", type(error).__name__))
                    record.append(("got", await Token("again")))
            elif kind == "reenter":
                try:
                    holder["driven"].send(None)
                except ValueError as error:
                    record.append(("reentered", str(error)))
        return None

    return app


SCOPE = {"type": "http", "path": "/work", "method": "GET", "headers": []}


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


class Side:
    """A middleware over the scripted app, its tracker counting in C (``compiled``: driven
    through its call) or in Python (driven through its Python path's coroutine)."""

    def __init__(self, compiled: bool, script: list[tuple[Any, ...]], app: Any = None) -> None:
        self.clock = Clock()
        self.record: list[Any] = []
        self.sent: list[Any] = []
        self.holder: dict[str, Any] = {}
        saved = _tracker.COMPILED
        _tracker.COMPILED = compiled
        try:
            tracker = LoadTracker(clock=self.clock, share_in_flight=False)
        finally:
            _tracker.COMPILED = saved
        self.middleware = LoadReportingASGI(
            app or scripted_app(script, self.record, self.holder), tracker=tracker
        )
        assert (self.middleware._gate is not None) == compiled

        def send(message: Any) -> Token:
            self.sent.append(message)
            return Token("sent")

        scope = {**SCOPE, "headers": list(SCOPE["headers"])}
        if compiled:
            self.driven: Any = self.middleware(scope, receive, send)
            assert type(self.driven) is counting.Call
        else:
            self.driven = self.middleware._in_python(scope, receive, send)
            assert inspect.iscoroutine(self.driven)
        self.holder["driven"] = self.driven

    def do(self, operation: tuple[Any, ...]) -> tuple[Any, ...]:
        kind = operation[0]
        try:
            if kind == "send":
                value = self.driven.send(operation[1])
            elif kind == "throw":
                value = self.driven.throw(THROWN[operation[1]]())
            elif kind == "throw_args":  # deprecated forms, and refused ones
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    value = self.driven.throw(*THROWN_ARGS[operation[1]]())
            else:
                value = self.driven.close()
        except StopIteration as stop:
            return ("returned", stop.value)
        except BaseException as error:  # every kind is compared, KeyboardInterrupt aside
            if isinstance(error, KeyboardInterrupt):  # pragma: no cover - a real interrupt
                raise
            cause = error.__cause__
            return ("raised", type(error).__name__, str(error), type(cause).__name__)
        return ("yielded" if kind != "close" else "closed", value)

    def state(self) -> tuple[Any, ...]:
        tracker = self.middleware.tracker
        self.clock.now += 0.25
        return tracker.rif, tracker.report(), self.sent, self.record


THROWN: dict[str, Callable[[], BaseException]] = {
    "error": lambda: RuntimeError("thrown"),
    "cancel": asyncio.CancelledError,
    "stop": lambda: Stop("thrown stop"),
    "exit": GeneratorExit,
    "stop iteration": lambda: StopIteration("thrown"),
}
THROWN_ARGS: dict[str, Callable[[], tuple[Any, ...]]] = {
    "not an exception": lambda: (1,),
    "a class and an instance of a subclass": lambda: (LookupError, KeyError("k")),
    "a class and its argument": lambda: (KeyError, "k"),
    "an instance and a value": lambda: (KeyError("k"), "v"),
    "a traceback that is not one": lambda: (KeyError, None, 5),
}

ACTIONS = st.one_of(
    st.tuples(st.just("wait"), st.sampled_from(["a", "b"])),
    st.tuples(st.just("catch"), st.sampled_from(["c", "d"])),
    st.tuples(st.just("start"), st.sampled_from([200, 503])),
    st.tuples(st.just("body")),
    st.tuples(st.just("raise")),
    st.tuples(st.just("raise stop")),
    st.tuples(st.just("stop")),
    st.tuples(st.just("return"), st.sampled_from([None, 7])),
    st.tuples(st.just("reenter")),
    st.tuples(st.just("stubborn"), st.sampled_from(["e"])),
)
OPERATIONS = st.one_of(
    st.tuples(st.just("send"), st.sampled_from([None, None, None, 5])),
    st.tuples(st.just("throw"), st.sampled_from(sorted(THROWN))),
    st.tuples(st.just("throw_args"), st.sampled_from(sorted(THROWN_ARGS))),
    st.tuples(st.just("close")),
)


def collected(side: Side) -> tuple[int, list[type[Warning]], list[str]]:
    """What dropping the side's call leaves: requests in flight, the warnings it gave, and the
    exceptions its closing raised (reported as unraisable)."""
    unraisable: list[str] = []
    hook = sys.unraisablehook
    sys.unraisablehook = lambda raised: unraisable.append(type(raised.exc_value).__name__)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            side.holder.clear()
            del side.driven  # its last reference: finalised now, as CPython does (no cycle)
    finally:
        sys.unraisablehook = hook
    return side.middleware.tracker.rif, [w.category for w in caught], unraisable


@settings(max_examples=500, deadline=None)
@given(
    script=st.lists(ACTIONS, max_size=6),
    operations=st.lists(OPERATIONS, max_size=8),
)
def test_the_call_is_driven_as_the_python_paths_coroutine(
    script: list[tuple[Any, ...]], operations: list[tuple[Any, ...]]
) -> None:
    compiled, python = Side(True, script), Side(False, script)
    for operation in operations:
        done = compiled.do(operation), python.do(operation)
        assert done[0] == done[1], operation
        assert compiled.state() == python.state(), operation
    assert collected(compiled) == collected(python)
    assert compiled.state() == python.state()
    assert compiled.middleware.tracker.rif == 0


@pytest.mark.parametrize(
    "operations",
    [
        [("send", None), ("throw", "exit")],
        [("send", None), ("close",)],
        [("send", None), ("throw", "cancel"), ("close",)],
        [("send", None)],  # and collected under way
    ],
)
def test_an_app_that_waits_on_after_generator_exit_is_met_as_a_coroutine_meets_it(
    operations: list[tuple[Any, ...]],
) -> None:
    # The app's coroutine is closed (GeneratorExit thrown in) and yields again: a coroutine
    # closing it raises RuntimeError where it awaits, an error for the request.
    script = [("stubborn", "e"), ("start", 200)]
    compiled, python = Side(True, script), Side(False, script)
    done = [[side.do(operation) for operation in operations] for side in (compiled, python)]
    assert done[0] == done[1]
    assert compiled.state() == python.state()
    assert collected(compiled) == collected(python)
    assert compiled.state() == python.state()
    assert compiled.middleware.tracker.rif == 0


def test_a_call_never_started_warns_as_a_coroutine_and_counts_nothing() -> None:
    side = Side(True, [("start", 200)])
    rif, caught, unraisable = collected(side)
    assert (rif, caught, unraisable) == (0, [RuntimeWarning], [])
    assert side.middleware.tracker.report().rps_fractional == 0


def test_a_call_dropped_under_way_leaves_flight_as_a_coroutine_does() -> None:
    sides = [Side(True, [("wait", "a"), ("start", 200)]), Side(False, [("wait", "a")])]
    for side in sides:
        assert side.do(("send", None)) == ("yielded", "a")
        assert side.middleware.tracker.rif == 1
    assert [collected(side) for side in sides] == [(0, [], []), (0, [], [])]
    assert [side.middleware.tracker.report().eps for side in sides] == [0, 0]


def test_a_finished_call_refuses_to_run_again_as_a_coroutine() -> None:
    sides = [Side(True, [("start", 200)]), Side(False, [("start", 200)])]
    operations = [("send", None), ("send", None), ("send", None), ("throw", "error"), ("close",)]
    done = [[side.do(operation) for operation in operations] for side in sides]
    assert done[0] == done[1]
    reused = ("raised", "RuntimeError", "cannot reuse already awaited coroutine", "NoneType")
    assert done[0] == [("yielded", "sent"), ("returned", None), reused, reused, ("closed", None)]


def test_a_call_closed_or_thrown_into_before_it_starts_runs_nothing() -> None:
    for first in [("close",), ("throw", "error")]:
        sides = [Side(True, [("start", 200)]), Side(False, [("start", 200)])]
        done = [[side.do(first), side.do(("send", None))] for side in sides]
        assert done[0] == done[1]
        reused = ("raised", "RuntimeError", "cannot reuse already awaited coroutine", "NoneType")
        assert done[0][1] == reused
        assert [side.sent for side in sides] == [[], []]
        assert [collected(side) for side in sides] == [(0, [], []), (0, [], [])]


AWAITED: dict[str, Callable[[], Any]] = {}


def _awaitables() -> None:
    class Future:
        def __await__(self) -> Generator[str, Any, str]:
            yield "pending"
            return "done"

    class Coroutine:
        def __await__(self) -> Any:
            return asyncio.sleep(0)  # a coroutine, which await refuses

    class NotIterator:
        def __await__(self) -> Any:
            return 5

    @types.coroutine
    def generator() -> Generator[str, Any, None]:
        yield "generated"

    AWAITED.update(
        {
            "future": Future,
            "coroutine returned by __await__": Coroutine,
            "non-iterator": NotIterator,
            "types.coroutine": generator,
            "a number": lambda: 5,
            "none": lambda: None,
        }
    )


_awaitables()


@pytest.mark.filterwarnings("ignore:coroutine 'sleep' was never awaited:RuntimeWarning")
@pytest.mark.parametrize("kind", sorted(AWAITED))
def test_whatever_the_app_returns_is_awaited_as_await_does(kind: str) -> None:
    def app(scope: Any, receive: Any, send: Any) -> Any:
        return AWAITED[kind]()

    sides = [Side(True, [], app), Side(False, [], app)]
    for _ in range(3):
        done = [side.do(("send", None)) for side in sides]
        assert done[0] == done[1]
        assert sides[0].state() == sides[1].state()
    assert sides[0].middleware.tracker.rif == 0


@pytest.mark.parametrize(
    ("raised", "seen"),
    [
        (LookupError("no coroutine"), ("raised", "LookupError", "no coroutine", "NoneType")),
        # PEP 479: leaving a coroutine, a StopIteration is a RuntimeError (else its driver
        # would take it for the call's return)
        (
            StopIteration("no coroutine"),
            ("raised", "RuntimeError", "coroutine raised StopIteration", "StopIteration"),
        ),
    ],
)
def test_an_app_that_raises_when_called_is_counted_as_an_error(
    raised: Exception, seen: tuple[Any, ...]
) -> None:
    def app(scope: Any, receive: Any, send: Any) -> Any:
        raise raised

    sides = [Side(True, [], app), Side(False, [], app)]
    assert [side.do(("send", None)) for side in sides] == [seen] * 2
    assert sides[0].state() == sides[1].state()
    assert sides[0].middleware.tracker.report().eps > 0


def test_an_app_raising_stop_iteration_ends_an_asyncio_task_as_a_coroutine_does() -> None:
    def app(scope: Any, receive: Any, send: Any) -> Any:
        raise StopIteration("x")

    middleware = LoadReportingASGI(app)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="coroutine raised StopIteration"):
            await asyncio.ensure_future(middleware({**SCOPE}, receive, print))
        with pytest.raises(RuntimeError, match="coroutine raised StopIteration"):
            await middleware({**SCOPE}, receive, print)

    asyncio.run(main())
    assert middleware.tracker.rif == 0


def test_a_coroutine_or_call_being_awaited_is_refused_as_await_refuses_it() -> None:
    async def main() -> None:
        pending = Token("pending")

        async def waiting() -> None:
            await pending

        owned = waiting()
        assert owned.send(None) == "pending"  # suspended in its await: another's

        def app(scope: Any, receive: Any, send: Any) -> Any:
            return owned

        outcomes = []
        for compiled in (True, False):
            side = Side(compiled, [], app)
            outcomes.append(side.do(("send", None)))
            assert side.middleware.tracker.rif == 0
        assert outcomes[0] == outcomes[1]
        assert outcomes[0][1:3] == ("RuntimeError", "coroutine is being awaited already")
        owned.close()

        # One call awaited by two: the second is refused.
        release = asyncio.Event()

        async def held(scope: Any, receive: Any, send: Any) -> None:
            await release.wait()

        middleware = LoadReportingASGI(held)
        call = middleware({**SCOPE}, receive, print)

        async def awaiting() -> None:
            await call

        first = asyncio.ensure_future(awaiting())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="being awaited already"):
            await awaiting()
        release.set()
        await first
        assert middleware.tracker.rif == 0

    asyncio.run(main())


def test_a_finished_call_lets_go_of_the_request_as_a_finished_coroutine_does() -> None:
    import weakref

    class Receive:
        async def __call__(self) -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

    sides = []
    for compiled in (True, False):
        side = Side(compiled, [("start", 200)])
        given = Receive()
        scope = {**SCOPE}
        call = side.middleware if compiled else side.middleware._in_python
        side.driven.close()  # the side's own, not started: made again with this receive
        side.driven = call(scope, given, lambda message: Token("sent"))
        side.holder["driven"] = side.driven
        assert side.do(("send", None))[0] == "yielded"
        assert side.do(("send", None)) == ("returned", None)
        side.holder.clear()
        sides.append((weakref.ref(given), weakref.ref(side.middleware)))
        del given
    assert [kept() is None for kept, _ in sides] == [True, True]


def test_a_subclass_that_skips_the_init_is_still_taken_for_an_asgi3_app() -> None:
    class Own(LoadReportingASGI):
        def __init__(self, app: Any) -> None:  # sets what it uses itself
            self.app = app
            self.tracker = LoadTracker()
            self._gate = None
            self.probe_path = None

    middleware = Own(scripted_app([("start", 200), ("body",)], [], {}))
    assert inspect.iscoroutinefunction(middleware.__call__)

    async def send(message: Any) -> None:
        return None

    asyncio.run(middleware.__call__({**SCOPE}, receive, send))
    assert middleware.tracker.report().rps_fractional > 0


def test_an_app_that_replaces_itself_while_called_is_held_until_it_returns() -> None:
    middleware: Any = None

    async def replacing(scope: Any, receive: Any, send: Any) -> None:
        del middleware.app  # the middleware's hold on it gone while it runs
        await send({"type": "http.response.start", "status": 200, "headers": []})

    middleware = LoadReportingASGI(functools.partial(replacing))

    async def send(message: Any) -> None:
        return None

    asyncio.run(middleware({**SCOPE}, receive, send))
    assert middleware.tracker.rif == 0
    assert middleware.tracker.report().rps_fractional > 0


def test_servers_take_the_middleware_for_an_asgi3_app() -> None:
    uvicorn = pytest.importorskip("uvicorn")
    middleware = LoadReportingASGI(scripted_app([], [], {}))
    assert inspect.iscoroutinefunction(middleware.__call__)
    assert asyncio.iscoroutinefunction(middleware.__call__)
    config = uvicorn.Config(middleware, lifespan="off")
    config.load()
    assert config.interface == "asgi3"


def test_a_call_is_a_coroutine_to_asyncio() -> None:
    middleware = LoadReportingASGI(scripted_app([("start", 204), ("body",)], [], {}))
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message["type"])

    async def main() -> None:
        call = middleware({**SCOPE}, receive, send)
        assert asyncio.iscoroutine(call)
        assert isinstance(call, collections.abc.Coroutine)
        assert inspect.isawaitable(call)
        await asyncio.create_task(call)
        await middleware(scope={**SCOPE}, receive=receive, send=send)  # as keywords too
        await middleware.__call__({**SCOPE}, receive, send)  # what servers read, called

    asyncio.run(main())
    assert sent == ["http.response.start", "http.response.body"] * 3
    assert middleware.tracker.report().rps_fractional > 0
    assert middleware.tracker.rif == 0


def test_a_call_steps_as_an_iterator_too() -> None:
    side = Side(True, [("wait", "a"), ("return", 3)])
    assert side.driven.__await__() is side.driven
    assert side.driven.cr_await is None
    assert next(side.driven) == "a"
    assert side.driven.cr_await is not None
    assert not side.driven.cr_running
    with pytest.raises(StopIteration) as stopped:
        next(side.driven)
    assert stopped.value.value is None  # the middleware's call returns None, as its async def
    assert side.middleware.tracker.rif == 0


def test_a_subclass_with_its_own_call_keeps_it() -> None:
    seen: list[str] = []

    class Logged(LoadReportingASGI):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            seen.append(scope["path"])
            await super().__call__(scope, receive, send)

    middleware = Logged(scripted_app([("start", 200), ("body",)], [], {}))
    assert middleware.__call__.__func__ is Logged.__call__  # type: ignore[attr-defined]

    async def send(message: Any) -> None:
        return None

    asyncio.run(middleware({**SCOPE}, receive, send))
    assert seen == ["/work"]
    assert middleware.tracker.report().rps_fractional > 0


def test_the_app_is_read_at_each_call() -> None:
    calls: list[str] = []

    def app_named(name: str) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            calls.append(name)

        return app

    middleware = LoadReportingASGI(app_named("first"))

    async def main() -> None:
        await middleware({**SCOPE}, receive, print)
        middleware.app = app_named("second")
        await middleware({**SCOPE}, receive, print)
        del middleware.app
        with pytest.raises(AttributeError):
            middleware.app  # noqa: B018 - the read is what is tested
        with pytest.raises(AttributeError):
            await middleware({**SCOPE}, receive, print)

    asyncio.run(main())
    assert calls == ["first", "second"]
    assert middleware.tracker.rif == 0
    with pytest.raises(TypeError, match="Gate or None"):
        middleware._gate = "a gate"


def test_a_copy_calls_its_own_app_and_counts_in_the_same_tracker() -> None:
    import copy

    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append("app")

    middleware = LoadReportingASGI(app)
    twin = copy.copy(middleware)
    assert twin.app is app
    assert twin.tracker is middleware.tracker
    assert vars(twin)["__call__"] is not vars(middleware)["__call__"]
    asyncio.run(twin({**SCOPE}, receive, print))
    asyncio.run(twin.__call__({**SCOPE}, receive, print))
    assert calls == ["app", "app"]
    assert middleware.tracker.report().rps_fractional > 0


def test_a_task_of_a_call_shows_as_a_tasks_coroutine_does() -> None:
    middleware = LoadReportingASGI(scripted_app([("start", 200), ("body",)], [], {}))

    async def main() -> str:
        task = asyncio.ensure_future(middleware({**SCOPE}, receive, print))
        shown = repr(task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return shown

    assert "LoadReportingASGI.__call__" in asyncio.run(main())
    assert middleware.tracker.rif == 0


def test_a_middleware_made_without_its_init_refuses_rather_than_crashes() -> None:
    bare = counting.Middleware()
    assert bare._gate is None
    with pytest.raises(AttributeError):
        bare.app  # noqa: B018 - the read is what is tested
    call = bare({**SCOPE}, receive, print)
    with pytest.raises(AttributeError, match="_in_python"):
        call.send(None)
    with pytest.raises(TypeError):
        bare({**SCOPE}, receive)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_anyio_and_trio_run_the_call_as_a_coroutine(backend: str) -> None:
    # Awaited, started as a task of its own (trio wraps what it sees is not a Python frame),
    # cancelled by a scope while the app waits.
    import anyio

    if backend == "trio":
        pytest.importorskip("trio", reason="trio (the dev extra) runs anyio's trio backend")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await anyio.sleep(60 if scope["path"] == "/slow" else 0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = LoadReportingASGI(app)
    sent: list[str] = []
    # anyio before 4.14 starts only what inspect.iscoroutine calls a coroutine (its own
    # backend for asyncio): there, middleware.__call__ (README: the compiled call).
    version = tuple(int(part) for part in importlib.metadata.version("anyio").split(".")[:2])
    started = middleware if backend == "trio" or version >= (4, 14) else middleware.__call__

    async def send(message: Any) -> None:
        sent.append(message["type"])

    async def main() -> None:
        await middleware({**SCOPE}, receive, send)
        async with anyio.create_task_group() as group:
            group.start_soon(started, {**SCOPE}, receive, send)
        with anyio.move_on_after(0.05):
            await middleware({**SCOPE, "path": "/slow"}, receive, send)
        assert middleware.tracker.rif == 0

    anyio.run(main, backend=backend)
    assert sent == ["http.response.start", "http.response.body"] * 2
    assert middleware.tracker.report().rps_fractional > 0


def test_a_portal_runs_the_call_as_starlettes_test_client_does() -> None:
    # Starlette's TestClient calls the app through an anyio BlockingPortal from its thread.
    from anyio.from_thread import start_blocking_portal

    middleware = LoadReportingASGI(scripted_app([("start", 200), ("body",)], [], {}))
    sent: list[str] = []

    async def send(message: Any) -> None:
        sent.append(message["type"])

    with start_blocking_portal() as portal:
        assert portal.call(middleware, {**SCOPE}, receive, send) is None
    assert sent == ["http.response.start", "http.response.body"]
    assert middleware.tracker.rif == 0


def test_a_middleware_dropped_is_freed_at_once_with_its_tracker() -> None:
    # No cycle holds it (what __call__ reads as holds it weakly): its tracker's slot in the
    # server's shared file is given back when the last reference goes, collector or not.
    import weakref

    middleware = LoadReportingASGI(scripted_app([], [], {}))
    shown = middleware.__call__
    tracker = weakref.ref(middleware.tracker)
    collecting = gc.isenabled()
    gc.disable()
    try:
        del middleware
        assert tracker() is None
    finally:
        if collecting:
            gc.enable()
    with pytest.raises(ReferenceError, match="is gone"):
        asyncio.run(shown({**SCOPE}, receive, print))
