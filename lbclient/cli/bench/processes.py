"""The benchmarks' child processes, ended: what every bench that starts servers or load
generators in their own processes does once it is done with them.

What lives here: :func:`reap`. What may not: starting processes (each bench starts its own, with
its own command and pipes).
"""

from __future__ import annotations

import subprocess
from typing import Any

__all__ = ["reap"]


def reap(process: subprocess.Popen[Any], timeout: float) -> None:
    """Wait up to ``timeout`` seconds for ``process`` (already told to end) to exit, then kill it
    if it still runs and wait for that."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
