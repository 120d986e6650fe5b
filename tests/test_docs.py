"""The README's snippets, the examples and the command line run as documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import BENCH_QUICK, blocks, readme_command_lines

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("snippet", blocks("python"))
def test_readme_python_snippets_run(snippet: str) -> None:
    exec(compile(snippet, "README.md", "exec"), {"__name__": "readme"})


def test_readme_opens_with_demo_and_test_commands_and_ci_runs_the_test_command() -> None:
    commands = [b.strip() for b in blocks("bash")[:2]]
    assert commands[0].endswith("python -m lbclient demo")
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert commands[1] in ci
    # The documented command runs the whole suite, the slow tests included.
    assert "-m" not in commands[1].rpartition("pytest")[2].split()
    addopts = re.search(r"^addopts = (.*)$", (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert addopts is not None
    assert "slow" not in addopts.group(1)


def test_there_are_examples() -> None:
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_run(path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["roundrobin", "random", "hash", "fnv", "consistent"])
def test_demo_runs(algorithm: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lbclient",
            "demo",
            "--algorithm",
            algorithm,
            "--backends",
            "3",
            "--requests",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "summary: " in done.stdout
    assert ", 0 failed, no request lost" in done.stdout
    assert "backend-0 KILLED" in done.stdout
    assert "backend-0 ejected for 1 s after 3 failures in a row" in done.stdout
    assert "backend-0 restored: its probe request succeeded" in done.stdout
    assert "the others stay: True" in done.stdout
    # A backend added to the discovery file gets traffic once the file was re-read.
    joined = re.search(
        r"before: 0 of 150 requests; joined the set after [\d.]+ s; then (\d+) of "
        r"150",
        done.stdout,
    )
    assert joined is not None, done.stdout
    assert int(joined.group(1)) > 0
    assert "\x1b[" not in done.stdout  # not a terminal: plain text


@pytest.mark.slow
def test_demo_shows_a_live_table_on_a_terminal() -> None:
    pytest.importorskip("rich", reason="the live table needs rich (pip install 'lbclient[demo]')")
    import pty
    import select

    main, child = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lbclient", "demo", "--requests", "40"],
        stdin=child,
        stdout=child,
        stderr=child,
        env=env,
        cwd=ROOT,
        close_fds=True,
    )
    os.close(child)
    output = b""
    try:
        while select.select([main], [], [], 60)[0]:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(main)
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
    text = output.decode("utf-8", "replace")
    assert process.returncode == 0, text
    assert "┏" in text  # a rich table, drawn live
    assert "backend-0 ejected for 1 s" in text
    assert ", 0 failed, no request lost" in text


def test_demo_rejects_bad_arguments() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lbclient", "demo", "--backends", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--backends" in done.stderr


def test_readme_shows_the_command_line() -> None:
    assert {line.split()[3] for line in readme_command_lines()} >= {"bench", "simulate"}


#: The README's command lines this test runs; ``bench --quick`` (minutes of benchmarks) runs
#: once, in test_cli, where every table it prints is checked.
RUN_HERE = [line for line in readme_command_lines() if tuple(line.split()[1:]) != BENCH_QUICK]


@pytest.mark.slow
@pytest.mark.parametrize("line", RUN_HERE)
def test_readme_commands_run_as_written(line: str, tmp_path: Path) -> None:
    if "--plot" in line:
        pytest.importorskip("matplotlib", reason="--plot needs matplotlib (lbclient[plot])")
    args = line.split()[1:]  # "python" is this interpreter
    done = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip()
    if "--plot" in line:
        written = tmp_path / args[args.index("--plot") + 1]
        assert written.read_bytes().startswith(b"\x89PNG")
