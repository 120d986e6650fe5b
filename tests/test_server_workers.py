"""The server companion under servers of several worker processes, each started by the test on a
free loopback port or a Unix socket of its own: gunicorn with four sync workers (a sync worker
holds one request at a time, so with three held a probe is answered by the fourth, which holds
none) and uvicorn with two worker processes. The requests in flight a report gives are the
server's, whichever worker answers: held requests (each waits for a file the test makes) are
counted by every worker. Every report names the process that made it (``named_metrics.pid``,
the test app's metric). On a Unix socket gunicorn gives the app the Host header's port, not an
address of its own: the workers find their one listening socket by themselves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from lbclient.cli.bench.pyservers import start_gunicorn, start_uvicorn
from lbclient.server import PROBE_PATH
from lbclient.server._shared import discard, unix_key

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"),
        reason="workers share their count through /proc and a shared file: Linux only",
    ),
]

HERE = Path(__file__).resolve().parent
PATIENCE = 30.0
#: Probes on fresh connections, at most, to hear from every worker.
PROBES = 60


class Target(NamedTuple):
    """A server under test: its kind, and the Unix socket it listens on (None: ``base_url``)."""

    kind: str
    base_url: str
    uds: str | None = None

    def client(self) -> httpx.Client:
        """A client of its own (a fresh connection)."""
        transport = httpx.HTTPTransport(uds=self.uds) if self.uds else None
        return httpx.Client(base_url=self.base_url, transport=transport, timeout=PATIENCE)


class Held:
    """Requests held open on fresh connections, each until ``gate`` exists."""

    def __init__(self, target: Target, gate: Path) -> None:
        self._target = target
        self._gate = gate
        self._stack = ExitStack()
        self.pids: list[int] = []

    def one(self) -> int:
        """One more held request; the id of the worker holding it."""
        client = self._stack.enter_context(self._target.client())
        response = self._stack.enter_context(
            client.stream("GET", "/wait", params={"file": str(self._gate)})
        )
        assert response.status_code == 200
        pid = int(next(response.iter_lines()))
        self.pids.append(pid)
        return pid

    def release(self) -> None:
        self._gate.touch()
        self._stack.close()


def probe(target: Target) -> tuple[int, int]:
    """A probe on a fresh connection: (the requests in flight it reads, the worker's id)."""
    with target.client() as client:
        response = client.get(PROBE_PATH)
    assert response.status_code == 200
    fields = dict(
        item.split("=", 1) for item in response.headers["endpoint-load-metrics"][5:].split(", ")
    )
    assert fields["named_metrics.rif"] == response.headers["x-prequal-rif"]
    return int(response.headers["x-prequal-rif"]), int(float(fields["named_metrics.pid"]))


def asked(target: Target) -> tuple[int, int]:
    """An ordinary request asking for the report, on a fresh connection: (the requests in flight
    its response's report reads besides it, the worker's id). Under uvicorn the ASGI
    middleware's compiled path answers it (after each worker's first request)."""
    with target.client() as client:
        response = client.get("/", headers={"endpoint-load-metrics-format": "TEXT"})
    assert response.status_code == 200
    fields = dict(
        item.split("=", 1) for item in response.headers["endpoint-load-metrics"][5:].split(", ")
    )
    return int(fields["named_metrics.rif"]), int(float(fields["named_metrics.pid"]))


def answering(target: Target, workers: int = 1) -> None:
    """Once ``workers`` of the server's workers have answered: uvicorn's supervisor says it
    listens before its workers do, and a worker still starting accepts nothing, so requests
    held before then all go to the first."""
    deadline = time.monotonic() + PATIENCE
    seen: set[int] = set()
    while len(seen) < workers:
        try:
            seen.add(probe(target)[1])
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        assert time.monotonic() < deadline, f"only workers {sorted(seen)} answered"


def start_on_unix_socket(stack: ExitStack, kind: str, path: str) -> None:
    """The server of ``kind`` on the Unix socket ``path``, stopped (SIGTERM, as its supervisor
    would be) when ``stack`` closes."""
    if kind.startswith("gunicorn"):
        command = [
            *(sys.executable, "-m", "gunicorn", "server_apps:wsgi", "--bind", f"unix:{path}"),
            *("--worker-class", "sync", "--workers", "4", "--graceful-timeout", "1"),
        ]
    else:
        command = [
            *(sys.executable, "-m", "uvicorn", "server_apps:asgi", "--uds", path),
            *("--workers", "2", "--no-access-log", "--lifespan", "off"),
            *("--timeout-graceful-shutdown", "1"),
        ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), *sys.path]))}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        discard(unix_key(path))  # uvicorn's workers end by the SIGTERM they caught: it stays

    stack.callback(stop)


@pytest.fixture(
    scope="module",
    params=["gunicorn-sync-4", "uvicorn-2", "gunicorn-sync-4-unix", "uvicorn-2-unix"],
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    kind: str = request.param
    with ExitStack() as stack:
        if kind.endswith("-unix"):
            path = str(tmp_path_factory.mktemp("unix") / "app.sock")
            start_on_unix_socket(stack, kind, path)
            target = Target(kind, "http://localhost", path)
        elif kind == "uvicorn-2":
            started = start_uvicorn(stack, "server_apps:asgi", workers=2, app_dir=HERE)
            target = Target(kind, f"http://{started.address}")
        else:
            started = start_gunicorn(
                stack, "server_apps:wsgi", workers=4, worker_class="sync", threads=1, app_dir=HERE
            )
            target = Target(kind, f"http://{started.address}")
        answering(target, 2 if kind.startswith("uvicorn") else 1)
        yield target


@pytest.mark.parametrize("read", [probe, asked], ids=["probe", "report"])
def test_a_probe_reads_the_requests_every_worker_holds(
    server: Target, tmp_path: Path, read: Callable[[Target], tuple[int, int]]
) -> None:
    sync = server.kind.startswith("gunicorn")
    held = Held(server, tmp_path / "open")
    try:
        if sync:
            for _ in range(3):  # one a worker: a sync worker takes no other while it holds one
                held.one()
            assert len(set(held.pids)) == 3
        else:  # held until two workers hold some: which worker accepts is the kernel's choice
            while len(set(held.pids)) < 2:
                assert len(held.pids) < 24, f"every held request went to one worker: {held.pids}"
                held.one()
        readers: dict[int, int] = {}
        for _ in range(PROBES):
            rif, pid = read(server)
            readers[pid] = rif
            if sync:
                assert pid not in held.pids  # the one free worker answers
                break
            if set(held.pids) <= set(readers):
                break
        # Every worker heard from reads every held request, its own and the others'.
        assert readers
        assert set(readers.values()) == {len(held.pids)}, (held.pids, readers)
        if not sync:
            assert set(held.pids) <= set(readers), (held.pids, readers)
    finally:
        held.release()
    # Released: once the held requests have ended, every worker reads none.
    deadline = time.monotonic() + PATIENCE
    while read(server)[0] != 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [read(server)[0] for _ in range(10)] == [0] * 10
