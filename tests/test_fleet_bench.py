"""The fleet benchmark runs alone, prints its table and its aims, and leaves no process behind
(the figures themselves are not checked: a measurement, not a test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import leaves_no_process

from lbclient.cli.bench.fleet import ALGORITHMS, COLUMNS, SETUPS
from lbclient.cli.bench.fleet_apps import DEFAULT_SERVICE, SERVICE_VARIABLE, service_time

#: The shortest run: one round of 0.1 s per case (after 0.25 s of warm-up).
SMOKE = ("--seconds", "0.1", "--rounds", "1")


def fleet(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "lbclient.cli.bench.fleet", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    return done.stdout


@pytest.mark.slow
def test_fleet_benchmark_runs_alone_and_prints_every_row(tmp_path: Path) -> None:
    # At 40 ms a request (the default is 20): the service time given reaches the backends.
    with leaves_no_process() as env:
        out = fleet(*SMOKE, "--service", "40", cwd=tmp_path, env=env)
    assert "for 40 ms each" in out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("setup "))
    assert [cell.strip() for cell in lines[head].split("|")] == [name for name, _ in COLUMNS]
    assert set(lines[head + 1]) <= {"-", "+"}
    rows = [[cell.strip() for cell in line.split("|")] for line in lines[head + 2 :]]
    rows = rows[: len(SETUPS) * len(ALGORITHMS)]
    expected = [(setup.name, name) for setup in SETUPS for name, _ in ALGORITHMS]
    assert [(cells[0], cells[1]) for cells in rows] == expected
    for cells, (setup, name) in zip(rows, expected, strict=True):
        assert len(cells) == len(COLUMNS)
        assert int(cells[2]) >= 1
        if cells[3] == "not available":
            assert name == "Prequal"
            continue
        float(cells[3].replace(",", ""))
        assert cells[4].endswith(" ms")
        if setup == "calm":  # served for 40 ms: no answer comes sooner
            assert float(cells[4].removesuffix(" ms").replace(",", "")) >= 40.0, cells
        assert cells[5].endswith(" ms")
        odd = next(s for s in SETUPS if s.name == setup).odd
        assert cells[6].endswith("%") if odd else cells[6] == "-"
        assert cells[7].endswith("%)")
        assert cells[9].endswith("%")
    assert set(lines[head + 2 + len(rows)]) <= {"-", "+"}
    aims = lines[lines.index("aims:") + 1 :]
    for text in (
        "hidden load: Prequal p99 <= 0.60x PeakEWMA's",
        "fail-fast: Prequal failures <= 0.20x RoundRobin's",
        "CPU-bound: Prequal req/s >= 0.90x RoundRobin's",
        "stall: PeakEWMA p99 / its calm p99",
    ):
        line = next(line for line in aims if line.strip().startswith(text))
        assert line.endswith(("met", "NOT MET", "for information", "not available)"))


def test_fleet_benchmark_rejects_bad_settings() -> None:
    for args in (
        ("--rounds", "0"),
        ("--setups", "nowhere"),
        ("--tasks", "0"),
        ("--service", "0"),
        ("--service", "nan"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "lbclient.cli.bench.fleet", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, args
        assert "error" in done.stderr


def test_the_service_time_is_read_from_the_environment() -> None:
    assert service_time({}) == DEFAULT_SERVICE
    assert service_time({SERVICE_VARIABLE: "20"}) == 0.02
    for bad in ("0", "-5", "nan", "inf", "twenty", "20000"):
        with pytest.raises(ValueError, match=SERVICE_VARIABLE):
            service_time({SERVICE_VARIABLE: bad})
