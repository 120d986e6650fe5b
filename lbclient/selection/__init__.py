"""Selection algorithms: pure functions of (backends, key), no I/O and no clock.

Part of the core. Each module builds a selector over a sorted backend set; health, load and
clients are not theirs to know.
"""

from lbclient.selection.base import (
    Algorithm,
    AlgorithmLike,
    Key,
    Selector,
    UniqueIterator,
)
from lbclient.selection.consistent import Consistent, ConsistentSelector
from lbclient.selection.weighted import (
    FNVHash,
    Hash,
    Random,
    RoundRobin,
    Weighted,
    WeightedIterator,
    WeightedSelector,
)

__all__ = [
    "Algorithm",
    "AlgorithmLike",
    "Consistent",
    "ConsistentSelector",
    "FNVHash",
    "Hash",
    "Key",
    "Random",
    "RoundRobin",
    "Selector",
    "UniqueIterator",
    "Weighted",
    "WeightedIterator",
    "WeightedSelector",
]
