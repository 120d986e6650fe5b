"""A test Kubernetes API server: EndpointSlices listed and watched over real HTTP, on loopback.

No Kubernetes API server can run on a test machine, so :class:`KubernetesAPI` speaks the part
of its documented protocol that EndpointSlice discovery uses, on a real
:class:`~lbclient.testing.TestServer` (plain HTTP, or TLS with a throwaway CA from trustme):

* ``GET /apis/discovery.k8s.io/v1/namespaces/<ns>/endpointslices?labelSelector=<k>=<v>``: an
  ``EndpointSliceList`` with ``metadata.resourceVersion`` and the slices whose labels match;
* the same with ``watch=1`` (and ``resourceVersion=N``, ``allowWatchBookmarks=true``,
  ``timeoutSeconds=S``): a chunked stream of JSON lines ``{"type": ..., "object": ...}``,
  ``ADDED``/``MODIFIED``/``DELETED`` for each change after ``N``, ``BOOKMARK`` when the test asks
  (to watches that allow them), and ``ERROR`` with a ``Status`` of code 410 when ``N`` is older
  than the oldest version kept (:meth:`KubernetesAPI.expire`; with ``gone_status = True``, a
  ``410 Gone`` answer instead) or when the test says so (:meth:`KubernetesAPI.gone`);
  without ``resourceVersion`` (or ``0``) the watch starts with an ``ADDED`` event per slice,
  as the real server's does;
* ``Authorization: Bearer <token>`` checked against :attr:`KubernetesAPI.token` (401 with a
  ``Status`` otherwise; the test may rotate it); a bad path 404, a bad selector or version 400.

The test changes slices (:meth:`~KubernetesAPI.apply`, :meth:`~KubernetesAPI.delete`, with
endpoints from :func:`endpoint` and ports from :func:`slice_port`), sends bookmarks, drops or
ends the open watches, expires versions, answers the next requests with an error status, and
writes raw bytes into the open watches (garbage, or a line that never ends).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from lbclient.testing import Exchange, TestServer, TLSCerts

__all__ = ["SERVICE_LABEL", "KubernetesAPI", "endpoint", "slice_port"]

#: The label that ties an EndpointSlice to its Service.
SERVICE_LABEL = "kubernetes.io/service-name"
_PREFIX = "/apis/discovery.k8s.io/v1/namespaces/"
_SUFFIX = "/endpointslices"
_API_VERSION = "discovery.k8s.io/v1"
_WAIT = 0.1  # a watch re-checks for a stop this often while nothing happens


def endpoint(
    address: str | Sequence[str],
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    zone: str | None = None,
    node: str | None = None,
    for_zones: Sequence[str] = (),
) -> dict[str, Any]:
    """One endpoint of a slice, as the API shows it (``serving`` defaults to ``ready``)."""
    addresses = [address] if isinstance(address, str) else list(address)
    found: dict[str, Any] = {
        "addresses": addresses,
        "conditions": {
            "ready": ready,
            "serving": ready if serving is None else serving,
            "terminating": terminating,
        },
    }
    if zone is not None:
        found["zone"] = zone
    if node is not None:
        found["nodeName"] = node
    if for_zones:
        found["hints"] = {"forZones": [{"name": name} for name in for_zones]}
    return found


def slice_port(port: int, name: str | None = None, protocol: str = "TCP") -> dict[str, Any]:
    """One entry of a slice's ``ports``."""
    found: dict[str, Any] = {"port": port, "protocol": protocol}
    if name is not None:
        found["name"] = name
    return found


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A ``Status`` object, as the API answers errors."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass(frozen=True)
class _Entry:
    """One thing that happened, in order: an event (``rv`` > 0) or an order to the watches."""

    kind: str  # "event", "bookmark", "end", "drop", "gone", "raw"
    rv: int = 0
    type: str = ""
    obj: Mapping[str, Any] | None = None
    raw: bytes = b""


@dataclass(frozen=True)
class _Query:
    namespace: str
    labels: dict[str, str]
    watch: bool
    since: int | None
    bookmarks: bool
    timeout: float | None


