"""``python -m lbclient simulate --fleet``: a fleet of clients calling a fleet of backends, on a
virtual clock, through the real balancer, subset and zone code in every simulated client.

**What runs.** Each simulated client is one real :class:`~lbclient.LoadBalancer` with the real
algorithm, one shared virtual clock and a seeded ``random``, configured as a client of a real
fleet would be (DESIGN rule 6): ``LoadBalancer(backends, algorithm, subset=Subset(...),
zone=Zone(zone, clients=clients per zone))`` over the whole set of backends. The balancer
takes its subset (within each zone, when zone-aware), plans its zone shares, draws a zone per
request and selects there, all by itself; the simulator does not compute members or shares.

* Zone-aware: ``zone=Zone(z, clients=...)`` with the fleet's clients per zone. Deterministic
  subsets use the client's rank among the clients of its own zone and their number
  (``Subset(size, index=rank, clients=clients in the zone)``), so each zone's backends get
  the same number of clients of one source zone within one.
* Zone-blind: no ``zone=``; deterministic subsets over the whole fleet
  (``Subset(size, index=i, clients=n)``).

Subset modes: ``deterministic``, ``rendezvous`` (``Subset(size, salt=...)``, a seeded salt per
client), ``none`` (every backend), and ``random``, the SRE book's random subsets, the baseline
(no ``Subset`` has that mode: the balancer is given ``size`` backends drawn by a seeded
generator, within each zone when zone-aware, so its zone plan is over the drawn ones, with the
clients spread like them: a baseline for the spread of connections, not for zone capacity).

**Traffic.** Open loop: requests arrive at the fleet as a Poisson process whose rate is
``--utilization`` times the healthy backends' capacity (servers / mean service time), each from a
client drawn at random. A request: the balancer's ``select()`` and ``begin(backend)``; half the
zone pair's round trip later it reaches the backend, a FIFO queue with ``--concurrency``
servers and exponential or lognormal service times (``--slow`` backends 10x slower,
``--failing`` ones fail every request at once); half a round trip after its answer the client
records it as a transport does: ``observe(load, latency, failed)``, ``load.end()``, and
``report(backend, ok)`` for passive health. Clients are out of step: before the traffic each
balancer makes a seeded random number of picks (under its number of members), as in a fleet that
has been running a while (RoundRobin keeps Pingora's shared counter from 0; only the clients'
starting points differ). With ``--in-step`` they start fresh together, so a fleet that starts
at once sweeps the backends in step (a herd: the run shows it in the p50 and p99).

**Figures.** Connections per backend (the clients whose members, in the zones their plan routes
to, include it; min / mean / max),
requests per backend (max / mean), the share of requests that crossed zones, p50 and p99
latency, failures, and the subset churn when one backend joins and one leaves: the clients
whose ``Subset.members`` over the whole set changed, and by how many members (for ``random``
subsets: the clients that held the backend that left each draw one replacement; a join changes
none). ``--compare subsets`` runs the random, deterministic and rendezvous modes side by side;
``--compare zones`` runs zone-aware against zone-blind routing with balanced zones and with the
first zone at half capacity.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lbclient import Backend, LoadBalancer
from lbclient.cli import simulate as base
from lbclient.subsets import Subset
from lbclient.zones import Zone, ZonePlan, zone_counts, zone_of

__all__ = [
    "ALGORITHMS",
    "SUBSET_MODES",
    "FleetOptions",
    "FleetRun",
    "add_arguments",
    "command",
    "compare",
    "fleet_backends",
    "format_runs",
    "run_fleet",
]

#: The algorithms a fleet can run: those that ignore the key (a subset would break the
#: agreement of clients on a key's backend).
ALGORITHMS = ("roundrobin", "smooth", "random", "leastrequest", "peakewma", "prequal")
SUBSET_MODES = ("none", "deterministic", "rendezvous", "random")
DISTRIBUTIONS = ("exponential", "lognormal")
SLOWER = 10.0  # a slow backend's service time, in mean service times
LOGNORMAL_SIGMA = 1.0
MAX_ZONES = 26


@dataclass(frozen=True)
class FleetOptions:
    """One fleet run's settings (the command line's, in seconds where times)."""

    clients: int = 300
    backends: int = 300
    zones: int = 3
    algorithm: str = "roundrobin"
    subset_mode: str = "deterministic"
    subset_size: int = 20
    requests: int = 100_000
    seed: int = 0
    zone_aware: bool = True
    #: Relative number of backends per zone (first zone first); empty: all equal.
    capacity: tuple[float, ...] = ()
    concurrency: int = 4
    service: float = 0.001
    distribution: str = "exponential"
    utilization: float = 0.7
    same_zone: float = 0.0002  # round trip, seconds
    cross_zone: float = 0.001
    slow: int = 0
    failing: int = 0
    churn: bool = True
    #: Every client's balancer starts fresh, in step with the others (else each has made a
    #: seeded random number of picks first, as clients that have been running a while).
    in_step: bool = False

    @property
    def label(self) -> str:
        """What tells this run from the others of a comparison."""
        subsets = "no subsets" if self.subset_mode == "none" else self.subset_mode
        zones = "zone-aware" if self.zone_aware else "zone-blind"
        caps = ""
        if self.capacity and len(set(self.capacity)) > 1:
            caps = f" ({','.join(f'{c:g}' for c in self.capacity)})"
        return f"{subsets}, {zones}{caps}"


@dataclass(frozen=True)
class FleetRun:
    """The figures of one fleet run."""

    options: FleetOptions
    connections: tuple[int, ...]  # per backend, in backend order
    served: tuple[int, ...]  # requests per backend
    crossed: int  # requests sent to another zone
    failures: int
    p50: float
    p99: float
    duration: float  # simulated seconds
    #: (clients changed, members changed in all, most members changed for one client), or None.
    joined: tuple[int, int, int] | None
    left: tuple[int, int, int] | None
    wall: float  # seconds the run took

    @property
    def requests(self) -> int:
        """Requests completed."""
        return sum(self.served)

    @property
    def cross_share(self) -> float:
        """The share of requests that crossed zones."""
        return self.crossed / self.requests if self.requests else 0.0


def fleet_backends(count: int, zones: int, capacity: Sequence[float] = ()) -> list[Backend]:
    """``count`` backends with zone metadata ``a``, ``b``, ...: each zone's number of backends
    in proportion to ``capacity`` (equal when empty), by largest remainder; in address order."""
    weights = list(capacity) or [1.0] * zones
    whole = math.fsum(weights)
    exact = [count * w / whole for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(zones), key=lambda z: (counts[z] - exact[z], z))
    for z in by_remainder[: count - sum(counts)]:
        counts[z] += 1
    names = [_zone_name(z) for z in range(zones) for _ in range(counts[z])]
    return [Backend(base._address(i), metadata={"zone": n}) for i, n in enumerate(names)]


def _zone_name(z: int) -> str:
    return chr(ord("a") + z)


def _random_subset(rng: random.Random, backends: Sequence[Backend], size: int) -> list[Backend]:
    return rng.sample(list(backends), min(size, len(backends)))


def _client(
    options: FleetOptions,
    rng: random.Random,
    clock: base._Clock,
    backends: Sequence[Backend],
    by_zone: dict[str, list[Backend]],
    who: tuple[str, int, int, int, bytes],
    per_zone: dict[str, int],
) -> LoadBalancer:
    """One client's balancer, configured as the module says. ``who``: its zone, index, rank
    in its zone, clients in its zone, salt."""
    zone_name, i, rank, peers, salt = who
    mode, size = options.subset_mode, options.subset_size
    zone = None
    if options.zone_aware:
        # The random baseline's zones are its draws, size each: its clients spread like them.
        spread = None if mode == "random" else {z: float(n) for z, n in per_zone.items() if n}
        zone = Zone(zone_name, clients=spread)
    given: Sequence[Backend] = backends
    subset = None
    if mode == "random":
        groups = by_zone.values() if options.zone_aware else [backends]
        given = [b for group in groups for b in _random_subset(rng, group, size)]
    elif mode == "deterministic":
        index, clients = (rank, peers) if options.zone_aware else (i, options.clients)
        subset = Subset(size, index=index, clients=clients)
    elif mode == "rendezvous":
        subset = Subset(size, salt=salt)
    algorithm = base.ALGORITHMS[options.algorithm](rng.getrandbits(32))
    return LoadBalancer(given, algorithm, clock=clock, random=rng.random, subset=subset, zone=zone)


def _routed(lb: LoadBalancer, plans: dict[object, ZonePlan]) -> list[Backend]:
    """The members of ``lb`` in the zones its plan routes to (all with a zone-blind plan). For
    the report: the plan is the one its balancer makes with every backend healthy (as in a
    snapshot, without a snapshot's pass over each backend's health), one per zone and set."""
    zone = lb.zone
    if zone is None:
        return list(lb.members)
    key = (zone, lb.backends)
    plan = plans.get(key)
    if plan is None:
        counts = zone_counts(lb.backends)
        plan = plans[key] = zone.plan(counts[0], counts[1])
    if plan.mode not in ("local", "residual"):
        return list(lb.members)
    return [b for b in lb.members if plan.share(zone_of(b)) > 0]


#: A client as the churn report sees it: its subset, and the zones it routes to (None: zone-blind,
#: a subset of the whole set).
Config = tuple[Subset | None, frozenset[str] | None]


def _members_in(
    subset: Subset, groups: dict[str, list[Backend]], zones: frozenset[str] | None
) -> set[Backend]:
    """The members of ``subset`` over the whole set (``groups[""]``), or within each of
    ``zones``, as a set."""
    if zones is None:
        return set(subset.members(groups[""]))
    return {b for z in zones for b in subset.members(groups.get(z, []))}


def _churn(
    options: FleetOptions, backends: Sequence[Backend], configs: Sequence[Config], seed: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """(joined, left): the subsets that change when a backend joins (in the first zone) and
    when one leaves, each as (clients changed, members changed in all, most for one client),
    over each client's subset as configured: within the zones it routes to, or the whole set."""
    mode = options.subset_mode
    if mode == "none":
        return None
    rng = random.Random(seed)
    gone = backends[rng.randrange(len(backends))]
    new = Backend(base._address(len(backends)), metadata={"zone": zone_of(backends[0])})
    if mode == "random":  # the clients holding the one that left each draw a replacement
        holders = sum(
            gone in _random_subset(rng, backends, options.subset_size)
            for _ in range(options.clients)
        )
        return (0, 0, 0), (holders, holders, 1 if holders else 0)

    def grouped(every: Sequence[Backend]) -> dict[str, list[Backend]]:
        groups: dict[str, list[Backend]] = {"": list(every)}
        for backend in every:
            groups.setdefault(zone_of(backend), []).append(backend)
        return groups

    now, grown = grouped(backends), grouped([*backends, new])
    shrunk = grouped([b for b in backends if b != gone])
    earlier = [_members_in(s, now, z) for s, z in configs if s is not None]
    tallies = []
    for after in (grown, shrunk):
        changed = members = most = 0
        kept = (c for c in configs if c[0] is not None)
        for (subset, zones), before in zip(kept, earlier, strict=True):
            assert subset is not None
            later = _members_in(subset, after, zones)
            moved = max(len(before - later), len(later - before))
            if moved:
                changed += 1
                members += moved
                most = max(most, moved)
        tallies.append((changed, members, most))
    return tallies[0], tallies[1]


