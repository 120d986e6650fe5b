"""What the Kubernetes source reads: where the API server is and how to reach it, and what an
EndpointSlice says, as plain values.

What lives here: :func:`resolve`, the API server, credentials and namespace, taken from what
the user gave (``server``, ``token_file``, ``ca_file``, ``namespace``), else from inside a pod
(``KUBERNETES_SERVICE_HOST``/``_PORT``, the service account's token, CA and namespace files),
else from a kubeconfig through the official ``kubernetes`` client's loader (the ``kubernetes``
extra); :class:`Credentials`, which reads the token file again for every request (the kubelet
rotates it); :func:`slice_backends`, an EndpointSlice's endpoints as backends by the rule of
conditions (``ready``: takes new requests; ``serving`` and ``terminating``, or not serving:
none, so it leaves the set, and a request already in flight on it finishes, as every request
does on a backend that leaves); checks of the user's input that name the bad value.

What may not: I/O beyond reading these files; the watch itself
(:mod:`lbclient.discovery.kubernetes`).
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit

from lbclient.backend import Backend, shown

__all__ = [
    "SERVICE_ACCOUNT",
    "Credentials",
    "SliceFacts",
    "check_namespace",
    "check_port",
    "check_service",
    "resolve",
    "slice_backends",
    "slices_path",
]

#: Where a pod finds its service account's token, CA and namespace.
SERVICE_ACCOUNT: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
#: The label that ties an EndpointSlice to its Service.
SERVICE_LABEL: Final = "kubernetes.io/service-name"
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")


def check_service(service: object) -> str:
    """``service`` if it is a Service's name (a DNS label); else an error naming it."""
    if not isinstance(service, str):
        raise TypeError(f"service must be a str, got {shown(service)}")
    if not service:
        raise ValueError("service must be a Service's name, got an empty string")
    if len(service) > 63 or not _LABEL.match(service):
        raise ValueError(
            f"service {shown(service)} is not a Service's name (lower-case letters, digits "
            "and '-', at most 63 characters)"
        )
    return service


def check_namespace(namespace: object) -> str:
    """``namespace`` if it is a namespace's name; else an error naming it."""
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, got {shown(namespace)}")
    if "/" in namespace:
        raise ValueError(f"namespace {shown(namespace)} has a '/': a namespace is one name")
    if not namespace or len(namespace) > 63 or not _LABEL.match(namespace):
        raise ValueError(
            f"namespace {shown(namespace)} is not a namespace's name (lower-case letters, "
            "digits and '-', at most 63 characters)"
        )
    return namespace


def check_port(port: object) -> int | str | None:
    """``port`` if it is a port number (1..65535), a port's name, or None; else an error."""
    if port is None:
        return None
    if isinstance(port, bool) or not isinstance(port, (int, str)):
        raise TypeError(f"port must be a port number or name, got {shown(port)}")
    if isinstance(port, int):
        if not 1 <= port <= 65_535:
            raise ValueError(f"port {shown(port)} is outside 1..65535")
        return port
    if not port or len(port) > 63 or not _PORT_NAME.match(port):
        raise ValueError(f"port {shown(port)} is not a port's name (as a Service names them)")
    return port


def slices_path(namespace: str, service: str) -> str:
    """The path and selector of a Service's EndpointSlices (without the watch's parameters)."""
    selector = quote(f"{SERVICE_LABEL}={service}", safe="")
    return (
        f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices?labelSelector={selector}"
    )


# -- credentials ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """How to reach the API server: its URL, the bearer token (a file read again for every
    request, or a fixed one from a kubeconfig), the CA to trust, a client certificate."""

    server: str
    token_file: Path | None = None
    token: str | None = None
    #: A kubeconfig's: the whole ``Authorization`` value, asked for every request.
    authorization: Callable[[], str | None] | None = None
    ca_file: str | None = None
    cert: tuple[str, str] | None = None
    verify: bool = True
    #: Where these came from: "given", "pod", or "kubeconfig".
    origin: str = "given"

    def bearer(self) -> str | None:
        """The token to send now (the token file's content, read afresh)."""
        if self.token_file is not None:
            try:
                text = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise OSError(
                    f"cannot read the Kubernetes token file {str(self.token_file)!r}: {exc}"
                ) from exc
            return text or None
        return self.token

    def headers(self) -> dict[str, str]:
        """The request headers these credentials add."""
        if self.authorization is not None and self.token_file is None:
            value = self.authorization()
            return {"Authorization": value} if value else {}
        token = self.bearer()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def tls(self) -> ssl.SSLContext | bool:
        """What an httpx client verifies the server with: a context trusting ``ca_file`` (and
        presenting ``cert``), or the system's CAs (True), or nothing (False)."""
        if not self.verify:
            return False
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert is not None:
            context.load_cert_chain(*self.cert)
        return context


def _server_url(server: object) -> str:
    if not isinstance(server, str):
        raise TypeError(f"server must be a URL string, got {shown(server)}")
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"server {shown(server)} is not an http(s) URL of the API server "
            "(as 'https://10.96.0.1:443')"
        )
    try:
        parts.port  # noqa: B018  (a bad port raises here)
    except ValueError:
        raise ValueError(f"server {shown(server)} has a bad port") from None
    return server.rstrip("/")


