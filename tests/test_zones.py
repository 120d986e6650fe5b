"""Zone shares: Envoy's zone-aware arithmetic, its minimum size, the health and load spill."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbclient import Backend
from lbclient.zones import ZonePlan, plan_zones, zone_counts, zone_of


def approx(shares: dict[str, float]) -> object:
    return pytest.approx(shares)


def test_balanced_zones_route_everything_locally() -> None:
    plan = plan_zones("a", {"a": 4, "b": 4, "c": 4})
    assert (plan.mode, dict(plan.shares), plan.local_share) == ("local", {"a": 1.0}, 1.0)
    assert plan.share("b") == 0.0


def test_local_zone_with_more_backends_than_its_clients_routes_everything_locally() -> None:
    plan = plan_zones("a", {"a": 6, "b": 3, "c": 3}, clients={"a": 1, "b": 1, "c": 1})
    assert dict(plan.shares) == {"a": 1.0}


def test_local_zone_short_of_capacity_sends_the_residual_by_spare_capacity() -> None:
    # a: 20% of the backends for a third of the clients -> 0.2 / (1/3) = 60% stays local
    plan = plan_zones("a", {"a": 2, "b": 4, "c": 4}, clients={"a": 1, "b": 1, "c": 1})
    assert plan.mode == "residual"
    assert dict(plan.shares) == approx({"a": 0.6, "b": 0.2, "c": 0.2})
    # unequal spare capacity: b has 1/2 - 1/3, c has 1/4 - 1/3 < 0 (none)
    plan = plan_zones("a", {"a": 3, "b": 6, "c": 3}, clients={"a": 1, "b": 1, "c": 1})
    assert dict(plan.shares) == approx({"a": 0.75, "b": 0.25})


def test_residual_routing_keeps_every_backend_at_the_same_rate() -> None:
    healthy = {"a": 2, "b": 5, "c": 9}
    clients = {"a": 5, "b": 5, "c": 6}
    total_clients = sum(clients.values())
    arriving = dict.fromkeys(healthy, 0.0)
    for zone, count in clients.items():
        for target, share in plan_zones(zone, healthy, clients=clients).shares.items():
            arriving[target] += count / total_clients * share
    per_backend = [arriving[z] / healthy[z] for z in healthy]
    assert max(per_backend) == pytest.approx(min(per_backend))


def test_unhealthy_local_backends_spill_in_proportion_by_default() -> None:
    # clients spread like all the backends; a lost one of its four: 3/11 healthy vs 4/12 clients
    plan = plan_zones("a", {"a": 3, "b": 4, "c": 4}, total={"a": 4, "b": 4, "c": 4})
    assert plan.mode == "residual"
    assert plan.local_share == pytest.approx((3 / 11) / (4 / 12))
    assert plan.share("b") == pytest.approx(plan.share("c"))
    assert math.fsum(plan.shares.values()) == pytest.approx(1.0)


def test_fewer_than_min_backends_is_zone_blind() -> None:
    plan = plan_zones("a", {"a": 1, "b": 2, "c": 2})
    assert plan.mode == "blind"
    assert dict(plan.shares) == approx({"a": 0.2, "b": 0.4, "c": 0.4})
    assert plan_zones("a", {"a": 2, "b": 2, "c": 2}).mode == "local"
    assert plan_zones("a", {"a": 2, "b": 2, "c": 2}, min_backends=7).mode == "blind"


def test_local_zone_under_the_panic_threshold_spills_zone_blind() -> None:
    total = {"a": 4, "b": 4, "c": 4}
    plan = plan_zones("a", {"a": 1, "b": 4, "c": 4}, total=total)
    assert plan.mode == "blind"
    assert dict(plan.shares) == approx({"a": 1 / 9, "b": 4 / 9, "c": 4 / 9})
    plan = plan_zones("a", {"a": 0, "b": 4, "c": 4}, total=total)
    assert dict(plan.shares) == approx({"b": 0.5, "c": 0.5})
    # exactly at the threshold is not under it
    assert plan_zones("a", {"a": 2, "b": 4, "c": 4}, total=total).mode == "residual"
    assert plan_zones("a", {"a": 2, "b": 4, "c": 4}, total=total, panic_threshold=0.6).mode == (
        "blind"
    )


def test_local_zone_loaded_beyond_the_band_spills() -> None:
    healthy = {"a": 4, "b": 4, "c": 4}
    calm = plan_zones("a", healthy, load={"a": 3.9, "b": 2, "c": 2})
    assert calm.mode == "local"
    hot = plan_zones("a", healthy, load={"a": 4.1, "b": 2, "c": 2})
    assert hot.mode == "blind"
    assert dict(hot.shares) == approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    # the others' load is their mean weighted by healthy backends: (1*2 + 3*6) / 4 = 5
    assert plan_zones("a", {"a": 4, "b": 1, "c": 3}, load={"a": 10, "b": 2, "c": 6}).mode == "local"
    assert plan_zones("a", {"a": 4, "b": 1, "c": 3}, load={"a": 10.1, "b": 2, "c": 6}).mode == (
        "blind"
    )
    assert plan_zones("a", healthy, load={"a": 3, "b": 2}, load_spill=1.4).mode == "blind"
    # nothing to compare: no reading for the local zone, none for the others, an idle fleet
    assert plan_zones("a", healthy, load={"b": 9}).mode == "local"
    assert plan_zones("a", healthy, load={"a": 9}).mode == "local"
    assert plan_zones("a", healthy, load={"a": 9, "b": 0, "c": 0}).mode == "local"


def test_a_load_floor_and_the_band_s_bottom_hold_a_spill() -> None:
    healthy = {"a": 4, "b": 4, "c": 4}
    idle = {"a": 2.1, "b": 0, "c": 0}
    # An idle other side counts as the floor: over 2x a floor of 1 spills, under does not.
    assert plan_zones("a", healthy, load=idle, load_floor=1.0).spilled
    assert not plan_zones("a", healthy, load={"a": 1.9, "b": 0}, load_floor=1.0).spilled
    # Once spilled, it stays until the local load falls to 0.8x the others' (floored).
    held = {"a": 1.5, "b": 1.0, "c": 1.0}
    assert not plan_zones("a", healthy, load=held, load_floor=1.0).spilled
    kept = plan_zones("a", healthy, load=held, load_floor=1.0, spilled=True)
    assert (kept.mode, kept.spilled) == ("blind", True)
    assert "still over 0.8x" in kept.reason
    back = plan_zones("a", healthy, load={"a": 0.7, "b": 0.2}, load_floor=1.0, spilled=True)
    assert (back.mode, back.spilled) == ("local", False)
    lower = plan_zones("a", healthy, load=held, load_floor=1.0, spilled=True, load_return=0.5)
    assert lower.spilled
    # Health comes first: a spill for load is one only when the zone is healthy enough.
    assert not plan_zones("a", {"a": 1, "b": 4, "c": 4}, total=healthy, load=idle).spilled


def test_unknown_or_emptied_local_zone_falls_back_to_zone_blind() -> None:
    plan = plan_zones("d", {"a": 2, "b": 2, "c": 2})
    assert plan.mode == "blind"
    assert "no backend in the local zone 'd'" in plan.reason
    assert plan_zones("a", {"a": 0, "b": 3, "c": 3}, total={"a": 0, "b": 3, "c": 3}).mode == (
        "blind"
    )


def test_no_healthy_backend_is_an_empty_plan() -> None:
    plan = plan_zones("a", {"a": 0, "b": 0}, total={"a": 4, "b": 4})
    assert plan == ZonePlan("a", {}, "none", "no healthy backend")
    assert plan.local_share == 0.0
    assert plan_zones("a", {}).mode == "none"


@settings(max_examples=200, deadline=None)
@given(
    healthy=st.dictionaries(st.sampled_from("abcde"), st.integers(0, 40), min_size=1),
    clients=st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 40), min_size=1),
    local=st.sampled_from("abcdef"),
)
def test_shares_are_a_distribution_and_never_exceed_capacity(
    healthy: dict[str, int], clients: dict[str, int], local: str
) -> None:
    clients.setdefault(local, 1)
    plan = plan_zones(local, healthy, clients=clients)
    assert plan == plan_zones(local, dict(healthy), clients=dict(clients))  # pure
    if not any(healthy.values()):
        assert plan.mode == "none"
        return
    assert math.fsum(plan.shares.values()) == pytest.approx(1.0)
    assert all(share > 0 and healthy[z] > 0 for z, share in plan.shares.items())
    if plan.mode == "residual":
        up = healthy[local] / sum(healthy.values())
        assert plan.local_share == pytest.approx(up / (clients[local] / sum(clients.values())))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: plan_zones(1, {"a": 1}), TypeError, "local zone must be a str"),  # type: ignore[arg-type]
        (lambda: plan_zones("", {"a": 1}), ValueError, "local zone must not be empty"),
        (lambda: plan_zones("a", {"a": -1}), ValueError, r"healthy\['a'\] must be a finite"),
        (lambda: plan_zones("a", {"a": math.nan}), ValueError, "finite number"),
        (lambda: plan_zones("a", {"a": True}), TypeError, "must be a number, got True"),
        (lambda: plan_zones("a", {"a": "3"}), TypeError, "must be a number, got '3'"),  # type: ignore[dict-item]
        (lambda: plan_zones("a", {1: 3}), TypeError, "zones must be str"),  # type: ignore[dict-item]
        (lambda: plan_zones("a", [("a", 1)]), TypeError, "healthy must be a mapping"),  # type: ignore[arg-type]
        (
            lambda: plan_zones("a", {"a": 5}, total={"a": 4}),
            ValueError,
            r"zone 'a' has more healthy backends \(5\) than backends \(4\)",
        ),
        (
            lambda: plan_zones("a", {"a": 5, "b": 1}, total={"a": 5}),
            ValueError,
            "zone 'b' has healthy backends but is missing from total",
        ),
        (
            lambda: plan_zones("a", {"a": 5}, clients={"b": 3}),
            ValueError,
            "clients has none in the local zone 'a'",
        ),
        (lambda: plan_zones("a", {"a": 5}, load={"a": -2}), ValueError, r"load\['a'\]"),
        (lambda: plan_zones("a", {"a": 5}, min_backends=-1), ValueError, "min_backends"),
        (lambda: plan_zones("a", {"a": 5}, panic_threshold=1.5), ValueError, "panic_threshold"),
        (lambda: plan_zones("a", {"a": 5}, load_spill=0.5), ValueError, "load_spill"),
    ],
)
def test_bad_inputs_are_clear_errors(call: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]


def test_zone_counts_from_backend_metadata() -> None:
    backends = [
        Backend("10.0.0.1:80", metadata={"zone": "a"}),
        Backend("10.0.0.2:80", metadata={"zone": "a"}),
        Backend("10.0.0.3:80", metadata={"zone": "b"}),
        Backend("10.0.0.4:80"),
    ]
    assert zone_of(backends[3]) == ""
    assert zone_counts(backends) == ({"a": 2, "b": 1, "": 1}, {"a": 2, "b": 1, "": 1})
    down = {backends[0]}
    assert zone_counts(backends, lambda b: b not in down) == (
        {"a": 1, "b": 1, "": 1},
        {"a": 2, "b": 1, "": 1},
    )


def test_a_plan_is_an_immutable_hashable_value() -> None:
    plan = plan_zones("a", {"a": 2, "b": 4, "c": 4}, clients={"a": 1, "b": 1, "c": 1})
    assert hash(plan) == hash(
        plan_zones("a", {"a": 2, "b": 4, "c": 4}, clients={"a": 1, "b": 1, "c": 1})
    )
    with pytest.raises(AttributeError):
        plan.local = "b"  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan.shares["a"] = 1.0  # type: ignore[index]
