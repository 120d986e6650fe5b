"""Running ``python -m lbclient ...`` for the command-line tests (test_cli) and the README's
command lines (test_docs).

Every benchmark run is checked to leave no process behind: its loopback servers are started
with a marker in their environment, and the processes that still carry it once the command is
done are counted (:func:`leaves_no_process`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

#: ``python -m lbclient bench --quick``, the README's bench line, as arguments of ``python``.
BENCH_QUICK = ("-m", "lbclient", "bench", "--quick")


def blocks(language: str) -> list[str]:
    """The README's code blocks in ``language``."""
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def readme_command_lines() -> list[str]:
    """The ``python -m lbclient ...`` lines of the README's shell blocks after the first two."""
    return [
        line.strip()
        for block in blocks("bash")[2:]
        for line in block.splitlines()
        if line.strip().startswith("python -m lbclient ")
    ]


# Runs ``python -m lbclient ARGS...`` with the module named by the first argument made
# unimportable, as if it were not installed: a meta path finder ahead of every other one.
WITHOUT = """
import runpy, sys

class NotInstalled:
    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None

sys.meta_path.insert(0, NotInstalled(sys.argv.pop(1)))
runpy.run_module("lbclient", run_name="__main__", alter_sys=True)
"""


def lbclient(
    *args: str,
    without: str | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m lbclient *args``, optionally with module ``without`` made unimportable."""
    if without is None:
        command = [sys.executable, "-m", "lbclient", *args]
    else:
        command = [sys.executable, "-c", WITHOUT, without, *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env, check=False
    )


# -- processes left behind -----------------------------------------------------------------------

MARKER = "LBCLIENT_TEST_BENCH"


def _processes_with(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def _left_behind(marker: str) -> list[int]:
    """The processes still marked with ``marker`` after a grace period of 10 s ([] where
    there is no /proc to look in)."""
    if not Path("/proc/self/environ").exists():
        return []
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _processes_with(marker)


@contextmanager
def leaves_no_process() -> Iterator[dict[str, str]]:
    """An environment to run a benchmark in; once the block ends, checks that every process the
    benchmark started (its loopback servers) is gone with it."""
    value = uuid.uuid4().hex
    yield {**os.environ, MARKER: value}
    left = _left_behind(f"{MARKER}={value}")
    assert not left, f"the bench left processes behind: {left}"