def _pod_server(environ: Mapping[str, str]) -> str | None:
    host = environ.get("KUBERNETES_SERVICE_HOST")
    if not host:
        return None
    port = environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not port.isdigit():
        raise ValueError(f"KUBERNETES_SERVICE_PORT {shown(port)} is not a port number")
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a name
    return f"https://{host}:{port}"


def _from_kubeconfig(kubeconfig: str | None, context: str | None) -> tuple[Credentials, str | None]:
    try:
        client: Any = importlib.import_module("kubernetes.client")
        config: Any = importlib.import_module("kubernetes.config")
    except ImportError:
        raise RuntimeError(
            "Kubernetes discovery found no API server: not inside a pod "
            "(KUBERNETES_SERVICE_HOST is not set) and no server= given; reading a kubeconfig "
            "needs the official client: pip install 'lbclient[kubernetes]'"
        ) from None
    found = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=found)
    namespace = None
    try:
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
        chosen = active
        if context is not None:
            contexts, _ = config.list_kube_config_contexts(config_file=kubeconfig)
            chosen = next((c for c in contexts if c.get("name") == context), active)
        namespace = (chosen or {}).get("context", {}).get("namespace")
    except Exception:  # a namespace is optional in a kubeconfig
        namespace = None
    cert_file, key_file = getattr(found, "cert_file", None), getattr(found, "key_file", None)
    return (
        Credentials(
            server=_server_url(found.host),
            authorization=lambda: _authorization(found),
            ca_file=getattr(found, "ssl_ca_cert", None),
            cert=(cert_file, key_file) if cert_file and key_file else None,
            verify=bool(getattr(found, "verify_ssl", True)),
            origin="kubeconfig",
        ),
        namespace,
    )


def _authorization(found: Any) -> str | None:
    """The ``Authorization`` value a kubeconfig's client configuration gives now (its refresh
    hook, for a token an exec plugin renews, runs first)."""
    try:
        value = found.get_api_key_with_prefix("BearerToken", alias="authorization")
    except TypeError:  # an older client: one identifier, "authorization"
        value = found.get_api_key_with_prefix("authorization")
    return value if isinstance(value, str) and value else None


def _optional_file(name: str, value: object) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {shown(value)}")
    return Path(value)


def resolve(
    *,
    server: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    namespace: str | None = None,
    kubeconfig: str | None = None,
    context: str | None = None,
    service_account: str | os.PathLike[str] = SERVICE_ACCOUNT,
    environ: Mapping[str, str] | None = None,
) -> tuple[Credentials, str]:
    """The credentials and the namespace to use: what was given, else a pod's, else a
    kubeconfig's (through the ``kubernetes`` package); the namespace defaults to the pod's
    (or the kubeconfig context's), then ``"default"``."""
    env = os.environ if environ is None else environ
    account = Path(service_account)
    token_path = _optional_file("token_file", token_file)
    ca_path = _optional_file("ca_file", ca_file)
    pod_namespace = None
    if server is None and kubeconfig is None:
        server = _pod_server(env)
    if server is not None:
        url = _server_url(server)
        origin = "given"
        if env.get("KUBERNETES_SERVICE_HOST") and url == _pod_server(env):
            origin = "pod"
        # The pod's token goes only over TLS (a server given as plain http:// gets it only
        # when given as token_file): it is a credential to the cluster.
        if token_path is None and url.startswith("https:") and (account / "token").is_file():
            token_path = account / "token"
        if ca_path is None and url.startswith("https:") and (account / "ca.crt").is_file():
            ca_path = account / "ca.crt"
        if (account / "namespace").is_file():
            pod_namespace = (account / "namespace").read_text(encoding="utf-8").strip() or None
        found = Credentials(
            server=url,
            token_file=token_path,
            ca_file=None if ca_path is None else str(ca_path),
            origin=origin,
        )
    else:
        found, pod_namespace = _from_kubeconfig(kubeconfig, context)
        if token_path is not None or ca_path is not None:
            found = Credentials(
                server=found.server,
                token_file=token_path,
                authorization=None if token_path is not None else found.authorization,
                ca_file=str(ca_path) if ca_path is not None else found.ca_file,
                cert=found.cert,
                verify=found.verify,
                origin=found.origin,
            )
    chosen = namespace if namespace is not None else (pod_namespace or "default")
    return found, check_namespace(chosen)


