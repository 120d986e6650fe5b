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
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from nginx_process import conf_head, nginx_with, running

from lbclient import Backend, LBTransport, LoadBalancer, SmoothRoundRobin
from lbclient.testing import Exchange, TestServer

pytestmark = pytest.mark.nginx

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


def _nginx_conf(directory: Path, front_port: int, servers: Sequence[TestServer], info: str) -> str:
    lines = conf_head(directory, info)
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
        lines += [
            f"        location /u{number}/ {{",
            f"            proxy_pass http://u{number};",
            "        }",
        ]
    lines += ["    }", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def nginx_front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxFront]:
    nginx, info = nginx_with(REQUIRED_MODULES)
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

        conf = _nginx_conf(directory, front_port, servers, info)
        with running(nginx, directory, conf, [("127.0.0.1", front_port)]):
            yield NginxFront(f"http://127.0.0.1:{front_port}", servers)


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
    with httpx.Client(
        transport=transport, base_url="http://service", timeout=HTTP_TIMEOUT_S, trust_env=False
    ) as client:
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
    diverged = next(
        (i for i, (a, b) in enumerate(zip(served, expected, strict=True)) if a != b), None
    )
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
