"""The server companion under servers of several worker processes, each started by the test on a
free loopback port: gunicorn with four sync workers (a sync worker holds one request at a time,
so with three held a probe is answered by the fourth, which holds none) and uvicorn with two
worker processes. The requests in flight a report gives are the server's, whichever worker
answers: held requests (each waits for a file the test makes) are counted by every worker.
Every report names the process that made it (``named_metrics.pid``, the test app's metric).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from lbclient.cli.bench.pyservers import start_gunicorn, start_uvicorn
from lbclient.server import PROBE_PATH

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


class Held:
    """Requests held open on fresh connections, each until ``gate`` exists."""

    def __init__(self, base_url: str, gate: Path) -> None:
        self._base_url = base_url
        self._gate = gate
        self._stack = ExitStack()
        self.pids: list[int] = []

    def one(self) -> int:
        """One more held request; the id of the worker holding it."""
        client = self._stack.enter_context(httpx.Client(base_url=self._base_url, timeout=PATIENCE))
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


def probe(base_url: str) -> tuple[int, int]:
    """A probe on a fresh connection: (the requests in flight it reads, the worker's id)."""
    with httpx.Client(base_url=base_url, timeout=PATIENCE) as client:
        response = client.get(PROBE_PATH)
    assert response.status_code == 200
    fields = dict(
        item.split("=", 1) for item in response.headers["endpoint-load-metrics"][5:].split(", ")
    )
    assert fields["named_metrics.rif"] == response.headers["x-prequal-rif"]
    return int(response.headers["x-prequal-rif"]), int(float(fields["named_metrics.pid"]))


def answering(base_url: str) -> None:
    """Once the server answers: uvicorn's supervisor says it listens before its workers do."""
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            probe(base_url)
            return
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module", params=["gunicorn-sync-4", "uvicorn-2"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    with ExitStack() as stack:
        if request.param == "uvicorn-2":
            started = start_uvicorn(stack, "server_apps:asgi", workers=2, app_dir=HERE)
        else:
            started = start_gunicorn(
                stack, "server_apps:wsgi", workers=4, worker_class="sync", threads=1, app_dir=HERE
            )
        answering(f"http://{started.address}")
        yield request.param, f"http://{started.address}"


def test_a_probe_reads_the_requests_every_worker_holds(
    server: tuple[str, str], tmp_path: Path
) -> None:
    kind, base_url = server
    held = Held(base_url, tmp_path / "open")
    try:
        if kind == "gunicorn-sync-4":
            for _ in range(3):  # one a worker: a sync worker takes no other while it holds one
                held.one()
            assert len(set(held.pids)) == 3
        else:  # held until two workers hold some: which worker accepts is the kernel's choice
            while len(set(held.pids)) < 2:
                assert len(held.pids) < 24, f"every held request went to one worker: {held.pids}"
                held.one()
        readers: dict[int, int] = {}
        for _ in range(PROBES):
            rif, pid = probe(base_url)
            readers[pid] = rif
            if kind == "gunicorn-sync-4":
                assert pid not in held.pids  # the one free worker answers
                break
            if set(held.pids) <= set(readers):
                break
        # Every worker heard from reads every held request, its own and the others'.
        assert readers
        assert set(readers.values()) == {len(held.pids)}, (held.pids, readers)
        if kind == "uvicorn-2":
            assert set(held.pids) <= set(readers), (held.pids, readers)
    finally:
        held.release()
    # Released: once the held requests have ended, every worker reads none.
    deadline = time.monotonic() + PATIENCE
    while probe(base_url)[0] != 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [probe(base_url)[0] for _ in range(10)] == [0] * 10
