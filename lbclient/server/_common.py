"""What both middlewares share: the default probe path, the tracker they count in, and the
probe's answer.

What may not: anything of ASGI or WSGI (the middlewares translate), a rule of counting.
"""

from __future__ import annotations

from collections.abc import Mapping

from lbclient.server._report import PREQUAL_LATENCY_HEADER, PREQUAL_RIF_HEADER, REPORT_HEADER
from lbclient.server._tracker import LoadTracker, Metric

__all__ = ["PROBE_PATH", "probe_answer", "tracker_of"]

#: Where the middlewares answer probes unless told otherwise.
PROBE_PATH = "/.lbclient/load"


def tracker_of(
    tracker: LoadTracker | None,
    cpu_utilization: Metric | None,
    application_utilization: Metric | None,
    named_metrics: Mapping[str, Metric] | None,
) -> LoadTracker:
    """The tracker a middleware counts in: ``tracker``, or a new one with the metrics given."""
    if tracker is None:
        return LoadTracker(
            cpu_utilization=cpu_utilization,
            application_utilization=application_utilization,
            named_metrics=named_metrics,
        )
    if (cpu_utilization, application_utilization, named_metrics) != (None, None, None):
        raise TypeError("give the metrics to the LoadTracker, not beside it")
    return tracker


def probe_answer(tracker: LoadTracker, asked: str | None) -> tuple[bytes, list[tuple[str, str]]]:
    """The probe's body and headers: the report in the format asked (TEXT unless JSON is asked),
    as both the ``endpoint-load-metrics`` header and the body, and Prequal's two headers."""
    report = tracker.report()
    value = report.render(asked or "TEXT")
    body = value.encode("ascii")
    return body, [
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("cache-control", "no-store"),
        (REPORT_HEADER, value),
        (PREQUAL_RIF_HEADER, str(report.rif)),
        (PREQUAL_LATENCY_HEADER, str(report.latency_us)),
    ]
