"""Backends from etcd: the keys under a prefix, listed, then watched; and registration.

:class:`Etcd` reads etcd v3 through its JSON gateway (``POST /v3/kv/range``, ``POST /v3/watch``
as a stream; keys and values base64), which needs nothing but httpx. Each key under the prefix
is one backend; its value is either etcd's naming JSON (what its Go ``naming/endpoints``
package writes)::

    {"Op": 0, "Addr": "10.0.3.7:8080", "Metadata": {"zone": "a", "weight": 3}}

(``Op`` 0 adds, 1 deletes; a ``Metadata`` object becomes the backend's metadata, its int
``weight``, if any, the backend's weight), or lbclient's own JSON entry, as a
:class:`~lbclient.discovery.File` reads it: ``{"address": "10.0.3.7:8080", "weight": 3,
"metadata": {...}, "priority": 1}`` or ``"10.0.3.7:8080"``. A value that is neither (not
JSON, no address, a bad weight) is skipped and counted (``snapshot().discovery_watch.skipped``);
the rest of the set stands.

:func:`register` is the other half: a service announces itself under the prefix with a lease
(the key ``<prefix>/<address>`` holds the naming JSON), kept alive in the background and
revoked at ``close()``; if the process dies, the key expires by itself within ``ttl`` seconds.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lbclient._background import Every, Runner, ThreadRunner, start_runner
from lbclient.backend import Backend, shown
from lbclient.discovery._etcd_access import (
    UNAUTHENTICATED,
    Access,
    Unauthenticated,
    stale_token,
)
from lbclient.discovery._watch import (
    Change,
    Listing,
    Relist,
    StreamBroken,
    WatchedDiscovery,
    describe,
    endpoints_of,
)
from lbclient.discovery.base import positive
from lbclient.discovery.file import parse_entry

if TYPE_CHECKING:
    import httpx

__all__ = [
    "Access",
    "Etcd",
    "Registration",
    "Unauthenticated",
    "aregister",
    "parse_value",
    "prefix_end",
    "register",
]

logger = logging.getLogger("lbclient")

#: Where a local etcd listens by default.
DEFAULT_ENDPOINTS: tuple[str, ...] = ("http://127.0.0.1:2379",)


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` of every key starting with ``prefix``: the prefix with its last byte
    that is not 0xff incremented (and what follows it dropped); ``b"\\0"`` (every key from
    ``prefix`` on) when there is none."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"
    end[-1] += 1
    return bytes(end)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} is not base64 text: {shown(text)}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError(f"{what} is not base64: {text[:40]!r}") from None


def parse_value(key: str, value: bytes) -> tuple[Backend, ...]:
    """The backend that ``key``'s ``value`` names (none: an etcd naming ``Op`` 1, a delete);
    ValueError naming the key for a value that names none."""
    try:
        data = json.loads(value.decode("utf-8"))
    except ValueError as exc:  # not UTF-8, not JSON
        raise ValueError(f"key {key!r}: the value is not JSON ({exc}): {value[:60]!r}") from None
    if isinstance(data, dict) and "Addr" in data:
        op = data.get("Op", 0)
        if op == 1:
            return ()
        if op != 0 or isinstance(op, bool):
            raise ValueError(f"key {key!r}: 'Op' must be 0 (add) or 1 (delete), got {shown(op)}")
        address = data["Addr"]
        if not isinstance(address, str):
            raise ValueError(
                f"key {key!r}: 'Addr' must be a 'host:port' string, got {shown(address)}"
            )
        metadata = data.get("Metadata")
        fields = dict(metadata) if isinstance(metadata, dict) else {}
        if metadata is not None and not isinstance(metadata, dict):
            fields["metadata"] = metadata
        weight = fields.get("weight", 1)
        try:
            return (Backend(address, weight, fields),)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"key {key!r}: {exc}") from None
    if isinstance(data, (dict, str)):
        return (parse_entry(data, f"key {key!r}"),)
    raise ValueError(
        f"key {key!r}: expected etcd's naming JSON ({{'Addr': ...}}) or an lbclient entry "
        f"({{'address': ...}}), got {shown(data)}"
    )


def _text(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


def _header(body: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The store's revision and its cluster ID, as a response's header says (None: not said).
    etcd gives the revision the store is at when it answers (a watch's "created" message too)
    and the ID of its cluster, the same from every member."""
    header = body.get("header")
    if not isinstance(header, dict):
        return None, None
    revision, cluster = header.get("revision"), header.get("cluster_id")
    return (
        None if revision is None else str(revision),
        None if cluster in (None, "", "0", 0) else str(cluster),
    )


