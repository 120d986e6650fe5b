"""``python -m lbclient demo``: real traffic through ``LBTransport`` to local backends.

Phases: traffic by weight; one backend killed mid-phase (failover with no failed request, its
ejection); its restart and return through one probe request; sticky sessions with
``Consistent`` and how few users move when a backend leaves; a backend joining through
discovery (a file of backends, re-read when it changes). The display is a live table (with the
optional ``rich`` package, on a terminal) or plain text.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import httpx

from lbclient import (
    Backend,
    BackendHealth,
    Consistent,
    FNVHash,
    Hash,
    HealthPolicy,
    HealthSnapshot,
    LBTransport,
    LoadBalancer,
    Random,
    RoundRobin,
)
from lbclient.discovery import File
from lbclient.testing import TestServer

ALGORITHMS = {
    "roundrobin": RoundRobin,
    "random": Random,
    "hash": Hash,
    "fnv": FNVHash,
    "consistent": Consistent,
}
#: The demo's health policy: three failures in a row eject a backend for 1 s at first.
POLICY = HealthPolicy(consecutive_failures=3, consecutive_5xx=3, base_ejection_time=1.0)
#: Pause per request on a live display, so that a person can follow the table.
PACE = 0.004


def state_of(entry: BackendHealth) -> str:
    """A few words for one backend's health."""
    if not entry.enabled:
        return "disabled"
    if entry.probing:
        return "probing"
    if entry.ejected:
        left = entry.ejection_remaining or 0.0
        return f"EJECTED {left:.1f}s" if left > 0 else "probe due"
    if entry.checked is False:
        return "failing checks"
    return "healthy"


class Board:
    """What the display shows: per-backend counts of this phase and overall, and events."""

    def __init__(self, lb: LoadBalancer, names: dict[str, str]) -> None:
        self.lb = lb
        self.names = names
        self.title = ""
        self.phase: Counter[str] = Counter()
        self.total: Counter[str] = Counter()
        self.sent = 0
        self.failed = 0
        self.events: list[str] = []
        self.started = time.monotonic()

    def event(self, text: str) -> None:
        """Note something that happened, with the time since the start."""
        self.events.append(f"t={time.monotonic() - self.started:4.1f}s  {text}")

    def rows(self) -> tuple[HealthSnapshot, list[tuple[str, BackendHealth, int, float]]]:
        snap = self.lb.snapshot()
        count = sum(self.phase.values()) or 1
        rows = []
        for entry in snap.backends:
            name = self.names[entry.backend.address]
            n = self.phase[name]
            rows.append((name, entry, n, n / count))
        return snap, rows

    def text(self) -> str:
        """The phase as plain text."""
        snap, rows = self.rows()
        lines = [self.title]
        for name, entry, n, share in rows:
            lines.append(
                f"  {name:<10} {entry.backend.address:<16} w={entry.backend.weight:<2} "
                f"{state_of(entry):<13} {n:>5}  {100 * share:5.1f}%  {'#' * round(40 * share)}"
            )
        if snap.panic:
            lines.append("  panic mode: health ignored")
        return "\n".join(lines)


class Display(Protocol):
    def phase(self, title: str) -> None: ...
    def tick(self) -> None: ...
    def done(self) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...


class PlainDisplay:
    """Prints each phase's table when it ends, then the events of the phase."""

    def __init__(self, board: Board) -> None:
        self.board = board
        self._shown = 0

    def phase(self, title: str) -> None:
        self.board.title = title

    def tick(self) -> None:
        pass

    def done(self) -> None:
        print(self.board.text())
        events = self.board.events[self._shown :]
        self._shown += len(events)
        for line in events:
            print(f"   {line}")
        print()

    def note(self, text: str) -> None:
        print(text)

    def close(self) -> None:
        pass


