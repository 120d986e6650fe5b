"""lbclient's ``SmoothRoundRobin`` must pick exactly the sequence of nginx's default ``upstream``.

One real nginx is started for the module: a single process (``daemon off; master_process off;
worker_processes 1;``) that listens on loopback only and keeps its config, pid, logs and temp
dirs inside a pytest tmp dir. It proxies ``/u<i>/`` to ``upstream u<i>``, one per weight set,
with no ``hash`` (smooth weighted round robin), ``max_fails=0``, no upstream keepalive and
``proxy_next_upstream off``, so every request is exactly one pick and nothing else moves the
state. Behind it, tiny ``TestServer`` backends answer with their names.

nginx takes an upstream's servers in the order written, ties going to the one written first, so
each upstream lists its servers in lbclient's sorted backend order (loopback, ascending port).
250 sequential requests (eleven periods of the longest upstream, whose weights add up to 21) go
through nginx; the backend that served each must be, request for request,
``LoadBalancer(backends, SmoothRoundRobin).select()``, and the backend lbclient's own
``LBTransport`` sends each of them to.

More upstreams mark some of their servers ``down``: nginx then picks among the others alone,
and so must lbclient with the same backends switched off or ejected (its backends down).

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

from lbclient import Backend, HealthPolicy, LBTransport, LoadBalancer, SmoothRoundRobin
from lbclient.testing import Exchange, TestServer

pytestmark = pytest.mark.nginx

HTTP_TIMEOUT_S = 5.0
REQUESTS = 250
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
# Upstreams with servers marked ``down``: (weights, the indexes of those down), in sorted order.
DOWN_SETS: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = (
    ((5, 1, 1), (0,)),  # the heaviest
    ((3, 2, 1, 1), (1,)),
    ((1, 5, 1, 3), (1, 2)),
    ((2, 7, 7, 1, 4), (1,)),  # one of two equal
    ((1, 1, 1, 1, 1, 1), (1, 2, 3)),  # a zone: three in a row
    ((1, 2, 3, 2), (3,)),
)
FIRST_DOWN = REVERSED + 1
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
    upstreams = [
        [(server, weight, False) for server, weight in zip(servers, weights, strict=False)]
        for weights in WEIGHT_SETS
    ]
    upstreams.append([(server, 1, False) for server in reversed(servers[:3])])
    upstreams += [
        [(servers[i], weight, i in down) for i, weight in enumerate(weights)]
        for weights, down in DOWN_SETS
    ]
    for number, members in enumerate(upstreams):
        lines.append(f"    upstream u{number} {{")
        lines += [
            f"        server {server.address} weight={weight} max_fails=0{' down' if out else ''};"
            for server, weight, out in members
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
    count = max(len(weights) for weights in (*WEIGHT_SETS, *(w for w, _ in DOWN_SETS)))

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


def _transport_sequence(backends: Sequence[Backend] | LoadBalancer, count: int) -> list[str]:
    """The name of the backend lbclient's LBTransport sent each of ``count`` requests to."""
    served: list[str] = []
    if isinstance(backends, LoadBalancer):
        transport = LBTransport(backends, max_attempts=1)
    else:
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


def _with_down(backends: Sequence[Backend], down: Sequence[int], how: str) -> LoadBalancer:
    """A smooth round robin balancer over ``backends`` with those at ``down`` switched off or
    ejected (on a clock that never moves: no probe comes due); panic mode off."""
    lb = LoadBalancer(
        backends,
        SmoothRoundRobin,
        health=HealthPolicy(consecutive_failures=1, max_ejection_percent=100, panic_threshold=0),
        clock=lambda: 1000.0,
    )
    for i in down:
        if how == "disabled":
            lb.set_enabled(backends[i], False)
        else:
            lb.report(backends[i], False)
            assert lb.health(backends[i]).ejected
    return lb


@pytest.mark.parametrize("how", ["disabled", "ejected"])
@pytest.mark.parametrize(
    ("upstream", "weights", "down"),
    [(FIRST_DOWN + i, weights, down) for i, (weights, down) in enumerate(DOWN_SETS)],
    ids=[
        "-".join(f"{w}{'x' if i in down else ''}" for i, w in enumerate(weights))
        for weights, down in DOWN_SETS
    ],
)
def test_with_servers_down_the_others_pick_nginx_sequence(
    nginx_front: NginxFront,
    upstream: int,
    weights: tuple[int, ...],
    down: tuple[int, ...],
    how: str,
) -> None:
    backends = nginx_front.backends(weights)
    lb = _with_down(backends, down, how)
    up = [b for i, b in enumerate(backends) if i not in down]
    period = sum(b.weight for b in up)
    # Whole periods: nginx's current weights are back at 0 for the next test of the upstream.
    count = period * -(-REQUESTS // period)
    served = _nginx_sequence(nginx_front, upstream, count)
    assert {backends[i].address for i in down}.isdisjoint(served)
    expected = []
    for _ in range(count):
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
    assert [served[:period].count(b.address) for b in up] == [b.weight for b in up]

    names = {server.address: server.name for server in nginx_front.servers}
    through_transport = _transport_sequence(_with_down(backends, down, how), count)
    assert through_transport == [names[address] for address in served]
