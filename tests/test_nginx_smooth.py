"""lbclient's ``SmoothRoundRobin`` must pick exactly the sequence of nginx's default ``upstream``.

One real nginx is started for the module: a single process (``daemon off; master_process off;
worker_processes 1;``) that listens on loopback only and keeps its config, pid, logs and temp
dirs inside a pytest tmp dir. It proxies ``/u<i>/`` to ``upstream u<i>``, one per weight set,
with no ``hash`` (smooth weighted round robin), ``max_fails=0``, no upstream keepalive and
``proxy_next_upstream off``, so every request is exactly one pick and nothing else moves the
state. Behind it, tiny ``TestServer`` backends answer with their names.

nginx takes an upstream's servers in the order written, ties going to the one written first, so
each upstream lists its servers in lbclient's sorted backend order (loopback, ascending port).
1,000 sequential requests go through nginx; the backend that served each must be, request for
request, ``LoadBalancer(backends, SmoothRoundRobin).select()``, and the backend lbclient's own
``LBTransport`` sends each of 1,000 requests to.

Skipped when nginx is not installed, unless ``LBCLIENT_REQUIRE_NGINX=1`` (then it fails).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import require

from lbclient import Backend, LBTransport, LoadBalancer, SmoothRoundRobin
from lbclient.testing import Exchange, TestServer

pytestmark = pytest.mark.nginx

NGINX_MISSING = "nginx not installed (Debian: apt-get install nginx-light)"
STARTUP_DEADLINE_S = 10.0
STOP_GRACE_S = 5.0
HTTP_TIMEOUT_S = 5.0
REQUESTS = 1_000
# Weights per upstream, in sorted backend order: the heaviest first, in the middle, ties.
WEIGHT_SETS: tuple[tuple[int, ...], ...] = (
    (5, 1, 1),
    (3, 2, 1, 1),
    (1, 1, 1),
    (1, 5, 1, 3),
    (2, 7, 7, 1, 4),
)
# An extra upstream with equal weights written in reverse sorted order: shows that nginx
# follows the order written.
REVERSED = len(WEIGHT_SETS)
REQUIRED_MODULES = ("proxy",)
OPTIONAL_TEMP_MODULES = ("fastcgi", "uwsgi", "scgi")


@dataclass(frozen=True)
class NginxFront:
    url: str
    servers: tuple[TestServer, ...]  # in lbclient's sorted order (ascending port)

    def backends(self, weights: Sequence[int]) -> list[Backend]:
        return [
            Backend(server.address, weight=weight)
            for server, weight in zip(self.servers, weights, strict=False)
        ]


def _name(exchange: Exchange) -> bool:
    """Answer with the server's name."""
    name = exchange.server.name.encode()
    return exchange.respond(200, name, {"Content-Type": "text/plain"})


# --------------------------------------------------------------------------- nginx discovery


def _skip_or_fail(reason: str) -> None:
    require(False, reason, "LBCLIENT_REQUIRE_NGINX")


def _nginx_binary() -> str:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    if found is None:
        _skip_or_fail(NGINX_MISSING)
        raise AssertionError("unreachable")  # pragma: no cover
    return found


