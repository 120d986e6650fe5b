"""Prometheus metrics: ``register(transport, service="users")``, with the ``metrics`` extra
(``pip install 'lbclient[metrics]'``).

One call registers what a balancer, a transport or an adapter does under a ``service`` label.
Requests are counted in lbclient's own structures, a few integer increments per attempt under
one lock; prometheus-client is only called at scrape time, when a collector reads the counts
and the balancer's snapshot. A balancer's registration counts the requests of every client
(transport or adapter) using it, made before or after; a transport's or an adapter's counts
its own. Backends that leave the set leave the metrics.

Every series has the ``service`` label; those per backend have ``backend`` (``host:port``) too:

* ``lbclient_requests_total{result, sent}``: requests, by the outcome of their last attempt.
* ``lbclient_requests_unavailable_total``: requests that found no backend (per service).
* ``lbclient_attempts_total{result, sent}``: attempts, by outcome.
* ``lbclient_retries_total``, ``lbclient_hedges_total``: attempts after a request's first
  (hedges aside), and hedged attempts.
* ``lbclient_retry_budget_exhausted_total``: retries and hedges to the backend kept back by an
  empty retry budget.
* ``lbclient_ejections_total{reason}``: passive ejections; ``reason`` is
  ``consecutive_failures``, ``consecutive_5xx`` or ``probe_failed``.
* ``lbclient_restorations_total``, ``lbclient_probes_total``: ejected backends restored by
  their probe request, and probe requests whose outcome was reported (each one restores its
  backend or ejects it again).
* ``lbclient_attempt_duration_seconds``: a histogram of the seconds from an attempt's start to
  its response head or its failure.
* ``lbclient_backend_healthy``, ``_ejected``, ``_enabled``, ``_ready``: 1 or 0.
* ``lbclient_backend_in_flight``: attempts in flight (every client of the balancer's).
* ``lbclient_backend_latency_estimate_seconds``: the balancer's latency estimate.
* ``lbclient_backend_load_report{field}``: the latest load report the backend sent, a sample per
  field it carried (``cpu_utilization``, ``named_metrics.kv_cache_usage_perc``, ...);
  ``lbclient_backend_load_report_age_seconds``: its age; ``lbclient_load_reports_total{result}``:
  reports kept (``kept``) and refused, by why (``not finite``, ``unknown field``, ``stale``...).
* ``lbclient_panic``: 1 while panic mode is on (per service).
* ``lbclient_discovery_refreshes_total``, ``lbclient_discovery_failures_total``: when the
  balancer discovers its backends (per service); ``lbclient_discovery_part_failures_total{part}``:
  parts of its answers that failed while the rest was used (DNS: ``part`` is the record type).
* A watched discovery (etcd, Kubernetes), per service: ``lbclient_discovery_watch_connected``
  (1 while its stream is open), ``lbclient_discovery_watch_revision`` (the revision seen),
  ``lbclient_discovery_watch_reconnects_total``, ``_relists_total``, ``_events_total``,
  ``_skipped_total`` (bad values and garbage lines).

``result`` is ``success`` (a response whose status is not in ``failure_statuses``),
``server_error`` (one whose status is), ``connection_failure``, ``timeout``, ``local_error``
(not the backend's), ``cancelled`` (a hedge that lost its race, an interrupted request) or
``error`` (an error that is not a failure of the attempt); ``sent`` is ``yes`` (a response came
back), ``maybe`` (the request may have reached the server) or ``never``. Ejections, probes and
restorations are those the watched requests caused; the health gauges and ``in_flight`` are
the balancer's own, read from :meth:`~lbclient.LoadBalancer.snapshot`.
"""

from __future__ import annotations

import bisect
import math
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
except ImportError as exc:  # the extra is not installed
    raise ImportError(
        "lbclient.metrics needs prometheus-client: pip install 'lbclient[metrics]'"
    ) from exc

