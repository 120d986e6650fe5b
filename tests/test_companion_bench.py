"""The server companion's benchmark runs alone, prints its table, and leaves no server behind
(the figures themselves are not checked: a measurement, not a test)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cli_runs import leaves_no_process

from lbclient.cli.bench.companion import CASES
from lbclient.cli.bench.pyservers import uvicorn_command, uvicorn_flavour

#: The shortest run: one round of 0.1 s per side and case.
SMOKE = ("--seconds", "0.1", "--rounds", "1")


@pytest.mark.slow
@pytest.mark.parametrize("http", ["auto", "h11"])  # auto: httptools where installed
def test_companion_benchmark_runs_alone_and_prints_its_table(tmp_path: Path, http: str) -> None:
    with leaves_no_process() as env:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "lbclient.cli.bench.companion",
                *("--seconds", "0.1"),
                *("--rounds", "1"),
                *(("--http", http) if http != "auto" else ()),
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
    assert f"({uvicorn_flavour(http)})" in lines[0]
    if http == "h11":
        assert "(h11, " in lines[0]
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


def test_uvicorn_is_started_with_the_protocol_asked() -> None:
    assert "--http" not in uvicorn_command("apps:app")
    assert uvicorn_command("apps:app", "httptools")[-2:] == ["--http", "httptools"]
    assert uvicorn_flavour("h11").startswith("h11, ")
    assert uvicorn_flavour("httptools").startswith("httptools, ")


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


#: uvicorn's protocols the instruction count runs under: h11, and httptools where installed (the
#: dev extra installs it, as uvicorn[standard] does).
HTTP = [
    "h11",
    pytest.param(
        "httptools",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("httptools") is None, reason="httptools is not installed"
        ),
    ),
]


@pytest.mark.parametrize("http", HTTP)
@pytest.mark.parametrize(
    "app", ["plain", "floor", "reported", "alone", "own clock", "carry", "short"]
)
@pytest.mark.parametrize("ask", [False, True])
def test_the_instruction_count_harness_answers_every_request(
    app: str, ask: bool, http: str
) -> None:
    # What valgrind counts runs uvicorn's protocol in process; it raises unless every request
    # got its answer (the count's own test of the harness, no valgrind needed).
    from lbclient.cli.bench import companion_count

    head = companion_count._serve(app, 25, ask, http)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    # The carry app writes its header whatever the request (it is counted with the report asked).
    reported = app in ("carry", "short") or (ask and app in ("reported", "alone", "own clock"))
    assert (b"\r\nendpoint-load-metrics: " in head) == reported


@pytest.mark.parametrize("http", HTTP)
def test_the_counted_middleware_shares_its_count_as_a_server_does(
    http: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The middleware is counted as a server runs it: its tracker finds the harness's listening
    # socket and shares its requests in flight (the "alone" case counts its process only).
    from lbclient.cli.bench import companion_count

    made: dict[str, Any] = {}
    for name in ("reported", "alone", "own clock"):
        factory = companion_count._APPS[name]
        monkeypatch.setitem(
            companion_count._APPS, name, lambda f=factory, n=name: made.setdefault(n, f())
        )
        companion_count._serve(name, 3, False, http)
    assert made["reported"].tracker.shared
    assert made["own clock"].tracker.shared
    assert not made["alone"].tracker.shared
    assert made["own clock"].tracker.clock is time.monotonic  # a server's, read in C


@pytest.mark.parametrize("http", HTTP)
def test_the_middleware_writes_a_report_as_long_as_the_carry_case(http: str) -> None:
    # The carry case costs what a report of the usual length costs the server; the middleware's
    # own report, in the counted requests, must be as long (not a shorter one, costing less).
    from lbclient.cli.bench import companion_count

    def report(app: str, requests: int) -> bytes:
        head = companion_count._serve(app, requests, True, http)
        return head.partition(b"\r\nendpoint-load-metrics: ")[2].partition(b"\r\n")[0]

    assert report("carry", 3) == companion_count.REPORT
    for requests in (companion_count.FEW, companion_count.MANY):
        written = report("reported", requests)
        assert written.startswith(b"TEXT cpu_utilization=0.412345, rps_fractional=")
        assert b"latency_ms=0.187654" in written
        assert len(companion_count.REPORT) <= len(written) <= len(companion_count.REPORT) + 2


def test_the_instruction_count_serves_under_the_protocol_asked() -> None:
    # The command valgrind runs: this module with --serve, the protocol last.
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lbclient.cli.bench.companion_count",
            *("--serve", "reported", "5", "ask", http),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def _counted(app: str, requests: int, ask: bool, http: str, cwd: str) -> int:
    """Instructions as valgrind would count them: start-up, then per request (httptools' own
    share half of h11's)."""
    made = {"plain": 500, "floor": 505, "reported": 515, "alone": 512, "own clock": 514}
    made.update({"carry": 522, "short": 518})
    own = made[app] + (20 if ask else 0)
    return 1_000_000 + requests * (own if http == "h11" else own - 250)


def test_the_instruction_counts_are_per_request_and_against_the_plain_app(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lbclient.cli.bench import companion_count

    monkeypatch.setattr(companion_count, "_instructions", _counted)
    rows = companion_count.count(few=10, many=110)
    assert [row.case for row in rows] == [case[0] for case in companion_count.CASES]
    by_case = {row.case: row for row in rows}
    assert by_case["plain app"].per_request == 500
    assert by_case["LoadReportingASGI"].ratio == pytest.approx(500 / 515)
    asked = by_case["LoadReportingASGI, every request asks for the report"]
    assert (asked.per_request, asked.ratio) == (535, pytest.approx(520 / 535))
    # Under each protocol, against the plain app under the same protocol.
    both = companion_count.count_protocols(["h11", "httptools"], few=10, many=110, jobs=2)
    assert both["h11"] == rows
    tools = {row.case: row for row in both["httptools"]}
    assert tools["plain app"].per_request == 250
    asked = tools["LoadReportingASGI, every request asks for the report"]
    assert (asked.per_request, asked.ratio) == (285, pytest.approx(270 / 285))


def test_the_instruction_count_prints_both_protocols_side_by_side(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lbclient.cli.bench import companion_count

    monkeypatch.setattr(companion_count, "_instructions", _counted)
    monkeypatch.setattr(companion_count.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(companion_count, "available", lambda http: True)
    assert companion_count.main(["--jobs", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Instructions per request under uvicorn's h11 and httptools")
    assert [cell.strip() for cell in lines[1].split("|")] == [
        "case",
        "h11 instructions/request",
        "ratio",
        "httptools instructions/request",
        "ratio",
    ]
    rows = lines[3 : 3 + len(companion_count.CASES)]
    assert [row.split("|")[0].strip() for row in rows] == [c[0] for c in companion_count.CASES]
    plain = [cell.strip() for cell in rows[0].split("|")]
    assert plain[1:] == ["500", "1.000", "250", "1.000"]
    assert lines[3 + len(companion_count.CASES)].startswith("-")
    # One protocol asked: its columns alone.
    assert companion_count.main(["--http", "httptools", "--jobs", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "uvicorn's httptools protocol," in lines[0]
    assert [cell.strip() for cell in lines[1].split("|")][1:] == [
        "httptools instructions/request",
        "ratio",
    ]
