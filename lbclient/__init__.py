"""lbclient: client-side load balancing for httpx and requests.

The core (backends, selection, health, the balancer) is pure: no I/O, no clock of its own; the
transports (``LBTransport``, ``AsyncLBTransport``) plug it into httpx, ``LBAdapter`` into
requests.
"""

import logging

from lbclient.backend import MAX_WEIGHT, Backend
from lbclient.balancer import DEFAULT_MAX_ITERATIONS, BackendHealth, HealthSnapshot, LoadBalancer
from lbclient.checks import CheckFailed, HealthCheck, HttpCheck, TcpCheck
from lbclient.errors import KeyFunctionError, LBClientError, NoBackendAvailable
from lbclient.health import HealthPolicy, HealthState, Outcome
from lbclient.httpx_transport import AsyncLBTransport, LBTransport
from lbclient.requests_adapter import LBAdapter
from lbclient.retry import IDEMPOTENT_METHODS, Failure, RetryPolicy
from lbclient.selection import (
    Algorithm,
    Consistent,
    ConsistentSelector,
    FNVHash,
    Hash,
    Random,
    RoundRobin,
    Selector,
    UniqueIterator,
    Weighted,
    WeightedIterator,
    WeightedSelector,
)

__version__ = "0.1.0"

# A library logs, the application decides where it goes.
logging.getLogger("lbclient").addHandler(logging.NullHandler())

__all__ = [
    "DEFAULT_MAX_ITERATIONS",
    "IDEMPOTENT_METHODS",
    "MAX_WEIGHT",
    "Algorithm",
    "AsyncLBTransport",
    "Backend",
    "BackendHealth",
    "CheckFailed",
    "Consistent",
    "ConsistentSelector",
    "FNVHash",
    "Failure",
    "Hash",
    "HealthCheck",
    "HealthPolicy",
    "HealthSnapshot",
    "HealthState",
    "HttpCheck",
    "KeyFunctionError",
    "LBAdapter",
    "LBClientError",
    "LBTransport",
    "LoadBalancer",
    "NoBackendAvailable",
    "Outcome",
    "Random",
    "RetryPolicy",
    "RoundRobin",
    "Selector",
    "TcpCheck",
    "UniqueIterator",
    "Weighted",
    "WeightedIterator",
    "WeightedSelector",
    "__version__",
]