from lbclient._config import AdapterConfig, config_of
from lbclient._metric_families import WATCH_FIELDS
from lbclient._metric_families import families as _families
from lbclient._metric_families import reported as _reported
from lbclient._metric_families import watched as _watched
from lbclient._observe import WatchedPlan, attach, detach
from lbclient._plan import Fault
from lbclient.backend import Backend, shown
from lbclient.balancer import LoadBalancer
from lbclient.errors import NoBackendAvailable
from lbclient.retry import Attempt, Failure

__all__ = ["DEFAULT_BUCKETS", "LBCollector", "Registration", "register"]

#: The attempt duration histogram's bucket bounds, in seconds (prometheus-client's defaults).
DEFAULT_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)

#: Ejection reasons, always shown (zero until one happens).
REASONS: Final = ("consecutive_failures", "consecutive_5xx", "probe_failed")


#: Every (result, sent) an attempt or a request may end with; counted by index.
OUTCOMES: Final = (
    ("success", "yes"),
    ("server_error", "yes"),
    ("connection_failure", "never"),
    ("connection_failure", "maybe"),
    ("timeout", "never"),
    ("timeout", "maybe"),
    ("local_error", "never"),
    ("cancelled", "maybe"),
    ("error", "maybe"),
)
_SUCCESS, _SERVER_ERROR, _REFUSED, _BROKEN, _CONNECT_TIMEOUT, _TIMEOUT, _LOCAL = range(7)
_CANCELLED, _ERROR = 7, 8


class _Counts:
    """One backend's counts, changed under its meter's lock."""

    __slots__ = (
        "attempts",
        "buckets",
        "ejections",
        "exhausted",
        "hedges",
        "probes",
        "requests",
        "restorations",
        "retries",
        "seconds",
    )

    def __init__(self, bounds: int) -> None:
        #: Attempts and requests by outcome, indexed as :data:`OUTCOMES`.
        self.attempts = [0] * len(OUTCOMES)
        self.requests = [0] * len(OUTCOMES)
        self.ejections: dict[str, int] = {}
        self.retries = self.hedges = self.probes = self.exhausted = self.restorations = 0
        #: Attempt durations per bucket (not cumulative; the last one is above every bound).
        self.buckets = [0] * (bounds + 1)
        self.seconds = 0.0

    def copy(self) -> _Counts:
        twin = _Counts(len(self.buckets) - 1)
        twin.attempts = list(self.attempts)
        twin.requests = list(self.requests)
        twin.ejections = dict(self.ejections)
        twin.retries, twin.hedges, twin.probes = self.retries, self.hedges, self.probes
        twin.exhausted, twin.restorations = self.exhausted, self.restorations
        twin.buckets = list(self.buckets)
        twin.seconds = self.seconds
        return twin


def _failure(fault: Fault) -> int:
    """The outcome of a failed attempt (an index into :data:`OUTCOMES`)."""
    if fault.failure is Failure.LOCAL:
        return _LOCAL
    if fault.failure is Failure.NEVER_SENT:
        return _CONNECT_TIMEOUT if fault.timed_out else _REFUSED
    return _TIMEOUT if fault.timed_out else _BROKEN


