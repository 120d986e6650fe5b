"""Probes: Prequal's load probes, sent beside requests, never in their way.

What lives here: :class:`Probes`, one per adapter whose balancer's algorithm probes (it has a
``probe_path``: :class:`~lbclient.Prequal`). After a request's first backend is taken, the loop
asks it to probe: it asks the balancer which backends (:meth:`LoadBalancer.probe_targets
<lbclient.LoadBalancer.probe_targets>`: the algorithm's choice among the ready ones) and sends
each ``GET <probe_path>`` with the logical ``Host`` and ``endpoint-load-metrics-format: TEXT``
only (no header, cookie or credential of the caller's), within ``probe_timeout``; the reply's
report (ORCA's ``endpoint-load-metrics``, or ``x-prequal-rif`` and ``x-prequal-latency-us``) is
recorded with :meth:`LoadBalancer.report_load <lbclient.LoadBalancer.report_load>`, which feeds
the algorithm's pool.

* The async transport sends them as tasks of the running asyncio loop, kept referenced and
  cancelled by ``aclose()``; on trio (no fire-and-forget task without a nursery) it submits
  them to the balancer's runner, as the sync clients do.
* The sync transport and ``LBAdapter`` submit them to the balancer's runner (its services'
  thread runner), where they run on its pool of workers.
* At most :data:`MAX_PENDING` (sync) or :data:`MAX_TASKS` (async) are in flight at once; beyond,
  a probe is dropped, not queued. After ``close()`` none is sent.
* A probe that fails (no connection, a timeout, a status other than 2xx, no report header) is
  counted and nothing more: it is no request's failure, and it does not count against the
  backend's passive health (a server without the probe path would otherwise be ejected for it).
  That backend is not probed again for :data:`QUIET` seconds (the probes it would have had are
  not sent, not owed): a server that does not answer probes costs a probe a second at most.

Counts (``probes_sent``, ``probes_failed``, ``probes_dropped``) are in the adapter's ``stats()``.

What may not: a selection rule (the algorithm's), a health rule, or a thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit

from lbclient.backend import Backend
from lbclient.balancer import LoadBalancer
from lbclient.reports import FORMAT_HEADER, PREQUAL_LATENCY_HEADER, PREQUAL_RIF_HEADER
from lbclient.reports import REPORT_HEADER as _REPORT

__all__ = ["MAX_PENDING", "MAX_TASKS", "Probes", "probes_of"]

#: The most probes of a sync adapter in flight or waiting for a worker at once.
MAX_PENDING: Final = 8
#: The most probe tasks of an async transport at once.
MAX_TASKS: Final = 64

#: Seconds a backend whose probe failed is not probed again.
QUIET: Final = 1.0

#: What a probe's reply says: its status, then its ORCA header, RIF and latency headers.
Reply = tuple[int, str | None, str | None, str | None]


def _origin(url: object) -> tuple[str, str]:
    parts = urlsplit(str(url))
    return parts.scheme or "http", parts.netloc


def _host(backend: Backend) -> str:
    host = backend.host
    return host[1:-1] if host.startswith("[") else host


class Probes:
    """The probes of one adapter over ``balancer``; ``kind`` names how they are sent
    (``"httpcore"``, ``"httpcore-async"``, ``"urllib3"``), ``options`` the pool's settings."""

    def __init__(
        self, balancer: LoadBalancer, kind: str = "", options: dict[str, Any] | None = None
    ) -> None:
        self.balancer = balancer
        algorithm = balancer.algorithm
        self.path: str = algorithm.probe_path  # type: ignore[attr-defined]
        self.timeout: float = algorithm.probe_timeout  # type: ignore[attr-defined]
        self.kind = kind
        self._options = options or {}
        self.sent = self.failed = self.dropped = 0
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Backends whose probe failed, and until when (monotonic) they are not probed.
        self._quiet: dict[Backend, float] = {}
        self._pool: Any = None
        #: The sockets of the sync probes' connections, shut down by close(): a probe blocked
        #: reading a backend that does not answer ends then, not at its timeout.
        self._sockets = _Sockets()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Probes, (self.balancer, self.kind))

    def counts(self) -> dict[str, int]:
        """Probes sent, failed (of those sent) and dropped (never sent), so far."""
        with self._lock:
            return {
                "probes_sent": self.sent,
                "probes_failed": self.failed,
                "probes_dropped": self.dropped,
            }

    def _claim(self, bound: int) -> bool:
        with self._lock:
            if self._closed or self._pending >= bound:
                self.dropped += 0 if self._closed else 1
                return False
            self._pending += 1
            return True

    def _begin(self) -> bool:
        """A probe is about to be sent: whether it may (not after close)."""
        with self._lock:
            if self._closed:
                self._pending -= 1
                return False
            self.sent += 1
            return True

    def _end(self, backend: Backend, ok: bool) -> None:
        with self._lock:
            self._pending -= 1
            self.failed += not ok
            if not ok:
                self._quiet[backend] = time.monotonic() + QUIET

    def _targets(self) -> list[Backend]:
        """The algorithm's targets for one request, less those whose probe failed lately."""
        targets = self.balancer.probe_targets()
        quiet = self._quiet
        if targets and quiet:
            now = time.monotonic()
            with self._lock:
                for backend, until in list(quiet.items()):
                    if until <= now:
                        del quiet[backend]
                targets = [backend for backend in targets if backend not in quiet]
        return targets

    def _read(self, backend: Backend, reply: Reply) -> bool:
        status, header, rif, latency = reply
        if not 200 <= status < 300 or (header is None and rif is None and latency is None):
            return False
        # A report refused (malformed, or older than one kept) is counted on the backend's load.
        with contextlib.suppress(ValueError):  # it left the set meanwhile
            self.balancer.report_load(backend, header, rif=rif, latency_us=latency, probe=True)
        return True

    # -- sync: on the balancer's runner ---------------------------------------------------

    def launch(self, services: Any, url: object, tls: dict[str, Any] | None = None) -> None:
        """Probe for one request of a sync adapter, on ``services``' runner; ``tls``: the
        request's certificate settings where the client gives them per request (requests'
        ``verify`` and ``cert`` as urllib3's pool settings)."""
        if self._closed or services is None:
            return
        targets = self._targets()
        if not targets:
            return
        scheme, netloc = _origin(url)
        for backend in targets:
            if not self._claim(MAX_PENDING):
                continue

            def job(backend: Backend = backend) -> Awaitable[None]:
                return asyncio.to_thread(self._probe, scheme, netloc, backend, tls)

            if not services.submit(job):
                with self._lock:
                    self._pending -= 1
                    self.dropped += 1

    def _probe(
        self, scheme: str, netloc: str, backend: Backend, tls: dict[str, Any] | None
    ) -> None:
        if not self._begin():
            return
        ok = False
        try:
            send = _SYNC[self.kind]
            ok = self._read(backend, send(self, scheme, netloc, backend, tls))
        except Exception:
            ok = False
        finally:
            self._end(backend, ok)

    # -- async: tasks of the running loop ---------------------------------------------------

    def alaunch(self, services: Any, url: object) -> None:
        """Probe for one request of the async transport, as tasks of the running loop (on
        trio, on ``services``' runner)."""
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # trio: no fire-and-forget task without a nursery
            self.launch(services, url)
            return
        targets = self._targets()
        if not targets:
            return
        scheme, netloc = _origin(url)
        for backend in targets:
            if self._claim(MAX_TASKS):
                task = loop.create_task(self._aprobe(scheme, netloc, backend))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _aprobe(self, scheme: str, netloc: str, backend: Backend) -> None:
        if not self._begin():
            return
        ok = False
        try:
            ok = self._read(backend, await _httpcore_async(self, scheme, netloc, backend))
        except Exception:
            ok = False
        finally:
            self._end(backend, ok)

    # -- the end ------------------------------------------------------------------------------

    def close(self) -> None:
        """No probe is sent from now on; a sync pool is closed (a probe waiting on one of its
        connections ends at once), tasks are cancelled."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        self._sockets.shut()
        for task in list(self._tasks):
            task.cancel()
        if pool is not None and hasattr(pool, "clear"):  # urllib3
            pool.clear()
        elif pool is not None and not hasattr(pool, "aclose"):
            pool.close()

    async def aclose(self) -> None:
        """:meth:`close`, awaiting the cancelled tasks and closing the async pool."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if pool is not None and hasattr(pool, "aclose"):
            await pool.aclose()
        elif pool is not None:  # the runner's (trio): a sync pool
            self._sockets.shut()
            pool.close()


