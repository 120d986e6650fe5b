"""How a client reaches etcd's JSON gateway: TLS (the CA to trust, a client certificate),
etcd's authentication (a token asked of ``/v3/auth/authenticate`` and asked again once etcd
no longer takes it), and one call's JSON answer or its error.

What lives here: :class:`Access` and :func:`post`, shared by the discovery source and the
registration of :mod:`lbclient.discovery.etcd`. What may not: what a key or a watch means.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from lbclient.backend import shown
from lbclient.discovery._watch import Relist

if TYPE_CHECKING:
    import httpx

__all__ = [
    "OUT_OF_RANGE",
    "UNAUTHENTICATED",
    "Access",
    "Unauthenticated",
    "post",
    "stale_token",
]

#: etcd's gRPC status for "the revision was compacted" (OutOfRange).
OUT_OF_RANGE = 11
#: etcd's gRPC status for a token it does not take (Unauthenticated: expired, or never given).
UNAUTHENTICATED = 16
#: What etcd says of a token it does not take: unknown or expired (Unauthenticated), made
#: before its users or roles last changed, or none sent since it turned authentication on.
_STALE_TOKEN = ("invalid auth token", "revision of auth store is old", "user name is empty")
#: What etcd answers a sign-in while its authentication is off.
_AUTH_OFF = "authentication is not enabled"


def stale_token(text: str) -> bool:
    """Whether etcd's error ``text`` says the token sent is no longer taken."""
    return any(words in text for words in _STALE_TOKEN)


def _error(body: Any, response: httpx.Response) -> str:
    message = body.get("message") or body.get("error") if isinstance(body, dict) else None
    return f"{response.request.url} answered {response.status_code}: {message or body!r}"


class Unauthenticated(ConnectionError):
    """etcd did not take the token sent: expired, dropped (a password changed), or made before
    its users or roles last changed."""


async def post(
    client: httpx.AsyncClient,
    url: str,
    payload: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
) -> Any:
    """``payload`` posted to ``url``, its JSON answer; ConnectionError for an error status
    (:class:`~lbclient.discovery._watch.Relist` for a compacted revision,
    :class:`Unauthenticated` for a token etcd does not take)."""
    response = await client.post(url, json=payload, headers=headers)
    try:
        body = response.json()
    except ValueError:
        body = response.text[:200]
    if not response.is_success:
        code = body.get("code") if isinstance(body, dict) else None
        if code == OUT_OF_RANGE:
            raise Relist(_error(body, response))
        if code == UNAUTHENTICATED or stale_token(str(body)):
            raise Unauthenticated(_error(body, response))
        raise ConnectionError(_error(body, response))
    if not isinstance(body, dict):
        raise ConnectionError(f"{url} answered with no JSON object: {body!r}")
    return body


def _checked_tls(make: Callable[[], object], given: str) -> None:
    """``make()`` (what builds the TLS context from the files given), once, so that a file
    missing or unreadable, or a key that does not match its certificate, is an error when the
    source is made rather than at each connection; ValueError naming ``given``."""
    try:
        make()
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"cannot use the TLS files given ({given}): {error}") from None


def _path(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path, got {shown(value)}")
    return os.fspath(value)


class Access:
    """How a client reaches etcd: over TLS, the CA it trusts (``ca_file``; None: the
    system's) and the client certificate it presents (``cert``: the certificate and key files,
    for an etcd run with ``--client-cert-auth``); with etcd's authentication on, the user it
    signs in as (``username``, ``password``: a token is asked of ``/v3/auth/authenticate``,
    sent as ``Authorization`` on every call, and asked for again once etcd no longer takes
    it; while etcd's authentication is off, calls go without one, as etcd's own client's do).
    The files are checked here (ValueError naming them); they are read again for each
    connection, so a renewed certificate is used."""

    def __init__(
        self,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        cert: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.ca_file = _path("ca_file", ca_file)
        if cert is not None and (not isinstance(cert, tuple) or len(cert) != 2):
            raise TypeError(f"cert must be (certificate file, key file), got {shown(cert)}")
        self.cert = None if cert is None else (_path("cert", cert[0]), _path("cert", cert[1]))
        if username is not None and (not isinstance(username, str) or not username):
            raise ValueError(f"username must be a non-empty str, got {shown(username)}")
        if password is not None and not isinstance(password, str):
            raise TypeError("password must be a str")
        if (username is None) != (password is None):
            raise ValueError("username and password go together: give both or neither")
        self.username = username
        self._password = password
        self._token: str | None = None
        _checked_tls(self.verify, f"ca_file={self.ca_file!r}, cert={self.cert!r}")

    def verify(self) -> ssl.SSLContext | bool:
        """What an httpx client verifies etcd with (and presents to it)."""
        if self.ca_file is None and self.cert is None:
            return True
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert is not None:
            context.load_cert_chain(*self.cert)  # type: ignore[arg-type]
        return context

    def client(self, timeout: float | httpx.Timeout) -> httpx.AsyncClient:
        import httpx

        return httpx.AsyncClient(timeout=timeout, verify=self.verify(), trust_env=False)

    async def headers(self, client: httpx.AsyncClient, endpoint: str) -> dict[str, str]:
        """The headers a call to ``endpoint`` carries: the token, asked for if there is none."""
        if self.username is None:
            return {}
        token = self._token
        if token is None:
            try:
                body = await post(
                    client,
                    f"{endpoint}/v3/auth/authenticate",
                    {"name": self.username, "password": self._password},
                )
            except ConnectionError as error:
                if _AUTH_OFF not in str(error):
                    raise
                body = {"token": ""}  # as etcd's own client: go on without one
            token = body.get("token")
            if not isinstance(token, str):
                raise ConnectionError(f"{endpoint} gave no token for user {self.username!r}")
            self._token = token
        return {"Authorization": token} if token else {}

    def forget(self, headers: Mapping[str, str] | None = None) -> None:
        """The token in ``headers`` (None: the one held; a call that carried none: none held)
        is no longer taken: the next call signs in again."""
        if headers is None or headers.get("Authorization", "") == self._token:
            self._token = None

    async def post(
        self, client: httpx.AsyncClient, endpoint: str, call: str, payload: Mapping[str, Any]
    ) -> Any:
        """:func:`post` of ``payload`` to ``endpoint + call`` with the token, and once more
        with a new one if etcd no longer takes it."""
        headers = await self.headers(client, endpoint)
        try:
            return await post(client, endpoint + call, payload, headers)
        except Unauthenticated:
            if self.username is None:
                raise
            self.forget(headers)
            headers = await self.headers(client, endpoint)
            return await post(client, endpoint + call, payload, headers)

    def __repr__(self) -> str:
        return f"Access(ca_file={self.ca_file!r}, cert={self.cert!r}, username={self.username!r})"
