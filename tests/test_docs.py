"""The README's snippets, the examples and the command line run as documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("snippet", blocks("python"))
def test_readme_python_snippets_run(snippet: str) -> None:
    exec(compile(snippet, "README.md", "exec"), {"__name__": "readme"})


def test_readme_opens_with_demo_and_test_commands_and_ci_runs_the_test_command() -> None:
    commands = [b.strip() for b in blocks("bash")[:2]]
    assert commands[0].endswith("python -m lbclient demo")
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert commands[1] in ci


def test_there_are_examples() -> None:
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_run(path: Path) -> None:
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.mark.parametrize("algorithm", ["roundrobin", "random", "hash", "fnv", "consistent"])
def test_demo_runs(algorithm: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lbclient", "demo", "--algorithm", algorithm, "--backends", "3",
         "--requests", "300"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no request lost" in done.stdout
    assert "is now UNHEALTHY" in done.stdout
    assert "the others stay: True" in done.stdout


def test_demo_rejects_bad_arguments() -> None:
    done = subprocess.run([sys.executable, "-m", "lbclient", "demo", "--backends", "1"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--backends" in done.stderr
