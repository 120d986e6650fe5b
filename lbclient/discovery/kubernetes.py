"""Kubernetes discovery: a Service's EndpointSlices, listed once, then watched.

``Kubernetes("users", port="http")`` lists the EndpointSlices labelled
``kubernetes.io/service-name=users`` in the namespace, then watches them from the listing's
resource version (``watch=1``, ``allowWatchBookmarks=true``), handing each change to the
balancer as it arrives, on the balancer's runner (see :mod:`lbclient.discovery._watch`, which
keeps the last good set, reconnects with backoff, resumes from the last version seen, and lists
again on ``410 Gone``).

An endpoint takes new requests while ``ready``; one ``serving`` and ``terminating`` (a pod
shutting down) or no longer ``serving`` leaves the set at once: no new request goes to it, and
a request already in flight on it finishes (a backend that leaves the set keeps its
connections until they are idle). Its ``zone`` and ``nodeName`` become the backend's metadata
``{"zone": ..., "node": ...}``, which zone-aware routing reads. IPv6 slices give ``[addr]:port``.

Where the API server is, and the credentials (:mod:`lbclient.discovery._kube_api`): what is
given (``server=``, ``token_file=``, ``ca_file=``, ``namespace=``), else inside a pod the
service account's (the token file is read again for every request, as the kubelet rotates it),
else a kubeconfig read by the official ``kubernetes`` client's loader (``pip install
'lbclient[kubernetes]'``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from lbclient.backend import Backend, shown
from lbclient.discovery._kube_api import (
    SERVICE_ACCOUNT,
    Credentials,
    check_port,
    check_service,
    resolve,
    slice_backends,
    slices_path,
)
from lbclient.discovery._watch import Change, Listing, Relist, StreamBroken, WatchedDiscovery
from lbclient.discovery.base import positive

if TYPE_CHECKING:
    import httpx

__all__ = ["Kubernetes"]

logger = logging.getLogger("lbclient")


class Kubernetes(WatchedDiscovery):
    """The ready endpoints of a Kubernetes Service, from its EndpointSlices, watched.

    ``service``: the Service's name. ``namespace``: its namespace (default: the pod's, or the
    kubeconfig context's, else ``"default"``). ``port``: the port by name (``"http"``) or by
    number, as the slices' ``ports`` list it (None: a slice's only port).

    ``server``: the API server's URL (default: ``https://$KUBERNETES_SERVICE_HOST:$..._PORT``
    inside a pod, else the kubeconfig's). ``token_file``, ``ca_file``: the bearer token (read
    again for every request) and the CA that signed the server's certificate (defaults: the
    pod's service account's). ``kubeconfig``, ``context``: the kubeconfig to read outside a
    pod (default: ``$KUBECONFIG``, ``~/.kube/config``), through the ``kubernetes`` package.
    ``service_account``: the directory of the pod's token, CA and namespace files.

    ``watch_timeout``: seconds a watch asks the server to keep it open (``timeoutSeconds``);
    it is then opened again from the last version seen. ``idle``: seconds a watch may stay
    silent before it is taken for dead (longer than ``watch_timeout``). The options of
    :class:`~lbclient.discovery._watch.WatchedDiscovery` (``backoff``, ``backoff_max``,
    ``max_line``) and :class:`~lbclient.discovery.ServiceDiscovery` (``timeout``) apply.
    """

    def __init__(
        self,
        service: str,
        *,
        namespace: str | None = None,
        port: int | str | None = None,
        server: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        service_account: str | os.PathLike[str] = SERVICE_ACCOUNT,
        watch_timeout: float = 300.0,
        idle: float = 330.0,
        **options: Any,
    ) -> None:
        super().__init__(idle=idle, **options)
        self.service = check_service(service)
        self.port = check_port(port)
        self.watch_timeout = positive("watch_timeout", watch_timeout)
        if self.watch_timeout < 1:
            raise ValueError(f"watch_timeout must be at least 1 s, got {shown(watch_timeout)}")
        self.credentials: Credentials
        self.credentials, self.namespace = resolve(
            server=server,
            token_file=token_file,
            ca_file=ca_file,
            namespace=namespace,
            kubeconfig=kubeconfig,
            context=context,
            service_account=service_account,
        )
        self.endpoints = (self.credentials.server,)
        self._path = slices_path(self.namespace, self.service)

    # -- what the watch base asks ------------------------------------------------------------

    def client(self, stream: bool = False) -> httpx.AsyncClient:
        """A client that trusts the API server's CA (read afresh for each connection)."""
        import httpx

        read = self.idle if stream else self.timeout
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout, read=read),
            verify=self.credentials.tls(),
            cert=None,
            trust_env=False,
        )

    async def _headers(self) -> dict[str, str]:
        """The credentials' request headers. A kubeconfig's are asked for in a thread: its
        client library may run an exec plugin (a cloud CLI that fetches a token, for seconds)
        to renew them, and the loop that runs this job runs others too."""
        credentials = self.credentials
        if credentials.authorization is None:
            return credentials.headers()  # a token file's read: a page from memory
        return await asyncio.to_thread(credentials.headers)

    async def alist(self, client: httpx.AsyncClient, endpoint: str) -> Listing:
        response = await client.get(endpoint + self._path, headers=await self._headers())
        if response.status_code != 200:
            raise ConnectionError(
                f"{endpoint} answered the listing {response.status_code}: {_reason(response)}"
            )
        try:
            data = response.json()
            version = data["metadata"]["resourceVersion"]
            items = data.get("items") or []
            if not isinstance(version, str) or not version or not isinstance(items, list):
                raise ValueError(f"metadata.resourceVersion {shown(version)}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConnectionError(
                f"{endpoint} answered the listing with no EndpointSliceList: {exc}"
            ) from None
        found: dict[str, tuple[Backend, ...]] = {}
        skipped = 0
        for obj in items:
            try:
                key, backends, bad = self._read(obj)
            except ValueError as exc:
                logger.warning("discovery %r: skipped %s", self, exc)
                skipped += 1
                continue
            found[key] = backends
            skipped += bad
        return Listing(found, version, skipped)

    async def watch_request(
        self, client: httpx.AsyncClient, endpoint: str, revision: str
    ) -> httpx.Request:
        query = (
            f"&watch=1&resourceVersion={quote(revision, safe='')}&allowWatchBookmarks=true"
            f"&timeoutSeconds={max(1, int(self.watch_timeout))}"
        )
        return client.build_request(
            "GET", endpoint + self._path + query, headers=await self._headers()
        )

    def message(self, data: Any) -> Change:
        if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
            raise ValueError(f"not a watch event: {shown(data)}")
        kind, obj = data.get("type"), data["object"]
        if kind == "ERROR":
            code, why = obj.get("code"), obj.get("message") or obj.get("reason")
            if code == 410:
                raise Relist(f"the resource version is gone (410): {why}")
            raise StreamBroken(f"the watch reported an error ({code}): {why}")
        metadata = obj.get("metadata")
        version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if not isinstance(version, str) or not version:
            raise ValueError(f"a {kind} event without metadata.resourceVersion")
        if kind == "BOOKMARK":
            return Change(revision=version)
        if kind == "DELETED":
            name = metadata.get("name") if isinstance(metadata, dict) else None
            if not isinstance(name, str):
                raise ValueError("a DELETED event without metadata.name")
            return Change(deleted=(name,), revision=version)
        if kind in ("ADDED", "MODIFIED"):
            try:
                key, backends, bad = self._read(obj)
            except ValueError as exc:
                # A slice that cannot be read: its endpoints cannot be reached as asked.
                name = metadata.get("name")
                if not isinstance(name, str):
                    raise
                logger.warning("discovery %r: skipped %s", self, exc)
                return Change(put={name: ()}, revision=version, skipped=1)
            return Change(put={key: backends}, revision=version, skipped=bad)
        raise ValueError(f"a watch event of type {shown(kind)}")

    # -- reading -----------------------------------------------------------------------------

    def _read(self, obj: object) -> tuple[str, tuple[Backend, ...], int]:
        facts = slice_backends(obj, self.port)
        assert isinstance(obj, dict)  # slice_backends checked it
        return obj["metadata"]["name"], facts.backends, len(facts.skipped)

    def __repr__(self) -> str:
        return f"Kubernetes({self.service!r}, namespace={self.namespace!r})"


def _reason(response: httpx.Response) -> str:
    """The ``message`` of the ``Status`` an error answer carries, else its first bytes."""
    try:
        data = response.json()
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            return str(data["message"])
    except ValueError:
        pass
    return response.text[:200].strip() or "(no body)"
