"""``python -m lbclient simulate``'s load runs: the algorithms that ignore the key, on a simulated
clock with one slow backend (or one failing fast), beside RoundRobin.

The runs are called directly, and the command through :func:`lbclient.cli.main` in this
process; one test runs ``python -m lbclient simulate --algorithm peakewma`` as a user does.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest

from lbclient import Backend
from lbclient.cli import main
from lbclient.cli.simulate import (
    BASELINE,
    FAST,
    SLOW,
    LoadRun,
    backends_for,
    compare_load,
    format_load_report,
    simulate_load,
)

TEN = backends_for([1] * 10)
LOAD_AWARE = ["leastrequest", "peakewma"]
NOT_KEYED = ["roundrobin", "smooth", "random", *LOAD_AWARE]

# A backend's row in a load table: address, weight, nominal answer time, then per run its
# requests and share.
LOAD_ROW = re.compile(
    r"^  (?P<address>\S+:\d+) +(?P<weight>\d+) +(?P<answers>[\d.]+ ms(?:, 503)?)"
    r"(?P<cells>(?: +[\d,]+ +\d+\.\d\d%(?: +[\d,]+(?![\d.,]))?)+) +(?P<fair>\d+\.\d\d)%"
    r"(?:  <- [a-z ]+)?$",
    re.M,
)
# A backend's row in the key distribution (as the key-spread tests read it).
KEY_ROW = re.compile(
    r"^  (?P<address>\S+:\d+) +(?P<weight>\d+) +(?P<keys>[\d,]+) +(?P<share>[\d.]+)% +"
    r"(?P<fair>[\d.]+)% +(?P<load>[\d.]+)",
    re.M,
)


def run(
    algorithm: str,
    scenario: str = "slow",
    seed: int = 0,
    backends: list[Backend] = TEN,
    **kwargs: int,
) -> LoadRun:
    return simulate_load(algorithm, backends, scenario, seed=seed, **kwargs)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``python -m lbclient simulate ARGS...`` in this process: (status, stdout, stderr)."""
    try:
        status = main(["simulate", *args])
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


# -- the slow backend ------------------------------------------------------------------------------


def test_round_robin_sends_the_slow_backend_its_fair_share() -> None:
    baseline = run(BASELINE)
    assert baseline.odd == TEN[0]
    assert sum(s.requests for s in baseline.shares) == 20_000
    assert all(s.share == pytest.approx(0.1, abs=0.001) for s in baseline.shares)
    assert baseline.failures == 0
    # One request in ten takes 10 ms: the mean is about 1.9 ms, the p99 in the slow band.
    assert baseline.mean == pytest.approx(0.9 * FAST + 0.1 * SLOW, rel=0.05)
    assert SLOW * 0.75 <= baseline.p99 <= SLOW * 1.25


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("algorithm", LOAD_AWARE)
def test_load_aware_algorithms_send_the_slow_backend_far_less(algorithm: str, seed: int) -> None:
    baseline = run(BASELINE, seed=seed)
    aware = run(algorithm, seed=seed)
    assert sum(s.requests for s in aware.shares) == 20_000
    assert aware.odd_share.share < baseline.odd_share.share / 3
    assert aware.mean < baseline.mean * 0.75
    assert aware.throughput > baseline.throughput * 1.3
    assert aware.p99 <= baseline.p99
    # What the slow backend does not take, the fast ones share evenly.
    fast = [s.share for s in aware.shares if s.backend != aware.odd]
    assert max(fast) - min(fast) < 0.02


def test_peak_ewma_nearly_stops_sending_to_the_slow_backend() -> None:
    aware = run("peakewma")
    assert aware.odd_share.share < 0.005  # measured once or twice, then avoided
    assert aware.p99 < SLOW / 2  # no request in a hundred waits for it


def test_load_aware_with_weights_keeps_the_weighted_shares_of_the_fast_backends() -> None:
    backends = backends_for([1, 1, 2, 4])
    baseline = run(BASELINE, backends=backends, requests=8000, clients=16)
    aware = run("peakewma", backends=backends, requests=8000, clients=16)
    assert [round(s.share, 3) for s in baseline.shares] == [0.125, 0.125, 0.25, 0.5]
    assert aware.odd_share.share < baseline.odd_share.share / 3
    shares = [s.share for s in aware.shares]
    assert shares[1] < shares[2] < shares[3]


