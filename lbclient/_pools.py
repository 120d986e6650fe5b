"""Connection pools of the httpx transports: one per backend and logical TLS name.

What lives here: the httpcore pool options made of a transport's arguments
(:func:`pool_options`), the key of a backend's pool (:func:`pool_key`), the pools of backends
that left the set (:func:`stale_pools`), :class:`AsyncPools`, the async transport's pools of
one backend: a FIFO gate (:mod:`lbclient._gate`) that admits ``max_connections`` attempts at
once, each over a pool of its own slot, and keeps ``max_keepalive_connections`` of them idle;
and the network backends every pool connects through, whose connects, TLS handshakes, writes
and reads end when the limits of the attempt running them (:data:`~lbclient._wire.BOUND`) say,
however slowly a server sends or reads, with the timeout httpcore raises for that operation.
What may not: sending a request or a rule about its outcome (the transport's wire and the loop).
"""

from __future__ import annotations

import importlib.util
import ssl
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar

import anyio
import httpcore
import httpx

from lbclient._gate import AsyncGate, GateClosed
from lbclient._wire import BOUND, within
from lbclient.backend import Backend
from lbclient.balancer import LoadBalancer

__all__ = ["AsyncPools", "pool_key", "pool_options", "shut", "stale_pools", "sync_pool"]

#: The most one write hands httpcore's sync stream at once when an end is set: it gives every
#: send() of a write the whole timeout, so a server that reads slowly could stretch one write.
_PIECE: Final = 64 * 1024

_P = TypeVar("_P", httpcore.ConnectionPool, "AsyncPools")


def stale_pools(pools: dict[tuple[str | None, str], _P], balancer: LoadBalancer) -> list[_P]:
    """Remove and return the idle pools of backends no longer in the balancer's set."""
    current = {b.address for b in balancer.backends}
    gone = [
        key
        for key, pool in pools.items()
        if key[1] not in current and all(c.is_idle() for c in pool.connections)
    ]
    return [pools.pop(key) for key in gone]


def pool_key(url: httpx.URL, backend: Backend) -> tuple[str | None, str]:
    """One pool per (logical TLS name, backend address): a TLS connection is never shared
    between two names, and a backend that is slow or black-holed holds only its own
    connections. Keyed by address: nothing holds on to a Backend that left the set."""
    return (url.host if url.scheme == "https" else None, backend.address)


def pool_options(
    verify: ssl.SSLContext | str | bool,
    cert: Any,
    trust_env: bool,
    http1: bool,
    http2: bool,
    limits: httpx.Limits,
    local_address: str | None,
    socket_options: Iterable[Any] | None,
) -> dict[str, Any]:
    if not isinstance(limits, httpx.Limits):
        raise TypeError(f"limits must be an httpx.Limits, got {limits!r}")
    if limits.max_connections is not None and limits.max_connections < 1:
        raise ValueError(f"limits.max_connections must be at least 1, got {limits!r}")
    if http2 and importlib.util.find_spec("h2") is None:
        raise ImportError("http2=True needs the h2 package: pip install 'lbclient[http2]'")
    return {
        "ssl_context": httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env),
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
        "http1": http1,
        "http2": http2,
        "local_address": local_address,
        "socket_options": socket_options,
        "retries": 0,
    }


async def shut(pool: httpcore.AsyncConnectionPool) -> None:
    """Close ``pool``'s connections, even in a task being cancelled."""
    with anyio.CancelScope(shield=True):
        await pool.aclose()


class AsyncPools:
    """One backend's connections for one TLS name, for the async transport, limited as httpx
    limits a pool: at most ``max_connections`` at once (more attempts wait in the gate's FIFO
    queue, up to the pool timeout), at most ``max_keepalive_connections`` kept idle. Over
    HTTP/1.1 each of the gate's slots has a pool of its own, of one connection: httpcore scans
    every connection of a pool on each request and each release, so with one pool for all of
    them a backend's requests would cost more the more there are at once; here each costs the
    same at any concurrency, and a connection given back while an attempt waits passes to it
    open. With HTTP/2 on, the gate admits every attempt into one pool of the transport's
    limits, whose connections multiplex them."""

    __slots__ = ("_closed", "_http2", "_options", "_pools", "gate")

    def __init__(self, options: dict[str, Any]) -> None:
        self._http2 = bool(options["http2"])
        if self._http2:
            self.gate = AsyncGate(None)
        else:
            most = options["max_connections"]
            keep = options["max_keepalive_connections"]
            self.gate = AsyncGate(most, keep if most is None or keep is None else min(most, keep))
            options = {**options, "max_connections": 1, "max_keepalive_connections": 1}
        self._options = options
        self._pools: dict[int, httpcore.AsyncConnectionPool] = {}
        self._closed = False

    async def enter(self, timeout: float | None) -> int:
        """A slot from the gate (see :meth:`AsyncGate.enter`). Where the wait ends otherwise
        (timed out, cancelled) just as a slot was handed to it, and that slot was not kept,
        its connection is closed here, as :meth:`leave` closes what is not kept."""
        try:
            return await self.gate.enter(timeout)
        except BaseException:
            for slot in self.gate.take_unkept():
                pool = self._pools.pop(slot, None)
                if pool is not None:
                    await shut(pool)
            raise

    def pool(self, slot: int) -> httpcore.AsyncConnectionPool:
        """The pool of ``slot``, made when first needed; GateClosed once closed."""
        if self._closed:
            raise GateClosed
        key = 0 if self._http2 else slot
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = httpcore.AsyncConnectionPool(
                **self._options, network_backend=_AsyncBackend(_cleartext_h2(self._options))
            )
        return pool

    def give_back(self, slot: int) -> httpcore.AsyncConnectionPool | None:
        """Give ``slot`` back (its attempt's response closed): to the next attempt waiting,
        or kept idle; beyond ``max_keepalive_connections``, return its pool, for the caller
        to close with :func:`shut` (taken out first: the slot may be handed out again)."""
        if self.gate.leave(slot):
            return None
        return self._pools.pop(slot, None)

    async def leave(self, slot: int) -> None:
        """:meth:`give_back`, and close what is not kept."""
        pool = self.give_back(slot)
        if pool is not None:
            await shut(pool)

    @property
    def connections(self) -> list[httpcore.AsyncConnectionInterface]:
        """Every connection, of every slot."""
        return [c for pool in self._pools.values() for c in pool.connections]

    async def aclose(self) -> None:
        """Turn away every attempt waiting for a place (and every later one), and close the
        connections."""
        self._closed = True
        self.gate.close()
        pools = list(self._pools.values())
        self._pools.clear()
        for pool in pools:
            await pool.aclose()