class _Meter:
    """Counts the requests of the clients it watches, per backend address. It is its own
    watch: it keeps nothing per request, so watching costs no allocation; it is told of rare
    steps only, and counts each request's attempts when the request ends."""

    #: Not told of every attempt's start, head and body (see :class:`~lbclient._observe.Watch`).
    steps = False
    propagates = False

    #: Requests answered at their first attempt wait in :attr:`_done` until a scrape or until
    #: this many wait.
    BATCH = 4096

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._lock = threading.Lock()
        self._counts: dict[str, _Counts] = {}
        self.unavailable = 0
        #: (address, outcome, seconds) of requests answered at their first attempt, counted
        #: at the next read: a deque's append is atomic, so the common request takes no lock
        #: and does no arithmetic.
        self._done: deque[tuple[str, int, float]] = deque()

    def _of(self, backend: Backend) -> _Counts:
        """Under the lock: the counts of ``backend``."""
        counts = self._counts.get(backend.address)
        if counts is None:
            counts = self._counts[backend.address] = _Counts(len(self.bounds))
        return counts

    def _tally(self) -> None:
        """Under the lock: count the requests waiting in :attr:`_done`."""
        done, bounds = self._done, self.bounds
        while done:
            address, outcome, seconds = done.popleft()
            counts = self._counts.get(address)
            if counts is None:
                counts = self._counts[address] = _Counts(len(bounds))
            counts.attempts[outcome] += 1
            counts.requests[outcome] += 1
            counts.buckets[bisect.bisect_left(bounds, seconds)] += 1
            counts.seconds += seconds

    def read(self, current: Iterable[str]) -> dict[str, _Counts]:
        """A copy of the counts of the backends in ``current``; those of the others are
        dropped."""
        keep = set(current)
        with self._lock:
            self._tally()
            for gone in [a for a in self._counts if a not in keep]:
                del self._counts[gone]
            return {address: counts.copy() for address, counts in self._counts.items()}

    # -- Observer ----------------------------------------------------------------------------

    def watch(self, plan: WatchedPlan, request: object, url: object) -> _Meter:
        return self

    # -- Watch: the common path counts a whole request at its end, under one lock ------------

    def attempt(
        self, plan: WatchedPlan, backend: Backend, kind: str, resend: int, probe: bool
    ) -> None:
        if kind == "first":
            return
        with self._lock:
            counts = self._of(backend)
            if kind == "hedge":
                counts.hedges += 1
            else:
                counts.retries += 1

    def headers(self, plan: WatchedPlan, backend: Backend) -> None:
        return None

    def responded(self, plan: WatchedPlan, backend: Backend, status: int, seconds: float) -> None:
        pass

    def failed(self, plan: WatchedPlan, backend: Backend, attempt: Attempt, fault: Fault) -> None:
        pass

    def finished(self, plan: WatchedPlan, backend: Backend, ok: bool) -> None:
        pass

    def abandoned(self, plan: WatchedPlan, backend: Backend) -> None:
        with self._lock:
            self._of(backend).attempts[_CANCELLED] += 1

    def health(self, plan: WatchedPlan, backend: Backend, change: str, reason: str) -> None:
        with self._lock:
            counts = self._of(backend)
            if change == "ejected":
                counts.ejections[reason] = counts.ejections.get(reason, 0) + 1
            elif change == "restored":
                counts.restorations += 1
            if reason in ("probe_failed", "probe_succeeded"):  # a probe decided it
                counts.probes += 1

    def refused(self, plan: WatchedPlan, backend: Backend | None) -> None:
        if backend is not None:
            with self._lock:
                self._of(backend).exhausted += 1

    def ended(self, plan: WatchedPlan, result: object, error: BaseException | None) -> None:
        attempts = plan.attempts
        if error is None and len(attempts) == 1:  # the common case: one attempt, a response
            attempt = attempts[0]
            outcome = _SERVER_ERROR if attempt.status in plan.failure_statuses else _SUCCESS
            waiting = self._done
            waiting.append((attempt.backend.address, outcome, attempt.seconds))
            if len(waiting) > self.BATCH:  # nobody reads: count them now, keep the queue short
                with self._lock:
                    self._tally()
            return
        faults = plan.faults or {}
        failures = plan.failure_statuses
        # Each recorded attempt: (backend, outcome, seconds).
        done = [
            (
                a.backend,
                _failure(faults[i])
                if i in faults
                else _SERVER_ERROR
                if a.status in failures
                else _SUCCESS,
                a.seconds,
            )
            for i, a in enumerate(attempts)
        ]
        # The request: the attempt its response came from, or its last failure.
        unavailable = False
        backend: Backend | None = None
        outcome = _ERROR
        if error is None:
            status = getattr(result, "status_code", None)
            for (b, o, _), a in zip(reversed(done), reversed(attempts), strict=True):
                if a.status == status:
                    backend, outcome = b, o
                    break
        elif not attempts and isinstance(error, NoBackendAvailable):
            unavailable = True
        elif attempts and attempts[-1].failure is not None:
            backend, outcome = done[-1][0], done[-1][1]
        else:  # an error that is not a failure of the attempt, or a cancellation
            backend = plan.latest
            if not isinstance(error, Exception):
                outcome = _CANCELLED
        bounds = self.bounds
        with self._lock:
            for b, o, seconds in done:
                counts = self._of(b)
                counts.attempts[o] += 1
                counts.buckets[bisect.bisect_left(bounds, seconds)] += 1
                counts.seconds += seconds
            if unavailable:
                self.unavailable += 1
            elif backend is not None:
                self._of(backend).requests[outcome] += 1


