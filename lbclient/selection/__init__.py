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
from lbclient.selection.libketama import LibKetama, LibKetamaSelector
from lbclient.selection.loadaware import LeastRequest, LoadAwareSelector, PeakEWMA
from lbclient.selection.maglev import Maglev, MaglevSelector
from lbclient.selection.prequal import Prequal, PrequalSelector
from lbclient.selection.rendezvous import Rendezvous, RendezvousSelector
from lbclient.selection.slow_start import SlowStart
from lbclient.selection.smooth import SmoothRoundRobin, SmoothSelector
from lbclient.selection.weighted import (
    FNVHash,
    Hash,
    Random,
    RoundRobin,
    Weighted,
    WeightedIterator,
    WeightedSelector,
)
from lbclient.selection.wrr import WeightedRoundRobin, WeightedRoundRobinSelector

__all__ = [
    "Algorithm",
    "AlgorithmLike",
    "Consistent",
    "ConsistentSelector",
    "FNVHash",
    "Hash",
    "Key",
    "LeastRequest",
    "LibKetama",
    "LibKetamaSelector",
    "LoadAwareSelector",
    "Maglev",
    "MaglevSelector",
    "PeakEWMA",
    "Prequal",
    "PrequalSelector",
    "Random",
    "Rendezvous",
    "RendezvousSelector",
    "RoundRobin",
    "Selector",
    "SlowStart",
    "SmoothRoundRobin",
    "SmoothSelector",
    "UniqueIterator",
    "Weighted",
    "WeightedIterator",
    "WeightedRoundRobin",
    "WeightedRoundRobinSelector",
    "WeightedSelector",
]