def sync_pool(options: dict[str, Any]) -> httpcore.ConnectionPool:
    """A sync transport's pool for one backend and TLS name."""
    backend = _SYNC_H2C_BACKEND if _cleartext_h2(options) else _SYNC_BACKEND
    return httpcore.ConnectionPool(**options, network_backend=backend)


# -- I/O that ends when the attempt's limits say --------------------------------------------


class _Stream(httpcore.NetworkStream):
    """A connection's stream, each operation ended by the limits of the attempt running it."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        timeout = _capped(timeout, httpcore.ReadTimeout)
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        bound = BOUND.get()
        if bound is None or bound.until is None:
            self._inner.write(buffer, timeout)
            return
        for start in range(0, len(buffer), _PIECE):
            piece = buffer if len(buffer) <= _PIECE else buffer[start : start + _PIECE]
            self._inner.write(piece, within(bound.until, timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        secured = self._inner.start_tls(ssl_context, server_hostname, timeout)
        return secured if _multiplexed(secured) else _Stream(secured)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    """httpcore's sync backend, its connects and streams ended by the attempt's limits."""

    def __init__(self, multiplexed: bool = False) -> None:
        self._inner = httpcore.SyncBackend()
        self._multiplexed = multiplexed

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return stream if self._multiplexed else _Stream(stream)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _capped(timeout: float | None, error: Callable[[str], BaseException]) -> float | None:
    """``timeout`` for an operation of the attempt running it: no longer than the time its
    limits leave (:func:`~lbclient._wire.within`: ``error`` once there is none)."""
    bound = BOUND.get()
    if bound is None or bound.until is None:
        return timeout
    return within(bound.until, timeout, error)


_SYNC_BACKEND: Final = _Backend()
_SYNC_H2C_BACKEND: Final = _Backend(multiplexed=True)


def _multiplexed(stream: httpcore.NetworkStream | httpcore.AsyncNetworkStream) -> bool:
    """Whether a TLS connection took HTTP/2: its streams are many requests', so no one
    request's limits may end its reads or writes (httpcore would fail every stream of it);
    each request's own timeouts, capped when its attempt began, still apply."""
    ssl_object = stream.get_extra_info("ssl_object")
    return ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"


def _cleartext_h2(options: dict[str, Any]) -> bool:
    """Whether a pool's connections all speak HTTP/2 without TLS (``http1=False``)."""
    return bool(options.get("http2")) and not options.get("http1", True)


class _AsyncStream(httpcore.AsyncNetworkStream):
    """The async twin of :class:`_Stream` (whose writes anyio and trio bound as a whole)."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        timeout = _capped(timeout, httpcore.ReadTimeout)
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        timeout = _capped(timeout, httpcore.WriteTimeout)
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        secured = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return secured if _multiplexed(secured) else _AsyncStream(secured)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _AsyncBackend(httpcore.AsyncNetworkBackend):
    """httpcore's async backend for the running library (trio, else anyio), as httpcore
    chooses it, its connects and streams ended by the attempt's limits."""

    def __init__(self, multiplexed: bool = False) -> None:
        self._inner: httpcore.AsyncNetworkBackend | None = None
        self._multiplexed = multiplexed

    def _backend(self) -> httpcore.AsyncNetworkBackend:
        inner = self._inner
        if inner is None:
            try:
                import sniffio
            except ImportError:  # pragma: no cover (httpcore assumes asyncio then, too)
                library = "asyncio"
            else:
                library = sniffio.current_async_library()
            trio = library == "trio"
            inner = self._inner = httpcore.TrioBackend() if trio else httpcore.AnyIOBackend()
        return inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        stream = await self._backend().connect_tcp(
            host, port, timeout, local_address, socket_options
        )
        return stream if self._multiplexed else _AsyncStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._backend().sleep(seconds)
