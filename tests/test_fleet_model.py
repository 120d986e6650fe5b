"""The fleet model: the real balancer on a simulated clock, queueing backends, a hidden load."""

from __future__ import annotations

import pytest

from lbclient.cli.bench import fleet_model
from lbclient.cli.bench.fleet_model import ALGORITHMS, run


def test_hidden_load_is_seen_by_reports_and_not_by_own_counts() -> None:
    results = {name: run(ALGORITHMS[name], hidden=12, requests=3000) for name in ALGORITHMS}
    assert results["RoundRobin"].odd_share == pytest.approx(0.25, abs=0.01)
    # The load-aware algorithms that count only their own requests keep sending some there.
    assert results["PeakEWMA"].odd_share > 0.01
    for name in ("Prequal", "Prequal r_probe=0"):
        assert results[name].odd_share < results["PeakEWMA"].odd_share / 5
        assert results[name].p99 < results["PeakEWMA"].p99
    assert results["Prequal"].probes > 0
    assert results["Prequal r_probe=0"].probes == 0
    # The same seed gives the same run.
    assert run(ALGORITHMS["Prequal"], hidden=12, requests=3000) == results["Prequal"]


def test_calm_backends_share_alike() -> None:
    for name in ("RoundRobin", "Prequal r_probe=0"):
        result = run(ALGORITHMS[name], requests=3000)
        assert 0.15 < result.odd_share < 0.35, name


def test_main_prints_every_row_and_the_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    assert fleet_model.main(["--requests", "500", "--hidden", "4"]) == 0
    out = capsys.readouterr().out
    for name in ALGORITHMS:
        assert out.count(f"| {name:<18} |") == 2
    assert "p99 against PeakEWMA's, hidden load:" in out
    with pytest.raises(SystemExit):
        fleet_model.main(["--requests", "0"])