class LiveDisplay:
    """A live table (rich): share and health of every backend, updated as requests go."""

    def __init__(self, board: Board) -> None:
        from rich.console import Console
        from rich.live import Live

        self.board = board
        self.console = Console()
        self.live = Live(console=self.console, refresh_per_second=15, transient=True)
        self.live.start()
        self._shown = 0

    def _render(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        board = self.board
        snap, rows = board.rows()
        table = Table(title=board.title, title_justify="left", expand=False)
        for column in ("backend", "address", "weight", "health", "requests", "share", ""):
            table.add_column(
                column, justify="right" if column in ("weight", "requests", "share") else "left"
            )
        for name, entry, n, share in rows:
            state = state_of(entry)
            style = "green" if state == "healthy" else "bold red" if "EJECT" in state else "yellow"
            table.add_row(
                name,
                entry.backend.address,
                str(entry.backend.weight),
                Text(state, style=style),
                str(n),
                f"{100 * share:.1f}%",
                Text("█" * round(30 * share), style="cyan"),
            )
        status = Text(
            f"{board.sent} requests, {board.failed} failed"
            + ("   PANIC MODE: health ignored" if snap.panic else ""),
            style="bold",
        )
        recent = Text("\n".join(board.events[self._shown :][-8:]), style="dim")
        return Group(table, status, recent)

    def phase(self, title: str) -> None:
        self.board.title = title
        self.live.update(self._render())

    def tick(self) -> None:
        self.live.update(self._render())

    def done(self) -> None:
        frame = self._render()
        self.live.update(frame)
        self.live.console.print(frame, "")
        self._shown = len(self.board.events)

    def note(self, text: str) -> None:
        self.live.console.print(text)

    def close(self) -> None:
        self.live.stop()


def _display(board: Board, plain: bool) -> Display:
    if not plain and sys.stdout.isatty():
        try:
            return LiveDisplay(board)
        except ImportError:
            pass
    return PlainDisplay(board)


class _Events(logging.Handler):
    """Collects the balancer's log lines (ejections, probes, recoveries) for the display."""

    def __init__(self, board: Board, names: dict[str, str]) -> None:
        super().__init__(logging.INFO)
        self.board = board
        self.names = names

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        for address, name in self.names.items():
            text = text.replace(f"backend {address}", name)
        self.board.event(text)


class MetricsServer:
    """The demo balancer's Prometheus metrics (``service="users"``), served on 127.0.0.1 by
    prometheus-client's own HTTP server until :meth:`close`."""

    def __init__(self, lb: LoadBalancer, port: int) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        from lbclient.metrics import register

        registry = CollectorRegistry()
        self.registration = register(lb, service="users", registry=registry)
        try:
            self.server, self.thread = start_http_server(port, addr="127.0.0.1", registry=registry)
        except BaseException:
            self.registration.unregister()
            raise
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        self.registration.unregister()


def _metrics_problem(port: int) -> str | None:
    """What stops the demo from serving metrics on ``port``, or None."""
    if not 0 <= port <= 65_535:
        return f"--metrics-port must be a port number 0..65535 (0: a free one), got {port}"
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return "--metrics-port needs prometheus-client: pip install 'lbclient[metrics]'"
    return None


def demo(
    algorithm: str,
    backends: int,
    requests: int,
    plain: bool = False,
    metrics_port: int | None = None,
) -> int:
    """Run the demo; return the exit status (0 when no request failed). With ``metrics_port``,
    the balancer's metrics are served on ``http://127.0.0.1:PORT/metrics`` while it runs."""
    if backends < 2:
        print("demo: --backends must be at least 2", file=sys.stderr)
        return 2
    if requests < 10:
        print("demo: --requests must be at least 10", file=sys.stderr)
        return 2
    problem = None if metrics_port is None else _metrics_problem(metrics_port)
    if problem is not None:
        print(f"demo: {problem}", file=sys.stderr)
        return 2
    servers = [TestServer(name=f"backend-{i}").start() for i in range(backends)]
    names = {s.address: s.name for s in servers}
    lb = LoadBalancer(
        [Backend(s.address, weight=1 + i % 3) for i, s in enumerate(servers)],
        ALGORITHMS[algorithm],
        health=POLICY,
    )
    metrics: MetricsServer | None = None
    if metrics_port is not None:
        try:
            metrics = MetricsServer(lb, metrics_port)
        except OSError as exc:
            for server in servers:
                server.close()
            print(f"demo: cannot serve metrics on 127.0.0.1:{metrics_port}: {exc}", file=sys.stderr)
            return 2
    board = Board(lb, names)
    events = _Events(board, names)
    logger = logging.getLogger("lbclient")
    level = logger.level
    logger.addHandler(events)
    logger.setLevel(logging.INFO)
    display = _display(board, plain)
    live = isinstance(display, LiveDisplay)
    try:
        display.note(
            f"lbclient demo: {backends} local backends, algorithm={algorithm}, {requests} "
            "requests per phase, GETs and POSTs through LBTransport\n"
        )
        if metrics is not None:
            display.note(f'metrics (service="users") while the demo runs: {metrics.url}\n')
        stayed_put = _run(board, display, servers, requests, live)
    finally:
        display.close()
        if metrics is not None:
            metrics.close()
        logger.removeHandler(events)
        logger.setLevel(level)
        for server in servers:
            server.close()
    served = Counter(s.name for s in servers for _ in s.requests)
    print(
        f"summary: {board.sent} requests, {board.failed} failed, "
        f"{'no request lost' if not board.failed else 'REQUESTS LOST'} during failover; "
        f"served: {', '.join(f'{n} {c}' for n, c in sorted(served.items()))}; "
        f"{time.monotonic() - board.started:.1f} s"
    )
    return 0 if not board.failed and stayed_put else 1


def _run(
    board: Board, display: Display, servers: list[TestServer], requests: int, live: bool
) -> bool:
    lb = board.lb

    def send(client: httpx.Client, i: int) -> None:
        board.sent += 1
        try:
            if i % 3 == 0:
                response = client.post("/orders", json={"order": i})
            else:
                response = client.get(f"/users/{i}", headers={"x-user-id": f"user-{i}"})
            response.raise_for_status()
            name = str(response.json()["server"])
            board.phase[name] += 1
            board.total[name] += 1
        except httpx.HTTPError as exc:
            board.failed += 1
            board.event(f"request {i} FAILED: {exc}")
        if live:
            if i % 10 == 0:
                display.tick()
            time.sleep(PACE)

    def phase(
        client: httpx.Client, title: str, before: Callable[[int], None] | None = None
    ) -> None:
        board.phase.clear()
        display.phase(title)
        for i in range(requests):
            if before is not None:
                before(i)
            send(client, i)
        display.done()

    victim = servers[0]
    transport = LBTransport(lb, key=lambda r: r.headers.get("x-user-id"))
    with httpx.Client(transport=transport, base_url="http://users", timeout=5) as client:
        phase(client, "1. Traffic by weight")

        def kill(i: int) -> None:
            if i == requests // 4:
                victim.kill()
                board.event(f"{victim.name} KILLED: its connections are refused")

        phase(
            client,
            f"2. {victim.name} killed mid-phase: every request fails over, it is ejected",
            kill,
        )

        victim.restart()
        board.event(f"{victim.name} restarted")
        while not lb.ready(victim.address):  # the rest of its ejection
            display.tick()
            time.sleep(0.05)
        phase(client, f"3. {victim.name} back: its ejection ends, one probe request restores it")

    ring = LoadBalancer([s.address for s in servers], Consistent)
    users = [f"user-{n}" for n in range(200)]
    sticky = LBTransport(ring, key=lambda r: r.headers.get("x-user-id"))
    with httpx.Client(transport=sticky, base_url="http://carts", timeout=5) as client:

        def home(user: str) -> str:
            board.sent += 1
            return str(client.get("/cart", headers={"x-user-id": user}).json()["server"])

        before = {u: home(u) for u in users}
        again = sum(home(u) == before[u] for u in users)
        ring.update([s.address for s in servers[1:]])
        after = {u: home(u) for u in users}
    moved = [u for u in users if after[u] != before[u]]
    stayed_put = all(before[u] == victim.name for u in moved)
    display.note(
        f"4. Sticky sessions with Consistent (nginx's ketama), {len(users)} users:\n"
        f"   same backend when asked twice: {again}/{len(users)}\n"
        f"   {victim.name} leaves: {len(moved)} users move "
        f"({100 * len(moved) / len(users):.1f}%), all of them from {victim.name}; "
        f"the others stay: {stayed_put}\n"
    )
    joined = _discovery_phase(board, display, servers, requests)
    return stayed_put and joined


def _discovery_phase(
    board: Board, display: Display, servers: list[TestServer], requests: int
) -> bool:
    """A file lists all backends but the last; the last is added to it while traffic runs.
    Return whether the newcomer got its share once the balancer had re-read the file."""
    newcomer = servers[-1]
    with tempfile.TemporaryDirectory() as folder:
        listing = f"{folder}/users.txt"

        def write(members: list[TestServer]) -> None:
            with open(listing, "w", encoding="utf-8") as out:
                out.write("".join(f"{s.address}\n" for s in members))

        write(servers[:-1])
        lb = LoadBalancer(discovery=File(listing), refresh=0.2, algorithm=RoundRobin)
        with httpx.Client(transport=LBTransport(lb), base_url="http://orders", timeout=5) as client:

            def share(count: int) -> int:
                got = 0
                for _ in range(count):
                    board.sent += 1
                    try:
                        got += client.get("/stock").json()["server"] == newcomer.name
                    except httpx.HTTPError as exc:
                        board.failed += 1
                        board.event(f"a request FAILED: {exc}")
                return got

            before = share(requests // 2)
            write(servers)
            waited = time.monotonic()
            while newcomer.address not in {b.address for b in lb.backends} and (
                time.monotonic() - waited < 10
            ):
                time.sleep(0.05)
            seen = time.monotonic() - waited
            after = share(requests // 2)
    expected = requests // 2 / len(servers)
    display.note(
        f"5. {newcomer.name} added to the discovery file users.txt (re-read every 0.2 s):\n"
        f"   before: {before} of {requests // 2} requests; joined the set after {seen:.1f} s; "
        f"then {after} of {requests // 2} (its share: about {expected:.0f})\n"
    )
    return before == 0 and after > 0