def run_fleet(options: FleetOptions) -> FleetRun:
    """Simulate one fleet run (see the module); deterministic for ``options.seed``."""
    started = time.perf_counter()
    rng = random.Random(options.seed)
    backends = fleet_backends(options.backends, options.zones, options.capacity)
    zones = sorted({zone_of(b) for b in backends})
    index = {b: i for i, b in enumerate(backends)}
    zone_index = [zones.index(zone_of(b)) for b in backends]
    by_zone = {z: [b for b in backends if zone_of(b) == z] for z in zones}
    order = list(range(options.backends))
    rng.shuffle(order)
    slow = set(order[: options.slow])
    failing = set(order[options.slow : options.slow + options.failing])
    mean = [options.service * (SLOWER if i in slow else 1.0) for i in range(len(backends))]

    client_zone = [_zone_name(i % options.zones) for i in range(options.clients)]
    per_zone = {z: client_zone.count(z) for z in zones}
    rank = [i // options.zones for i in range(options.clients)]  # among its zone's clients
    salts = [rng.getrandbits(128).to_bytes(16, "little") for _ in range(options.clients)]

    clock = base._Clock()
    rng.getrandbits(64)  # drawn as before, so that the draws after it stay where they were
    connections = [0] * len(backends)
    fleet: list[LoadBalancer] = []
    plans: dict[object, ZonePlan] = {}
    configs: list[Config] = []
    for i in range(options.clients):
        z = client_zone[i]
        who = (z, i, rank[i], per_zone[z], salts[i])
        lb = _client(options, rng, clock, backends, by_zone, who, per_zone)
        routed = _routed(lb, plans)
        zoned = None if lb.zone is None else frozenset(zone_of(b) for b in routed)
        configs.append((lb.subset, zoned))
        for b in routed:
            connections[index[b]] += 1
        if not options.in_step and routed:
            for _ in range(rng.randrange(len(routed))):
                lb.select()
        fleet.append(lb)
    served, crossed, failures, latencies = _traffic(
        options, rng, clock, fleet, client_zone, index, zone_index, zones, mean, failing
    )
    latencies.sort()
    count = len(latencies)
    churn = _churn(options, backends, configs, options.seed) if options.churn else None
    return FleetRun(
        options,
        tuple(connections),
        tuple(served),
        crossed,
        failures,
        p50=latencies[max(0, math.ceil(0.50 * count) - 1)] if count else 0.0,
        p99=latencies[max(0, math.ceil(0.99 * count) - 1)] if count else 0.0,
        duration=clock.now,
        joined=None if churn is None else churn[0],
        left=None if churn is None else churn[1],
        wall=time.perf_counter() - started,
    )


_ARRIVE, _REACH, _ANSWER = 0, 1, 2


def _traffic(
    options: FleetOptions,
    rng: random.Random,
    clock: base._Clock,
    fleet: Sequence[LoadBalancer],
    fleet_zones: Sequence[str],
    index: dict[Backend, int],
    zone_index: Sequence[int],
    zones: Sequence[str],
    mean: Sequence[float],
    failing: set[int],
) -> tuple[list[int], int, int, list[float]]:
    """The event loop: (requests per backend, crossed zones, failures, latencies)."""
    n = len(mean)
    servers = [[0.0] * options.concurrency for _ in range(n)]
    capacity = math.fsum(options.concurrency / mean[i] for i in range(n) if i not in failing)
    rate = options.utilization * max(capacity, 1.0 / options.service)
    half = [
        [(options.same_zone if a == b else options.cross_zone) / 2 for b in range(len(zones))]
        for a in range(len(zones))
    ]
    client_zone = [zones.index(z) for z in fleet_zones]
    lognormal = options.distribution == "lognormal"
    mu_shift = -(LOGNORMAL_SIGMA**2) / 2  # so that the mean is the nominal service time
    served = [0] * n
    crossed = failures = 0
    latencies: list[float] = []
    events: list[tuple[float, int, int, Any]] = [(0.0, 0, _ARRIVE, None)]
    push, pop = heapq.heappush, heapq.heappop
    expovariate, randrange = rng.expovariate, rng.randrange
    lognormvariate = rng.lognormvariate
    clients = len(fleet)
    sent = seq = 0
    while events:
        now, _, kind, payload = pop(events)
        clock.now = now
        if kind == _ARRIVE:
            sent += 1
            if sent < options.requests:
                seq += 1
                push(events, (now + expovariate(rate), seq, _ARRIVE, None))
            c = randrange(clients)
            lb = fleet[c]
            backend = lb.select()
            if backend is None:
                failures += 1
                continue
            load = lb.begin(backend)
            b = index[backend]
            home, there = client_zone[c], zone_index[b]
            if home != there:
                crossed += 1
            trip = half[home][there]
            seq += 1
            push(events, (now + trip, seq, _REACH, (lb, load, backend, b, now, trip)))
        elif kind == _REACH:
            lb, load, backend, b, start, trip = payload
            if b in failing:
                done, failed = now + trip, True
            else:
                nominal = mean[b]
                if lognormal:
                    service = nominal * lognormvariate(mu_shift, LOGNORMAL_SIGMA)
                else:
                    service = expovariate(1.0 / nominal)
                queue = servers[b]
                begin = queue[0] if queue[0] > now else now
                heapq.heapreplace(queue, begin + service)
                done, failed = begin + service + trip, False
            seq += 1
            push(events, (done, seq, _ANSWER, (lb, load, backend, b, start, failed)))
        else:
            lb, load, backend, b, start, failed = payload
            if load is not None:
                lb.observe(load, now - start, failed)
                load.end()
            lb.report(backend, not failed)
            served[b] += 1
            failures += failed
            latencies.append(now - start)
    return served, crossed, failures, latencies


# -- comparisons -----------------------------------------------------------------------------------

#: What ``--compare`` runs beside the given options.
COMPARISONS = ("subsets", "zones")


def compare(options: FleetOptions, what: str | None) -> list[FleetRun]:
    """The runs of one invocation: ``options`` alone, or its comparison (see the module)."""
    if what is None:
        return [run_fleet(options)]
    if what == "subsets":
        return [run_fleet(replace(options, subset_mode=m)) for m in SUBSET_MODES[1:]]
    if what == "zones":
        half = (0.5, *([1.0] * (options.zones - 1)))
        return [
            run_fleet(replace(options, capacity=capacity, zone_aware=aware))
            for capacity in ((), half)
            for aware in (True, False)
        ]
    raise ValueError(f"unknown comparison {what!r}; expected one of {list(COMPARISONS)}")


# -- the report ------------------------------------------------------------------------------------


def _spread(values: Sequence[int]) -> str:
    average = sum(values) / len(values)
    if not average:
        return "0 / 0 / 0"
    return (
        f"{min(values):,} / {average:,.1f} / {max(values):,} "
        f"({min(values) / average:.0%}-{max(values) / average:.0%})"
    )


def _churn_text(tally: tuple[int, int, int] | None, clients: int) -> str:
    if tally is None:
        return "n/a (no subsets)"
    changed, members, most = tally
    mean = members / changed if changed else 0.0
    return f"{changed:,} ({changed / clients:.0%}), {mean:.1f} each, max {most}"


def _zones_text(run: FleetRun) -> str:
    backends = fleet_backends(run.options.backends, run.options.zones, run.options.capacity)
    counts: dict[str, int] = {}
    for b in backends:
        counts[zone_of(b)] = counts.get(zone_of(b), 0) + 1
    return " ".join(f"{z}:{counts[z]}" for z in sorted(counts))


ROWS: tuple[tuple[str, Callable[[FleetRun], str]], ...] = (
    ("backends per zone", _zones_text),
    ("connections/backend min/mean/max", lambda r: _spread(r.connections)),
    ("requests/backend min/mean/max", lambda r: _spread(r.served)),
    ("cross-zone traffic", lambda r: f"{r.cross_share:.2%}"),
    ("latency p50", lambda r: base._ms(r.p50)),
    ("latency p99", lambda r: base._ms(r.p99)),
    ("failures", lambda r: f"{r.failures:,}"),
    ("simulated time", lambda r: f"{r.duration:.3f} s"),
    ("one backend joins: clients changed", lambda r: _churn_text(r.joined, r.options.clients)),
    ("one backend leaves: clients changed", lambda r: _churn_text(r.left, r.options.clients)),
    ("run took", lambda r: f"{r.wall:.2f} s"),
)


def format_runs(runs: Sequence[FleetRun]) -> str:
    """The runs side by side, a column each, as plain text."""
    first = runs[0].options
    subsets = (
        "no subsets"
        if first.subset_mode == "none"
        else f"subsets of {first.subset_size} ({first.subset_mode})"
    )
    lines = [
        f"lbclient simulate --fleet: {first.clients:,} clients x {first.backends:,} backends in "
        f"{first.zones} zone{'s' if first.zones != 1 else ''}, algorithm={first.algorithm}, "
        f"{subsets}, {first.requests:,} requests at {first.utilization:.0%} of capacity "
        f"(seed {first.seed})",
        f"  backends: {first.concurrency} servers each, {first.distribution} service times of "
        f"{base._nominal(first.service)} mean; round trip {base._nominal(first.same_zone)} in a "
        f"zone, {base._nominal(first.cross_zone)} across"
        + (f"; {first.slow} slow ({SLOWER:g}x)" if first.slow else "")
        + (f"; {first.failing} failing" if first.failing else ""),
        "  connections: clients whose members (in the zones they route to) include the "
        "backend; churn: clients whose subsets there change, members changed each",
        "",
    ]
    cells = [[value(r) for r in runs] for _, value in ROWS]
    heads = [r.options.label for r in runs]
    width = max(len(label) for label, _ in ROWS)
    column = max(len(c) for c in [*heads, *(c for row in cells for c in row)]) + 2
    lines.append(" " * (width + 2) + "".join(f"{h:>{column}}" for h in heads))
    for (label, _), row in zip(ROWS, cells, strict=True):
        lines.append(f"  {label:<{width}}" + "".join(f"{c:>{column}}" for c in row))
    return "\n".join(lines)


def plot(runs: Sequence[FleetRun], path: Path) -> None:
    """Draw each run's connections and requests per backend, sorted, over their mean, into the
    PNG file ``path``."""
    base.load_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    charts: list[tuple[Any, str, Callable[[FleetRun], Sequence[int]]]] = [
        (left, "connections per backend", lambda r: r.connections),
        (right, "requests per backend", lambda r: r.served),
    ]
    for axes, title, values in charts:
        for run in runs:
            spread = sorted(values(run))
            average = sum(spread) / len(spread) or 1.0
            axes.plot([100 * v / average for v in spread], label=run.options.label)
        axes.axhline(100, color="black", linewidth=1)
        axes.set_title(f"{title} (sorted), % of the mean", fontsize=10)
        axes.set_xlabel("backends, least loaded first")
        axes.set_ylabel("% of the mean")
        axes.legend(fontsize=7)
    first = runs[0].options
    figure.suptitle(
        f"{first.clients:,} clients x {first.backends:,} backends, {first.zones} "
        f"zone{'s' if first.zones != 1 else ''}, "
        f"{first.algorithm}, {first.requests:,} requests",
        fontsize=11,
    )
    figure.savefig(path, format="png", dpi=100)


# -- command line ----------------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def _capacity(text: str) -> tuple[float, ...]:
    return tuple(_positive(item) for item in text.split(","))


#: The fleet's own options: (flags, argparse keywords). Their defaults are None, so that the
#: command can tell one given without --fleet.
FLEET_ONLY: tuple[tuple[str, dict[str, object]], ...] = (
    ("--zones", {"type": base._count(1, MAX_ZONES), "help": "zones a, b, ... (3)"}),
    (
        "--subset-mode",
        {"choices": SUBSET_MODES, "help": "each client's backends (deterministic)"},
    ),
    ("--subset-size", {"type": base._count(1, base.MAX_BACKENDS), "help": "backends each (20)"}),
    (
        "--zone-capacity",
        {
            "type": _capacity,
            "metavar": "C1,C2,...",
            "help": "relative number of backends per zone, one per zone (equal)",
        },
    ),
    ("--zone-blind", {"action": "store_true", "default": None, "help": "ignore zones"}),
    ("--concurrency", {"type": base._count(1, 1000), "help": "servers per backend (4)"}),
    ("--service-ms", {"type": _positive, "help": "mean service time (1)"}),
    ("--distribution", {"choices": DISTRIBUTIONS, "help": "of service times (exponential)"}),
    ("--utilization", {"type": _positive, "help": "offered load over capacity, below 1 (0.7)"}),
    ("--same-zone-ms", {"type": _positive, "help": "round trip within a zone (0.2)"}),
    ("--cross-zone-ms", {"type": _positive, "help": "round trip across zones (1)"}),
    ("--slow", {"type": base._count(0, base.MAX_BACKENDS), "help": f"{SLOWER:g}x slower backends"}),
    ("--failing", {"type": base._count(0, base.MAX_BACKENDS), "help": "backends failing all"}),
    (
        "--in-step",
        {
            "action": "store_true",
            "default": None,
            "help": "clients' balancers start fresh together (else each has made a random "
            "number of picks first)",
        },
    ),
    ("--compare", {"choices": COMPARISONS, "help": "run the baselines beside (see above)"}),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--fleet`` flag and the fleet's own options, on ``simulate``'s parser."""
    group = parser.add_argument_group(
        "fleet simulation (--fleet)",
        "a fleet of clients with subsets and zones, on a virtual clock (defaults in brackets; "
        "--clients 300, --backends 300, --requests 100,000, --algorithm roundrobin)",
    )
    group.add_argument(
        "--fleet", action="store_true", help="simulate a fleet (see the options below)"
    )
    for flag, keywords in FLEET_ONLY:
        group.add_argument(flag, **keywords)  # type: ignore[arg-type]


def options_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> FleetOptions:
    """The run's options from the command line; ``parser.error`` (exit 2) for bad ones."""
    defaults = FleetOptions()
    if args.algorithm is not None and args.algorithm not in ALGORITHMS:
        parser.error(
            f"argument --algorithm: {args.algorithm!r} maps keys to backends; a fleet with "
            f"subsets runs one that ignores the key: {', '.join(ALGORITHMS)}"
        )
    if args.weights is not None:
        parser.error("argument --weights: not used with --fleet")

    def given(name: str, default: object) -> object:
        value = getattr(args, name)
        return default if value is None else value

    zones = int(given("zones", defaults.zones))  # type: ignore[call-overload]
    capacity: tuple[float, ...] = args.zone_capacity or ()
    if capacity and len(capacity) != zones:
        parser.error(
            f"argument --zone-capacity: {len(capacity)} values for {zones} zones; give one per zone"
        )
    options = FleetOptions(
        clients=int(given("clients", defaults.clients)),  # type: ignore[call-overload]
        backends=int(given("backends", defaults.backends)),  # type: ignore[call-overload]
        zones=zones,
        algorithm=str(given("algorithm", defaults.algorithm)),
        subset_mode=str(given("subset_mode", defaults.subset_mode)),
        subset_size=int(given("subset_size", defaults.subset_size)),  # type: ignore[call-overload]
        requests=int(given("requests", defaults.requests)),  # type: ignore[call-overload]
        seed=args.seed,
        zone_aware=not args.zone_blind,
        capacity=capacity,
        concurrency=int(given("concurrency", defaults.concurrency)),  # type: ignore[call-overload]
        service=float(given("service_ms", 1.0)) / 1000,  # type: ignore[arg-type]
        distribution=str(given("distribution", defaults.distribution)),
        utilization=float(given("utilization", defaults.utilization)),  # type: ignore[arg-type]
        same_zone=float(given("same_zone_ms", 0.2)) / 1000,  # type: ignore[arg-type]
        cross_zone=float(given("cross_zone_ms", 1.0)) / 1000,  # type: ignore[arg-type]
        slow=int(given("slow", 0)),  # type: ignore[call-overload]
        failing=int(given("failing", 0)),  # type: ignore[call-overload]
        in_step=bool(args.in_step),
    )
    if options.utilization >= 1:
        parser.error(f"argument --utilization: must be below 1, got {options.utilization:g}")
    if options.backends < options.zones:
        parser.error(f"--backends {options.backends} is fewer than --zones {options.zones}")
    if min(capacity, default=1.0) * options.backends / math.fsum(capacity or [1.0]) < 1:
        parser.error(f"argument --zone-capacity: a zone of {capacity} would have no backend")
    if options.slow + options.failing > options.backends:
        parser.error(
            f"--slow {options.slow} and --failing {options.failing} are more than "
            f"--backends {options.backends}"
        )
    if options.failing == options.backends:
        parser.error("--failing: every backend would fail; leave at least one healthy")
    return options


def check_not_fleet(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Without ``--fleet``: an error naming a fleet-only option that was given."""
    for flag, _ in FLEET_ONLY:
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            parser.error(f"argument {flag}: applies only with --fleet")


def command(args: argparse.Namespace, parser: argparse.ArgumentParser, path: Path | None) -> int:
    """Run ``python -m lbclient simulate --fleet``: 0, or 2 after an error message."""
    options = options_from(args, parser)
    start = time.perf_counter()
    runs = compare(options, args.compare)
    print(format_runs(runs))
    if path is not None:
        plot(runs, path)
        print(f"\nplot written to {path}")
    print(f"\ntook {time.perf_counter() - start:.2f} s")
    return 0
