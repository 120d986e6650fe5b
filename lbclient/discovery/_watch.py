"""Watched discovery: sources a store tells of each change (etcd, Kubernetes EndpointSlices).

What lives here: the rules every such source shares, and its job.

* :class:`WatchedDiscovery`, the base of such sources. A source lists the whole set once
  (:meth:`~WatchedDiscovery.alist`: a :class:`Listing`, the backends by the store's key and the
  revision it was read at), then opens a stream from that revision
  (:meth:`~WatchedDiscovery.watch_request`) whose lines are JSON messages, each read by
  :meth:`~WatchedDiscovery.message` into a :class:`Change`. A message may say the revision is
  gone (etcd: compacted; Kubernetes: 410 Gone): it raises :class:`Relist`, and the set is
  listed again; so does one from a store other than the one listed (:func:`replaced`: another
  cluster, or a revision of its own below the one held: the store lost its data).
* :class:`LineReader`: the stream's lines, never waiting on a line that never ends (a line
  longer than ``max_line`` bytes breaks the stream) nor on a silent server (no byte for
  ``idle`` seconds breaks it: httpx's read timeout).
* :func:`backoff`: seconds before the next attempt after failures in a row, doubled each time,
  capped, jittered.
* :class:`WatchJob`, what a source binds itself into for a balancer: its first listing (before
  the balancer's first start returns), then one :class:`~lbclient._background.Watch` on the
  balancer's runner (the runner thread's loop for sync users, the running loop for asyncio
  users): each change goes to ``balancer.update()`` as it arrives (changes already read
  together go together), with no polling interval and no thread per change. A store that
  cannot be reached, or a stream that breaks, keeps the last good set: the job tries the next
  endpoint, backing off, and resumes from the last revision seen; its state goes to
  ``balancer.report_discovery(watch=...)`` for ``snapshot()`` and the metrics.

What may not: the balancer's internals (the job calls ``update()`` and ``report_discovery()``),
threads or tasks of its own (the runner's), the wire format of a particular store (the
source's). httpx is imported when a stream or listing is made, never by the core.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from lbclient._background import Watch
from lbclient.backend import Backend, shown
from lbclient.discovery.base import Discovered, ServiceDiscovery, positive
from lbclient.health import WatchState

if TYPE_CHECKING:
    import httpx

    from lbclient.balancer import LoadBalancer

__all__ = [
    "MAX_LINE",
    "SHORT",
    "Change",
    "LineReader",
    "Listing",
    "Relist",
    "StreamBroken",
    "WatchJob",
    "WatchedDiscovery",
    "backoff",
    "endpoints_of",
    "merge",
    "replaced",
]

logger = logging.getLogger("lbclient")

#: The longest stream line read by default (bytes): a message longer breaks the stream.
MAX_LINE: Final = 64 * 1024 * 1024
#: Seconds: a stream that ends sooner having moved nothing on is reopened after a backoff
#: (one that ends so again and again, longer each time); a longer one is reopened at once.
SHORT: Final = 1.0


class Relist(Exception):
    """The store says the revision asked for is gone (etcd: compacted; Kubernetes: 410 Gone),
    or it is not the store listed (:func:`replaced`): the whole set is listed again."""


class _Silent(Exception):
    """An open stream that had been following sent no byte for ``idle`` seconds."""


class StreamBroken(Exception):
    """The stream broke a rule (a line too long, an error message, a refused request): the job
    reconnects, keeping the last good set."""


@dataclass(frozen=True)
class Listing:
    """The whole set as the store holds it at ``revision``: backends by the store's key (a key
    whose value is bad maps to no backend), how many values were skipped as bad, and which
    store answered (etcd's cluster ID; None: unknown)."""

    items: Mapping[str, tuple[Backend, ...]]
    revision: str
    skipped: int = 0
    store: str | None = None


@dataclass(frozen=True)
class Change:
    """What one stream message says: keys put (to their backends: none for a bad value, which
    is skipped and counted), keys deleted, and the revision the stream has reached (None: the
    message says nothing of it: a stream's "created" message, say); if it says them, the store's
    own revision as it sent it and the store's ID (``current``, ``store``: :func:`replaced`)."""

    put: Mapping[str, tuple[Backend, ...]] = field(default_factory=dict)
    deleted: tuple[str, ...] = ()
    revision: str | None = None
    skipped: int = 0
    current: str | None = None
    store: str | None = None

    @property
    def events(self) -> int:
        """How many keys the message changed."""
        return len(self.put) + len(self.deleted)


def backoff(failures: int, first: float, cap: float, draw: Callable[[], float]) -> float:
    """Seconds before the next attempt after ``failures`` failures in a row: ``first``, doubled
    for each further failure, at most ``cap``, times a jitter in [0.5, 1) drawn from ``draw``
    (a number in [0, 1)), so that many clients of a store that comes back do not return in
    step."""
    if failures < 1:
        return 0.0
    return min(cap, first * 2.0 ** min(failures - 1, 60)) * (0.5 + draw() / 2.0)


def endpoints_of(endpoints: object, name: str = "endpoints") -> tuple[str, ...]:
    """``endpoints`` (one URL, or a non-empty list of them) as ``http://`` or ``https://`` URLs
    without a trailing slash; ValueError or TypeError naming the bad value."""
    items = [endpoints] if isinstance(endpoints, str) else endpoints
    if not isinstance(items, Iterable) or isinstance(items, (bytes, Mapping)):
        raise TypeError(f"{name} must be a list of URLs, got {shown(endpoints)}")
    urls: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name} must hold URL strings, got {shown(item)}")
        try:
            parts = urlsplit(item)
            parts.port  # noqa: B018  (raises for a bad port)
        except ValueError as exc:
            raise ValueError(f"{name}: {item!r} is not a URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"{name}: {item!r} is not an http:// or https:// URL with a host "
                "(say 'http://127.0.0.1:2379')"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"{name}: {item!r} must have no query or fragment")
        urls.append(item.rstrip("/"))
    if not urls:
        raise ValueError(f"{name} must name at least one URL, got {shown(endpoints)}")
    return tuple(urls)