def _prefix(prefix: object) -> bytes:
    if isinstance(prefix, str):
        prefix = prefix.encode("utf-8")
    if not isinstance(prefix, bytes):
        raise TypeError(f"prefix must be a str, got {shown(prefix)}")
    if not prefix:
        raise ValueError("prefix must not be empty (it would watch every key of the store)")
    return prefix


class Etcd(WatchedDiscovery):
    """The backends under ``prefix`` in etcd (see the module's text), listed then watched.

    ``endpoints``: the etcd client URLs, tried in turn (``http://`` or ``https://``).
    ``page_size``: keys read per range request of a listing (1000). ``ca_file``, ``cert``,
    ``username`` and ``password``: TLS and etcd's authentication, as :class:`Access` takes
    them. Options as for
    :class:`~lbclient.discovery._watch.WatchedDiscovery` (``backoff``, ``backoff_max``,
    ``idle``, ``max_line``) and :class:`~lbclient.discovery.ServiceDiscovery` (``timeout``).

    The listing reads every page at the revision of its first, so it is one consistent set;
    the watch starts at the revision after it. A broken stream or a restarted etcd: the watch
    resumes from the last revision seen, so no change is missed; a revision etcd compacted
    meanwhile, an etcd whose revision went back below the one held (it lost its data, or was
    restored from a snapshot) or another cluster behind the same address (its cluster ID):
    the prefix is listed again, and the listing replaces the set. Asks etcd for progress
    notifications (``--experimental-watch-progress-notify-interval``): a watch silent for
    ``idle`` seconds (60) is reopened, from the same revision.
    """

    def __init__(
        self,
        prefix: str,
        *,
        endpoints: Sequence[str] | str = DEFAULT_ENDPOINTS,
        page_size: int = 1000,
        ca_file: str | os.PathLike[str] | None = None,
        cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        username: str | None = None,
        password: str | None = None,
        **options: Any,
    ) -> None:
        self.access = Access(ca_file=ca_file, cert=cert, username=username, password=password)
        self.prefix = _prefix(prefix)
        self.endpoints = endpoints_of(endpoints)
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {shown(page_size)}")
        self.page_size = page_size
        super().__init__(**options)
        self._end = prefix_end(self.prefix)

    async def alist(self, client: httpx.AsyncClient, endpoint: str) -> Listing:
        items: dict[str, tuple[Backend, ...]] = {}
        skipped = 0
        start = self.prefix
        revision: str | None = None
        store: str | None = None
        while True:
            payload: dict[str, Any] = {
                "key": _b64(start),
                "range_end": _b64(self._end),
                "limit": self.page_size,
            }
            if revision is not None:
                payload["revision"] = revision
            body = await self.access.post(client, endpoint, "/v3/kv/range", payload)
            current, cluster = _header(body)
            if revision is None:
                revision, store = current or "0", cluster
            elif cluster != store:  # the pages would mix two stores: list again
                raise ConnectionError(f"etcd's cluster changed during the listing ({cluster})")
            kvs = body.get("kvs") or []
            for kv in kvs:
                key = _unb64(kv.get("key"), "a key")
                name = _text(key)
                try:
                    items[name] = parse_value(name, _unb64(kv.get("value", ""), f"key {name!r}"))
                except ValueError as exc:
                    skipped += 1
                    logger.warning("discovery %r: skipped %s", self, exc)
                start = key + b"\0"
            if not body.get("more") or not kvs:
                return Listing(items, revision, skipped, store)

    async def watch_request(
        self, client: httpx.AsyncClient, endpoint: str, revision: str
    ) -> httpx.Request:
        create = {
            "key": _b64(self.prefix),
            "range_end": _b64(self._end),
            "start_revision": str(int(revision) + 1),
            "progress_notify": True,
        }
        return client.build_request(
            "POST",
            f"{endpoint}/v3/watch",
            json={"create_request": create},
            headers=await self.access.headers(client, endpoint),
        )

    def client(self, stream: bool = False) -> httpx.AsyncClient:
        import httpx

        read = self.idle if stream else self.timeout
        return self.access.client(httpx.Timeout(self.timeout, read=read))

    def refused(self, response: httpx.Response, body: bytes) -> Exception:
        if response.status_code == 401:  # the token is no longer taken: sign in again
            self.access.forget(response.request.headers)
        return super().refused(response, body)

    def message(self, data: Any) -> Change:
        if not isinstance(data, dict):
            raise ValueError(f"a watch message must be a JSON object, got {shown(data)}")
        if "error" in data:
            error = data["error"]
            self._stale(error)
            raise StreamBroken(f"the watch failed: {error!r}")
        result = data.get("result")
        if not isinstance(result, dict):
            raise ValueError(f"a watch message without a result: {shown(data)}")
        if result.get("canceled"):
            compacted = int(result.get("compact_revision") or 0)
            if compacted:
                raise Relist(f"etcd compacted the watched revisions up to {compacted}")
            reason = result.get("cancel_reason", "")
            self._stale(reason)
            raise StreamBroken(f"etcd cancelled the watch: {reason}")
        current, store = _header(result)
        events = result.get("events") or []
        if not events:  # created, or a progress notification
            if result.get("created"):  # its revision is the store's, not the stream's
                return Change(current=current, store=store)
            return Change(revision=current, current=current, store=store)
        put: dict[str, tuple[Backend, ...]] = {}
        deleted: list[str] = []
        skipped = 0
        revision = None
        for event in events:
            kv = event.get("kv") if isinstance(event, dict) else None
            if not isinstance(kv, dict):
                raise ValueError(f"a watch event without a key-value: {shown(event)}")
            name = _text(_unb64(kv.get("key"), "a key"))
            if kv.get("mod_revision") is not None:
                revision = str(kv["mod_revision"])
            if event.get("type") == "DELETE":
                deleted.append(name)
                put.pop(name, None)
                continue
            try:
                put[name] = parse_value(name, _unb64(kv.get("value", ""), f"key {name!r}"))
            except ValueError as exc:
                skipped += 1
                put[name] = ()
                logger.warning("discovery %r: skipped %s", self, exc)
            if name in deleted:
                deleted.remove(name)
        return Change(put, tuple(deleted), revision, skipped, current, store)

    def older(self, revision: str, than: str) -> bool:
        try:
            return int(revision) < int(than)
        except ValueError:
            return False

    def _stale(self, error: object) -> None:
        """A watch ended by ``error``: if it says the token is no longer taken, the stream's
        reopening signs in again."""
        grpc_code = error.get("grpc_code") if isinstance(error, dict) else None
        if grpc_code == UNAUTHENTICATED or stale_token(str(error)):
            self.access.forget()

    def __repr__(self) -> str:
        return f"Etcd({_text(self.prefix)!r})"


