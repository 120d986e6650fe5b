"""Python web servers in their own processes, on a free 127.0.0.1 port: uvicorn for an ASGI app,
gunicorn (one ``gthread`` worker) for a WSGI app. For the server companion's benchmark and its
tests.

Each server binds port 0 and the port it got is read from its log (``Uvicorn running on
http://127.0.0.1:PORT``, ``Listening at: http://127.0.0.1:PORT``); its log is drained by a thread
of this process until it exits. It is stopped when the ``ExitStack`` given closes, by SIGTERM:
a graceful shutdown of at most a second (``--timeout-graceful-shutdown``, ``--graceful-timeout``),
in which the workers exit as they normally do (gunicorn's quick shutdown, SIGINT, would kill a
gthread worker after that second, leaving its slot of the shared in-flight count behind), then
killed if it still runs 10 s later; then the file its workers shared their requests in flight
through is removed (uvicorn's workers end by the signal they caught, which leaves it). uvicorn
with several workers says it listens before its workers do: connections are refused until they
have started.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from contextlib import ExitStack
from pathlib import Path

from lbclient.cli.bench.processes import reap
from lbclient.server._shared import discard

__all__ = [
    "Server",
    "start_gunicorn",
    "start_uvicorn",
    "start_uvicorns",
    "uvicorn_command",
    "uvicorn_flavour",
]

_PORT = re.compile(rb"(?:Uvicorn running on|Listening at:) http://127\.0\.0\.1:(\d+)")


class Server:
    """One server process: its address once it listens, its log's last lines, its stop."""

    def __init__(self, command: list[str], *, cwd: Path | None, env: dict[str, str] | None):
        self.command = command
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
        )
        self._log: deque[bytes] = deque(maxlen=50)
        self._port: int | None = None
        self._signalled = False
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self._log.append(line)
            found = _PORT.search(line)
            if found and self._port is None:
                self._port = int(found.group(1))
                self._listening.set()
        self._listening.set()  # it exited: nothing more to wait for

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` (see :meth:`wait_listening`)."""
        return f"127.0.0.1:{self._port}"

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) spent so far by the server process and its children's
        threads (gunicorn's worker), from ``/proc``; None where there is no ``/proc``."""
        pids = [self._proc.pid]
        try:
            children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
            pids += [int(pid) for pid in children.read_text().split()]
            ticks = 0
            for pid in pids:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            return None
        return ticks / os.sysconf("SC_CLK_TCK")

    def log(self) -> str:
        """The last lines the server wrote."""
        return b"".join(self._log).decode("utf-8", "replace")

    def wait_listening(self, timeout: float) -> str:
        """Its address (``127.0.0.1:PORT``) once it listens; RuntimeError if it exits first or
        does not listen within ``timeout`` seconds."""
        self._listening.wait(timeout)
        if self._port is None:
            raise RuntimeError(
                f"{' '.join(self.command)} did not start listening:\n{self.log()}".rstrip()
            )
        return f"127.0.0.1:{self._port}"

    def hang_up(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Signal it to stop, once, if it still runs (:meth:`stop` then waits for it)."""
        if not self._signalled and self._proc.poll() is None:
            self._signalled = True
            self._proc.send_signal(sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Signal it (unless :meth:`hang_up` did), wait for it (killing it after 10 s), and for
        its log to end."""
        self.hang_up(sig)
        if self._proc.poll() is None:
            reap(self._proc, 10)
        self._reader.join(timeout=10)
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        if self._port is not None:  # its workers are gone; one killed leaves the file behind
            discard(self._port)


def _start(
    stack: ExitStack,
    command: list[str],
    sig: signal.Signals,
    cwd: Path | None,
    env: dict[str, str] | None,
    timeout: float,
) -> Server:
    server = Server(command, cwd=cwd, env=env)
    stack.callback(server.stop, sig)
    server.wait_listening(timeout)
    return server


def _environment(app_dir: Path | None, env: dict[str, str] | None) -> dict[str, str] | None:
    if app_dir is None:
        return env
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(app_dir), env.get("PYTHONPATH")]))
    return env


def start_uvicorn(
    stack: ExitStack,
    app: str,
    *,
    workers: int = 1,
    app_dir: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    http: str = "auto",
) -> Server:
    """``python -m uvicorn APP`` (``module:attribute``, importable from ``app_dir`` if given) on
    127.0.0.1, one process (or ``workers`` worker processes under uvicorn's supervisor), no
    access log, no lifespan, uvicorn's HTTP protocol ``http`` (``--http``); returned once it
    listens."""
    command = uvicorn_command(app, http) + (["--workers", str(workers)] if workers != 1 else [])
    return _start(stack, command, signal.SIGTERM, None, _environment(app_dir, env), timeout)


def uvicorn_flavour(http: str = "auto") -> str:
    """What uvicorn's automatic choices take here (``--http auto``, ``--loop auto``):
    ``"httptools, uvloop"`` where those are installed (``uvicorn[standard]``), else
    ``"h11, asyncio"``, or one of each; with ``http`` other than ``"auto"``, that protocol and
    the loop uvicorn takes. Benchmarks print it: the server's own cost per request differs
    several times between them."""
    if http == "auto":
        http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{http}, {loop}"


def uvicorn_command(app: str, http: str = "auto") -> list[str]:
    """The command line :func:`start_uvicorn` runs for ``app`` (under uvicorn's HTTP protocol
    ``http``: ``auto``, ``h11`` or ``httptools``)."""
    return [
        *(sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", "0"),
        *("--no-access-log", "--lifespan", "off", "--timeout-graceful-shutdown", "1"),
        *(("--http", http) if http != "auto" else ()),
    ]


def start_uvicorns(
    stack: ExitStack,
    apps: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> list[Server]:
    """One :func:`start_uvicorn` server per app, all started at once (and stopped at once when
    ``stack`` closes: every one signalled, then each waited for), in environment ``env`` (None:
    this process's); returned once every one listens."""
    servers: list[Server] = []
    stack.callback(_stop_all, servers)
    for app in apps:
        servers.append(Server(uvicorn_command(app), cwd=None, env=env))
    for server in servers:
        server.wait_listening(timeout)
    return servers


def _stop_all(servers: list[Server]) -> None:
    for server in servers:
        server.hang_up(signal.SIGTERM)
    for server in servers:
        server.stop(signal.SIGTERM)


def _gunicorn_options() -> list[str]:
    """Options only some gunicorn versions know: no control socket (one fixed path per user,
    which servers started side by side would share)."""
    config = importlib.import_module("gunicorn.config")
    settings = {setting.name for setting in config.KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in settings else []


def start_gunicorn(
    stack: ExitStack,
    app: str,
    *,
    threads: int = 4,
    workers: int = 1,
    worker_class: str = "gthread",
    app_dir: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Server:
    """``python -m gunicorn APP`` (``module:attribute``, importable from ``app_dir`` if given) on
    127.0.0.1: ``workers`` workers of ``worker_class`` (one ``gthread`` worker by default) with
    ``threads`` threads; returned once it listens (requests sent before a worker has booted
    wait in the listen queue)."""
    command = [
        *(sys.executable, "-m", "gunicorn", app, "--bind", "127.0.0.1:0"),
        *("--worker-class", worker_class, "--workers", str(workers), "--threads", str(threads)),
        *("--graceful-timeout", "1", "--keep-alive", "30", "--log-level", "info"),
        *_gunicorn_options(),
    ]
    return _start(stack, command, signal.SIGTERM, None, _environment(app_dir, env), timeout)