def _shut_down(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # closed already, or a TCP socket a TLS one took over
        sock.shutdown(socket.SHUT_RDWR)


class _Sockets:
    """The sync probes' sockets, to be shut down (closing a pool from another thread does not
    end a read blocked on one of its connections; a shutdown does). A socket added once
    :meth:`shut` has run is shut down at once: a probe may still be connecting when the probes
    close (its TCP socket, or over TLS the TLS socket that took the TCP one's place as its
    handshake ended, comes too late for the shutdown)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._shut = False

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._shut:
                self._live.add(sock)
                return
        _shut_down(sock)

    def shut(self) -> None:
        with self._lock:
            self._shut = True
            live = list(self._live)
        for sock in live:
            _shut_down(sock)


def probes_of(balancer: LoadBalancer, kind: str) -> Probes | None:
    """The probes of an adapter over ``balancer``, sent the way ``kind`` names (``"httpcore"``,
    ``"urllib3"``): None unless its algorithm probes."""
    if not isinstance(getattr(balancer.algorithm, "probe_path", None), str):
        return None
    return Probes(balancer, kind)


def use(probes: Probes | None, options: dict[str, Any]) -> None:
    """Have ``probes`` (an httpx transport's, if any) use its pools' TLS and socket settings."""
    if probes is not None:
        probes._options = options


# -- the senders ----------------------------------------------------------------------------


def _find(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _httpcore_request(scheme: str, netloc: str, backend: Backend, path: str, timeout: float) -> Any:
    import httpcore

    extensions: dict[str, Any] = {
        "timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
    }
    if scheme == "https":
        extensions["sni_hostname"] = urlsplit(f"//{netloc}").hostname or netloc
    return httpcore.Request(
        "GET",
        httpcore.URL(
            scheme=scheme.encode("ascii"),
            host=_host(backend).encode("ascii"),
            port=backend.port,
            target=path.encode("ascii"),
        ),
        headers=[(b"Host", netloc.encode("latin-1")), (FORMAT_HEADER.encode(), b"TEXT")],
        extensions=extensions,
    )


def _reply(status: int, headers: list[tuple[bytes, bytes]]) -> Reply:
    return (
        status,
        _find(headers, _REPORT.encode()),
        _find(headers, PREQUAL_RIF_HEADER.encode()),
        _find(headers, PREQUAL_LATENCY_HEADER.encode()),
    )


def _pool_options(options: dict[str, Any]) -> dict[str, Any]:
    keep = ("ssl_context", "http1", "http2", "local_address", "socket_options")
    return {k: options[k] for k in keep if k in options} | {"retries": 0, "max_connections": 16}


def _httpcore_sync(
    probes: Probes, scheme: str, netloc: str, backend: Backend, _tls: dict[str, Any] | None
) -> Reply:  # pragma: no cover - a thread's
    import httpcore

    with probes._lock:
        pool = probes._pool
        if pool is None:
            tracked: Any = _Tracked(probes._sockets)  # httpcore's interface, duck-typed
            pool = probes._pool = httpcore.ConnectionPool(
                **_pool_options(probes._options), network_backend=tracked
            )
    request = _httpcore_request(scheme, netloc, backend, probes.path, probes.timeout)
    response = pool.handle_request(request)
    try:
        response.read()
    finally:
        response.close()
    return _reply(response.status, response.headers)


async def _httpcore_async(probes: Probes, scheme: str, netloc: str, backend: Backend) -> Reply:
    import httpcore

    pool = probes._pool
    if pool is None:
        pool = probes._pool = httpcore.AsyncConnectionPool(**_pool_options(probes._options))
    request = _httpcore_request(scheme, netloc, backend, probes.path, probes.timeout)
    response = await pool.handle_async_request(request)
    try:
        await response.aread()
    finally:
        await response.aclose()
    return _reply(response.status, response.headers)


def _urllib3_sync(
    probes: Probes, scheme: str, netloc: str, backend: Backend, tls: dict[str, Any] | None
) -> Reply:  # pragma: no cover - a thread's
    import urllib3

    with probes._lock:
        manager = probes._pool
        if manager is None:
            manager = probes._pool = urllib3.PoolManager(num_pools=64, retries=False)
            manager.pool_classes_by_scheme = _tracked_pools(probes._sockets)
    host = urlsplit(f"//{netloc}").hostname or netloc
    extra = {"server_hostname": host, "assert_hostname": host, **(tls or {})}
    if scheme != "https":
        extra = {}
    pool = manager.connection_from_host(_host(backend), backend.port, scheme, extra or None)
    response = pool.urlopen(
        "GET",
        probes.path,
        headers={"Host": netloc, FORMAT_HEADER: "TEXT"},
        retries=False,
        redirect=False,
        assert_same_host=False,
        timeout=urllib3.Timeout(connect=probes.timeout, read=probes.timeout),
    )
    headers = response.headers
    return (
        response.status,
        headers.get(_REPORT),
        headers.get(PREQUAL_RIF_HEADER),
        headers.get(PREQUAL_LATENCY_HEADER),
    )


class _Tracked:
    """httpcore's own network backend, each connection's socket kept in ``sockets``."""

    def __init__(self, sockets: _Sockets) -> None:
        import httpcore

        self._backend = httpcore.SyncBackend()
        self._sockets = sockets

    def connect_tcp(self, *args: Any, **kwargs: Any) -> Any:
        return _TrackedStream(self._backend.connect_tcp(*args, **kwargs), self._sockets)

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> Any:
        return _TrackedStream(self._backend.connect_unix_socket(*args, **kwargs), self._sockets)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _TrackedStream:
    """A connection's stream whose socket is kept in ``sockets``, and after ``start_tls`` its
    TLS socket's (the TCP socket is detached then: shutting it down would do nothing)."""

    def __init__(self, stream: Any, sockets: _Sockets) -> None:
        self._stream = stream
        self._sockets = sockets
        sockets.add(stream.get_extra_info("socket"))

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data: bytes = self._stream.read(max_bytes, timeout)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, *args: Any, **kwargs: Any) -> Any:
        return _TrackedStream(self._stream.start_tls(*args, **kwargs), self._sockets)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _tracked_pools(sockets: _Sockets) -> dict[str, Any]:
    """urllib3's pool classes by scheme, each connection's socket kept in ``sockets``."""
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    pools = {}
    for scheme, pool in (("http", HTTPConnectionPool), ("https", HTTPSConnectionPool)):

        class Connection(pool.ConnectionCls):  # type: ignore[name-defined,misc]
            def _new_conn(self) -> socket.socket:
                sock: socket.socket = super()._new_conn()
                sockets.add(sock)
                return sock

            def connect(self) -> None:
                super().connect()
                sockets.add(self.sock)  # over TLS, the TLS socket (the TCP one is detached)

        pools[scheme] = type(f"Probe{pool.__name__}", (pool,), {"ConnectionCls": Connection})
    return pools


def urllib3_tls(verify: object, cert: object) -> dict[str, Any]:
    """requests' ``verify`` and ``cert`` as urllib3's pool settings, as requests applies them."""
    import os

    tls: dict[str, Any] = {}
    if verify is False:
        tls.update(cert_reqs="CERT_NONE", assert_hostname=False)
    elif isinstance(verify, str):
        tls.update(cert_reqs="CERT_REQUIRED")
        tls["ca_cert_dir" if os.path.isdir(verify) else "ca_certs"] = verify
    if isinstance(cert, str):
        tls["cert_file"] = cert
    elif isinstance(cert, tuple) and len(cert) == 2:
        tls["cert_file"], tls["key_file"] = cert
    return tls


_SYNC: Final[dict[str, Callable[[Probes, str, str, Backend, dict[str, Any] | None], Reply]]] = {
    "httpcore": _httpcore_sync,
    "urllib3": _urllib3_sync,
}
