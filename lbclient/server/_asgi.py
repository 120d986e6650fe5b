"""The ASGI middleware: counts each HTTP request in a :class:`LoadTracker`, adds the load report
to the responses that ask for it, and answers the probe path itself.

What lives here: :class:`LoadReportingASGI` and the few ASGI types it needs. What may not: a
rule of counting or reporting (the tracker and the report hold them), buffering a body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

from lbclient.server._common import PROBE_PATH, probe_answer, tracker_of
from lbclient.server._report import FORMAT_HEADER, REPORT_HEADER, requested_format
from lbclient.server._tracker import LoadTracker, Metric

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


class LoadReportingASGI:
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gate = self._gate
        if gate is not None:
            answer = gate.enter(scope, send)
            if answer is not None:  # counted as arrived: see Gate in _counting.c
                try:
                    await self.app(scope, receive, answer)
                except Exception:
                    answer.end(True)
                    raise
                except BaseException:
                    answer.drop()
                    raise
                answer.end(False)
                return
        # The Python path: any request where the compiled path is not built, and the rest.
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
