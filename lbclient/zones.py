"""Zone shares: how much of a client's traffic stays in its zone, and where the rest goes.

Envoy's zone-aware routing, as arithmetic over plain counts. The aim: send as much traffic as
possible to the client's own (local) zone while every backend of the fleet keeps about the same
request rate. :func:`plan_zones` takes, per zone, the healthy backends (``healthy``), all the
backends (``total``, default ``healthy``), the share of the calling fleet's clients
(``clients``, default: spread like ``total``, that is like the backends as deployed) and,
optionally, the load per backend (``load``: requests in flight per backend, or a reported
utilization; any unit, the same for every zone), and returns a :class:`ZonePlan`: the
probability of routing to each zone, summing to 1.

The rules, in the order they are applied (the first that applies decides):

1. No healthy backend anywhere: an empty plan (``mode="none"``).
2. ``blind`` (zone-blind: each zone in proportion to its healthy backends, as if there were no
   zones) when

   * the fleet has fewer than ``min_backends`` backends (Envoy's ``min_cluster_size``, 6), or
   * the local zone has no backends (an unknown zone, or discovery removed them all; a
     documented fallback, not an error: a running client keeps working), or
   * the local zone's healthy share ``healthy[local] / total[local]`` is under
     ``panic_threshold`` (0.5, Envoy's panic threshold applied to the local zone), or
   * the local zone is overloaded: its load per backend is more than ``load_spill`` (2.0, the
     top of Linkerd's 0.8-2.0 band) times the other zones' load per backend (their mean,
     weighted by their healthy backends; zones without a load reading left out), that
     reading taken as at least ``load_floor`` (0: none). No spill when either side has no
     reading, or the other zones' load (after the floor) is 0 (an idle fleet has nothing to
     compare). A floor suits readings that are this client's own requests in flight: the
     other zones read 0 while it sends them nothing, and with a floor of 1 the local zone
     spills once it holds more than ``load_spill`` requests per backend and that many times
     the others' (Linkerd's band is in requests per endpoint). Once spilled (``spilled``: the
     previous plan spilled for load, :attr:`ZonePlan.spilled`), the plan stays zone-blind
     until the local load falls to ``load_return`` (0.8, the band's bottom) times the others'
     (floored likewise): without it a zone relieved by spilling would be loaded again at once.

3. ``local`` (everything to the local zone) when the local zone's share of the healthy
   backends, ``up = healthy[local] / sum(healthy)``, is at least its share of the clients,
   ``cl = clients[local] / sum(clients)``: its backends can take all its clients' traffic.
4. ``residual`` otherwise: ``up / cl`` of the traffic stays local, and the rest goes to the other
   zones in proportion to their residual capacity ``max(0, up_z - cl_z)`` (their share of the
   healthy backends beyond their share of the clients). That sum is always positive here.

Bad inputs are errors naming the value: a local zone that is not a non-empty str, a count,
share or load that is negative, not finite, or not a number; ``healthy`` above ``total`` for a
zone, or a healthy zone missing from ``total``; ``clients`` that sum to 0 or leave out the
local zone (this client is one of them); out-of-range settings.

Part of the core: pure values and functions; no I/O, no clock, no thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from lbclient.backend import Backend, shown

__all__ = [
    "LOAD_RETURN",
    "LOAD_SPILL",
    "MIN_BACKENDS",
    "PANIC_THRESHOLD",
    "Zone",
    "ZonePlan",
    "plan_zones",
    "zone_counts",
    "zone_of",
]

#: Below this many backends in the fleet, routing is zone-blind (Envoy's ``min_cluster_size``).
MIN_BACKENDS: Final = 6
#: Under this healthy share in the local zone, routing is zone-blind (Envoy's panic threshold).
PANIC_THRESHOLD: Final = 0.5
#: Above this ratio of local to other zones' load per backend, routing is zone-blind (the top
#: of Linkerd's 0.8-2.0 band).
LOAD_SPILL: Final = 2.0
#: A zone spilled for load returns once its load per backend is this ratio of the other
#: zones' (the bottom of Linkerd's band).
LOAD_RETURN: Final = 0.8

#: The modes of a plan.
MODES: Final = ("none", "blind", "local", "residual")


@dataclass(frozen=True)
class ZonePlan:
    """Where one client's traffic goes, by zone. Immutable.

    ``shares`` maps each zone that gets traffic to its probability (they sum to 1; empty when
    no backend is healthy); ``mode`` is one of ``"none"``, ``"blind"``, ``"local"``,
    ``"residual"``; ``reason`` says in words why; ``spilled`` is True when it is zone-blind
    because the local zone is overloaded (the next plan's ``spilled=``).
    """

    local: str
    shares: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    mode: str = "none"
    reason: str = ""
    spilled: bool = False

    def __hash__(self) -> int:
        items = tuple(self.shares.items())
        return (self.local, items, self.mode, self.reason, self.spilled).__hash__()

    def share(self, zone: str) -> float:
        """The probability of routing to ``zone`` (0.0 for a zone not in the plan)."""
        return self.shares.get(zone, 0.0)

    @property
    def local_share(self) -> float:
        """The probability of staying in the local zone."""
        return self.share(self.local)


#: What a wired zone reads as a backend's load (:attr:`Zone.load`).
LOAD_SIGNALS: Final = ("in_flight", "utilization")


@dataclass(frozen=True)
class Zone:
    """A client's zone and its routing settings, for ``LoadBalancer(zone=...)`` (a plain str
    there is ``Zone(name)``). Immutable, hashable, picklable.

    * ``name``: the client's zone (non-empty).
    * ``clients``: the fleet's clients per zone, counts or shares (None: spread like the
      backends). Must include ``name``.
    * ``min_backends``, ``panic_threshold``: as :func:`plan_zones` takes them (6, 0.5).
    * ``load_spill``: the ratio of the local zone's load per backend to the other zones' above
      which routing spills zone-blind (2.0); None: no load spill. ``load_return``: the ratio
      under which a spilled zone comes back (0.8).
    * ``load``: what is read as a backend's load: ``"in_flight"``, this client's requests in
      flight to it (the balancer's load book), or ``"utilization"``, the latest load report's
      ``application_utilization`` (else ``cpu_utilization``; a backend without one is left out,
      a zone with none has no reading). ``load_floor``: the least the other zones' reading
      counts as, in the same unit (None: 1.0 for ``"in_flight"``, one request in flight per
      backend; 0.1 for ``"utilization"``, a tenth of a backend's capacity).
    * ``load_every``: seconds of the balancer's clock between readings of the load (1.0); a
      reading scans the backends the balancer selects among once, so select() pays for it at
      most once per interval (0: every select, O(backends) each).

    Bad values are errors naming the value.
    """

    name: str
    clients: Mapping[str, float] | None = None
    min_backends: int = MIN_BACKENDS
    panic_threshold: float = PANIC_THRESHOLD
    load_spill: float | None = LOAD_SPILL
    load_return: float = LOAD_RETURN
    load: str = "in_flight"
    load_floor: float | None = None
    load_every: float = 1.0

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str):
            raise TypeError(f"zone must be a str, got {shown(name)} ({type(name).__name__})")
        if not name or name.isspace():
            raise ValueError("zone must not be empty")
        top = LOAD_SPILL if self.load_spill is None else self.load_spill
        _check_settings(self.min_backends, self.panic_threshold, top, self.load_return)
        if self.load not in LOAD_SIGNALS:
            raise ValueError(
                f"Zone load must be one of {list(LOAD_SIGNALS)}, got {shown(self.load)}"
            )
        if self.load_floor is None:  # in the unit of the reading
            object.__setattr__(self, "load_floor", 1.0 if self.load == "in_flight" else 0.1)
        _number("load_floor", self.load_floor)
        _number("load_every", self.load_every)
        if self.clients is not None:
            clients = _per_zone("clients", self.clients)
            if clients.get(name, 0.0) <= 0:
                raise ValueError(
                    f"clients has none in the zone {name!r}: this client is one of them"
                )
            object.__setattr__(self, "clients", MappingProxyType(dict(sorted(clients.items()))))

    def _settings(self) -> tuple[object, ...]:
        """Every field, in order, ``clients`` as a plain dict (or None)."""
        clients = None if self.clients is None else dict(self.clients)
        return (
            self.name,
            clients,
            self.min_backends,
            self.panic_threshold,
            self.load_spill,
            self.load_return,
            self.load,
            self.load_floor,
            self.load_every,
        )

    def __hash__(self) -> int:
        name, _, *rest = self._settings()
        items = None if self.clients is None else tuple(self.clients.items())
        return (name, items, *rest).__hash__()

    def __reduce__(self) -> tuple[object, ...]:
        return (_zone, self._settings())

    def plan(
        self,
        healthy: Mapping[str, float],
        total: Mapping[str, float],
        load: Mapping[str, float] | None = None,
        spilled: bool = False,
    ) -> ZonePlan:
        """:func:`plan_zones` for this zone with its settings."""
        return plan_zones(
            self.name,
            healthy,
            total=total,
            clients=self.clients,
            load=None if self.load_spill is None else load,
            min_backends=self.min_backends,
            panic_threshold=self.panic_threshold,
            load_spill=LOAD_SPILL if self.load_spill is None else self.load_spill,
            load_return=self.load_return,
            load_floor=0.0 if self.load_floor is None else self.load_floor,  # set by now
            spilled=spilled,
        )


def _zone(*fields: object) -> Zone:
    return Zone(*fields)  # type: ignore[arg-type]


def zone_of(backend: Backend) -> str:
    """``backend``'s zone: its ``metadata["zone"]`` as a str; ``""`` when it has none."""
    zone = backend.metadata.get("zone")
    return "" if zone is None else str(zone)


def zone_counts(
    backends: Iterable[Backend],
    available: Callable[[Backend], bool] | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """``(healthy, total)``: per zone (:func:`zone_of`), how many of ``backends`` are available
    (all when ``available`` is None) and how many there are."""
    healthy: dict[str, int] = {}
    total: dict[str, int] = {}
    for backend in backends:
        zone = zone_of(backend)
        total[zone] = total.get(zone, 0) + 1
        up = available is None or available(backend)
        healthy[zone] = healthy.get(zone, 0) + (1 if up else 0)
    return healthy, total


def _number(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {shown(value)} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {shown(value)}")
    return number


def _per_zone(name: str, values: object) -> dict[str, float]:
    if not isinstance(values, Mapping):
        raise TypeError(f"{name} must be a mapping of zone to number, got {shown(values)}")
    checked: dict[str, float] = {}
    for zone, value in values.items():
        if not isinstance(zone, str):
            raise TypeError(f"{name} zones must be str, got {shown(zone)}")
        checked[zone] = _number(f"{name}[{zone!r}]", value)
    return checked


def _proportional(weights: Mapping[str, float]) -> dict[str, float]:
    """``weights`` scaled to sum to 1, zero weights left out, in zone order."""
    whole = math.fsum(weights.values())
    return {zone: weights[zone] / whole for zone in sorted(weights) if weights[zone] > 0}


def _check_settings(
    min_backends: object, panic_threshold: object, load_spill: object, load_return: object
) -> None:
    if isinstance(min_backends, bool) or not isinstance(min_backends, int) or min_backends < 0:
        raise ValueError(f"min_backends must be an int >= 0, got {shown(min_backends)}")
    threshold = _number("panic_threshold", panic_threshold)
    if threshold > 1:
        raise ValueError(f"panic_threshold must be in 0..1, got {shown(panic_threshold)}")
    top = _number("load_spill", load_spill)
    if top < 1:
        raise ValueError(f"load_spill must be at least 1, got {shown(load_spill)}")
    if _number("load_return", load_return) > top:
        raise ValueError(
            f"load_return must not be above load_spill ({shown(load_spill)}), "
            f"got {shown(load_return)}"
        )


def _overloaded(
    local: str,
    load: dict[str, float],
    healthy: dict[str, float],
    floor: float,
    ratio: float,
) -> bool | None:
    """Whether the local zone's load per backend is more than ``ratio`` times the others'
    (taken as at least ``floor``); None without a reading to compare."""
    mine = load.get(local)
    others = [(healthy[z], v) for z, v in load.items() if z != local and healthy.get(z, 0) > 0]
    weight = math.fsum(w for w, _ in others)
    if mine is None or not weight:
        return None
    theirs = max(math.fsum(w * v for w, v in others) / weight, floor)
    return None if theirs <= 0 else mine > ratio * theirs


def plan_zones(
    local: str,
    healthy: Mapping[str, float],
    *,
    total: Mapping[str, float] | None = None,
    clients: Mapping[str, float] | None = None,
    load: Mapping[str, float] | None = None,
    min_backends: int = MIN_BACKENDS,
    panic_threshold: float = PANIC_THRESHOLD,
    load_spill: float = LOAD_SPILL,
    load_return: float = LOAD_RETURN,
    load_floor: float = 0.0,
    spilled: bool = False,
) -> ZonePlan:
    """The zone shares of a client in zone ``local`` (the rules are in the module's text).

    ``healthy`` and ``total``: backends per zone (counts, or capacity in any one unit);
    ``clients``: clients per zone (counts or shares); ``load``: load per backend per zone;
    ``spilled``: the previous plan spilled for load. A pure function of its arguments.
    """
    if not isinstance(local, str):
        raise TypeError(f"local zone must be a str, got {shown(local)} ({type(local).__name__})")
    if not local:
        raise ValueError("local zone must not be empty")
    _check_settings(min_backends, panic_threshold, load_spill, load_return)
    floor = _number("load_floor", load_floor)
    up = _per_zone("healthy", healthy)
    every = dict(up) if total is None else _per_zone("total", total)
    for zone, count in up.items():
        if zone not in every:
            raise ValueError(f"zone {zone!r} has healthy backends but is missing from total")
        if count > every[zone]:
            raise ValueError(
                f"zone {zone!r} has more healthy backends ({shown(healthy[zone])}) than "
                f"backends ({shown(total[zone] if total is not None else every[zone])})"
            )
    for zone in every:
        up.setdefault(zone, 0.0)
    callers = dict(every) if clients is None else _per_zone("clients", clients)
    if clients is not None and callers.get(local, 0.0) <= 0:
        raise ValueError(
            f"clients has none in the local zone {local!r}: this client is one of them"
        )
    loads = {} if load is None else _per_zone("load", load)

    if not math.fsum(up.values()):
        return ZonePlan(local, MappingProxyType({}), "none", "no healthy backend")
    blind = _proportional(up)

    def zone_blind(reason: str) -> ZonePlan:
        return ZonePlan(local, MappingProxyType(blind), "blind", reason)

    if math.fsum(every.values()) < min_backends:
        return zone_blind(f"fewer than {min_backends} backends")
    if every.get(local, 0.0) <= 0:
        return zone_blind(f"no backend in the local zone {local!r}")
    if up[local] < panic_threshold * every[local]:
        return zone_blind(f"under {panic_threshold:.0%} of the local zone's backends are healthy")
    over = _overloaded(local, loads, up, floor, load_return if spilled else load_spill)
    if over:
        ratio = f"still over {load_return:g}x" if spilled else f"over {load_spill:g}x"
        reason = f"the local zone's load is {ratio} the other zones'"
        return ZonePlan(local, MappingProxyType(blind), "blind", reason, spilled=True)

    up_share = _proportional(up)
    cl_share = _proportional(callers)
    mine = up_share.get(local, 0.0)
    theirs = cl_share[local]
    if mine >= theirs:
        return ZonePlan(
            local, MappingProxyType({local: 1.0}), "local", "the local zone can take it all"
        )
    stay = mine / theirs
    residual = {
        zone: share - cl_share.get(zone, 0.0)
        for zone, share in up_share.items()
        if zone != local and share > cl_share.get(zone, 0.0)
    }
    spread = _proportional(residual)
    shares = {local: stay}
    for zone, part in spread.items():
        shares[zone] = (1.0 - stay) * part
    ordered = {zone: shares[zone] for zone in sorted(shares)}
    return ZonePlan(
        local,
        MappingProxyType(ordered),
        "residual",
        f"the local zone holds {mine:.1%} of the healthy backends for {theirs:.1%} of the clients",
    )
