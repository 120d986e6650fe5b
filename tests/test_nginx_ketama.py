"""lbclient's ``Consistent`` must route every key exactly like nginx's ``hash $key consistent``.

One real nginx is started for the module: a single process (``daemon off; master_process off;``)
that listens on loopback only and keeps its config, pid, logs and temp dirs inside a pytest tmp
dir.  The same process serves several tiny backends (each on its own port, answering with that
port) and a front ``server`` that proxies to ``upstream up { hash $arg_key consistent; ... }``
with mixed weights and mixed server forms (IPv4, bracketed IPv6, a host name).  Every key is sent
through the front, nginx's pick is read from ``X-Upstream`` (the port identifies the backend), and
it must equal ``LoadBalancer(..., algorithm=Consistent).select(key)`` for the same backends.

Skipped when nginx is not installed, unless ``LBCLIENT_REQUIRE_NGINX=1`` (then it fails).
"""

from __future__ import annotations

import ipaddress
import random
import socket
import string
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from nginx_process import conf_head, nginx_with, running

from lbclient import Backend, Consistent, LoadBalancer

pytestmark = pytest.mark.nginx

HTTP_TIMEOUT_S = 5.0
RANDOM_KEYS = 3000
ORDER_TEST_KEYS = 400
# Unreserved URL characters only: nginx's $arg_key is the raw (undecoded) query value, so these
# keys reach the hash byte for byte (the front echoes $arg_key in X-Key to prove it).
KEY_ALPHABET = string.ascii_letters + string.digits + "-._~"
# (host text as written in nginx.conf, weight); weight None = not written (nginx default 1).
# "[::1]" becomes "127.0.0.1" where no IPv6 loopback socket can be bound.
UPSTREAM_PLAN: tuple[tuple[str, int | None], ...] = (
    ("127.0.0.1", 1),
    ("127.0.0.1", 2),
    ("[::1]", 3),
    ("127.0.0.1", 5),
    ("localhost", 1),
    ("127.0.0.1", 4),
    ("127.0.0.1", None),
)
# Modules this test needs in nginx, and optional ones whose temp path must be moved into tmp.
REQUIRED_MODULES = ("proxy", "upstream_hash", "rewrite", "upstream_keepalive")


@dataclass(frozen=True)
class UpstreamServer:
    """One ``server`` line of ``upstream up`` and the backend ``server {}`` block behind it."""

    text: str  # "HOST:PORT" exactly as in nginx.conf and in Backend(...)
    weight: int | None  # None: written neither in nginx.conf nor in Backend(...)
    port: int  # unique per backend, identifies it in X-Upstream
    listen: tuple[str, ...]  # "ADDR:PORT" listen directives of the backend block

    def backend(self) -> Backend:
        if self.weight is None:
            return Backend(self.text)
        return Backend(self.text, weight=self.weight)

    def conf_line(self) -> str:
        weight = "" if self.weight is None else f" weight={self.weight}"
        return f"server {self.text}{weight} max_fails=0;"


@dataclass(frozen=True)
class NginxFront:
    url: str
    servers: tuple[UpstreamServer, ...]

    def by_port(self) -> dict[int, UpstreamServer]:
        return {server.port: server for server in self.servers}


# --------------------------------------------------------------------------- nginx discovery


# --------------------------------------------------------------------------- loopback ports


def _ipv6_loopback_usable() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _localhost_addresses(ipv6: bool) -> tuple[str, ...]:
    """Addresses nginx may resolve ``localhost`` to (with and without AI_ADDRCONFIG)."""
    found: set[str] = set()
    for flags in (0, socket.AI_ADDRCONFIG):
        try:
            infos = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM, flags=flags)
        except socket.gaierror:
            continue
        found.update(str(info[4][0]) for info in infos)
    if not found:
        pytest.skip("'localhost' does not resolve on this machine")
    if any(not ipaddress.ip_address(address).is_loopback for address in found):
        pytest.skip(f"'localhost' resolves to non-loopback addresses: {sorted(found)}")
    if not ipv6:
        found = {address for address in found if ":" not in address}
        if not found:
            pytest.skip("'localhost' resolves only to ::1, which cannot be bound here")
    return tuple(sorted(found))


def _bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


def _reserve_port(addresses: Sequence[str], held: list[socket.socket]) -> int:
    """A port that is free on every address; the probe sockets stay in ``held`` until closed."""
    for _ in range(100):
        first = _bind(addresses[0], 0)
        port = int(first.getsockname()[1])
        others: list[socket.socket] = []
        try:
            others.extend(_bind(address, port) for address in addresses[1:])
        except OSError:
            for sock in [first, *others]:
                sock.close()
            continue
        held.extend([first, *others])
        return port
    raise RuntimeError(f"no port free on all of {list(addresses)}")


