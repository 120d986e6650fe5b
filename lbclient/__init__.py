"""lbclient: client-side load balancing for httpx and requests.

The core (backends, selection, health, the balancer) is pure: no I/O, no clock of its own.
"""

import logging

from lbclient.backend import MAX_WEIGHT, Backend
from lbclient.balancer import DEFAULT_MAX_ITERATIONS, LoadBalancer
from lbclient.health import HealthPolicy, HealthState
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
    "MAX_WEIGHT",
    "Algorithm",
    "Backend",
    "Consistent",
    "ConsistentSelector",
    "FNVHash",
    "Hash",
    "HealthPolicy",
    "HealthState",
    "LoadBalancer",
    "Random",
    "RoundRobin",
    "Selector",
    "UniqueIterator",
    "Weighted",
    "WeightedIterator",
    "WeightedSelector",
    "__version__",
]