def replaced(
    revision: str | None, store: str | None, change: Change, older: Callable[[str, str], bool]
) -> str | None:
    """Why ``change`` comes from a store other than the one the set was read from (None: the
    same, as far as it says): another store's ID than ``store``, the listing's (a new cluster
    behind the same address), or a revision of the store's own ``older`` than the ``revision``
    held (the store went back: it lost its data, or was restored from a snapshot)."""
    if store is not None and change.store is not None and change.store != store:
        return f"another store answers (ID {change.store}, the set was listed from {store})"
    if revision is not None and change.current is not None and older(change.current, revision):
        return f"the store's revision went back to {change.current}, below the {revision} held"
    return None


def merge(items: Mapping[str, tuple[Backend, ...]]) -> list[Backend]:
    """The backends of every key, each address once (the first key in key order wins)."""
    seen: dict[str, Backend] = {}
    for key in sorted(items):
        for backend in items[key]:
            seen.setdefault(backend.address, backend)
    return list(seen.values())


class LineReader:
    """The lines of a streamed response body, one at a time, without their end of line.

    A line longer than ``max_line`` bytes raises :class:`StreamBroken` (a stream that never
    ends a line is never waited on past that); silence is the response's read timeout's.
    :meth:`buffered` says whether a whole line is already read (so changes read together are
    applied together)."""

    def __init__(self, chunks: AsyncIterator[bytes], max_line: int = MAX_LINE) -> None:
        self._chunks = chunks
        self._max = max_line
        self._buffer = bytearray()
        self._start = 0

    def buffered(self) -> bool:
        """Whether a whole line waits in the buffer."""
        return self._buffer.find(b"\n", self._start) >= 0

    async def next(self) -> bytes | None:
        """The next line (None at the end of the stream; a last line without its end of line
        counts)."""
        while True:
            end = self._buffer.find(b"\n", self._start)
            if end >= 0:
                line = bytes(self._buffer[self._start : end])
                self._start = end + 1
                if self._start > 65536:  # drop what was read, now and then
                    del self._buffer[: self._start]
                    self._start = 0
                return line.rstrip(b"\r")
            if len(self._buffer) - self._start > self._max:
                raise StreamBroken(f"a stream line longer than {self._max} bytes")
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                rest = bytes(self._buffer[self._start :]).strip()
                self._buffer.clear()
                self._start = 0
                return rest or None
            self._buffer += chunk