# -- registration ------------------------------------------------------------------------------


class Registration:
    """A service's key under a prefix, held by a lease kept alive in the background (made by
    :func:`register` or :func:`aregister`; see there). ``close()`` (``aclose()`` on an event
    loop, or leaving its ``with`` / ``async with``) stops the keep-alives and revokes the
    lease, deleting the key."""

    def __init__(
        self,
        prefix: str,
        address: str,
        *,
        endpoints: Sequence[str] | str = DEFAULT_ENDPOINTS,
        ttl: int = 10,
        metadata: Mapping[str, Any] | None = None,
        timeout: float = 5.0,
        ca_file: str | os.PathLike[str] | None = None,
        cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.access = Access(ca_file=ca_file, cert=cert, username=username, password=password)
        raw = _prefix(prefix)
        self.backend = Backend(address)  # a clear error for a bad address
        self.address = address
        self.endpoints = endpoints_of(endpoints)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise ValueError(f"ttl must be a whole number of seconds >= 1, got {shown(ttl)}")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping or None, got {shown(metadata)}")
        self.ttl = ttl
        self.timeout = positive("timeout", timeout)
        self.key = raw + (b"" if raw.endswith(b"/") else b"/") + address.encode("utf-8")
        value: dict[str, Any] = {"Op": 0, "Addr": address}
        if metadata:
            value["Metadata"] = dict(metadata)
        try:
            self.value = json.dumps(value).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata must be JSON: {exc}") from None
        #: The lease held (etcd's ID, as text); None before the first grant and after close().
        self.lease: str | None = None
        #: Keep-alives sent, leases granted (more than one: etcd lost the first), and why the
        #: latest keep-alive failed (None once one succeeds).
        self.keepalives = 0
        self.grants = 0
        self.error: str | None = None
        self._index = 0
        self._runner: Runner | None = None

    def _client(self) -> httpx.AsyncClient:
        return self.access.client(self.timeout)

    async def _on_each(self, call: str, payload: Mapping[str, Any]) -> Any:
        """``payload`` posted to the path ``call`` of each endpoint in turn until one answers."""
        errors = []
        for _ in self.endpoints:
            endpoint = self.endpoints[self._index % len(self.endpoints)]
            try:
                async with self._client() as client:
                    return await self.access.post(client, endpoint, call, payload)
            except Exception as exc:
                errors.append(f"{endpoint}: {describe(exc)}")
                self._index += 1
        raise ConnectionError(f"etcd {call} failed on every endpoint: {'; '.join(errors)}")

    async def _announce(self) -> None:
        """Grant a lease and put the key with it."""
        grant = await self._on_each("/v3/lease/grant", {"TTL": self.ttl})
        lease = str(grant["ID"])
        try:
            await self._on_each(
                "/v3/kv/put", {"key": _b64(self.key), "value": _b64(self.value), "lease": lease}
            )
        except Exception:  # (not on a cancellation: nothing more is awaited then)
            # The lease would hold nothing until its TTL ran out: give it back (best effort).
            with contextlib.suppress(Exception):
                await self._on_each("/v3/lease/revoke", {"ID": lease})
            raise
        self.lease = lease
        self.grants += 1

    async def _keepalive(self) -> None:
        """One keep-alive; a lease etcd no longer knows (it expired while etcd could not be
        reached) is granted again and the key put again."""
        try:
            if self.lease is None:
                await self._announce()
                return
            answer = await self._on_each("/v3/lease/keepalive", {"ID": self.lease})
            self.keepalives += 1
            if int((answer.get("result") or {}).get("TTL") or 0) <= 0:
                logger.warning("etcd lease of %r expired; registering again", _text(self.key))
                await self._announce()
            self.error = None
        except Exception as exc:
            self.error = describe(exc)
            logger.warning("etcd keep-alive of %r failed: %s", _text(self.key), self.error)

    def _job(self) -> Every:
        return Every("lbclient-etcd-lease", self._keepalive, lambda: self.ttl / 3, self.timeout)

    def start(self) -> Registration:
        """Register now (blocking) and keep the lease alive on a thread of its own."""
        runner = ThreadRunner("lbclient-etcd-lease")
        try:
            runner.call(self._announce)
        except BaseException:
            runner.stop()
            raise
        runner.spawn(self._job())
        self._runner = runner
        return self

    async def astart(self) -> Registration:
        """Register now and keep the lease alive as a task of the running event loop."""
        await self._announce()
        runner = start_runner(True)
        runner.spawn(self._job())
        self._runner = runner
        return self

    def close(self) -> None:
        """Stop the keep-alives and revoke the lease (the key goes with it)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.stop()
        if self.lease is not None:
            revoker = ThreadRunner("lbclient-etcd-lease")
            try:
                revoker.call(self._revoke)
            finally:
                revoker.stop()

    async def aclose(self) -> None:
        """:meth:`close`, awaited on the running event loop."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.astop()
        await self._revoke()

    async def _revoke(self) -> None:
        lease, self.lease = self.lease, None
        if lease is None:
            return
        try:
            await self._on_each("/v3/lease/revoke", {"ID": lease})
        except Exception as exc:  # it expires within ttl anyway
            logger.warning(
                "etcd lease of %r not revoked (it expires within %d s): %s",
                _text(self.key),
                self.ttl,
                describe(exc),
            )

    def __enter__(self) -> Registration:
        return self if self._runner is not None else self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Registration:
        return self if self._runner is not None else await self.astart()

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "registered" if self.lease is not None else "not registered"
        return f"<Registration {_text(self.key)!r} lease={self.lease} {state}>"


def register(
    prefix: str,
    address: str,
    *,
    endpoints: Sequence[str] | str = DEFAULT_ENDPOINTS,
    ttl: int = 10,
    metadata: Mapping[str, Any] | None = None,
    timeout: float = 5.0,
    ca_file: str | os.PathLike[str] | None = None,
    cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
    username: str | None = None,
    password: str | None = None,
) -> Registration:
    """Announce ``address`` under ``prefix`` in etcd, now: a lease of ``ttl`` seconds is
    granted, the key ``<prefix>/<address>`` put with etcd's naming JSON (``{"Op": 0, "Addr":
    address, "Metadata": metadata}``) under it, and the lease kept alive every ``ttl / 3``
    seconds on a thread until ``close()`` revokes it. A lease etcd lost (it was down longer
    than ``ttl``) is granted again. ConnectionError if no endpoint answers. Use it as a
    context manager, or close it. From async code, ``await aregister(...)``. ``ca_file``,
    ``cert``, ``username`` and ``password``: TLS and etcd's authentication, as :class:`Access`
    takes them."""
    return Registration(
        prefix,
        address,
        endpoints=endpoints,
        ttl=ttl,
        metadata=metadata,
        timeout=timeout,
        ca_file=ca_file,
        cert=cert,
        username=username,
        password=password,
    ).start()


async def aregister(
    prefix: str,
    address: str,
    *,
    endpoints: Sequence[str] | str = DEFAULT_ENDPOINTS,
    ttl: int = 10,
    metadata: Mapping[str, Any] | None = None,
    timeout: float = 5.0,
    ca_file: str | os.PathLike[str] | None = None,
    cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
    username: str | None = None,
    password: str | None = None,
) -> Registration:
    """:func:`register` on the running event loop: the keep-alives are a task of it, and the
    handle is closed with ``await registration.aclose()`` (or ``async with``)."""
    return await Registration(
        prefix,
        address,
        endpoints=endpoints,
        ttl=ttl,
        metadata=metadata,
        timeout=timeout,
        ca_file=ca_file,
        cert=cert,
        username=username,
        password=password,
    ).astart()