# -- what a slice says ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceFacts:
    """One EndpointSlice read: the backends that take new requests, how many endpoints are
    draining (``serving`` and ``terminating``: no new requests), and what was skipped."""

    backends: tuple[Backend, ...]
    draining: int = 0
    skipped: tuple[str, ...] = ()


def _condition(conditions: Mapping[str, Any], name: str, unknown: bool) -> bool:
    """A condition's value; an unknown one (absent, null) reads as the API says to read it."""
    value = conditions.get(name)
    return unknown if value is None else value is True


def _pick_port(ports: object, wanted: int | str | None, name: str) -> int:
    if not isinstance(ports, list) or not ports:
        raise ValueError(f"EndpointSlice {name!r} lists no ports")
    listed = [p for p in ports if isinstance(p, dict) and isinstance(p.get("port"), int)]
    if wanted is None:
        if len(listed) != 1:
            names = [p.get("name") or p.get("port") for p in listed]
            raise ValueError(
                f"EndpointSlice {name!r} has ports {names!r}: say which with port= (name or number)"
            )
        return int(listed[0]["port"])
    for entry in listed:
        if entry["port"] == wanted or entry.get("name") == wanted:
            return int(entry["port"])
    names = [p.get("name") or p.get("port") for p in listed]
    raise ValueError(f"EndpointSlice {name!r} has no port {wanted!r} (it has {names!r})")


def slice_backends(obj: object, port: int | str | None) -> SliceFacts:
    """The backends of one EndpointSlice object, for ``port`` (a name or a number of the
    slice's ``ports``; None: its only port). An endpoint takes new requests when ``ready``
    (unknown reads as ready) and not ``terminating``; a bad endpoint is skipped (said in
    ``skipped``); a slice that cannot be read at all raises ValueError naming it."""
    if not isinstance(obj, dict):
        raise ValueError(f"an EndpointSlice must be a JSON object, got {shown(obj)}")
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"an EndpointSlice without metadata.name: {shown(obj)}")
    family = obj.get("addressType")
    if family not in ("IPv4", "IPv6", "FQDN"):
        raise ValueError(f"EndpointSlice {name!r} has addressType {shown(family)}")
    endpoints = obj.get("endpoints") or []
    if not isinstance(endpoints, list):
        raise ValueError(f"EndpointSlice {name!r} has endpoints {shown(endpoints)}")
    if not endpoints:  # a slice with no endpoints may list no ports either
        return SliceFacts(())
    number = _pick_port(obj.get("ports"), port, name)
    found: list[Backend] = []
    draining = 0
    skipped: list[str] = []
    for entry in endpoints:
        if not isinstance(entry, dict) or not isinstance(entry.get("addresses"), list):
            skipped.append(f"EndpointSlice {name!r}: an endpoint {shown(entry)}")
            continue
        conditions = entry.get("conditions") or {}
        if not isinstance(conditions, dict):
            conditions = {}
        terminating = _condition(conditions, "terminating", False)
        if not _condition(conditions, "ready", True) or terminating:
            if terminating and _condition(conditions, "serving", True):
                draining += 1
            continue
        metadata_of: dict[str, Any] = {}
        if isinstance(entry.get("zone"), str):
            metadata_of["zone"] = entry["zone"]
        if isinstance(entry.get("nodeName"), str):
            metadata_of["node"] = entry["nodeName"]
        for address in entry["addresses"][:1]:  # the API: consumers use the first address
            host = f"[{address}]" if family == "IPv6" and isinstance(address, str) else address
            try:
                if not isinstance(host, str):
                    raise ValueError(f"address {shown(address)} is not a string")
                found.append(Backend(f"{host}:{number}", metadata=metadata_of))
            except (TypeError, ValueError) as exc:
                skipped.append(f"EndpointSlice {name!r}: {exc}")
    return SliceFacts(tuple(found), draining, tuple(skipped))
