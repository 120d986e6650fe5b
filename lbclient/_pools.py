"""Connection pools of the httpx transports: one per backend and logical TLS name.

What lives here: the httpcore pool options made of a transport's arguments
(:func:`pool_options`), the key of a backend's pool (:func:`pool_key`), the pools of backends
that left the set (:func:`stale_pools`), and :class:`AsyncPools`, the async transport's pools of
one backend: a FIFO gate (:mod:`lbclient._gate`) that admits a fixed number of attempts at
once, each over a pool of its own slot. What may not: sending a request or a rule about its
outcome (the transport's wire and the loop).
"""

from __future__ import annotations

import importlib.util
import ssl
from collections.abc import Iterable
from typing import Any, TypeVar

import httpcore
import httpx

from lbclient._gate import AsyncGate, GateClosed
from lbclient.backend import Backend
from lbclient.balancer import LoadBalancer

__all__ = ["AsyncPools", "pool_key", "pool_options", "stale_pools"]

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


class AsyncPools:
    """One backend's connections for one TLS name, for the async transport: a gate that admits
    at most ``limit`` attempts and queues the rest, and a connection pool per slot the gate
    hands out. Over HTTP/1.1 each slot's pool keeps one connection: httpcore scans every
    connection of a pool on each request and each release, so with one pool for all of them
    a backend's requests would cost more the more there are at once; here each costs the
    same at any concurrency. With HTTP/2 on, the slots share one pool, whose connection
    multiplexes them."""

    __slots__ = ("_closed", "_options", "_pools", "gate")

    def __init__(self, options: dict[str, Any], limit: int) -> None:
        self.gate = AsyncGate(limit)
        if not options["http2"]:
            keepalive = options["max_keepalive_connections"]
            options = {
                **options,
                "max_connections": 1,
                "max_keepalive_connections": 1 if keepalive is None else min(1, keepalive),
            }
        self._options = options
        self._pools: dict[int, httpcore.AsyncConnectionPool] = {}
        self._closed = False

    def pool(self, slot: int) -> httpcore.AsyncConnectionPool:
        """The pool of ``slot``, made when first needed; GateClosed once closed."""
        if self._closed:
            raise GateClosed
        key = slot if not self._options["http2"] else 0
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = httpcore.AsyncConnectionPool(**self._options)
        return pool

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
