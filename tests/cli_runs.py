"""Running ``python -m lbclient ...`` for the command-line tests, and the README's bench line
once per test session, in the background.

``python -m lbclient bench --quick`` (the README's command line) takes about two minutes. The
README test (test_docs) and the bench tests (test_cli) that read its output are marked
:data:`READS_BENCH_QUICK`, and :mod:`bench_session`, the plugin those two modules load, runs
them last and starts the command in the background as soon as the tests are collected
(:func:`start`), so that it runs while the other tests do. :func:`shared_run` gives them that
run, waited for.

Every benchmark run is checked to leave no process behind: its loopback servers are started
with a marker in their environment, and the processes that still carry it once the command is
done are counted (:func:`leaves_no_process`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

#: The marker of the tests that read the session's run of :data:`BENCH_QUICK`.
READS_BENCH_QUICK = "reads_bench_quick"

#: ``python -m lbclient bench --quick``, the README's bench line, as arguments of ``python``.
BENCH_QUICK = ("-m", "lbclient", "bench", "--quick")

#: How long a run may take before it is killed, and a reader waits for it.
RUN_TIMEOUT = 600.0
#: The nice value of a background run while it runs alone on one thread (0: the tests').
BOOST = -5

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
    *args: str, without: str | None = None, cwd: Path | None = None, timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m lbclient *args``, optionally with module ``without`` made unimportable."""
    if without is None:
        command = [sys.executable, "-m", "lbclient", *args]
    else:
        command = [sys.executable, "-c", WITHOUT, without, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env, check=False)


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


# -- one run per session -------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One finished command: what it printed, its exit status, and its processes left over."""

    done: subprocess.CompletedProcess[str]
    left: list[int]  # the marked processes still there after it ended (should be none)


class _Background:
    """``python *args`` on a thread of this process; its :class:`Run` kept, and written to
    ``result`` (a JSON file) for the other processes of the session where ``result`` is set."""

    def __init__(self, args: tuple[str, ...], result: Path | None) -> None:
        self.args = args
        self.result = result
        self.run: Run | None = None
        self.done = threading.Event()
        self.process: subprocess.Popen[str] | None = None
        self.thread = threading.Thread(target=self._main, name="lbclient-shared-run",
                                       daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            value = uuid.uuid4().hex
            with tempfile.TemporaryDirectory(prefix="lbclient-run-") as folder:
                self.process = subprocess.Popen(
                    [sys.executable, *self.args], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, cwd=folder,
                    env={**os.environ, MARKER: value})
                threading.Thread(target=_ahead_while_alone, args=(self.process, value),
                                 name="lbclient-shared-run-priority", daemon=True).start()
                try:
                    out, err = self.process.communicate(timeout=RUN_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    out, err = self.process.communicate()
                    err += f"\n(killed after {RUN_TIMEOUT:g} s)"
            done = subprocess.CompletedProcess(list(self.args), self.process.returncode, out, err)
            run = Run(done, _left_behind(f"{MARKER}={value}"))
        except BaseException:  # told to every reader rather than lost on this thread
            run = Run(subprocess.CompletedProcess(list(self.args), -1, "",
                                                  traceback.format_exc()), [])
        self.run = run
        if self.result is not None:
            _write(self.result, run)
        self.done.set()

    def wait(self, timeout: float = RUN_TIMEOUT) -> Run:
        """The run, once it is over."""
        assert self.done.wait(timeout), f"python {' '.join(self.args)}: still running"
        assert self.run is not None
        return self.run

    def stop(self) -> None:
        """Kill the command if it still runs."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.kill()


def _ahead_while_alone(process: subprocess.Popen[str], value: str) -> None:
    """Schedule ``process`` ahead of the tests while it runs alone, and like them from its
    first child on.

    The bench first measures selection on one thread, a minute of CPU that the tests beside it
    would otherwise stretch by a third; then it starts servers, and its parts use both CPUs,
    which it then shares with the tests as equals. Raising a priority takes root (as CI has);
    elsewhere this does nothing.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, process.pid, BOOST)
    except (OSError, AttributeError):
        return
    marker = f"{MARKER}={value}"
    while process.poll() is None:
        family = _processes_with(marker)
        if len(family) > 1:  # its first server: the part on one thread is over
            for pid in family:
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, pid, 0)
            return
        time.sleep(0.2)


def _write(path: Path, run: Run) -> None:
    data = {"args": run.done.args, "returncode": run.done.returncode,
            "stdout": run.done.stdout, "stderr": run.done.stderr, "left": run.left}
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data), encoding="utf-8")
    partial.replace(path)  # whole or not there: a reader never sees half of it


def _read(path: Path) -> Run:
    data = json.loads(path.read_text(encoding="utf-8"))
    done = subprocess.CompletedProcess(data["args"], data["returncode"], data["stdout"],
                                       data["stderr"])
    return Run(done, data["left"])


_started: dict[tuple[str, ...], _Background] = {}  # runs this process makes
_elsewhere: dict[tuple[str, ...], Path] = {}  # runs another worker of the session makes
_runs: dict[tuple[str, ...], Run] = {}
_lock = threading.Lock()


def _shared_folder(config: pytest.Config) -> Path | None:
    """Under pytest-xdist, a folder that every worker of this session shares (the parent of
    their base temporary folders); None otherwise."""
    basetemp = config.getoption("basetemp", None)
    if os.environ.get("PYTEST_XDIST_WORKER") is None or not basetemp:
        return None
    folder = Path(basetemp).parent / "lbclient-shared-runs"
    folder.mkdir(exist_ok=True)
    return folder


def start(args: tuple[str, ...], config: pytest.Config) -> None:
    """Start the session's run of ``python *args`` here, unless another worker did."""
    with _lock:
        if args in _started or args in _elsewhere:
            return
        folder = _shared_folder(config)
        if folder is None:
            _started[args] = _Background(args, None)
            return
        name = uuid.uuid5(uuid.NAMESPACE_URL, " ".join(args)).hex
        try:  # the first worker to create the claim runs it
            os.close(os.open(folder / f"{name}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            _elsewhere[args] = folder / f"{name}.json"
        else:
            _started[args] = _Background(args, folder / f"{name}.json")


def shared_run(args: Sequence[str]) -> Run:
    """The session's one run of ``python *args``: the one started in the background when the
    tests were collected (here or by another worker of the session), waited for; or, where
    none was started, made now, once."""
    key = tuple(args)
    with _lock:
        background, result = _started.get(key), _elsewhere.get(key)
    if background is not None:
        return background.wait()
    if result is not None:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not result.exists():
            assert time.monotonic() < deadline, f"python {' '.join(key)}: no result"
            time.sleep(0.2)
        return _read(result)
    with _lock:
        if key not in _runs:
            _runs[key] = _Background(key, None).wait()
        return _runs[key]


def finish(interrupted: bool) -> None:
    """Wait for the runs this process started (other workers of the session may read them), or
    kill them first if the session was interrupted."""
    for background in list(_started.values()):
        if interrupted:
            background.stop()
        background.thread.join(RUN_TIMEOUT)