def _listen_text(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _plan_servers(held: list[socket.socket], ipv6: bool) -> tuple[UpstreamServer, ...]:
    servers: list[UpstreamServer] = []
    for host, weight in UPSTREAM_PLAN:
        if host == "localhost":
            addresses = _localhost_addresses(ipv6)
        elif host == "[::1]" and ipv6:
            addresses = ("::1",)
        else:
            host, addresses = "127.0.0.1", ("127.0.0.1",)
        port = _reserve_port(addresses, held)
        listen = tuple(_listen_text(address, port) for address in addresses)
        servers.append(UpstreamServer(f"{host}:{port}", weight, port, listen))
    return tuple(servers)


# --------------------------------------------------------------------------- ring helpers


def _ketama_points(servers: Sequence[UpstreamServer]) -> list[tuple[int, str]]:
    """nginx's ketama points (hash, server text), sorted.

    Used ONLY to choose boundary keys and to reject port sets where two different servers share
    a point (a tie whose winner depends on sort details); the expected picks come from nginx.
    """
    points: list[tuple[int, str]] = []
    for server in servers:
        host, _, port = server.text.rpartition(":")
        base = zlib.crc32(host.encode() + b"\0" + port.encode())
        previous = 0
        for _ in range((server.weight or 1) * 160):
            previous = zlib.crc32(previous.to_bytes(4, "little"), base)
            points.append((previous, server.text))
    points.sort()
    return points


def _has_cross_server_tie(servers: Sequence[UpstreamServer]) -> bool:
    owners: dict[int, set[str]] = {}
    for point, text in _ketama_points(servers):
        owners.setdefault(point, set()).add(text)
    return any(len(texts) > 1 for texts in owners.values())


_SOLVE_LEN = 40  # key length for crc-targeted keys: 40 positions, each "a" or "c" (one bit apart)


def _crc_basis() -> tuple[int, dict[int, tuple[int, int]]]:
    """GF(2) basis of crc32 changes caused by flipping bit 1 of each position of "a" * 40."""
    base = bytearray(b"a" * _SOLVE_LEN)
    crc0 = zlib.crc32(base)
    basis: dict[int, tuple[int, int]] = {}  # pivot bit -> (crc delta, mask of flipped positions)
    for position in range(_SOLVE_LEN):
        flipped = bytearray(base)
        flipped[position] ^= 0x02
        vector, mask = zlib.crc32(flipped) ^ crc0, 1 << position
        while vector:
            pivot = vector.bit_length() - 1
            if pivot not in basis:
                basis[pivot] = (vector, mask)
                break
            vector ^= basis[pivot][0]
            mask ^= basis[pivot][1]
    return crc0, basis


def _key_with_crc32(target: int, crc0: int, basis: dict[int, tuple[int, int]]) -> str | None:
    """A URL-safe key whose crc32 is exactly ``target`` (crc32 is affine over GF(2))."""
    remaining, mask = target ^ crc0, 0
    for bit in range(31, -1, -1):
        if remaining >> bit & 1:
            if bit not in basis:
                return None
            remaining ^= basis[bit][0]
            mask ^= basis[bit][1]
    key = "".join("c" if mask >> i & 1 else "a" for i in range(_SOLVE_LEN))
    return key if zlib.crc32(key.encode()) == target else None


def _boundary_keys(servers: Sequence[UpstreamServer], seed: int = 1) -> list[str]:
    """Keys hashing exactly onto, just below and just above ring points, and at 0 / 2**32-1.

    Random keys practically never hit a point exactly, so this is what pins down ``>=`` versus
    ``>`` and the wrap-around past the last point.
    """
    hashes = sorted({point for point, _ in _ketama_points(servers)})
    rng = random.Random(seed)
    chosen = [hashes[0], hashes[1], hashes[-2], hashes[-1], *rng.sample(hashes, 20)]
    targets = [0, 1, 0xFFFFFFFF]
    for point in chosen:
        targets.extend(((point - 1) % 2**32, point, (point + 1) % 2**32))
    crc0, basis = _crc_basis()
    keys = [_key_with_crc32(target, crc0, basis) for target in targets]
    return [key for key in keys if key is not None]


def _random_keys(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    keys: dict[str, None] = {}
    while len(keys) < count:
        keys["".join(rng.choices(KEY_ALPHABET, k=rng.randint(1, 40)))] = None
    return list(keys)


# --------------------------------------------------------------------------- nginx process


def _nginx_conf(
    directory: Path, front_port: int, servers: Sequence[UpstreamServer], info: str
) -> str:
    lines = conf_head(directory, info)
    lines += [
        "    upstream up {",
        "        hash $arg_key consistent;",
        *(f"        {server.conf_line()}" for server in servers),
        "        keepalive 8;",
        "    }",
        "    server {",
        f"        listen 127.0.0.1:{front_port};",
        "        location / {",
        "            proxy_pass http://up;",
        "            proxy_http_version 1.1;",
        '            proxy_set_header Connection "";',
        "            proxy_next_upstream off;",
        "            add_header X-Upstream $upstream_addr always;",
        "            add_header X-Key $arg_key always;",
        "        }",
        "    }",
    ]
    for server in servers:
        lines.append("    server {")
        lines += [f"        listen {listen};" for listen in server.listen]
        lines += ['        return 200 "$server_port\\n";', "    }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def nginx_front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxFront]:
    nginx, info = nginx_with(REQUIRED_MODULES)
    directory = tmp_path_factory.mktemp("nginx")
    ipv6 = _ipv6_loopback_usable()

    held: list[socket.socket] = []
    try:
        for _ in range(20):
            for sock in held:
                sock.close()
            held.clear()
            front_port = _reserve_port(("127.0.0.1",), held)
            servers = _plan_servers(held, ipv6)
            if not _has_cross_server_tie(servers):
                break
        else:  # pragma: no cover - astronomically unlikely
            pytest.fail("could not find ports without a ketama point tie", pytrace=False)
    finally:
        for sock in held:  # free the ports just before nginx binds them
            sock.close()

    endpoints = [("127.0.0.1", front_port)]
    for server in servers:
        endpoints += [
            (listen.rpartition(":")[0].strip("[]"), server.port) for listen in server.listen
        ]
    conf = _nginx_conf(directory, front_port, servers, info)
    with running(nginx, directory, conf, endpoints):
        yield NginxFront(f"http://127.0.0.1:{front_port}", servers)


def _nginx_picks(front: NginxFront, keys: Sequence[str]) -> dict[str, int]:
    """Key -> port of the backend nginx proxied it to (one keep-alive client for all keys)."""
    ports = front.by_port()
    picks: dict[str, int] = {}
    with httpx.Client(base_url=front.url, timeout=HTTP_TIMEOUT_S, trust_env=False) as client:
        for key in keys:
            response = client.get(f"/?key={key}")
            upstream = response.headers.get("X-Upstream", "")
            assert response.status_code == 200, (key, response.status_code, upstream)
            assert response.headers.get("X-Key") == key, "nginx's $arg_key differs from the key"
            host, _, port_text = upstream.rpartition(":")
            assert host, f"unexpected X-Upstream {upstream!r}"
            assert "," not in upstream, f"nginx tried more than one upstream: {upstream!r}"
            port = int(port_text)
            assert port in ports, f"X-Upstream {upstream!r} is not a configured backend"
            assert response.text == f"{port}\n", (upstream, response.text)
            picks[key] = port
    return picks


def _mismatches(
    lb: LoadBalancer, front: NginxFront, picks: dict[str, int], *, as_bytes: bool = False
) -> list[str]:
    ports = front.by_port()
    found = []
    for key, port in picks.items():
        chosen = lb.select(key.encode() if as_bytes else key)
        expected = ports[port].text
        if chosen.address != expected:
            crc = zlib.crc32(key.encode())
            found.append(
                f"{key!r} (crc32 {crc:#010x}): nginx {expected}, lbclient {chosen.address}"
            )
    return found


# --------------------------------------------------------------------------- tests


def test_consistent_routes_like_nginx_hash_consistent(nginx_front: NginxFront) -> None:
    servers = nginx_front.servers
    boundary = _boundary_keys(servers)
    assert len(boundary) >= 60, "could not build the crc-targeted boundary keys"
    keys = list(dict.fromkeys([*_random_keys(RANDOM_KEYS, seed=20240229), *boundary]))
    assert len(keys) >= 2000

    picks = _nginx_picks(nginx_front, keys)
    lb = LoadBalancer([server.backend() for server in servers], algorithm=Consistent)
    mismatches = _mismatches(lb, nginx_front, picks)

    assert not mismatches, (
        f"{len(mismatches)} of {len(keys)} keys routed differently from nginx, e.g.:\n"
        + "\n".join(mismatches[:10])
    )
    unused = sorted(set(nginx_front.by_port()) - set(picks.values()))
    assert not unused, f"nginx never chose backends on ports {unused}; keys do not spread"


def test_consistent_ignores_backend_list_order(nginx_front: NginxFront) -> None:
    picks = _nginx_picks(nginx_front, _random_keys(ORDER_TEST_KEYS, seed=7))
    servers = list(nginx_front.servers)
    rng = random.Random(7)
    orders = [servers[::-1], *(rng.sample(servers, len(servers)) for _ in range(3))]
    for order in orders:
        lb = LoadBalancer([server.backend() for server in order], algorithm=Consistent)
        mismatches = _mismatches(lb, nginx_front, picks, as_bytes=True)
        assert not mismatches, (
            f"backend order {[server.text for server in order]} changes routing, e.g.:\n"
            + "\n".join(mismatches[:10])
        )