# -- the backend failing fast ----------------------------------------------------------------------


def test_round_robin_callers_see_half_the_failing_backends_requests_fail() -> None:
    baseline = run(BASELINE, "failing")
    odd = baseline.odd_share
    assert odd.failures == (odd.requests + 1) // 2  # every other one, the first failing
    assert baseline.failures == odd.failures
    assert baseline.failure_share == pytest.approx(0.05, abs=0.001)


@pytest.mark.parametrize("algorithm", LOAD_AWARE)
def test_a_backend_failing_fast_does_not_draw_load_aware_traffic(algorithm: str) -> None:
    aware = run(algorithm, "failing")
    assert aware.failures > 0  # it is tried, and fails
    assert aware.failure_share < 0.005
    assert aware.failures == aware.odd_share.failures


# -- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", NOT_KEYED)
def test_a_run_is_the_same_for_a_seed(algorithm: str) -> None:
    first = run(algorithm, requests=3000)
    again = run(algorithm, requests=3000)
    assert again == first
    other = run(algorithm, requests=3000, seed=7)
    assert other != first  # the service times, at least, differ


def test_a_run_neither_reads_nor_leaves_changed_the_shared_random_generator() -> None:
    random.seed(123)
    state = random.getstate()
    first = run("leastrequest", requests=3000)
    assert random.getstate() == state
    random.random()  # whatever the shared generator's state, the run is the same
    assert run("leastrequest", requests=3000) == first


def test_compare_load_pairs_each_scenario_with_the_baseline() -> None:
    comparison = compare_load("leastrequest", TEN, clients=8, requests=2000, seed=3)
    assert [(a.scenario, b.scenario) for a, b in comparison.pairs] == [
        ("slow", "slow"),
        ("failing", "failing"),
    ]
    assert all(
        a.algorithm == "leastrequest" and b.algorithm == BASELINE for a, b in comparison.pairs
    )
    assert comparison.pairs[0][0] == run("leastrequest", seed=3, clients=8, requests=2000)
    # The baseline against itself is one run, shown once.
    own = compare_load(BASELINE, TEN, clients=8, requests=2000)
    assert all(a is b for a, b in own.pairs)
    text = format_load_report(own)
    assert text.count("roundrobin (baseline)") == 2
    assert len(LOAD_ROW.findall(text)) == 20


def test_more_clients_than_requests_sends_each_request_once() -> None:
    result = run("peakewma", clients=50, requests=7)
    assert sum(s.requests for s in result.shares) == 7
    assert result.duration > 0


# -- the report ----------------------------------------------------------------------------------


def test_the_report_shows_both_runs_side_by_side() -> None:
    text = format_load_report(compare_load("peakewma", TEN, requests=4000))
    assert "Simulated run, one slow backend" in text
    assert "Simulated run, one backend failing fast" in text
    rows = [m.groupdict() for m in LOAD_ROW.finditer(text)]
    assert len(rows) == 20
    slow = rows[0]
    assert slow["address"] == "10.0.0.1:8080"
    assert slow["answers"] == "10 ms"
    cells = re.findall(r"([\d,]+) +([\d.]+)%", slow["cells"])
    assert len(cells) == 2  # peakewma's, then roundrobin's
    assert float(cells[0][1]) < float(cells[1][1]) == 10.0
    assert rows[10]["answers"] == "1 ms, 503"
    for label in ("failures callers see", "mean latency", "p99 latency", "throughput"):
        assert label in text
    assert re.search(r"throughput +[\d,]+ req/s +[\d,]+ req/s", text)