class WatchedDiscovery(ServiceDiscovery):
    """The base of sources a store tells of each change (see the module's text).

    A source gives :meth:`alist`, :meth:`watch_request` and :meth:`message`; it may give
    :meth:`client` (TLS, credentials) and :meth:`refused` (what an error status means).
    Options every such source has, beside :class:`ServiceDiscovery`'s ``timeout`` (seconds to
    connect, and for a listing):

    * ``backoff``, ``backoff_max``: seconds before reconnecting after a failure, doubled for
      each failure in a row, at most ``backoff_max``, jittered (0.2, 5.0). Each failure moves
      on to the next endpoint; the wait comes once every endpoint was tried.
    * ``idle``: seconds a stream may stay silent before it is taken for dead and reopened from
      the last revision seen (60.0).
    * ``max_line``: the longest stream message, in bytes (64 MiB); a longer one breaks the
      stream.
    """

    #: The stores' URLs, tried in turn.
    endpoints: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        backoff: float = 0.2,
        backoff_max: float = 5.0,
        idle: float = 60.0,
        max_line: int = MAX_LINE,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.backoff = positive("backoff", backoff)
        self.backoff_max = positive("backoff_max", backoff_max)
        self.idle = positive("idle", idle)
        if isinstance(max_line, bool) or not isinstance(max_line, int) or max_line < 1:
            raise ValueError(f"max_line must be an int >= 1 (bytes), got {shown(max_line)}")
        self.max_line = max_line

    # -- what a source gives -------------------------------------------------------------

    async def alist(self, client: httpx.AsyncClient, endpoint: str) -> Listing:
        """The whole set, read from ``endpoint``."""
        raise NotImplementedError

    async def watch_request(
        self, client: httpx.AsyncClient, endpoint: str, revision: str
    ) -> httpx.Request:
        """The request that opens a stream of changes after ``revision`` (a coroutine: a source
        may have to wait for its credentials)."""
        raise NotImplementedError

    def message(self, data: Any) -> Change:
        """What one decoded stream line says; :class:`Relist` if the revision is gone,
        :class:`StreamBroken` if the stream reports an error, ValueError for a line that
        makes no sense (skipped and counted)."""
        raise NotImplementedError

    def older(self, revision: str, than: str) -> bool:
        """Whether ``revision`` comes before ``than`` (False: opaque ones, as Kubernetes' are)."""
        return False

    def client(self, stream: bool = False) -> httpx.AsyncClient:
        """A client for one connection: the source's ``timeout`` to connect, and to read a
        listing; a stream's reads wait ``idle`` seconds."""
        import httpx

        read = self.idle if stream else self.timeout
        return httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, read=read), trust_env=False)

    def refused(self, response: httpx.Response, body: bytes) -> Exception:
        """The error for a stream request answered with a status other than 2xx: 410 (Gone)
        relists, anything else breaks the stream."""
        text = body[:200].decode("utf-8", "replace").strip()
        why = f"{response.request.url} answered {response.status_code}: {text or '(no body)'}"
        return Relist(why) if response.status_code == 410 else StreamBroken(why)

    # -- the ServiceDiscovery side ---------------------------------------------------------

    def bind(self, balancer: LoadBalancer, refresh: float | None = None) -> WatchJob:  # type: ignore[override]
        """The job that keeps ``balancer``'s backends current from this source (``refresh``
        is for polled sources: a watch needs none)."""
        return WatchJob(self, balancer)

    async def adiscover(self) -> Discovered:
        """The whole set now (one listing, from the first endpoint that answers)."""
        errors = []
        for endpoint in self.endpoints:
            try:
                async with self.client() as client:
                    listing = await self.alist(client, endpoint)
            except Exception as exc:
                errors.append(f"{endpoint}: {describe(exc)}")
                continue
            return Discovered(merge(listing.items))
        raise ConnectionError(f"{self!r}: no endpoint answered: {'; '.join(errors)}")

    def discover(self) -> Discovered:
        return asyncio.run(self.adiscover())