class _BadQuery(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason = code, reason


class KubernetesAPI:
    """A test Kubernetes API server for EndpointSlices; see the module docstring.

    ``token``: the bearer token accepted (None: no check). ``tls``: serve HTTPS with a
    certificate for ``host`` from a throwaway CA (:attr:`certs`; :meth:`write_ca` writes it).
    """

    __test__ = False  # not a pytest class

    #: :func:`endpoint` and :func:`slice_port`, for tests that import the class alone.
    endpoint = staticmethod(endpoint)
    port = staticmethod(slice_port)

    def __init__(
        self, *, token: str | None = "test-token", tls: bool = False, host: str = "127.0.0.1"
    ) -> None:
        self.certs = TLSCerts(host) if tls else None
        context = None if self.certs is None else self.certs.server_context()
        self.server = TestServer(
            "kube", behaviours={"kube": self._exchange}, ssl_context=context, host=host
        )
        self._cond = threading.Condition()
        self._token = token
        self._rv = 1000
        self._oldest = 0
        self._slices: dict[tuple[str, str], dict[str, Any]] = {}
        self._log: list[_Entry] = []
        self._failures: list[int] = []
        #: How a watch from an expired version is refused: an ``ERROR`` event with a 410
        #: ``Status`` in a 200 stream (False, the default), or a ``410 Gone`` answer (True).
        self.gone_status = False
        self._watching = 0
        self._closed = False
        #: Lists and watches served so far.
        self.lists = 0
        self.watches = 0

    # -- the server ------------------------------------------------------------------------------

    def start(self) -> KubernetesAPI:
        self._closed = False
        self.server.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.server.close()

    def __enter__(self) -> KubernetesAPI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def url(self) -> str:
        """``http(s)://host:port``."""
        return self.server.url

    def write_ca(self, path: str | Path) -> Path:
        """Write the CA certificate (TLS only) as PEM; returns the path."""
        if self.certs is None:
            raise RuntimeError("KubernetesAPI(tls=False) has no CA")
        return self.certs.write_ca(path)

    @property
    def token(self) -> str | None:
        """The bearer token accepted; set it to rotate (the next request must bring it)."""
        return self._token

    @token.setter
    def token(self, value: str | None) -> None:
        self._token = value

    @property
    def resource_version(self) -> int:
        """The latest resource version."""
        return self._rv

    @property
    def watching(self) -> int:
        """Watches open now."""
        return self._watching

    def wait_watching(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until at least ``count`` watches are open (at most ``timeout`` seconds)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._watching >= count, timeout)

    def wait_watches(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until at least ``count`` watches have been started in all."""
        with self._cond:
            return self._cond.wait_for(lambda: self.watches >= count, timeout)

    # -- what the test changes -------------------------------------------------------------------

    def apply(
        self,
        name: str,
        endpoints: Iterable[Mapping[str, Any]],
        *,
        service: str,
        ports: Iterable[Mapping[str, Any]] = (),
        address_type: str = "IPv4",
        namespace: str = "default",
        labels: Mapping[str, str] | None = None,
    ) -> int:
        """Create or replace the slice ``name`` (an ``ADDED`` or ``MODIFIED`` event); returns
        its resource version."""
        with self._cond:
            self._rv += 1
            key = (namespace, name)
            kind = "MODIFIED" if key in self._slices else "ADDED"
            obj: dict[str, Any] = {
                "kind": "EndpointSlice",
                "apiVersion": _API_VERSION,
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": {**(labels or {}), SERVICE_LABEL: service},
                    "resourceVersion": str(self._rv),
                },
                "addressType": address_type,
                "endpoints": [dict(e) for e in endpoints],
                "ports": [dict(p) for p in ports],
            }
            self._slices[key] = obj
            self._add(_Entry("event", self._rv, kind, obj))
            return self._rv

    def delete(self, name: str, namespace: str = "default") -> int:
        """Delete the slice ``name`` (a ``DELETED`` event); returns the new resource version."""
        with self._cond:
            obj = self._slices.pop((namespace, name))
            self._rv += 1
            gone = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self._rv)}}
            self._add(_Entry("event", self._rv, "DELETED", gone))
            return self._rv

    def bookmark(self) -> int:
        """Send a ``BOOKMARK`` with the latest version to the watches that allow them (a
        version of its own, as the API's bookmarks move past changes of other objects)."""
        with self._cond:
            self._rv += 1
            self._add(_Entry("bookmark", self._rv))
            return self._rv

    def end_watches(self) -> None:
        """End the open watches cleanly (as the server's watch timeout does)."""
        self._order(_Entry("end"))

    def drop_watches(self) -> None:
        """Close the open watches' connections in the middle of the stream."""
        self._order(_Entry("drop"))

    def gone(self) -> None:
        """Send the open watches an ``ERROR`` event with a 410 ``Status``, then end them."""
        self._order(_Entry("gone"))

    def expire(self) -> None:
        """Forget the history: a watch from a version older than the latest gets 410."""
        with self._cond:
            self._oldest = self._rv

    def send_raw(self, data: bytes) -> None:
        """Write ``data`` into the open watches as it is (garbage, a line without its end)."""
        self._order(_Entry("raw", raw=data))

    def fail_next(self, code: int, count: int = 1) -> None:
        """Answer the next ``count`` requests with ``code`` and a ``Status``."""
        with self._cond:
            self._failures.extend([code] * count)

    def _order(self, entry: _Entry) -> None:
        with self._cond:
            self._add(entry)

    def _add(self, entry: _Entry) -> None:
        self._log.append(entry)
        self._cond.notify_all()

    # -- serving -----------------------------------------------------------------------------

    def _exchange(self, exchange: Exchange) -> bool:
        request = exchange.request
        try:
            query = self._read(request.method, request.target, request.headers)
        except _BadQuery as bad:
            return _json(exchange, bad.code, status(bad.code, bad.reason, str(bad)))
        if not query.watch:
            return _json(exchange, 200, self._list(query))
        if self.gone_status and query.since is not None and query.since < self._oldest:
            message = f"too old resource version: {query.since} ({self._oldest})"
            return _json(exchange, 410, status(410, "Expired", message))
        self._watch(exchange, query)
        return False

    def _read(self, method: str, target: str, headers: Mapping[str, str]) -> _Query:
        if self._token is not None and headers.get("authorization") != f"Bearer {self._token}":
            raise _BadQuery(401, "Unauthorized", "Unauthorized")
        with self._cond:
            if self._failures:
                code = self._failures.pop(0)
                raise _BadQuery(code, "InternalError", f"the test asked for {code}")
        parts = urlsplit(target)
        path = unquote(parts.path)
        if method != "GET":
            raise _BadQuery(405, "MethodNotAllowed", f"{method} is not served here")
        if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
            raise _BadQuery(404, "NotFound", f"the server could not find {path}")
        namespace = path[len(_PREFIX) : -len(_SUFFIX)]
        if not namespace or "/" in namespace:
            raise _BadQuery(404, "NotFound", f"the server could not find {path}")
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        labels: dict[str, str] = {}
        for term in filter(None, params.get("labelSelector", "").split(",")):
            key, sep, value = term.replace("==", "=").partition("=")
            if not sep or not key:
                raise _BadQuery(400, "BadRequest", f"unable to parse requirement: {term!r}")
            labels[key.strip()] = value.strip()
        since: int | None = None
        version = params.get("resourceVersion", "")
        if version not in ("", "0"):
            if not version.isdigit():
                raise _BadQuery(400, "BadRequest", f"invalid resource version {version!r}")
            since = int(version)
        timeout = params.get("timeoutSeconds")
        if timeout is not None and not timeout.isdigit():
            raise _BadQuery(400, "BadRequest", f"invalid timeoutSeconds {timeout!r}")
        return _Query(
            namespace=namespace,
            labels=labels,
            watch=params.get("watch", "") in ("1", "true"),
            since=since,
            bookmarks=params.get("allowWatchBookmarks", "") in ("1", "true"),
            timeout=None if timeout is None else float(timeout),
        )

    def _matches(self, obj: Mapping[str, Any], query: _Query) -> bool:
        metadata = obj["metadata"]
        labels = metadata.get("labels", {})
        return metadata["namespace"] == query.namespace and all(
            labels.get(key) == value for key, value in query.labels.items()
        )

    def _list(self, query: _Query) -> dict[str, Any]:
        with self._cond:
            self.lists += 1
            items = [obj for key, obj in sorted(self._slices.items()) if self._matches(obj, query)]
            return {
                "kind": "EndpointSliceList",
                "apiVersion": _API_VERSION,
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }

    def _watch(self, exchange: Exchange, query: _Query) -> None:
        deadline = None if query.timeout is None else time.monotonic() + query.timeout
        with self._cond:
            if query.since is None:
                pending = [
                    _Entry("event", self._rv, "ADDED", obj)
                    for _, obj in sorted(self._slices.items())
                ]
            elif query.since < self._oldest:
                pending = [_Entry("gone", query.since)]
            else:
                pending = [e for e in self._log if e.kind == "event" and e.rv > query.since]
            position = len(self._log)
            self._watching += 1
            self.watches += 1
            self._cond.notify_all()
        try:
            exchange.send(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )
            while True:
                for entry in pending:
                    data = self._render(entry, query)
                    if data:
                        exchange.send(b"%x\r\n%s\r\n" % (len(data), data))
                    if entry.kind == "drop":
                        return
                    if entry.kind in ("end", "gone"):
                        exchange.send(b"0\r\n\r\n")
                        return
                with self._cond:
                    while (
                        len(self._log) == position
                        and not self._closed
                        and not exchange.stopping
                        and (deadline is None or time.monotonic() < deadline)
                    ):
                        self._cond.wait(_WAIT)
                    pending = self._log[position:]
                    position = len(self._log)
                if not pending:  # stopping, or the watch's time is up
                    exchange.send(b"0\r\n\r\n")
                    return
        finally:
            with self._cond:
                self._watching -= 1
                self._cond.notify_all()

    def _render(self, entry: _Entry, query: _Query) -> bytes:
        if entry.kind == "event":
            assert entry.obj is not None
            if not self._matches(entry.obj, query):
                return b""
            return _line({"type": entry.type, "object": entry.obj})
        if entry.kind == "bookmark":
            if not query.bookmarks:
                return b""
            metadata = {"resourceVersion": str(entry.rv)}
            return _line(
                {
                    "type": "BOOKMARK",
                    "object": {
                        "kind": "EndpointSlice",
                        "apiVersion": _API_VERSION,
                        "metadata": metadata,
                    },
                }
            )
        if entry.kind == "gone":
            version = entry.rv or query.since or 0
            message = f"too old resource version: {version} ({self._oldest})"
            return _line({"type": "ERROR", "object": status(410, "Expired", message)})
        return entry.raw

    def __repr__(self) -> str:
        return f"<KubernetesAPI {self.server.url if self.server.running else 'stopped'}>"


def _line(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def _json(exchange: Exchange, code: int, body: Mapping[str, Any]) -> bool:
    return exchange.respond(code, json.dumps(body).encode(), {"Content-Type": "application/json"})
