"""The code stays typed and linted: ruff and mypy --strict run as part of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
def test_ruff_clean() -> None:
    done = run("ruff", "check", "lbclient", "tests", "examples")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_ruff_format_clean() -> None:
    done = run("ruff", "format", "--check", "lbclient", "tests", "examples")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_mypy_strict_clean() -> None:
    done = run("mypy", "--strict", "lbclient")
    assert done.returncode == 0, done.stdout + done.stderr


def test_package_is_typed() -> None:
    assert (ROOT / "lbclient" / "py.typed").is_file()