def describe(error: BaseException) -> str:
    """A short text for a failure."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class WatchJob:
    """Lists a watched source, then follows its stream, keeping ``balancer``'s backends current
    (see the module's text). ``draw``: numbers in [0, 1) for the backoff's jitter."""

    name = "lbclient-watch"

    def __init__(
        self,
        source: WatchedDiscovery,
        balancer: LoadBalancer,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.source = source
        self.balancer = balancer
        self.draw = draw
        #: The set as the store holds it: backends by key.
        self.items: dict[str, tuple[Backend, ...]] = {}
        #: The last revision seen (None: list first), and the store listed (its ID, if known).
        self.revision: str | None = None
        self.store: str | None = None
        self.connected = False
        self.failures = 0  # in all
        self.failed = 0  # in a row
        self._idle = 0  # streams in a row that ended without moving on
        self.reconnects = 0
        self.relists = 0
        self.events = 0
        self.skipped = 0
        self.error: str | None = None
        self._index = 0
        self._streams = 0
        #: Listings in a row the store answered with "the revision is gone" at once.
        self._relisting = 0

    @property
    def endpoint(self) -> str:
        """The endpoint in use."""
        endpoints = self.source.endpoints
        return endpoints[self._index % len(endpoints)]

    # -- on the runner -------------------------------------------------------------------

    def jobs(self) -> tuple[Watch]:
        """The watch, on the balancer's runner."""
        return (Watch(self.name, self.run, retry=self.source.backoff, timeout=1.0),)

    async def prepare(self) -> None:
        """The first listing, before the balancer's first start returns: each endpoint tried
        once; if none answers, the watch goes on trying."""
        for _ in self.source.endpoints:
            try:
                async with self.source.client() as client:
                    await self._list(client)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(exc)

    async def run(self) -> None:
        """Follow the stream until cancelled: list when needed, reconnect on failure."""
        while True:
            try:
                if self.revision is None:
                    async with self.source.client() as client:
                        await self._list(client)
                opened = asyncio.get_running_loop().time()
                async with self.source.client(stream=True) as client:
                    progressed = await self._follow(client)
                # The server ended the stream (a watch's own time limit): resume at once,
                # unless it ended at once without a change or a revision, again and again.
                self._lost()
                lasted = asyncio.get_running_loop().time() - opened >= SHORT
                self._idle = 0 if progressed or lasted else self._idle + 1
                await asyncio.sleep(self._wait(self._idle))
            except asyncio.CancelledError:
                raise
            except _Silent:
                # No byte for ``idle`` seconds on an open stream: a quiet store (etcd sends
                # progress notices only every 10 minutes by default), not a failure: reopen it.
                logger.debug("discovery %r: the stream was silent; reopening it", self.source)
                self._lost()
            except Relist as exc:
                # Listed again at once; a store that keeps saying so is asked less often.
                logger.info("discovery %r: %s; listing again", self.source, exc)
                self.revision = None
                self._relisting += 1
                self._lost()
                if self._relisting > 1:
                    await asyncio.sleep(self._wait(self._relisting - 1))
            except Exception as exc:
                self._failed(exc)
                await asyncio.sleep(self._wait())

    # -- work ----------------------------------------------------------------------------

    async def _list(self, client: httpx.AsyncClient) -> None:
        listing = await self.source.alist(client, self.endpoint)
        self.items = {key: tuple(backends) for key, backends in listing.items.items()}
        self.revision = listing.revision
        self.store = listing.store
        self.relists += 1
        self.skipped += listing.skipped
        self.failed = 0
        self.error = None
        self._apply()

    async def _follow(self, client: httpx.AsyncClient) -> bool:
        """One stream, until it ends; whether a message moved it on (a change, a revision)."""
        import httpx

        assert self.revision is not None
        request = await self.source.watch_request(client, self.endpoint, self.revision)
        response = await client.send(request, stream=True)
        try:
            if not response.is_success:
                body = await _head(response)
                raise self.source.refused(response, body)
            if self._streams:
                self.reconnects += 1
            self._streams += 1
            self.connected = True
            self.error = None
            self._report()
            # Decoded as the server encoded it (gzip, say): lines are read from the body.
            reader = LineReader(response.aiter_bytes(), self.source.max_line)
            progressed = False
            dirty = False
            while True:
                try:
                    line = await reader.next()
                except httpx.ReadTimeout as exc:
                    if progressed or self.failed == 0:
                        raise _Silent from exc
                    raise
                if line is None:
                    break
                if not line.strip():
                    continue
                taken = self._take(line)
                if taken is not None:
                    dirty = taken or dirty
                    # Failures in a row end with a message that moves the stream on, not
                    # with an answer: a stream that is accepted, then breaks, backs off.
                    self.failed = 0
                    progressed = True
                if not reader.buffered():  # read all that came together, then apply it
                    if dirty:
                        self._apply()
                        dirty = False
                    else:
                        self._report()
            if dirty:
                self._apply()
            return progressed
        finally:
            await response.aclose()

    def _take(self, line: bytes) -> bool | None:
        """Take one stream line into :attr:`items`; whether the set may have changed, or None
        when the message moved nothing on (skipped, or no change and no revision). Relist
        when the store says the revision is gone, or is not the store listed."""
        try:
            change = self.source.message(json.loads(line))
        except (Relist, StreamBroken):
            raise
        except ValueError as exc:  # not JSON, or no message the source knows
            self.skipped += 1
            logger.warning(
                "discovery %r: skipped a stream line: %s: %r",
                self.source,
                describe(exc),
                line[:120],
            )
            return None
        why = replaced(self.revision, self.store, change, self.source.older)
        if why is not None:
            raise Relist(why)
        if change.revision is None and change.events == 0:
            return None
        if change.revision is not None:
            self.revision = change.revision
            self._relisting = 0
        self.skipped += change.skipped
        self.events += change.events
        for key in change.deleted:
            self.items.pop(key, None)
        for key, backends in change.put.items():
            if backends:
                self.items[key] = backends
            else:
                self.items.pop(key, None)
        return change.events > 0

    def _apply(self) -> None:
        backends = merge(self.items)
        if self.balancer.update(backends):
            logger.info("discovery %r: %d backends", self.source, len(backends))
        self._report()

    # -- failures ------------------------------------------------------------------------

    def _failed(self, error: BaseException) -> None:
        """A listing or stream failed: note it, and move on to the next endpoint."""
        self.failures += 1
        self.failed += 1
        self.error = f"{self.endpoint}: {describe(error)}"
        self.connected = False
        logger.warning(
            "discovery %r: %s (%d in a row); keeping the last %d backends",
            self.source,
            self.error,
            self.failed,
            len(self.balancer.backends),
        )
        self._index += 1
        self._report()

    def _lost(self) -> None:
        """The stream ended without a failure (or a listing is due)."""
        self.connected = False
        self._report()

    def _wait(self, failures: int | None = None) -> float:
        """Seconds to wait before the next attempt: none until every endpoint was tried once
        in this run of failures, then the backoff (``failures``: of another kind, in a row)."""
        if failures is not None:
            return backoff(failures, self.source.backoff, self.source.backoff_max, self.draw)
        rounds, turn = divmod(self.failed, len(self.source.endpoints))
        if turn:
            return 0.0
        return backoff(rounds, self.source.backoff, self.source.backoff_max, self.draw)

    def state(self) -> WatchState:
        """The job's state, as ``snapshot()`` shows it."""
        return WatchState(
            connected=self.connected,
            revision=self.revision,
            endpoint=self.endpoint,
            reconnects=self.reconnects,
            relists=self.relists,
            events=self.events,
            skipped=self.skipped,
            error=self.error,
        )

    def _report(self) -> None:
        self.balancer.report_discovery(
            refreshes=self.relists + self.events,
            failures=self.failures,
            error=self.error,
            priority=None,
            watch=self.state(),
        )


async def _head(response: httpx.Response, limit: int = 4096) -> bytes:
    """The first bytes of a response's body (an error's text)."""
    body = b""
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) >= limit:
            break
    return body[:limit]
