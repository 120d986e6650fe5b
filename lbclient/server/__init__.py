"""lbclient.server: the companion for Python services. Middleware that reports the process's
load the way lbclient's clients read it, for ASGI and WSGI apps alike::

    from lbclient.server import LoadReportingASGI, LoadReportingWSGI, cpu_utilization

    app = LoadReportingASGI(app, cpu_utilization=cpu_utilization())  # FastAPI, Starlette, ...
    application = LoadReportingWSGI(application)  # Flask, Django, ... under gunicorn

What a middleware reports (:class:`LoadTracker` counts, the middlewares translate):

* in a response, when its request asks with ``endpoint-load-metrics-format: TEXT`` or ``JSON``:
  the ORCA header ``endpoint-load-metrics`` (``TEXT rps_fractional=120, eps=0.5,
  named_metrics.rif=3, named_metrics.latency_ms=4.2``), as vLLM and Triton answer;
* on the probe path (``/.lbclient/load`` by default), answered without calling the app: the same
  report, and Prequal's ``x-prequal-rif`` and ``x-prequal-latency-us``.

Under a server of several worker processes (``gunicorn -w N``, ``uvicorn --workers N``) the
requests in flight are the server's, summed over its workers through a small shared file (on
Linux; see :class:`LoadTracker`); the rest of a report is the answering worker's.

Where lbclient was built with a C compiler (:data:`COMPILED`), the ASGI middleware's call and
its usual request are counted in C, with the same results.

This package imports no HTTP client and no framework, and ``import lbclient`` does not load it.
"""

from __future__ import annotations

from lbclient.server._asgi import LoadReportingASGI
from lbclient.server._common import PROBE_PATH
from lbclient.server._cpu import CpuUtilization, cpu_utilization
from lbclient.server._report import (
    FORMAT_HEADER,
    PREQUAL_LATENCY_HEADER,
    PREQUAL_RIF_HEADER,
    REPORT_HEADER,
    ServerReport,
)
from lbclient.server._tracker import (
    COMPILED,
    LATENCY_WINDOW,
    RATE_WINDOW,
    Arrival,
    LoadTracker,
    Metric,
)
from lbclient.server._wsgi import LoadReportingWSGI

__all__ = [  # noqa: RUF022 (grouped by topic, not sorted)
    # the middlewares
    "LoadReportingASGI",
    "LoadReportingWSGI",
    "PROBE_PATH",
    # what they count in, and what they report
    "LoadTracker",
    "Arrival",
    "ServerReport",
    "Metric",
    "LATENCY_WINDOW",
    "RATE_WINDOW",
    # a ready-made metric
    "cpu_utilization",
    "CpuUtilization",
    # the header names
    "FORMAT_HEADER",
    "REPORT_HEADER",
    "PREQUAL_RIF_HEADER",
    "PREQUAL_LATENCY_HEADER",
    # whether the per-request path is compiled
    "COMPILED",
]
