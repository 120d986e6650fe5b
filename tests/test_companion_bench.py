"""The server companion's benchmark runs alone, prints its table, and leaves no server behind
(the figures themselves are not checked: a measurement, not a test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import leaves_no_process

from lbclient.cli.bench.companion import CASES
from lbclient.cli.bench.pyservers import uvicorn_flavour

#: The shortest run: one round of 0.1 s per side and case.
SMOKE = ("--seconds", "0.1", "--rounds", "1")


@pytest.mark.slow
def test_companion_benchmark_runs_alone_and_prints_its_table(tmp_path: Path) -> None:
    with leaves_no_process() as env:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "lbclient.cli.bench.companion",
                *("--seconds", "0.1"),
                *("--rounds", "1"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=env,
            check=False,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    # Which HTTP parser and loop uvicorn took: its cost per request depends on them.
    assert f"({uvicorn_flavour()})" in lines[0]
    head = next(i for i, line in enumerate(lines) if line.startswith("case "))
    assert [cell.strip() for cell in lines[head].split("|")][:4] == [
        "case",
        "plain",
        "middleware",
        "ratio",
    ]
    rows = lines[head + 2 : head + 2 + len(CASES)]
    assert [row.split("|")[0].strip() for row in rows] == [name for name, _, _ in CASES]
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")]
        assert cells[1].endswith(" req/s")
        assert cells[2].endswith(" req/s")
        float(cells[3])
    assert lines[head + 2 + len(CASES)].startswith("-")
    # Then, in process, a tracker counting its process alone and one sharing with three others.
    start = next(i for i, line in enumerate(lines) if line.startswith("In process, LoadTracker"))
    alone, shared = lines[start + 1 : start + 3]
    assert alone.startswith("  counted per process (share_in_flight=False)")
    assert float(alone.split()[-2]) > 0
    if sys.platform.startswith("linux"):
        assert shared.startswith("  shared with 3 other worker processes")
        assert float(shared.split()[-2]) > 0
    else:
        assert "not available here" in shared


def test_companion_benchmark_rejects_bad_round_settings() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lbclient.cli.bench.companion", "--rounds", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--rounds" in done.stderr