class _Source:
    """One registration's part of a registry's metrics."""

    def __init__(
        self,
        service: str,
        balancer: LoadBalancer,
        target: AdapterConfig[Any] | LoadBalancer,
        meter: _Meter,
    ) -> None:
        self.service = service
        self.balancer = balancer
        self.target = target
        self.meter = meter


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class LBCollector:
    """The collector of one registry: every registration made with it, read at scrape time.
    Made and registered by :func:`register`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: list[_Source] = []

    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples (so the registry sees name clashes)."""
        return list(_families().values())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            sources = list(self._sources)
        families = _families()
        for source in sources:
            self._fill(families, source)
        discovered = {
            "discovery_refreshes",
            "discovery_failures",
            "discovery_part_failures",
            *WATCH_FIELDS,
        }
        for name, family in families.items():
            if name not in discovered or family.samples:
                yield family

    @staticmethod
    def _fill(families: dict[str, Metric], source: _Source) -> None:
        service = source.service
        snapshot = source.balancer.snapshot()
        meter = source.meter
        counts = meter.read(b.backend.address for b in snapshot.backends)
        bounds = meter.bounds
        idle = _Counts(len(bounds))

        def add(name: str, labels: list[str], value: float) -> None:
            family = families[name]
            assert isinstance(family, (CounterMetricFamily, GaugeMetricFamily))
            family.add_metric(labels, value)

        for entry in snapshot.backends:
            address = entry.backend.address
            mine = [service, address]
            add("backend_healthy", mine, float(entry.healthy))
            add("backend_ejected", mine, float(entry.ejected))
            add("backend_enabled", mine, float(entry.enabled))
            add("backend_ready", mine, float(entry.ready))
            add("backend_in_flight", mine, entry.in_flight)
            if entry.latency is not None:
                add("backend_latency_estimate_seconds", mine, entry.latency)
            _reported(add, mine, entry)
            c = counts.get(address, idle)
            for (result, sent), n in zip(OUTCOMES, c.requests, strict=True):
                if n:
                    add("requests", [*mine, result, sent], n)
            for (result, sent), n in zip(OUTCOMES, c.attempts, strict=True):
                if n:
                    add("attempts", [*mine, result, sent], n)
            add("retries", mine, c.retries)
            add("hedges", mine, c.hedges)
            add("retry_budget_exhausted", mine, c.exhausted)
            for reason in sorted({*REASONS, *c.ejections}):
                add("ejections", [*mine, reason], c.ejections.get(reason, 0))
            add("restorations", mine, c.restorations)
            add("probes", mine, c.probes)
            running = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip((*bounds, math.inf), c.buckets, strict=True):
                running += n
                buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), running))
            duration = families["duration"]
            assert isinstance(duration, HistogramMetricFamily)
            duration.add_metric(mine, buckets, sum_value=c.seconds)
        add("unavailable", [service], meter.unavailable)
        add("panic", [service], float(snapshot.panic))
        # Discovery's counts, where the balancer discovers its backends (read by name: a
        # snapshot without them has none).
        discovers = getattr(source.balancer, "discovery", None) is not None
        for name in ("discovery_refreshes", "discovery_failures"):
            value = _number(getattr(snapshot, name, None))
            if value is not None and (discovers or value):
                add(name, [service], value)
        for part, n in sorted(
            dict(getattr(snapshot, "discovery_part_failures", None) or {}).items()
        ):
            add("discovery_part_failures", [service, str(part)], float(n))
        _watched(add, service, getattr(snapshot, "discovery_watch", None))

    def add(self, source: _Source) -> None:
        with self._lock:
            if any(s.service == source.service for s in self._sources):
                raise ValueError(
                    f"service {source.service!r} is already registered with this registry"
                )
            self._sources.append(source)

    def remove(self, source: _Source) -> bool:
        """Take ``source`` out; return whether none is left."""
        with self._lock:
            if source in self._sources:
                self._sources.remove(source)
            return not self._sources


