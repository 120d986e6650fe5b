"""lbclient: client-side load balancing for httpx and requests.

``import lbclient`` loads the core only (backends, selection, subsets, health, the balancer,
the errors): no HTTP client, no I/O, no thread. The rest loads on first use (PEP 562): the httpx
transports (``LBTransport``, ``AsyncLBTransport``), the requests adapter (``LBAdapter``), the
retry policy, the active health checks and service discovery.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from lbclient.backend import Backend
from lbclient.balancer import LoadBalancer
from lbclient.errors import KeyFunctionError, LBClientError, NoBackendAvailable
from lbclient.health import BackendHealth, HealthPolicy, HealthSnapshot, Outcome
from lbclient.selection import FNVHash, Hash, Random, RoundRobin, SmoothRoundRobin
from lbclient.selection.consistent import Consistent
from lbclient.selection.loadaware import LeastRequest, PeakEWMA
from lbclient.selection.prequal import Prequal
from lbclient.selection.slow_start import SlowStart
from lbclient.selection.wrr import WeightedRoundRobin
from lbclient.subsets import Subset

if TYPE_CHECKING:
    from lbclient.checks import HttpCheck, TcpCheck
    from lbclient.httpx_transport import AsyncLBTransport, LBTransport
    from lbclient.requests_adapter import LBAdapter
    from lbclient.retry import RequestOptions, RetryBudget, RetryPolicy

__version__ = "0.1.0"

# A library logs, the application decides where it goes.
logging.getLogger("lbclient").addHandler(logging.NullHandler())

__all__ = [  # noqa: RUF022 (grouped by topic, not sorted)
    # the balancer and its backends
    "LoadBalancer",
    "Backend",
    # selection algorithms
    "RoundRobin",
    "Random",
    "Hash",
    "FNVHash",
    "Consistent",
    "LeastRequest",
    "PeakEWMA",
    "WeightedRoundRobin",
    "Prequal",
    "SlowStart",
    "SmoothRoundRobin",
    # a fleet: which backends this client uses
    "Subset",
    # health
    "HealthPolicy",
    "Outcome",
    "HealthSnapshot",
    "BackendHealth",
    "TcpCheck",
    "HttpCheck",
    # the clients (loaded on first use)
    "LBTransport",
    "AsyncLBTransport",
    "LBAdapter",
    "RetryPolicy",
    "RequestOptions",
    "RetryBudget",
    # errors
    "LBClientError",
    "NoBackendAvailable",
    "KeyFunctionError",
    "__version__",
]

# Loaded on first use: name -> module.
_LAZY = {
    "LBTransport": "lbclient.httpx_transport",
    "AsyncLBTransport": "lbclient.httpx_transport",
    "LBAdapter": "lbclient.requests_adapter",
    "RetryPolicy": "lbclient.retry",
    "RequestOptions": "lbclient.retry",
    "RetryBudget": "lbclient.retry",
    "TcpCheck": "lbclient.checks",
    "HttpCheck": "lbclient.checks",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lbclient' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
