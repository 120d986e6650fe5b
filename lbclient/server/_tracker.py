"""One process's load as its middleware sees it: requests in flight, a latency estimate, request
and error rates, and the metrics the service adds; :class:`LoadTracker` makes the report.

What lives here: the counting, under one small lock (a middleware calls :meth:`begin` and
:meth:`end` from any thread or task), and the user's metric callables, read when a report is
made. Every time comes from the injected clock. What may not: HTTP, a framework, a thread of
its own.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final, NoReturn

from lbclient.server._report import (
    Metric,
    Reading,
    ServerReport,
    check_metric_name,
    check_named,
    reading,
    requested_format,
)
from lbclient.server._rings import Ring, median, nearest
from lbclient.server._shared import Shared

#: Whether this interpreter runs without the interpreter lock (a free-threaded build), where the
#: compiled counter, which relies on that lock, is not even imported.
FREE_THREADED: Final = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
try:  # the optional compiled per-request path (hatch_build.py builds it where a compiler is)
    if FREE_THREADED:  # pragma: no cover - not this project's interpreter
        raise ImportError("the compiled counter relies on the interpreter lock")
    from lbclient.server import _counting
except ImportError:  # pragma: no cover - a build without a compiler
    _counting = None  # type: ignore[assignment]

__all__ = ["COMPILED", "LATENCY_WINDOW", "RATE_WINDOW", "Arrival", "LoadTracker", "Metric"]

logger = logging.getLogger("lbclient.server")


#: How many of the latest latencies the median is taken over, for each number of requests found
#: in flight at arrival.
LATENCY_WINDOW: Final = 16
#: Over how many seconds (whole-second buckets) requests and errors per second are counted.
RATE_WINDOW: Final = 10
_INFINITY: Final = float("inf")
#: Named metrics the tracker writes itself.
RESERVED: Final = frozenset({"rif", "latency_ms"})
#: Seconds a rendered report's rates, latency and metrics are reused for (requests in flight
#: are always exact): the report added to every response costs a string join, not a report.
REFRESH: Final = 0.01
#: Arrivals are told apart by the requests they found in flight up to this many (more count
#: as this many).
MAX_FOUND: Final = 64
#: Seconds after which the latencies kept for a number found in flight, none newer, are not used.
FOUND_AGE: Final = 30.0
#: Where each form of a report writes the requests in flight and the latency (rendered as 0,
#: then replaced): (the mark, the text before the RIF, the text between RIF and latency).
_MARKS: Final = {
    "TEXT": (
        "named_metrics.rif=0, named_metrics.latency_ms=0",
        "named_metrics.rif=",
        ", named_metrics.latency_ms=",
    ),
    "JSON": ('"rif": 0, "latency_ms": 0', '"rif": ', ', "latency_ms": '),
}

#: A form's report as rendered: when, the text before its RIF, between its RIF and latency, and
#: after; and the header values made of it since, by the requests in flight they write (the
#: latency estimate for that many made with the first), as text and as latin-1 bytes.
_Line = tuple[float, str, str, str, dict[int, str], dict[int, bytes]]

#: Requests ended that are counted together (sooner where a report is made): a request's end
#: appends to a list, and every so many the list is counted, in one loop under the lock.
FOLD_EVERY: Final = 64

#: Whether new trackers count in the compiled counter, which lets
#: :class:`~lbclient.server.LoadReportingASGI` take each usual request's path in C (the counts
#: and reports are the same either way). It relies on the interpreter lock: False on a
#: free-threaded build, and where the module was not built. (A tracker whose windows are larger
#: than the compiled counter keeps, ``MOST_WINDOW`` latencies or ``MOST_RATE_WINDOW`` seconds,
#: counts in Python.)
COMPILED: bool = _counting is not None

#: Where the compiled counter reads ``time.monotonic``'s clock itself (the same clock, rounded
#: alike); elsewhere it calls ``time.monotonic``.
_OWN_CLOCK: Final = sys.platform.startswith("linux")

#: Seconds before a tracker tries again to join the processes of its server, where the shared
#: file stayed locked, and how many tries it makes in all.
JOIN_RETRY: Final = 5.0
JOIN_TRIES: Final = 3


def _address(value: object) -> int | str | None:
    """What a request says of the address it came to: a TCP port (an int, or a string of ASCII
    digits), or a Unix socket's path (a string starting with ``/``, or ``@`` for an abstract
    one); None for anything else (not known)."""
    if isinstance(value, str):
        if value[:1] in ("/", "@"):
            return value
        if value.isascii() and value.isdigit() and len(value) <= 5:
            value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        return None
    return value


#: What :meth:`LoadTracker.begin` returns: the arrival's clock value, and the requests it found
#: in flight.
Arrival = tuple[float, int]


class LoadTracker:
    """Counts one process's requests and makes its load report.

    A request is in flight from :meth:`begin` to :meth:`end` (or :meth:`drop`). ``end`` records
    its latency (``end``'s time less ``begin``'s) and counts it, and an error if ``error``;
    ``drop`` (a cancelled request: no answer finished, no fault of the app's) only takes it out
    of the count.

    The report (:meth:`report`):

    * ``rif``: requests in flight now; in the report a response carries (:meth:`rendered`),
      those besides the request it answers, which leaves as the client reads it: what the
      client's next request would find, as a probe's report says;
    * ``latency_ms``: the latency a request arriving now may expect, as Prequal's servers
      estimate it: the median latency of the last ``latency_window`` requests (16 by default,
      errors included) that found as many requests in flight when they arrived as there are now
      (``rif``; from :data:`MAX_FOUND` on, all count as that many). Latency is counted by the
      load a request met, so a server whose slots are full reports the wait a request joining
      it had, where a median of all requests would still show the unqueued ones: a client then
      avoids it before its queue forms. Where none found as many lately (within
      :data:`FOUND_AGE` seconds), the nearest fewer, else the nearest more; 0 before the first
      request;
    * ``rps_fractional`` and ``eps``: requests ended, and errors, per second over the last
      ``rate_window`` seconds (10 by default; whole-second buckets on the clock since the tracker
      was made: the current second's part and the ``rate_window - 1`` seconds before it, or
      since the tracker was made if that is later, and never less than one second);
    * ``cpu_utilization``, ``application_utilization`` and ``named_metrics.<name>``: what the
      given callables return, each left out when it raises or returns anything but a number
      from 0 to :data:`~lbclient.reports.MAX_VALUE` (logged once per metric); at most
      ``MAX_NAMED - 2`` named metrics, whose reports fit in ``MAX_LENGTH`` characters (what a
      client reads; a ValueError otherwise).

    With ``share_in_flight`` (the default), requests in flight are the server's, not the
    process's alone: the middlewares tell the tracker the address (port, or Unix socket) of the
    first request they see (:meth:`listening`), and every process that accepts on that
    listening socket (the workers of ``gunicorn -w N`` or ``uvicorn --workers N``, whose
    trackers do the same) counts in a slot of a small shared file
    (``/dev/shm/lbclient-rif-<uid>-<pid namespace>-<port, or unix-<hash of the path>>``);
    ``rif`` and the requests an arrival found are then this tracker's count and the other live
    processes' slots. Where that is not possible (not Linux, no listening socket found, the file
    refused, or ``share_in_flight=False``) each process counts its own. Rates, latencies and
    metrics are the process's own either way.

    ``clock`` (seconds, monotonic) is the only clock read. Thread-safe: requests in flight are
    counted without a lock (see ``_flying``; where they are shared, each change is published
    without one too, see ``Shared.track``), and so is a request's end: it is appended to a list
    of ends that are counted later, together, under one lock (every :data:`FOLD_EVERY` ends,
    and whenever a report is made, which always counts every end before it). The lock is held
    for list operations (the latency median is sorted out of it); the metric callables run
    outside it.

    Where :data:`COMPILED`, the tracker counts in C instead (``lbclient/server/_counting.c``,
    each step under the interpreter lock): requests in flight, published as they change, and
    each end counted as it comes, by the same rules, with the same reports.
    """

    def __init__(
        self,
        *,
        cpu_utilization: Metric | None = None,
        application_utilization: Metric | None = None,
        named_metrics: Mapping[str, Metric] | None = None,
        clock: Callable[[], float] = time.monotonic,
        latency_window: int = LATENCY_WINDOW,
        rate_window: int = RATE_WINDOW,
        share_in_flight: bool = True,
    ) -> None:
        if not isinstance(share_in_flight, bool):
            raise TypeError(f"share_in_flight must be a bool, got {share_in_flight!r}")
        if isinstance(latency_window, bool) or not isinstance(latency_window, int):
            raise TypeError(f"latency_window must be an int, got {latency_window!r}")
        if isinstance(rate_window, bool) or not isinstance(rate_window, int):
            raise TypeError(f"rate_window must be an int, got {rate_window!r}")
        if latency_window < 1 or rate_window < 1:
            raise ValueError(
                f"latency_window and rate_window must be >= 1, got {latency_window}, {rate_window}"
            )
        named = dict(named_metrics or {})
        for name in named:
            check_metric_name(name)
            if name in RESERVED:
                raise ValueError(f"named metric {name!r} is the tracker's own")
        check_named(list(named))
        self._cpu = reading("cpu_utilization", cpu_utilization)
        self._application = reading("application_utilization", application_utilization)
        self._named = tuple(Reading(name, function) for name, function in named.items())
        self._clock = clock
        self._lock = threading.Lock()
        # Requests ended and not yet counted: (arrival, end time, error), see end and _fold.
        self._ended: deque[tuple[Arrival, float, bool]] = deque()
        # Rates: one bucket per second since the tracker was made, in a ring of rate_window;
        # requests count in the current second's bucket until the clock reaches ``_until``.
        self._origin = clock()
        # One entry per request in flight: a list's append and pop are each one step no other
        # thread can split, so counting in flight takes no lock. The compiled counter is the
        # same (its len, append and pop), and counts each end as it comes, with the rates and
        # latencies below kept in it instead (see lbclient/server/_counting.c).
        self._flying: list[None] | _counting.Counter
        if (
            COMPILED
            and latency_window <= _counting.MOST_WINDOW
            and rate_window <= _counting.MOST_RATE_WINDOW
        ):
            self._flying = _counting.Counter(
                None if clock is time.monotonic and _OWN_CLOCK else clock,
                self._origin,
                latency_window,
                rate_window,
                MAX_FOUND,
                FOUND_AGE,
            )
        else:
            self._flying = []
        self._seconds = [-1] * rate_window  # which second each bucket counts
        self._requests = [0] * rate_window
        self._errors = [0] * rate_window
        self._slot = 0
        self._until = self._origin  # the first request turns to its second's bucket
        # Latencies by the requests each arrival found in flight (up to MAX_FOUND), each a ring
        # of the window's latest (sorted only for a report).
        self._found = [Ring(latency_window) for _ in range(MAX_FOUND + 1)]
        #: Per form: the report as rendered (see _Line), for REFRESH seconds.
        self._lines: dict[str, _Line] = {}
        #: This process's slot among the server's processes (None: counted alone), and whether
        #: the port was told (or nothing is to be shared).
        self._shared: Shared | None = None
        self.joined = not share_in_flight
        self._joining = threading.Lock()
        self._join_after = -_INFINITY
        self._join_tries = 0

    def listening(self, address: object, *, exact: bool = False) -> None:
        """The address the requests arrive at, as the middlewares read it from their first
        request: a port (an int, or a string of digits), or a Unix socket's path; anything else
        is not known. With ``share_in_flight``, the tracker joins the other processes accepting
        on this process's listening socket at that address (or, where it is not known or not
        this process's, unless ``exact`` says it is the socket's own, on the process's only
        listening address), once: tried again :data:`JOIN_RETRY` seconds later where the shared
        file stayed locked, :data:`JOIN_TRIES` times in all. Never raises (what fails is logged
        and the process counts its own), never waits for another thread that is joining: that
        request is counted as the process's alone."""
        if self.joined or not self._joining.acquire(blocking=False):
            return
        try:
            now = self._clock()
            if self.joined or now < self._join_after:
                return
            try:
                shared = Shared.join(_address(address), exact=exact)
            except TimeoutError as error:
                self._join_tries += 1
                if self._join_tries < JOIN_TRIES:
                    logger.warning("%s; in flight counted per process until a later try", error)
                    self._join_after = now + JOIN_RETRY
                    return
                logger.warning("%s; in flight counted per process", error)
                shared = None
            except Exception:
                logger.exception("requests in flight not shared: counted per process")
                shared = None
            self.joined = True
            if shared is None:
                return
            self._shared = shared  # set, then published: a begin after this publishes too
            shared.track(self._flying)
            if not isinstance(self._flying, list):
                shared.attach(self._flying)
        finally:
            self._joining.release()
        reference = weakref.ref(self)

        def forked() -> None:  # a child of a fork is not the slot's owner: it may join anew
            tracker = reference()
            if tracker is not None and tracker._shared is shared:
                if not isinstance(tracker._flying, list):
                    tracker._flying.share(None)
                tracker._shared = None
                tracker.joined = False
                tracker._joining = threading.Lock()  # a thread of the parent may have held it

        os.register_at_fork(after_in_child=forked)
        weakref.finalize(self, shared.leave)  # a tracker dropped gives its slot back

    def compiled_gate(self, probe_path: str | None) -> _counting.Gate | None:
        """The compiled path of an ASGI middleware's usual request, counting here and
        answering the probe at ``probe_path`` by the middleware's own (None: the tracker counts
        in Python, and so does the middleware)."""
        flying = self._flying
        if isinstance(flying, list):
            return None
        # A subclass's own encoded is called as it is (the compiled path reads no lines then).
        lines = self._lines if type(self).encoded is LoadTracker.encoded else None
        return _counting.Gate(flying, self, probe_path, requested_format, lines, REFRESH)

    @property
    def shared(self) -> bool:
        """Whether requests in flight are counted across the server's processes."""
        return self._shared is not None

    def _others(self, now: float) -> int:
        shared = self._shared
        return 0 if shared is None else shared.others(now)

    @property
    def rif(self) -> int:
        """Requests in flight now (the server's, where they are shared)."""
        return len(self._flying) + self._others(self._clock())

    @property
    def clock(self) -> Callable[[], float]:
        """The clock the tracker reads."""
        return self._clock

    def begin(self) -> Arrival:
        """A request arrived: count it in flight; returns its arrival (its start time, and the
        requests it found in flight), for :meth:`end`."""
        flying = self._flying
        now = self._clock()  # first: a clock that raises leaves nothing counted
        found = len(flying)
        flying.append(None)
        shared = self._shared
        if shared is None:
            return (now, found)
        try:
            return (now, found + shared.arrived(flying, now))
        except BaseException:  # nothing left counted, as where the clock raises
            self._out()
            raise

    def end(self, arrival: Arrival | float, *, error: bool = False) -> None:
        """The request of ``arrival`` (what :meth:`begin` returned; a start time alone is taken
        to have found in flight what is besides it now) is over: out of flight, its latency
        recorded, counted (and counted as an error if ``error``)."""
        flying = self._flying
        if not isinstance(flying, list):
            flying.end(arrival, error)
            return
        # The request leaves flight whatever goes wrong here: a bad arrival, a clock that raises.
        if isinstance(arrival, tuple):
            if (
                len(arrival) != 2
                or not isinstance(arrival[0], (float, int))
                or not isinstance(arrival[1], int)
            ):
                self._not_an_arrival(arrival)
        elif not isinstance(arrival, (float, int)):
            self._not_an_arrival(arrival)
        try:
            now = self._clock()
        except BaseException:
            self._out()
            raise
        if not isinstance(arrival, tuple):  # a start time alone: what is in flight besides it
            arrival = (arrival, len(flying) - 1 + self._others(now))
        try:  # noqa: SIM105 (contextlib.suppress would cost a context manager per request)
            flying.pop()
        except IndexError:  # an end without its begin
            pass
        shared = self._shared
        if shared is not None:
            shared.track(flying)
        # Counted later, in a batch (see _fold): a deque's append is one step no other thread
        # can split, so ending a request takes no lock.
        ended = self._ended
        ended.append((arrival, now, error))
        if len(ended) >= FOLD_EVERY:
            with self._lock:
                self._fold()

    def _not_an_arrival(self, arrival: object) -> NoReturn:
        self._out()
        raise TypeError(
            "an arrival is (start time, requests found), as begin() returns it, or a start "
            f"time; got {arrival!r}"
        )

    def _fold(self) -> None:
        """Count the requests ended since the last fold, in the order they ended: each one's
        latency in the ring of the requests it found in flight, and it (and its error) in the
        bucket of the second it ended in. The lock is held; requests that end meanwhile are
        folded by this fold or the next. (The compiled counter counts each end as it comes.)"""
        ended = self._ended
        rings = self._found
        requests, errors = self._requests, self._errors
        slot, until = self._slot, self._until
        popleft = ended.popleft
        while ended:
            (started, found), now, error = popleft()  # only a fold takes: never empty here
            latency = now - started
            if latency < 0.0:
                latency = 0.0
            if found < 0:
                found = 0
            elif found > MAX_FOUND:
                found = MAX_FOUND
            ring = rings[found]
            samples = ring.samples
            if now - ring.last > FOUND_AGE:  # what it kept is old: it starts afresh
                samples.clear()
                ring.next = 0
            if len(samples) < ring.size:
                samples.append(latency)
            else:
                samples[ring.next] = latency
                ring.next = (ring.next + 1) % ring.size
            ring.last = now
            if now >= until:
                self._turn(now)
                slot, until = self._slot, self._until
            requests[slot] += 1
            if error:
                errors[slot] += 1

    def _out(self) -> None:
        """One request fewer in flight (none below zero)."""
        try:  # noqa: SIM105 (contextlib.suppress would cost a context manager per request)
            self._flying.pop()
        except IndexError:  # an end without its begin
            pass
        shared = self._shared
        if shared is not None:
            shared.track(self._flying)

    def _turn(self, now: float) -> None:
        """Count in the bucket of the second ``now`` is in (the lock held): a bucket last used
        for an older second starts from 0."""
        second = int((now - self._origin) // 1.0)
        slot = second % len(self._seconds)
        if self._seconds[slot] != second:
            self._seconds[slot] = second
            self._requests[slot] = 0
            self._errors[slot] = 0
        self._slot = slot
        self._until = self._origin + second + 1.0

    def drop(self) -> None:
        """A request ended without an answer its app finished (cancelled): out of flight only."""
        self._out()

    def rendered(self, form: str) -> str:
        """The header value in ``form`` (``"TEXT"`` or ``"JSON"``) of the report a response
        carries, made as it starts: the requests in flight as of now besides the one it answers;
        the latency estimate for that many, and the rest, as of at most :data:`REFRESH` seconds
        ago."""
        now = self._clock()
        line, rif = self._current(form, now)
        text = line[4].get(rif)
        if text is None:
            text = self._text(line, rif, now)
        return text

    def encoded(self, form: str) -> bytes:
        """:meth:`rendered`, as the latin-1 bytes of an ASGI header value (made once a value)."""
        return self._encoded_at(form, self._clock())

    def _encoded_at(self, form: str, now: float) -> bytes:
        """:meth:`encoded` with the clock read (``now``), as the compiled path reads it."""
        line, rif = self._current(form, now)
        value = line[5].get(rif)
        if value is None:
            text = line[4].get(rif)
            if text is None:
                text = self._text(line, rif, now)
            value = line[5][rif] = text.encode("latin-1")
        return value

    def _current(self, form: str, now: float) -> tuple[_Line, int]:
        """``form``'s line as of ``now`` (rendered anew where it is :data:`REFRESH` seconds old),
        and the requests in flight a response's report says: those besides the one it answers,
        which is on its way out."""
        line = self._lines.get(form)
        if line is None or not 0.0 <= now - line[0] < REFRESH:
            line = self._line(form, now)
        rif = len(self._flying) - 1
        if rif < 0:
            rif = 0
        if self._shared is not None:
            rif += self._others(now)
        return line, rif

    def _line(self, form: str, now: float) -> _Line:
        """``form``'s report rendered anew as of ``now``, kept for :data:`REFRESH` seconds."""
        with self._lock:
            rates = self._rates(now)
        report = self._load(0, 0.0, rates)  # RIF and latency: written as each is asked
        mark, head, middle = _MARKS[form]
        before, _, after = report.render(form).partition(mark)
        line: _Line = (now, before + head, middle, after, {}, {})
        self._lines[form] = line  # a race renders twice, harmlessly
        return line

    def _text(self, line: _Line, rif: int, now: float) -> str:
        """The header value of ``line`` for ``rif`` in flight, with the latency estimate for
        that many as of ``now`` (kept in the line)."""
        with self._lock:
            samples = self._estimate(rif, now)
        text = line[4][rif] = f"{line[1]}{rif}{line[2]}{median(samples) * 1000:.6g}{line[3]}"
        return text

    def _estimate(self, rif: int, now: float) -> list[float]:
        """The latencies (seconds) whose median a request arriving to find ``rif`` in flight may
        expect, copied: those of the recent requests that found as many (any more than
        :data:`MAX_FOUND` count as that many); where there are none, or the newest of them is
        older than :data:`FOUND_AGE`, those of the nearest fewer, else the nearest more, with a
        newer one; else its own however old, or where it has none the nearest of any age; none
        before the first request. The lock is held."""
        if not isinstance(self._flying, list):
            return self._flying.samples(rif, now)
        self._fold()
        found = self._found
        key = rif if rif < MAX_FOUND else MAX_FOUND
        ring = found[key]
        if ring.last < now - FOUND_AGE:
            near = nearest(found, key, now - FOUND_AGE)
            if near is None and not ring.samples:
                near = nearest(found, key, -_INFINITY)
            if near is not None:
                ring = near
        return ring.samples[:]

    def report(self) -> ServerReport:
        """The load as it stands (see the class docstring for each field)."""
        now = self._clock()
        others = self._others(now)
        with self._lock:
            rif = len(self._flying) + others
            samples = self._estimate(rif, now)
            rates = self._rates(now)
        middle = median(samples)  # sorted here, out of the lock
        return self._load(rif, middle * 1000, rates)

    def _rates(self, now: float) -> tuple[float, float]:
        """Requests and errors per second over the rate window as of ``now`` (the lock held)."""
        if not isinstance(self._flying, list):
            return self._flying.rates(now)
        self._fold()
        elapsed = now - self._origin
        oldest = max(int(elapsed // 1.0) - len(self._seconds) + 1, 0)
        requests = errors = 0
        if min(self._seconds) >= oldest:  # every bucket in the window: a busy server
            requests, errors = sum(self._requests), sum(self._errors)
        else:
            for counted, done, failed in zip(
                self._seconds, self._requests, self._errors, strict=True
            ):
                if counted >= oldest:  # never later than now: the clock is monotonic
                    requests += done
                    errors += failed
        span = max(elapsed - oldest, 1.0)
        return requests / span, errors / span

    def _load(self, rif: int, latency_ms: float, rates: tuple[float, float]) -> ServerReport:
        """The report of ``rif``, ``latency_ms`` and ``rates``, with the metrics read now."""
        named: dict[str, float] = {}
        for metric in self._named:
            value = metric.read()
            if value is not None:
                named[metric.name] = value
        return ServerReport(  # positional: the fields' order
            rif,
            latency_ms,
            rates[0],
            rates[1],
            None if self._cpu is None else self._cpu.read(),
            None if self._application is None else self._application.read(),
            named,
        )
