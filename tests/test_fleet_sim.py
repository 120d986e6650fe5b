"""``python -m lbclient simulate --fleet``: a fleet of clients, each with real balancers over
its subset and zone plan, on a virtual clock. Runs are called directly, and the command through
:func:`lbclient.cli.main` in this process."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from lbclient.cli import main
from lbclient.cli.fleet_sim import FleetOptions, compare, fleet_backends, run_fleet
from lbclient.zones import zone_of

SMALL = ["--fleet", "--clients", "30", "--backends", "12", "--zones", "3", "--requests", "2000"]
OPTIONS = FleetOptions(clients=30, backends=12, zones=3, subset_size=3, requests=2000)
FIGURES = [
    "connections/backend min/mean/max",
    "requests/backend min/mean/max",
    "cross-zone traffic",
    "latency p50",
    "latency p99",
    "one backend joins: clients changed",
    "one backend leaves: clients changed",
]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(["simulate", *args])
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def timeless(out: str) -> str:
    """``out`` without the wall-clock lines."""
    return "\n".join(
        line for line in out.splitlines() if not re.match(r"\s*(run took|took) ", line)
    )


def test_a_small_run_prints_every_figure_the_same_for_a_seed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = cli(capsys, *SMALL, "--subset-size", "3")
    assert (code, err) == (0, "")
    for figure in FIGURES:
        assert re.search(rf"^  {re.escape(figure)} +\S", out, re.M), figure
    assert "30 clients x 12 backends in 3 zones" in out
    again = cli(capsys, *SMALL, "--subset-size", "3")[1]
    assert timeless(again) == timeless(out)
    other = cli(capsys, *SMALL, "--subset-size", "3", "--seed", "7")[1]
    assert timeless(other) != timeless(out)


def test_runs_are_deterministic_values() -> None:
    first, second = run_fleet(OPTIONS), run_fleet(OPTIONS)
    assert replace(first, wall=0.0) == replace(second, wall=0.0)
    assert first.requests == 2000


@pytest.mark.parametrize(
    ("clients", "backends", "size"), [(30, 12, 3), (30, 12, 5), (17, 10, 4), (40, 9, 9)]
)
def test_deterministic_subsets_give_connection_counts_within_one(
    clients: int, backends: int, size: int
) -> None:
    options = FleetOptions(
        clients=clients, backends=backends, zones=1, subset_size=size, requests=500
    )
    run = run_fleet(options)
    assert max(run.connections) - min(run.connections) <= 1
    assert sum(run.connections) == clients * min(size, backends)


def test_random_subsets_spread_connections_unevenly() -> None:
    options = FleetOptions(clients=60, backends=30, zones=1, subset_size=9, requests=500)
    spread = run_fleet(replace(options, subset_mode="random")).connections
    assert max(spread) - min(spread) > 1
    even = run_fleet(options).connections
    assert max(even) - min(even) <= 1


def test_zone_aware_routing_stays_in_zone_when_zones_are_balanced() -> None:
    aware = run_fleet(OPTIONS)
    assert aware.cross_share <= 0.05
    blind = run_fleet(replace(OPTIONS, zone_aware=False))
    assert blind.cross_share > 0.4  # two thirds of the backends are elsewhere


def test_a_zone_at_half_capacity_spills_its_residual() -> None:
    options = replace(OPTIONS, backends=15, capacity=(0.5, 1.0, 1.0), requests=3000)
    run = run_fleet(options)
    backends = fleet_backends(15, 3, (0.5, 1.0, 1.0))
    assert [zone_of(b) for b in backends].count("a") == 3
    # Zone a's clients (a third) keep 3/15 / (1/3) = 60% at home and spill the rest.
    assert 0.08 < run.cross_share < 0.2


def test_churn_rendezvous_moves_at_most_one_member_and_random_joins_move_none() -> None:
    rendezvous = run_fleet(replace(OPTIONS, subset_mode="rendezvous", zones=1))
    assert rendezvous.joined is not None
    assert rendezvous.left is not None
    for changed, members, most in (rendezvous.joined, rendezvous.left):
        assert most <= 1
        assert members == changed
    deterministic = run_fleet(replace(OPTIONS, zones=1))
    assert deterministic.left is not None
    assert deterministic.left[0] > rendezvous.left[0]
    random_ = run_fleet(replace(OPTIONS, subset_mode="random", zones=1))
    assert random_.joined == (0, 0, 0)
    assert run_fleet(replace(OPTIONS, subset_mode="none")).joined is None


def test_failing_backends_are_ejected_by_the_real_health_book() -> None:
    options = replace(OPTIONS, zones=1, failing=1, requests=3000)
    run = run_fleet(options)
    holders = max(run.connections)  # the failing backend's clients, at most
    # Each client holding it sees at most 5 failures in a row before it is ejected for 30 s.
    assert 0 < run.failures <= 5 * holders


@pytest.mark.parametrize("algorithm", ["random", "leastrequest", "peakewma", "smooth"])
def test_every_key_less_algorithm_runs(algorithm: str) -> None:
    run = run_fleet(replace(OPTIONS, algorithm=algorithm, distribution="lognormal", slow=1))
    assert run.requests == 2000
    assert run.failures == 0


def test_compare_subsets_runs_the_three_modes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, *SMALL, "--zones", "1", "--compare", "subsets")
    assert code == 0
    heads = next(line for line in out.splitlines() if "deterministic, zone-aware" in line)
    assert "rendezvous" in heads
    assert "random" in heads
    assert len(compare(OPTIONS, "zones")) == 4


def test_plot_writes_a_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (lbclient[plot])")
    path = tmp_path / "fleet.png"
    code, out, _ = cli(capsys, *SMALL, "--plot", str(path))
    assert code == 0
    assert f"plot written to {path}" in out
    assert path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param(["--subset-mode", "sometimes"], "sometimes", id="subset-mode"),
        pytest.param(["--algorithm", "consistent"], "consistent", id="keyed-algorithm"),
        pytest.param(["--zones", "0"], "--zones", id="no-zones"),
        pytest.param(["--zone-capacity", "1,2"], "--zone-capacity", id="capacity-count"),
        pytest.param(["--zone-capacity", "1,0,1"], "--zone-capacity", id="capacity-zero"),
        pytest.param(["--utilization", "1.5"], "--utilization", id="overload"),
        pytest.param(["--failing", "12"], "--failing", id="all-failing"),
        pytest.param(["--weights", "1,2"], "--weights", id="weights"),
        pytest.param(["--compare", "everything"], "everything", id="compare"),
    ],
)
def test_bad_fleet_options_are_clear_errors(
    capsys: pytest.CaptureFixture[str], args: list[str], named: str
) -> None:
    code, out, err = cli(capsys, *SMALL, *args)
    assert code == 2
    assert not out
    assert "error:" in err
    assert named in err


def test_fleet_options_without_fleet_are_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "--zones", "3")
    assert code == 2
    assert not out
    assert "--zones: applies only with --fleet" in err


@pytest.mark.slow
def test_half_capacity_p99_stays_near_zone_blind_routing() -> None:
    options = FleetOptions(
        clients=90, backends=90, subset_size=10, requests=30_000, capacity=(0.5, 1.0, 1.0)
    )
    aware, blind = run_fleet(options), run_fleet(replace(options, zone_aware=False))
    assert aware.cross_share < blind.cross_share
    assert aware.p99 <= 1.2 * blind.p99


def test_each_client_is_one_wired_balancer_with_its_subset_and_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lbclient import LoadBalancer, Subset
    from lbclient.cli import fleet_sim

    made: list[LoadBalancer] = []

    class Recorded(LoadBalancer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    def refused(*_args: object) -> None:
        raise AssertionError("routing computed members outside the balancer")

    monkeypatch.setattr(fleet_sim, "LoadBalancer", Recorded)
    monkeypatch.setattr(Subset, "members", refused)  # the balancer uses its own view
    run = run_fleet(replace(OPTIONS, churn=False))
    assert run.requests == 2000
    assert len(made) == OPTIONS.clients
    assert all(len(lb.backends) == OPTIONS.backends for lb in made)
    zones = [lb.zone for lb in made]
    assert [z.name for z in zones if z is not None] == [
        "abc"[i % 3] for i in range(OPTIONS.clients)
    ]
    assert {z.clients["a"] for z in zones if z is not None and z.clients} == {10.0}
    # Deterministic subsets by rank among the clients of each zone (ten per zone).
    assert [lb.subset for lb in made[:4]] == [
        Subset(3, index=0, clients=10),
        Subset(3, index=0, clients=10),
        Subset(3, index=0, clients=10),
        Subset(3, index=1, clients=10),
    ]
    made.clear()
    run_fleet(replace(OPTIONS, churn=False, zone_aware=False))
    blind = [lb.subset for lb in made[:2]]
    assert blind == [Subset(3, index=0, clients=30), Subset(3, index=1, clients=30)]
    assert all(lb.zone is None for lb in made)


def test_zone_aware_connections_count_the_members_of_the_local_zone() -> None:
    for mode in ("deterministic", "rendezvous", "random"):
        run = run_fleet(replace(OPTIONS, subset_mode=mode, churn=False))
        # Ten clients per zone, 3 members each in their own zone, four backends per zone.
        assert sum(run.connections) == OPTIONS.clients * 3, mode
        if mode == "deterministic":
            assert set(run.connections) <= {7, 8}


def test_zone_aware_churn_counts_the_subsets_within_the_zones_routed_to() -> None:
    run = run_fleet(replace(OPTIONS, subset_mode="rendezvous"))
    assert run.joined is not None
    # The new backend joins zone a: only zone a's ten clients route there.
    changed, members, most = run.joined
    assert 0 < changed <= 10
    assert (members, most) == (changed, 1)
    deterministic = run_fleet(OPTIONS)
    assert deterministic.joined is not None
    assert deterministic.joined[0] <= 10