def _nginx_build_info(nginx: str) -> str:
    try:
        done = subprocess.run(
            [nginx, "-V"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _skip_or_fail(f"{nginx} -V failed: {exc}")
        raise AssertionError("unreachable") from exc  # pragma: no cover
    return done.stdout + done.stderr


# --------------------------------------------------------------------------- nginx process


def _nginx_conf(
    directory: Path, front_port: int, servers: Sequence[TestServer], info: str
) -> str:
    def path(name: str) -> str:
        return f'"{directory / name}"'

    lines = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        import grp
        import pwd

        # As root nginx would otherwise chown its temp dirs to (and look up) "nobody".
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
        lines.append(f"user {user} {group};")
    lines += [
        "daemon off;",
        "master_process off;",
        "worker_processes 1;",
        f"pid {path('nginx.pid')};",
        f"lock_file {path('nginx.lock')};",
        f"error_log {path('error.log')} notice;",
        "events { worker_connections 256; }",
        "http {",
        "    access_log off;",
        "    default_type text/plain;",
        "    keepalive_requests 100000;",
        f"    client_body_temp_path {path('client_body_temp')};",
        f"    proxy_temp_path {path('proxy_temp')};",
    ]
    lines += [
        f"    {module}_temp_path {path(module + '_temp')};"
        for module in OPTIONAL_TEMP_MODULES
        if f"--without-http_{module}_module" not in info
    ]
    upstreams = [list(zip(servers, weights, strict=False)) for weights in WEIGHT_SETS]
    upstreams.append([(server, 1) for server in reversed(servers[:3])])
    for number, members in enumerate(upstreams):
        lines.append(f"    upstream u{number} {{")
        lines += [
            f"        server {server.address} weight={weight} max_fails=0;"
            for server, weight in members
        ]
        lines.append("    }")
    lines += [
        "    server {",
        f"        listen 127.0.0.1:{front_port};",
        "        proxy_next_upstream off;",
        "        proxy_connect_timeout 5s;",
        "        add_header X-Upstream $upstream_addr always;",
    ]
    for number in range(len(upstreams)):
        lines += [f"        location /u{number}/ {{", f"            proxy_pass http://u{number};",
                  "        }"]
    lines += ["    }", "}"]
    return "\n".join(lines) + "\n"


def _tail(*files: Path, limit: int = 4000) -> str:
    parts = []
    for file in files:
        text = file.read_text(errors="replace") if file.exists() else "(missing)"
        parts.append(f"--- {file.name} ---\n{text[-limit:]}")
    return "\n".join(parts)


def _wait_until_listening(proc: subprocess.Popen[bytes], port: int) -> str:
    """Empty string once nginx accepts TCP connections on ``port``, otherwise why not."""
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while True:
        if proc.poll() is not None:
            return f"nginx exited with status {proc.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return ""
        except OSError as exc:
            if time.monotonic() > deadline:
                return f"127.0.0.1:{port} not accepting after {STARTUP_DEADLINE_S:.0f} s: {exc}"
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: nginx fast shutdown
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # own session: only nginx is in this group
            proc.wait(STOP_GRACE_S)


@pytest.fixture(scope="module")
def nginx_front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxFront]:
    nginx = _nginx_binary()
    info = _nginx_build_info(nginx)
    missing = [m for m in REQUIRED_MODULES if f"--without-http_{m}_module" in info]
    if missing:
        _skip_or_fail(f"{nginx} lacks required modules: {', '.join(missing)}")
    directory = tmp_path_factory.mktemp("nginx-smooth")
    count = max(len(weights) for weights in WEIGHT_SETS)

    with contextlib.ExitStack() as stack:
        started = [
            stack.enter_context(TestServer("name", name=f"backend-{i}", behaviours={"name": _name}))
            for i in range(count)
        ]
        servers = tuple(sorted(started, key=lambda server: server.port))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            front_port = int(probe.getsockname()[1])  # freed just before nginx binds it

        conf = directory / "nginx.conf"
        error_log = directory / "error.log"
        output = directory / "nginx.out"
        conf.write_text(_nginx_conf(directory, front_port, servers, info))
        with output.open("wb") as out:
            proc = subprocess.Popen(
                [nginx, "-p", f"{directory}/", "-c", str(conf), "-e", str(error_log)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                problem = _wait_until_listening(proc, front_port)
                if problem:
                    pytest.fail(
                        f"nginx did not come up: {problem}\n{_tail(error_log, output, conf)}",
                        pytrace=False,
                    )
                yield NginxFront(f"http://127.0.0.1:{front_port}", servers)
            finally:
                _stop(proc)


def _nginx_sequence(front: NginxFront, upstream: int, count: int) -> list[str]:
    """The address of the backend that served each of ``count`` sequential requests."""
    by_name = {server.name: server.address for server in front.servers}
    served: list[str] = []
    with httpx.Client(base_url=front.url, timeout=HTTP_TIMEOUT_S, trust_env=False) as client:
        for _ in range(count):
            response = client.get(f"/u{upstream}/")
            upstream_addr = response.headers.get("X-Upstream", "")
            assert response.status_code == 200, (response.status_code, upstream_addr)
            assert "," not in upstream_addr, f"nginx tried more than one server: {upstream_addr}"
            address = by_name[response.text]
            assert upstream_addr == address, (upstream_addr, response.text)
            served.append(address)
    return served


def _transport_sequence(backends: Sequence[Backend], count: int) -> list[str]:
    """The name of the backend lbclient's LBTransport sent each of ``count`` requests to."""
    served: list[str] = []
    transport = LBTransport(backends, algorithm=SmoothRoundRobin, max_attempts=1)
    with httpx.Client(transport=transport, base_url="http://service", timeout=HTTP_TIMEOUT_S,
                      trust_env=False) as client:
        for _ in range(count):
            response = client.get("/")
            assert response.status_code == 200, response.status_code
            served.append(response.text)
    return served


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("upstream", "weights"),
    list(enumerate(WEIGHT_SETS)),
    ids=["-".join(map(str, weights)) for weights in WEIGHT_SETS],
)
def test_smooth_round_robin_picks_nginx_sequence(
    nginx_front: NginxFront, upstream: int, weights: tuple[int, ...]
) -> None:
    backends = nginx_front.backends(weights)
    lb = LoadBalancer(backends, SmoothRoundRobin)
    assert list(lb.backends) == backends, "the upstream is not written in lbclient's order"

    served = _nginx_sequence(nginx_front, upstream, REQUESTS)
    expected = []
    for _ in range(REQUESTS):
        picked = lb.select()
        assert picked is not None
        expected.append(picked.address)
    diverged = next((i for i, (a, b) in enumerate(zip(served, expected, strict=True)) if a != b),
                    None)
    assert diverged is None, (
        f"request {diverged}: nginx {served[diverged]}, lbclient {expected[diverged]}; "
        f"nginx's first picks {served[:20]}, lbclient's {expected[:20]}"
    )
    period = sum(weights)
    first = served[:period]
    assert [first.count(b.address) for b in backends] == list(weights)

    names = {server.address: server.name for server in nginx_front.servers}
    through_transport = _transport_sequence(backends, REQUESTS)
    assert through_transport == [names[address] for address in served]


def test_nginx_breaks_ties_in_the_order_written(nginx_front: NginxFront) -> None:
    written = [server.address for server in reversed(nginx_front.servers[:3])]
    assert _nginx_sequence(nginx_front, REVERSED, 6) == written * 2