_lock = threading.Lock()
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, LBCollector] = weakref.WeakKeyDictionary()


class Registration:
    """What :func:`register` registered; :meth:`unregister` takes it back."""

    def __init__(self, source: _Source, registry: CollectorRegistry) -> None:
        self._source: _Source | None = source
        self._registry = registry

    @property
    def service(self) -> str:
        assert self._source is not None, "unregistered"
        return self._source.service

    def unregister(self) -> None:
        """Stop counting and drop the service's metrics from the registry. Idempotent."""
        with _lock:
            source, self._source = self._source, None
            if source is None:
                return
            detach(source.target, source.meter)
            collector = _collectors.get(self._registry)
            if collector is not None and collector.remove(source):
                del _collectors[self._registry]
                self._registry.unregister(collector)

    def __repr__(self) -> str:
        state = "unregistered" if self._source is None else f"service={self._source.service!r}"
        return f"<lbclient.metrics.Registration {state}>"


def _check_buckets(buckets: Iterable[float]) -> tuple[float, ...]:
    bounds = tuple(buckets)
    if not bounds or any(
        isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0
        for b in bounds
    ):
        raise ValueError(f"buckets must be finite numbers of seconds > 0, got {bounds!r}")
    if list(bounds) != sorted(set(bounds)):
        raise ValueError(f"buckets must be increasing, got {bounds!r}")
    return tuple(float(b) for b in bounds)


def register(
    target: object,
    *,
    service: str,
    registry: CollectorRegistry | None = None,
    buckets: Iterable[float] = DEFAULT_BUCKETS,
) -> Registration:
    """Count the requests of ``target`` under the label ``service="..."`` and expose them, with
    its balancer's health and load, through ``registry``.

    * ``target``: a :class:`~lbclient.LoadBalancer` (every transport and adapter using it, made
      before or after), an :class:`~lbclient.LBTransport`, an
      :class:`~lbclient.AsyncLBTransport` or an :class:`~lbclient.LBAdapter` (its own
      requests).
    * ``service``: the value of the ``service`` label; one per registry.
    * ``registry``: a ``prometheus_client.CollectorRegistry`` (its default ``REGISTRY``);
      anything else is a TypeError naming it.
    * ``buckets``: the bounds of the attempt duration histogram, in seconds
      (:data:`DEFAULT_BUCKETS`).

    Returns a :class:`Registration`; ``unregister()`` undoes it.
    """
    if not isinstance(service, str) or not service:
        raise ValueError(f"service must be a non-empty str, got {shown(service)}")
    bounds = _check_buckets(buckets)
    registry = REGISTRY if registry is None else registry
    if not isinstance(registry, CollectorRegistry):
        raise TypeError(
            "registry must be a prometheus_client.CollectorRegistry (or None: its REGISTRY), "
            f"got {shown(registry)} ({type(registry).__name__})"
        )
    attached: AdapterConfig[Any] | LoadBalancer
    if isinstance(target, LoadBalancer):
        attached = balancer = target
    else:
        client = config_of(target)
        if client is None:
            raise TypeError(
                "target must be a LoadBalancer, an LBTransport, an AsyncLBTransport or an "
                f"LBAdapter, got {target!r}"
            )
        attached, balancer = client, client.balancer
    source = _Source(service, balancer, attached, _Meter(bounds))
    with _lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = LBCollector()
            registry.register(collector)  # names clashing with another collector's: ValueError
            _collectors[registry] = collector
        collector.add(source)
        attach(attached, source.meter)
    return Registration(source, registry)
