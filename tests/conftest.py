"""Shared test helpers.

Data from real nginx lives in the sibling ``../shared/`` folder of the development workspace, not
in this repository. Tests that read it skip where it is absent (a user's clone has none), unless
``LBCLIENT_REQUIRE_SHARED=1`` is set, as CI does, which turns that skip into a failure.

:class:`Dnsmasq` runs a real DNS server on a free loopback port for the discovery tests; where
dnsmasq is not installed they skip, unless ``LBCLIENT_REQUIRE_DNSMASQ=1``. By default it answers
for its domain alone (``--local``); made with ``local=False`` it is a common local set-up, a
resolver serving a hosts file with no upstream (what it cannot answer from the file, an AAAA
query for a name with A records only, say, it REFUSES), or, given ``upstream=`` a port, one
that forwards those queries there (:class:`Upstream`: a server that answers them SERVFAIL, or
none at all, so that they time out).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from lbclient import Backend, Hash, HealthPolicy, LoadBalancer
from lbclient._plan import Fault
from lbclient.testing import Exchange, TestServer

ROOT = Path(__file__).resolve().parent.parent


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (the suite's default): one worker per CPU, and one more for the worker that
    mostly waits on the README's bench run (a subprocess of its own)."""
    return (os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked ``long`` first: under pytest-xdist a worker starts each of them at once,
    and the other workers take the rest (``--dist worksteal``), so the suite lasts about as long
    as its longest test, not as that test plus whatever was queued behind it."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def _shared_dir() -> Path:
    configured = os.environ.get("LBCLIENT_SHARED")
    return Path(configured) if configured else ROOT.parent / "shared"


def require(condition: bool, reason: str, env: str) -> None:
    """Skip with ``reason`` unless ``condition``; fail instead when ``$env`` is ``1``."""
    if condition:
        return
    if os.environ.get(env) == "1":
        pytest.fail(f"{reason} ({env}=1 makes this a failure)")
    pytest.skip(reason)


def compiled_module(name: str, what: str, instead: str) -> ModuleType:
    """The compiled module ``name`` (``what`` it is); where the install did not build it, a
    skip saying so and what serves ``instead`` (of the whole test module where called at its
    top), or the ImportError where ``LBCLIENT_REQUIRE_COMPILED=1`` (CI builds it)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("LBCLIENT_REQUIRE_COMPILED") == "1":
            raise
        pytest.skip(
            f"lbclient was installed without its {what} (no C compiler, or "
            f"LBCLIENT_PURE_PYTHON=1 at install): {instead}",
            allow_module_level=True,
        )


@pytest.fixture(scope="session")
def shared_vectors() -> Path:
    """The ``vectors/`` folder of the workspace's ``../shared/`` data."""
    path = _shared_dir() / "vectors"
    require(
        path.is_dir(),
        f"{path} not found: the nginx vector data lives beside the repository in the "
        "development workspace only (a user's clone has no ../shared/)",
        "LBCLIENT_REQUIRE_SHARED",
    )
    return path


# -- dnsmasq ---------------------------------------------------------------------------------

DNSMASQ_MISSING = "dnsmasq not installed (Debian: apt-get install dnsmasq-base)"
#: The domain the test servers answer for: names in it that are not in the files are NXDOMAIN.
DNS_DOMAIN = "lbclient.test"
#: The TTL of every record dnsmasq serves (seconds).
DNS_TTL = 1


def dnsmasq_binary() -> str:
    """The dnsmasq program; skips (or fails, with LBCLIENT_REQUIRE_DNSMASQ=1) without one."""
    found = shutil.which("dnsmasq")
    if found is None and os.access("/usr/sbin/dnsmasq", os.X_OK):
        found = "/usr/sbin/dnsmasq"
    if found is None:
        require(False, DNSMASQ_MISSING, "LBCLIENT_REQUIRE_DNSMASQ")
        raise AssertionError("unreachable")  # pragma: no cover
    return found


def _free_dns_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


class Dnsmasq:
    """A real dnsmasq on 127.0.0.1 and a free port, answering only from files the test writes:
    address records from a hosts file (read again on SIGHUP, see :meth:`set_hosts`) and SRV
    records from its config (read at start, see :meth:`set_srv`). It runs in the foreground
    as a child of the test, logs into its directory, and is stopped by :meth:`stop`.

    ``local=False``: without ``--local``, what the files cannot answer is REFUSED (no upstream),
    or forwarded to the ``upstream`` port on 127.0.0.1 when one is given."""

    def __init__(
        self, binary: str, directory: Path, *, local: bool = True, upstream: int | None = None
    ) -> None:
        self.binary = binary
        self.local = local
        self.upstream = upstream
        self.directory = directory
        self.hosts = directory / "hosts"
        self.config = directory / "dnsmasq.conf"
        self.log = directory / "dnsmasq.log"
        self.port = _free_dns_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.hosts.write_text("")
        self.config.write_text("")

    # -- records -------------------------------------------------------------------------

    def set_hosts(self, names: Mapping[str, Iterable[str]]) -> None:
        """Serve ``names`` (name -> addresses, IPv4 or IPv6) from now on: rewrite the hosts
        file and, while running, send SIGHUP and wait until the answers show it."""
        lines = [f"{address} {name}" for name, addresses in names.items() for address in addresses]
        self.hosts.write_text("".join(line + "\n" for line in lines))
        if self.process is not None:
            self.process.send_signal(signal.SIGHUP)
            self._wait_for(names)

    def set_srv(self, records: Sequence[tuple[str, str, int, int, int]]) -> None:
        """Serve SRV ``records`` (service, target, port, priority, weight) from the next
        start (dnsmasq reads them only then; :meth:`restart` applies them)."""
        self.config.write_text(
            "".join(
                f"srv-host={service},{target},{port},{priority},{weight}\n"
                for service, target, port, priority, weight in records
            )
        )

    # -- the process ---------------------------------------------------------------------

    def command(self) -> list[str]:
        import grp
        import pwd

        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
        return [
            self.binary,
            "--keep-in-foreground",
            f"--conf-file={self.config}",
            "--no-resolv",
            "--no-hosts",
            f"--addn-hosts={self.hosts}",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            *([f"--local=/{DNS_DOMAIN}/"] if self.local else []),
            *([f"--server=127.0.0.1#{self.upstream}"] if self.upstream is not None else []),
            f"--local-ttl={DNS_TTL}",
            "--no-negcache",
            "--pid-file=",
            f"--user={user}",
            f"--group={group}",
            "--log-facility=-",
            "--log-queries",
        ]

    def start(self) -> Dnsmasq:
        """Start, and return once it answers."""
        if self.process is not None:
            raise RuntimeError("dnsmasq is already running")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_for({})
        return self

    def stop(self) -> None:
        """Stop and reap the process; idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)

    def restart(self) -> None:
        """Stop and start again on the same port (applying :meth:`set_srv`)."""
        self.stop()
        self.start()

    def _wait_for(self, names: Mapping[str, Iterable[str]]) -> None:
        """Wait until dnsmasq answers, and answers each of ``names`` with its addresses."""
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        wanted = {name: set(addresses) for name, addresses in names.items()}
        deadline = time.monotonic() + 10.0
        while True:
            process = self.process
            assert process is not None
            if process.poll() is not None:
                raise RuntimeError(
                    f"dnsmasq exited with status {process.returncode}:\n"
                    + self.log.read_text(errors="replace")[-3000:]
                )
            try:
                if self.local:
                    self._addresses(resolver, f"probe.{DNS_DOMAIN}")  # NXDOMAIN once it answers
                else:
                    self._version()  # answered by dnsmasq itself, whatever its upstream
                if all(
                    self._addresses(resolver, n, strict=self.local) == want
                    for n, want in wanted.items()
                ):
                    return
            except Exception:  # not answering yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq on port {self.port} did not answer as expected")
            time.sleep(0.02)

    def _version(self) -> None:
        """Ask dnsmasq its version (CHAOS TXT version.bind): it answers that itself."""
        import dns.message
        import dns.query
        import dns.rdataclass

        query = dns.message.make_query("version.bind", "TXT", rdclass=dns.rdataclass.CH)
        dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.5)

    @staticmethod
    def _addresses(resolver: object, name: str, strict: bool = True) -> set[str]:
        """The addresses of ``name``; with ``strict=False``, a record type whose query fails
        (REFUSED, SERVFAIL, no answer) has none."""
        import dns.exception
        import dns.resolver

        assert isinstance(resolver, dns.resolver.Resolver)
        found: set[str] = set()
        for kind in ("A", "AAAA"):
            try:
                answer = resolver.resolve(name, kind, lifetime=0.5, raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                continue
            except dns.exception.DNSException:
                if strict:
                    raise
                continue
            found.update(r.to_text() for r in answer.rrset or ())
        return found


class Upstream:
    """A DNS server of a few lines on 127.0.0.1 and a free UDP port, for a :class:`Dnsmasq` to
    forward to: it answers every query with ``rcode`` (SERVFAIL by default), or, with
    ``rcode=None``, receives and never answers (the queries time out). One thread of its own;
    a context manager."""

    def __init__(self, rcode: str | None = "SERVFAIL") -> None:
        self.rcode = rcode
        self.queries = 0
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.05)
        self.port = int(self._socket.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-upstream", daemon=True)

    def _serve(self) -> None:
        import dns.message
        import dns.rcode

        while not self._stop.is_set():
            try:
                data, peer = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            self.queries += 1
            if self.rcode is None:
                continue
            response = dns.message.make_response(dns.message.from_wire(data))
            response.set_rcode(dns.rcode.from_text(self.rcode))
            self._socket.sendto(response.to_wire(), peer)

    def __enter__(self) -> Upstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    """A :class:`Dnsmasq`, not yet started; stopped after the test."""
    pytest.importorskip("dns.resolver", reason="the DNS tests need dnspython (the dev extra)")
    server = Dnsmasq(dnsmasq_binary(), tmp_path)
    try:
        yield server
    finally:
        server.stop()


# -- shared by the transport tests -------------------------------------------------------------

#: Passive health that never ejects: the tests that use it steer traffic themselves.
NO_EJECTION = HealthPolicy(consecutive_failures=None, consecutive_5xx=None)


def key_for(lb: LoadBalancer, target: TestServer) -> str:
    """A key whose first pick is ``target``."""
    for i in range(10_000):
        picked = lb.select(f"k{i}")
        if picked is not None and picked.address == target.address:
            return f"k{i}"
    raise AssertionError("no key lands on the target")


@contextlib.contextmanager
def busy_and_idle() -> Iterator[tuple[TestServer, TestServer, LoadBalancer, str, threading.Event]]:
    """Two servers, "busy" and "idle", under one ``Hash`` balancer, and a key whose first pick
    is busy. Busy holds a request for ``/hold`` until the event is set (at the latest on exit)."""
    release = threading.Event()

    def hold(exchange: Exchange) -> bool:
        if exchange.request.target == "/hold":
            release.wait(10)
        return exchange.respond()

    try:
        with (
            TestServer("hold", name="busy", behaviours={"hold": hold}) as busy,
            TestServer(name="idle") as idle,
        ):
            lb = LoadBalancer([busy.address, idle.address], Hash, health=NO_EJECTION)
            yield busy, idle, lb, key_for(lb, busy), release
    finally:
        release.set()


# -- a wire for the loop alone, with no socket ---------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Boom(Exception):
    """A client error the fake wire classifies by its ``fault``."""

    def __init__(self, text: str, fault: Fault) -> None:
        super().__init__(text)
        self.fault = fault


@dataclass
class FakeWire:
    """A wire that sends nothing: it fails the first attempts with ``faults``, then answers
    ``statuses`` (200 after them), and records nothing (the loop does)."""

    faults: list[Fault] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    clock: Clock | None = None
    took: float = 0.0
    seen: list[Backend] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)
    request: object = None
    method: str = "GET"
    url: object = "http://svc/"
    replayable: bool = True
    timeouts: dict[str, float | None] | None = None
    options: object = None

    def send(
        self, backend: Backend, timeouts: object, headers: object, buffer: int
    ) -> tuple[int, str, None]:
        self.seen.append(backend)
        if self.clock is not None:
            self.clock.now += self.took
        n = len(self.seen)
        if n <= len(self.faults):
            raise Boom(f"attempt {n}", self.faults[n - 1])
        status = self.statuses[n - len(self.faults) - 1] if self.statuses else 200
        return status, f"{status} from {backend.address}", None

    def header(self, response: str, name: str) -> str | None:
        return None

    def fault(self, error: Exception) -> Fault | None:
        return error.fault if isinstance(error, Boom) else None

    def discard(self, response: str) -> None:
        self.discarded.append(response)

    def final(self, error: Exception, summary: str) -> Exception:
        return error


@dataclass
class AsyncFakeWire(FakeWire):
    async def send(  # type: ignore[override]
        self, backend: Backend, timeouts: object, headers: object, buffer: int
    ) -> tuple[int, str, None]:
        return FakeWire.send(self, backend, timeouts, headers, buffer)

    async def discard(self, response: str) -> None:  # type: ignore[override]
        FakeWire.discard(self, response)
