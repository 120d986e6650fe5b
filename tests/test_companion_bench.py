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


@pytest.mark.parametrize("app", ["plain", "floor", "reported", "carry"])
@pytest.mark.parametrize("ask", [False, True])
def test_the_instruction_count_harness_answers_every_request(app: str, ask: bool) -> None:
    # What valgrind counts runs uvicorn's h11 protocol in process; it raises unless every
    # request got its answer (the count's own test of the harness, no valgrind needed).
    from lbclient.cli.bench import companion_count

    companion_count._serve(app, 25, ask)


def test_the_instruction_counts_are_per_request_and_against_the_plain_app(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lbclient.cli.bench import companion_count

    made = {"plain": 500, "floor": 505, "reported": 515, "carry": 522}

    def counted(app: str, requests: int, ask: bool) -> int:  # start-up, then per request
        return 1_000_000 + requests * (made[app] + (20 if ask else 0))

    monkeypatch.setattr(companion_count, "_instructions", counted)
    rows = companion_count.count(few=10, many=110)
    assert [row.case for row in rows] == [case[0] for case in companion_count.CASES]
    by_case = {row.case: row for row in rows}
    assert by_case["plain app"].per_request == 500
    assert by_case["LoadReportingASGI"].ratio == pytest.approx(500 / 515)
    asked = by_case["LoadReportingASGI, every request asks for the report"]
    assert (asked.per_request, asked.ratio) == (535, pytest.approx(520 / 535))