@pytest.mark.parametrize("algorithm", NOT_KEYED)
def test_the_command_keeps_the_key_spread_and_adds_the_load_runs(
    capsys: pytest.CaptureFixture[str], algorithm: str
) -> None:
    status, out, err = cli(
        capsys, "--algorithm", algorithm, "--backends", "3", "--keys", "3000", "--requests", "2000"
    )
    assert status == 0, err
    spread, _, load = out.partition("\nSimulated run")
    # The key spread reads as before: three rows, every key counted, and why no key moves.
    keys = [m.groupdict() for m in KEY_ROW.finditer(out)]
    assert len(keys) == 3
    assert sum(int(k["keys"].replace(",", "")) for k in keys) == 3000
    assert f"n/a: {algorithm} does not map keys to backends" in spread
    assert "of keys move" not in out
    assert len(LOAD_ROW.findall(load)) == 6
    assert "roundrobin (baseline)" in load
    assert algorithm in load


def test_the_command_prints_no_load_run_for_keyed_algorithms(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, _ = cli(capsys, "--algorithm", "maglev", "--keys", "2000")
    assert status == 0
    assert "Simulated run" not in out
    assert "of keys move" in out


@pytest.mark.parametrize("algorithm", LOAD_AWARE)
def test_the_command_is_deterministic_for_a_seed(
    capsys: pytest.CaptureFixture[str], algorithm: str
) -> None:
    args = ("--algorithm", algorithm, "--keys", "2000", "--requests", "3000")
    first = cli(capsys, *args)[1].split("\ntook")[0]
    assert cli(capsys, *args)[1].split("\ntook")[0] == first
    assert cli(capsys, *args, "--seed", "5")[1].split("\ntook")[0] != first


def test_python_m_lbclient_simulate_peakewma() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lbclient", "simulate", "--algorithm", "peakewma"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert len(KEY_ROW.findall(out)) == 10
    rows = [m.groupdict() for m in LOAD_ROW.finditer(out)]
    assert len(rows) == 20
    peak, baseline = (float(share) for share in re.findall(r"([\d.]+)%", rows[0]["cells"]))
    assert baseline == 10.0
    assert peak < 1.0
    failures = re.search(r"failures callers see +([\d.]+)% \([\d,]+\) +([\d.]+)%", out)
    assert failures is not None
    assert float(failures.group(1)) < 0.5 < 5.0 == float(failures.group(2))


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param(["--algorithm", "leastrequests"], "'leastrequests'", id="unknown-algorithm"),
        pytest.param(["--algorithm", "peakewma", "--clients", "0"], "got 0", id="no-clients"),
        pytest.param(
            ["--algorithm", "peakewma", "--clients", "many"], "'many'", id="clients-not-a-number"
        ),
        pytest.param(
            ["--algorithm", "peakewma", "--clients", "10001"], "got 10001", id="too-many-clients"
        ),
        pytest.param(
            ["--algorithm", "leastrequest", "--requests", "-3"], "got -3", id="negative-requests"
        ),
        pytest.param(
            ["--algorithm", "leastrequest", "--requests", "1e4"], "'1e4'", id="requests-not-whole"
        ),
        pytest.param(["--algorithm", "peakewma", "--backends", "0"], "got 0", id="no-backends"),
        pytest.param(
            ["--algorithm", "peakewma", "--backends", "3", "--weights", "1,2"],
            "'1,2'",
            id="weights-for-2-of-3",
        ),
        pytest.param(["--algorithm", "peakewma", "--seed", "x"], "'x'", id="seed-not-a-number"),
        pytest.param(
            ["--algorithm", "peakewma", "--plot", "load.svg"], "'load.svg'", id="plot-not-png"
        ),
    ],
)
def test_bad_input_is_rejected_naming_the_value(
    capsys: pytest.CaptureFixture[str], args: list[str], named: str
) -> None:
    status, out, err = cli(capsys, *args)
    assert status == 2
    assert "error:" in err
    assert named in err
    assert not out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"algorithm": "ketama"}, "unknown algorithm 'ketama'", id="algorithm"),
        pytest.param({"scenario": "down"}, "unknown scenario 'down'", id="scenario"),
        pytest.param({"backends": []}, "at least one backend", id="no-backends"),
        pytest.param({"clients": 0}, "at least one client, got 0", id="no-clients"),
        pytest.param({"requests": 0}, "at least one request, got 0", id="no-requests"),
        pytest.param({"requests": True}, "at least one request, got True", id="bool-requests"),
    ],
)
def test_simulate_load_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"algorithm": "peakewma", "backends": TEN, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        simulate_load(**arguments)  # type: ignore[arg-type]
