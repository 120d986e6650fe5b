"""The metric families :mod:`lbclient.metrics` exports, made afresh at each scrape, and the
samples of one backend's load report. Needs prometheus-client (the ``metrics`` extra); imported
by :mod:`lbclient.metrics` alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from lbclient.reports import FIELDS

__all__ = ["WATCH_FIELDS", "families", "reported", "watched"]


def families() -> dict[str, Metric]:
    """Every family lbclient exports, empty: filled at each scrape."""
    per_backend = ["service", "backend"]
    counters = {
        "requests": ("Requests by the outcome of their last attempt.", ["result", "sent"]),
        "attempts": ("Attempts by outcome.", ["result", "sent"]),
        "retries": ("Attempts after a request's first, hedges aside.", []),
        "hedges": ("Hedged attempts.", []),
        "retry_budget_exhausted": ("Retries and hedges kept back by an empty retry budget.", []),
        "ejections": ("Passive ejections by reason.", ["reason"]),
        "restorations": ("Ejected backends restored by their probe request.", []),
        "probes": ("Probe requests to an ejected backend whose outcome was reported.", []),
    }
    gauges = {
        "backend_healthy": "1 if the backend is neither ejected nor failing its checks.",
        "backend_ejected": "1 if the backend is passively ejected.",
        "backend_enabled": "1 unless the backend is switched off by hand.",
        "backend_ready": "1 if the backend may take a request now.",
        "backend_in_flight": "Attempts in flight to the backend.",
        "backend_latency_estimate_seconds": "The balancer's latency estimate of the backend.",
    }
    families: dict[str, Metric] = {}
    for name, (text, extra) in counters.items():
        families[name] = CounterMetricFamily(
            f"lbclient_{name}", text, labels=[*per_backend, *extra]
        )
    families["unavailable"] = CounterMetricFamily(
        "lbclient_requests_unavailable", "Requests that found no backend.", labels=["service"]
    )
    families["duration"] = HistogramMetricFamily(
        "lbclient_attempt_duration_seconds",
        "Seconds from an attempt's start to its response head or its failure.",
        labels=per_backend,
    )
    for name, text in gauges.items():
        families[name] = GaugeMetricFamily(f"lbclient_{name}", text, labels=per_backend)
    families["panic"] = GaugeMetricFamily(
        "lbclient_panic", "1 while panic mode is on: health is ignored.", labels=["service"]
    )
    families["load_report"] = GaugeMetricFamily(
        "lbclient_backend_load_report",
        "The latest load report the backend sent, by field (ORCA's names; named metrics as "
        "named_metrics.<name>).",
        labels=[*per_backend, "field"],
    )
    families["load_report_age"] = GaugeMetricFamily(
        "lbclient_backend_load_report_age_seconds",
        "Seconds since the latest load report the backend sent arrived.",
        labels=per_backend,
    )
    families["load_reports"] = CounterMetricFamily(
        "lbclient_load_reports",
        "Load reports read: kept, or refused and why.",
        labels=[*per_backend, "result"],
    )
    families["discovery_refreshes"] = CounterMetricFamily(
        "lbclient_discovery_refreshes", "Discovery refreshes.", labels=["service"]
    )
    families["discovery_failures"] = CounterMetricFamily(
        "lbclient_discovery_failures", "Discovery refreshes that failed.", labels=["service"]
    )
    families["discovery_part_failures"] = CounterMetricFamily(
        "lbclient_discovery_part_failures",
        "Parts of discovery answers that failed while the rest was used (DNS: record types).",
        labels=["service", "part"],
    )
    for name, text in WATCH_COUNTERS.items():
        families[name] = CounterMetricFamily(f"lbclient_{name}", text, labels=["service"])
    for name, text in WATCH_GAUGES.items():
        families[name] = GaugeMetricFamily(f"lbclient_{name}", text, labels=["service"])
    return families


#: A watched discovery's counts (etcd, Kubernetes), by the :class:`~lbclient.health.WatchState`
#: field each reads.
WATCH_COUNTERS = {
    "discovery_watch_reconnects": "Streams a watched discovery opened after its first.",
    "discovery_watch_relists": "Listings of the whole set by a watched discovery.",
    "discovery_watch_events": "Changes a watched discovery's stream delivered.",
    "discovery_watch_skipped": "Bad values and stream lines a watched discovery skipped.",
}
WATCH_GAUGES = {
    "discovery_watch_connected": "1 while a watched discovery's stream is open.",
    "discovery_watch_revision": "The store revision a watched discovery has seen (if a number).",
}
WATCH_FIELDS = {
    "discovery_watch_reconnects": "reconnects",
    "discovery_watch_relists": "relists",
    "discovery_watch_events": "events",
    "discovery_watch_skipped": "skipped",
    "discovery_watch_connected": "connected",
    "discovery_watch_revision": "revision",
}


def watched(add: Callable[[str, list[str], float], None], service: str, state: Any) -> None:
    """The samples of a watched discovery's state (none for other sources)."""
    if state is None:
        return
    for name, attribute in WATCH_FIELDS.items():
        value = getattr(state, attribute, None)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:  # a resource version that is no number
                continue
        if isinstance(value, (bool, int, float)):
            add(name, [service], float(value))


def reported(add: Callable[[str, list[str], float], None], mine: list[str], entry: Any) -> None:
    """The load report samples of one backend's snapshot entry (none before a report)."""
    report = getattr(entry, "report", None)
    if report is not None:
        for name in FIELDS:
            value = getattr(report, name)
            if value is not None:
                add("load_report", [*mine, name], value)
        for name, value in sorted(report.named_metrics.items()):
            add("load_report", [*mine, f"named_metrics.{name}"], value)
        add("load_report_age", mine, entry.report_age or 0.0)
    kept = getattr(entry, "reports", 0)
    refused = getattr(entry, "reports_refused", {})
    if kept or refused:
        add("load_reports", [*mine, "kept"], kept)
        for reason, count in sorted(refused.items()):
            add("load_reports", [*mine, reason], count)
