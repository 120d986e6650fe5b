"""One real etcd for a test module (``/usr/bin/etcd``, Debian's etcd-server: the tests skip
without it, unless ``LBCLIENT_REQUIRE_ETCD=1`` makes that a failure), on free loopback ports
with its data in a pytest tmp dir, killed (and restarted) at will; a client of its JSON gateway
for the tests' own writes; and :class:`Cut`, a loopback TCP relay in front of it that the tests
open and close to disconnect a watching client without stopping etcd."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from conftest import require

if TYPE_CHECKING:
    from lbclient import LoadBalancer

ETCD_MISSING = "etcd not installed (Debian: apt-get install etcd-server)"
#: A hang guard only: etcd answers within about a second.
STARTUP_GUARD_S = 20.0


def etcd_binary() -> str:
    found = shutil.which("etcd") or (
        "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None
    )
    if found is None:
        require(False, ETCD_MISSING, "LBCLIENT_REQUIRE_ETCD")
        raise AssertionError("unreachable")  # pragma: no cover
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def addresses(balancer: LoadBalancer) -> set[str]:
    """The addresses ``balancer`` routes to now."""
    return {b.address for b in balancer.backends}


def naming(address: str, **metadata: object) -> str:
    """etcd's naming JSON for ``address``."""
    return json.dumps({"Op": 0, "Addr": address, "Metadata": metadata or None})


def connected(balancer: LoadBalancer) -> bool:
    """Whether ``balancer``'s watch has its stream open."""
    state = balancer.snapshot().discovery_watch
    return state is not None and state.connected


def wait_until(condition: Callable[[], object], guard: float = 15.0, what: str = "") -> None:
    """Poll ``condition`` until it holds; the guard only stops a hang."""
    end = time.monotonic() + guard
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"not within the {guard:g} s hang guard: {what}")
        time.sleep(0.005)


class EtcdTLS:
    """A throwaway CA (trustme), etcd's server certificate for 127.0.0.1 and a client
    certificate, written as PEM files in ``directory``."""

    def __init__(self, directory: Path) -> None:
        import trustme

        ca = trustme.CA()
        self.ca = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        self.server = self._write(ca.issue_cert("127.0.0.1"), directory, "server")
        self.client = self._write(ca.issue_cert("lbclient-tests"), directory, "client")

    @staticmethod
    def _write(leaf: Any, directory: Path, name: str) -> tuple[str, str]:
        cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return str(cert), str(key)


class EtcdProcess:
    """A single-member etcd on 127.0.0.1, its data in ``directory``; with ``tls``, its client
    URL is https and it asks clients for a certificate its CA signed (``--client-cert-auth``).
    The tests' own client presents that certificate, and after :meth:`enable_auth` signs in
    as root."""

    def __init__(self, directory: Path, tls: EtcdTLS | None = None) -> None:
        self.binary = etcd_binary()
        self.directory = directory
        self.tls = tls
        self.port = free_port()
        self.peer = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        verify: ssl.SSLContext | bool = True
        if tls is not None:
            verify = ssl.create_default_context(cafile=str(tls.ca))
            verify.load_cert_chain(*tls.client)
        self.client = httpx.Client(timeout=10.0, trust_env=False, verify=verify)
        self.password: str | None = None

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer}"
        log = open(self.directory / "etcd.log", "ab")  # noqa: SIM115  (the process owns it)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--name=test",
                f"--data-dir={self.directory / 'data'}",
                f"--listen-client-urls={self.url}",
                f"--advertise-client-urls={self.url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=test={peer}",
                "--max-txn-ops=20000",
                "--max-request-bytes=33554432",
                "--log-level=error",
                *(
                    [
                        f"--cert-file={self.tls.server[0]}",
                        f"--key-file={self.tls.server[1]}",
                        "--client-cert-auth",
                        f"--trusted-ca-file={self.tls.ca}",
                    ]
                    if self.tls is not None
                    else []
                ),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        end = time.monotonic() + STARTUP_GUARD_S
        while True:
            if self.process.poll() is not None:
                text = (self.directory / "etcd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"etcd exited with {self.process.returncode}: {text}")
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get(f"{self.url}/health").status_code == 200:
                    return
            if time.monotonic() > end:
                raise RuntimeError("etcd did not answer within the startup guard")
            time.sleep(0.05)

    def __enter__(self) -> EtcdProcess:
        """Started; closed (killed) at the end of the ``with``, however it ends."""
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def wipe(self) -> None:
        """Kill etcd and start it again on the same ports with its data gone (a lost disk, a
        restore): its revision starts over at 1, its cluster ID stays (etcd derives it from the
        member's name and peer URL)."""
        self.kill()
        shutil.rmtree(self.directory / "data", ignore_errors=True)
        self.start()

    def close(self) -> None:
        self.kill()
        self.client.close()

    # -- the tests' own writes -----------------------------------------------------------

    def enable_auth(self, password: str) -> None:
        """etcd's authentication on: the user root (role root) with ``password``."""
        self.call("/v3/auth/user/add", {"name": "root", "password": password})
        self.call("/v3/auth/role/add", {"name": "root"})
        self.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.call("/v3/auth/enable", {})
        self.password = password

    def call(self, path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        headers = {}
        if self.password is not None:  # a token of its own for each write: tokens end
            token = self.client.post(
                f"{self.url}/v3/auth/authenticate", json={"name": "root", "password": self.password}
            )
            token.raise_for_status()
            headers["Authorization"] = token.json()["token"]
        response = self.client.post(f"{self.url}{path}", json=payload, headers=headers)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def header(self) -> dict[str, str]:
        """A read's response header: the store's ``revision``, its ``cluster_id``."""
        header: dict[str, str] = self.call("/v3/kv/range", {"key": b64("\0")})["header"]
        return header

    def put(self, key: str, value: str | bytes) -> int:
        body = self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})
        return int(body["header"]["revision"])

    def delete(self, key: str) -> int:
        return int(self.call("/v3/kv/deleterange", {"key": b64(key)})["header"]["revision"])

    def put_many(self, pairs: Mapping[str, str]) -> None:
        """Every pair in one transaction."""
        ops = [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in pairs.items()]
        self.call("/v3/kv/txn", {"success": ops})

    def compact(self) -> int:
        """Compact the history up to the current revision; return it."""
        revision = int(self.call("/v3/kv/range", {"key": b64("\0")})["header"]["revision"])
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision


class Cut:
    """A loopback TCP relay to ``port``: :meth:`cut` drops every connection and refuses new
    ones (they are closed at once) until :meth:`mend`."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = False
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self._cut or self._closed:
                    inbound.close()
                    continue
            try:
                outbound = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                inbound.close()
                continue
            with self._lock:
                self._open.update((inbound, outbound))
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            sockets, self._open = self._open, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def point(self, port: int) -> None:
        """Connections made from now on go to ``port`` (those open stay: :meth:`cut` them)."""
        with self._lock:
            self.target = port

    def mend(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.listener.close()
        self._thread.join(5)
