"""The ASGI middleware: counts each HTTP request in a :class:`LoadTracker`, adds the load report
to the responses that ask for it, and answers the probe path itself.

What lives here: :class:`LoadReportingASGI` and the few ASGI types it needs. What may not: a
rule of counting or reporting (the tracker and the report hold them), buffering a body.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from lbclient.server._common import PROBE_PATH, probe_answer, tracker_of
from lbclient.server._report import FORMAT_HEADER, REPORT_HEADER, requested_format
from lbclient.server._tracker import COMPILED, LoadTracker, Metric

__all__ = ["ASGIApp", "LoadReportingASGI", "Receive", "Scope", "Send"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_ASKING = FORMAT_HEADER.encode("latin-1")
_REPORT = REPORT_HEADER.encode("latin-1")
_REPORT_LENGTH = len(_REPORT)


#: The values clients send most, read without decoding (anything else: ``requested_format``).
_FORMS = {b"TEXT": "TEXT", b"JSON": "JSON", b"text": "TEXT", b"json": "JSON"}


def _asked(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == _ASKING:
            return _FORMS.get(value) or requested_format(value)
    return None


if TYPE_CHECKING or not COMPILED:
    _Called = object
    _CALLED: Any = None
else:
    #: Calling the middleware makes, in C, the awaitable its ``async def`` would make.
    from lbclient.server._counting import Middleware as _Called

    _CALLED = _Called.__call__


class LoadReportingASGI(_Called):
    """ASGI middleware reporting the process's load (see :class:`LoadTracker` for the fields).

    * Each HTTP request is in flight from its arrival until the app returns (or raises, or is
      cancelled); its latency runs to the same point. It is an error if the app raised or its
      response status is 500 or more; a cancelled request leaves the count and nothing else.
    * A request with ``endpoint-load-metrics-format: TEXT`` (or ``JSON``, any case) gets the
      report, made when its response starts, in an ``endpoint-load-metrics`` response header
      (unless the app set one itself); any other value, or none, gets none. Bodies stream as
      the app sends them.
    * A request for ``probe_path`` (the path the app would see, any method; None: no probe) is
      answered here without calling the app and counts nowhere: 200, the report (TEXT unless
      JSON is asked) in the body and the ``endpoint-load-metrics`` header, and
      ``x-prequal-rif`` and ``x-prequal-latency-us``.
    * Lifespan and WebSocket scopes pass through untouched.

    The metrics are those of ``tracker``, or of a new tracker with ``cpu_utilization``,
    ``application_utilization`` and ``named_metrics`` (name -> callable).

    Where the tracker counts in the compiled counter (:data:`~lbclient.server.COMPILED`), a
    request of the usual path (an HTTP request, not the probe path, after the first) is counted
    and its response watched in C (``lbclient/server/_counting.c``), with the same results.
    Where compiled, calling the middleware makes, in C, the awaitable its ``async def`` would
    make (driven, thrown into, closed and collected alike), and ``__call__`` read on an
    instance is still a coroutine function, as ASGI servers look for.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        probe_path: str | None = PROBE_PATH,
        cpu_utilization: Metric | None = None,
        application_utilization: Metric | None = None,
        named_metrics: Mapping[str, Metric] | None = None,
        tracker: LoadTracker | None = None,
    ) -> None:
        self.app = app
        self.probe_path = probe_path
        self.tracker = tracker_of(tracker, cpu_utilization, application_utilization, named_metrics)
        self._gate = self.tracker.compiled_gate(probe_path)

    def __new__(cls, *args: Any, **kwargs: Any) -> LoadReportingASGI:
        made = super().__new__(cls)
        made._show_call()  # here, not in __init__: a subclass may set itself up otherwise
        return made

    def _show_call(self) -> None:
        if _CALLED is not None and type(self).__call__ is _CALLED:
            # ASGI servers tell an ASGI 3 app by its __call__ being a coroutine function; the
            # call itself is the type's, made in C (see Middleware in _counting.c).
            vars(self)["__call__"] = _shown_call(weakref.ref(self))

    def __getstate__(self) -> dict[str, Any]:  # what copy.copy takes (app and _gate may be C's)
        state = {name: value for name, value in vars(self).items() if name != "__call__"}
        return {**state, "app": self.app, "_gate": self._gate}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    async def _in_python(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The Python path: every request where the compiled path is not built, and the rest.
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracker = self.tracker
        if not tracker.joined:  # the first request: the port it came to, for sharing the count
            server = scope.get("server")  # the socket's: (host, port), or (path, None)
            if isinstance(server, (tuple, list)) and len(server) == 2:
                tracker.listening(server[0] if server[1] is None else server[1], exact=True)
            else:
                tracker.listening(None)
        if scope["path"] == self.probe_path:
            await self._probe(scope, send)
            return
        for name, value in scope["headers"]:
            if name == _ASKING:
                asked = _FORMS.get(value) or requested_format(value)
                break
        else:
            asked = None
        failed = True  # an app that returns without a response gets a 500 from its server

        def reply(message: Message) -> Awaitable[None]:
            # Not a coroutine: the server's own send is what the app awaits, no frame between.
            nonlocal failed
            if message["type"] == "http.response.start":
                status = message["status"]
                try:
                    failed = bool(status >= 500)
                except Exception:  # not a status that compares: counted as an error
                    failed = True
                if asked is not None:
                    headers = list(message.get("headers", ()))
                    for name, _ in headers:
                        if len(name) == _REPORT_LENGTH and name.lower() == _REPORT:
                            break  # the app reported itself
                    else:
                        headers.append((_REPORT, tracker.encoded(asked)))
                        message = {**message}
                        message["headers"] = headers
            return send(message)

        started = tracker.begin()
        try:
            await self.app(scope, receive, reply)
        except Exception:
            tracker.end(started, error=True)
            raise
        except BaseException:
            tracker.drop()
            raise
        tracker.end(started, error=failed)

    if TYPE_CHECKING or not COMPILED:
        __call__ = _in_python

    async def _probe(self, scope: Scope, send: Send) -> None:
        body, headers = probe_answer(self.tracker, _asked(scope["headers"]))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else body}
        )


def _shown_call(reference: weakref.ref[LoadReportingASGI]) -> ASGIApp:
    """Calling the middleware ``reference`` holds, as a coroutine function: what ``__call__``
    reads as on the instance. It holds the middleware weakly, so that a middleware dropped is
    freed at once (and its tracker's slot given back), not left to the cycle collector."""

    async def __call__(scope: Scope, receive: Receive, send: Send) -> None:
        middleware = reference()
        if middleware is None:
            raise ReferenceError("the LoadReportingASGI this __call__ was read from is gone")
        await _CALLED(middleware, scope, receive, send)

    return __call__
