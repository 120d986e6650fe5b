"""The WSGI middleware: counts each request in a :class:`LoadTracker`, adds the load report to
the responses that ask for it, and answers the probe path itself.

What lives here: :class:`LoadReportingWSGI`, the body it returns in place of the app's (lazy,
closed as PEP 3333 says) and the few WSGI types it needs. What may not: a rule of counting or
reporting (the tracker and the report hold them), buffering a body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Protocol

from lbclient.server._common import PROBE_PATH, probe_answer, tracker_of
from lbclient.server._report import REPORT_HEADER, requested_format
from lbclient.server._tracker import Arrival, LoadTracker, Metric

__all__ = ["LoadReportingWSGI", "StartResponse", "WSGIApp", "WSGIEnvironment"]

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
WSGIEnvironment = dict[str, Any]


class StartResponse(Protocol):
    """PEP 3333's ``start_response``."""

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = ..., /
    ) -> Callable[[bytes], object]: ...


WSGIApp = Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]

#: The WSGI environment key of the request header that asks for a report.
_ASKING = "HTTP_ENDPOINT_LOAD_METRICS_FORMAT"


class _Body:
    """The app's iterable, passed through lazily; the request is over when it is exhausted or
    closed, whichever comes first (an error raised while iterating or closing it makes the
    request an error). ``close()`` closes the app's iterable, if it has a ``close``."""

    __slots__ = ("_done", "_iterator", "_started", "_tracker", "inner", "status")

    def __init__(self, tracker: LoadTracker, started: Arrival) -> None:
        self._tracker = tracker
        self._started = started
        self.inner: Iterable[bytes] = ()
        self._iterator: Iterator[bytes] | None = None
        self._done = False
        self.status = 500  # until start_response says otherwise

    def __iter__(self) -> _Body:
        self._iterator = iter(self.inner)
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            self._iterator = iter(self.inner)
        try:
            return next(self._iterator)
        except StopIteration:
            self._finish(False)
            raise
        except BaseException:
            self._finish(True)
            raise

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        try:
            if close is not None:
                close()
        except BaseException:
            self._finish(True)
            raise
        self._finish(False)

    def _finish(self, error: bool) -> None:
        if not self._done:
            self._done = True
            self._tracker.end(self._started, error=error or self.status >= 500)


def _status(status: str) -> int:
    try:
        return int(status[:3])
    except ValueError:
        return 500


class LoadReportingWSGI:
    """WSGI middleware reporting the process's load (see :class:`LoadTracker` for the fields).

    * Each request is in flight from its arrival until the iterable the app returned is
      exhausted or closed (the server must close it, PEP 3333); its latency runs to the same
      point. It is an error if the app raised (calling it, iterating or closing its iterable)
      or its response status is 500 or more.
    * A request with ``endpoint-load-metrics-format: TEXT`` (or ``JSON``, any case) gets the
      report, made when ``start_response`` is called, in an ``endpoint-load-metrics`` header
      (unless the app set one itself); any other value, or none, gets none. The body is passed
      through as the app yields it.
    * A request for ``probe_path`` (``PATH_INFO``, any method; None: no probe) is answered here
      without calling the app and counts nowhere: 200, the report (TEXT unless JSON is asked)
      in the body and the ``endpoint-load-metrics`` header, and ``x-prequal-rif`` and
      ``x-prequal-latency-us``.

    The metrics are those of ``tracker``, or of a new tracker with ``cpu_utilization``,
    ``application_utilization`` and ``named_metrics`` (name -> callable).
    """

    def __init__(
        self,
        app: WSGIApp,
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

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        tracker = self.tracker
        if not tracker.joined:  # the first request: the port it came to, for sharing the count
            tracker.listening(environ.get("SERVER_PORT"))
        if environ.get("PATH_INFO") == self.probe_path:
            body, headers = probe_answer(self.tracker, requested_format(environ.get(_ASKING)))
            start_response("200 OK", headers)
            return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]
        asked = requested_format(environ.get(_ASKING))
        started = tracker.begin()
        answer = _Body(tracker, started)

        def reply(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None, /
        ) -> Callable[[bytes], object]:
            answer.status = _status(status)
            if asked is not None and all(name.lower() != REPORT_HEADER for name, _ in headers):
                headers = [*headers, (REPORT_HEADER, tracker.rendered(asked))]
            return start_response(status, headers, exc_info)

        try:
            answer.inner = self.app(environ, reply)
        except BaseException:
            tracker.end(started, error=True)
            raise
        return answer
