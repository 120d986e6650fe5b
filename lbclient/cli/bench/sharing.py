"""What sharing the requests in flight between a server's worker processes costs a request, in
process (no server, no HTTP): ``LoadTracker.begin``, ``rendered("TEXT")`` and ``end`` per
request, for a tracker that counts its process alone and for one that shares its count with
other worker processes (real processes that inherit the same listening socket and hold one
request each). Printed by :mod:`lbclient.cli.bench.companion`; Linux only (elsewhere a tracker
counts its own process and there is nothing to compare).
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import NamedTuple

from lbclient.server import LoadTracker

__all__ = ["OTHERS", "SharingCost", "measure"]

#: Other worker processes of the shared tracker's server.
OTHERS = 3
#: Requests per timed batch.
BATCH = 5_000

#: Another worker: joins the server of the listening socket it inherited (its descriptor in
#: argv[1]), holds one request, says so, and leaves when its standard input closes.
_WORKER = """
import socket, sys
from lbclient.server import LoadTracker
listener = socket.socket(fileno=int(sys.argv[1]))
tracker = LoadTracker()
tracker.listening(listener.getsockname()[1])
tracker.begin()
print("shared" if tracker.shared else "alone", flush=True)
sys.stdin.read()
"""


class SharingCost(NamedTuple):
    """Microseconds a request, the median over the rounds."""

    alone: float
    shared: float
    #: Whether the shared tracker did share (False: not Linux, or the file could not be used).
    sharing: bool


def _batch(tracker: LoadTracker) -> float:
    begin, end, rendered = tracker.begin, tracker.end, tracker.rendered
    started = time.perf_counter()
    for _ in range(BATCH):
        arrival = begin()
        rendered("TEXT")
        end(arrival)
    return (time.perf_counter() - started) / BATCH * 1e6


def measure(rounds: int) -> SharingCost:
    """Both trackers' cost a request, timed in turns over ``rounds`` rounds."""
    with ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        for _ in range(OTHERS):
            worker = subprocess.Popen(
                [sys.executable, "-c", _WORKER, str(listener.fileno())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                pass_fds=[listener.fileno()],
            )
            stack.callback(worker.wait, 30)
            stack.callback(worker.stdin.close)  # type: ignore[union-attr]
            stack.callback(worker.stdout.close)  # type: ignore[union-attr]
            worker.stdout.readline()  # type: ignore[union-attr]
        alone = LoadTracker(share_in_flight=False)
        shared = LoadTracker()
        shared.listening(port)
        times: dict[bool, list[float]] = {False: [], True: []}
        for number in range(rounds):
            order = (alone, shared) if number % 2 else (shared, alone)
            for tracker in order:
                times[tracker is shared].append(_batch(tracker))
        return SharingCost(
            statistics.median(times[False]), statistics.median(times[True]), shared.shared
        )
