"""Etcd discovery and registration against a real etcd that guards itself, as production ones
do: one on TLS that asks every client for a certificate its CA signed (``--client-cert-auth``),
and one with etcd's authentication on (a user, its password, tokens that a restart forgets).
Every wait is a hang guard; none measures time."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_process import EtcdProcess, EtcdTLS, addresses, connected, naming, wait_until

from lbclient import LoadBalancer
from lbclient.discovery import Etcd
from lbclient.discovery._watch import StreamBroken
from lbclient.discovery.etcd import Access, register

PASSWORD = "s3cret-Pass"


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    directory = tmp_path_factory.mktemp("etcd-tls")
    with EtcdProcess(directory, tls=EtcdTLS(directory)) as server:
        yield server


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    with EtcdProcess(tmp_path_factory.mktemp("etcd-auth")) as server:
        server.enable_auth(PASSWORD)
        yield server


@pytest.fixture
def prefix() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}/"


def test_tls_with_a_client_certificate_lists_watches_and_registers(
    tls_etcd: EtcdProcess, prefix: str
) -> None:
    tls = tls_etcd.tls
    assert tls is not None
    assert tls_etcd.url.startswith("https://")
    tls_etcd.put(prefix + "a", naming("10.0.0.1:80"))
    source = Etcd(prefix, endpoints=tls_etcd.url, ca_file=tls.ca, cert=tls.client, backoff=0.05)
    with LoadBalancer(discovery=source) as balancer:
        assert addresses(balancer) == {"10.0.0.1:80"}  # listed
        wait_until(lambda: connected(balancer), what="the stream")
        tls_etcd.put(prefix + "b", naming("10.0.0.2:80"))
        wait_until(lambda: "10.0.0.2:80" in addresses(balancer), what="the watched change")
        with register(
            prefix, "10.0.0.3:80", endpoints=[tls_etcd.url], ttl=5, ca_file=tls.ca, cert=tls.client
        ) as registration:
            wait_until(lambda: "10.0.0.3:80" in addresses(balancer), what="the registration")
            assert registration.lease is not None
        wait_until(lambda: "10.0.0.3:80" not in addresses(balancer), what="the revoke")


def test_tls_without_the_certificate_or_the_ca_is_refused_clearly(
    tls_etcd: EtcdProcess, prefix: str
) -> None:
    tls = tls_etcd.tls
    assert tls is not None
    # No client certificate: etcd ends the handshake. The system's CAs: ours is not one.
    for source in (
        Etcd(prefix, endpoints=tls_etcd.url, ca_file=tls.ca),
        Etcd(prefix, endpoints=tls_etcd.url, cert=tls.client),
    ):
        with pytest.raises(ConnectionError) as caught:
            asyncio.run(source.adiscover())
        assert tls_etcd.url in str(caught.value)
    with pytest.raises(ConnectionError, match="every endpoint"):
        register(prefix, "10.0.0.4:80", endpoints=[tls_etcd.url], ca_file=tls.ca, timeout=2.0)


def test_authentication_lists_watches_registers_and_signs_in_again(
    auth_etcd: EtcdProcess, prefix: str
) -> None:
    auth_etcd.put(prefix + "a", naming("10.0.0.1:80"))
    source = Etcd(
        prefix,
        endpoints=auth_etcd.url,
        username="root",
        password=PASSWORD,
        backoff=0.05,
        backoff_max=0.3,
    )
    with LoadBalancer(discovery=source) as balancer:
        assert addresses(balancer) == {"10.0.0.1:80"}
        wait_until(lambda: connected(balancer), what="the stream")
        with register(
            prefix,
            "10.0.0.2:80",
            endpoints=[auth_etcd.url],
            ttl=3,
            username="root",
            password=PASSWORD,
        ) as registration:
            wait_until(lambda: "10.0.0.2:80" in addresses(balancer), what="the registration")
            held, watching = registration.access._token, source.access._token
            assert held is not None
            assert watching is not None
            # A password set (even to itself) drops the user's tokens; a restart then breaks
            # the stream, whose reopening signs in again. (Keep-alives need no token.)
            auth_etcd.call("/v3/auth/user/changepw", {"name": "root", "password": PASSWORD})
            auth_etcd.kill()
            auth_etcd.start()
            auth_etcd.put(prefix + "c", naming("10.0.0.3:80"))
            wait_until(lambda: "10.0.0.3:80" in addresses(balancer), what="a change after it")
            assert source.access._token not in (None, watching)
            state = balancer.snapshot().discovery_watch
            assert state is not None
            assert state.reconnects >= 1
            keepalives = registration.keepalives
            wait_until(
                lambda: registration.keepalives > keepalives and registration.error is None,
                what="a keep-alive after the restart",
            )
            assert "10.0.0.2:80" in addresses(balancer)  # the lease outlived it all
        # The revoke, with the dropped token, signs in again and takes the key away.
        wait_until(lambda: "10.0.0.2:80" not in addresses(balancer), what="the revoke")
        assert registration.access._token not in (None, held)


def test_a_token_etcd_no_longer_takes_is_asked_for_again(
    auth_etcd: EtcdProcess, prefix: str
) -> None:
    auth_etcd.put(prefix + "a", naming("10.0.0.1:80"))
    source = Etcd(prefix, endpoints=auth_etcd.url, username="root", password=PASSWORD)
    source.access._token = "not-a-token-etcd-gave"
    assert {b.address for b in asyncio.run(source.adiscover()).backends} == {"10.0.0.1:80"}
    assert source.access._token not in (None, "not-a-token-etcd-gave")


def test_a_wrong_password_or_no_user_is_a_clear_error(auth_etcd: EtcdProcess, prefix: str) -> None:
    wrong = Etcd(prefix, endpoints=auth_etcd.url, username="root", password="wrong")
    with pytest.raises(ConnectionError, match="authentication failed"):
        asyncio.run(wrong.adiscover())
    anonymous = Etcd(prefix, endpoints=auth_etcd.url)
    with pytest.raises(ConnectionError, match=auth_etcd.url):
        asyncio.run(anonymous.adiscover())


def test_access_refuses_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="username and password go together"):
        Access(username="root")
    with pytest.raises(ValueError, match="username and password go together"):
        Access(password="pw")
    with pytest.raises(ValueError, match="username must be a non-empty str"):
        Access(username="", password="pw")
    with pytest.raises(TypeError, match="cert must be"):
        Access(cert="client.pem")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ca_file must be a file path, got 42"):
        Access(ca_file=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="password must be a str"):
        Access(username="root", password=b"pw")  # type: ignore[arg-type]
    assert Access().verify() is True  # no TLS settings: the system's CAs
    ca = EtcdTLS(tmp_path).ca  # a path object, kept as its text
    assert Access(ca_file=ca).ca_file == str(ca)


def test_a_watch_cancelled_for_its_token_signs_in_again_when_reopened() -> None:
    source = Etcd("svc/", username="root", password=PASSWORD)
    for message in (
        {
            "result": {
                "canceled": True,
                "cancel_reason": "rpc error: code = Unauthenticated "
                "desc = etcdserver: invalid auth token",
            }
        },
        {"error": {"grpc_code": 16, "http_code": 401, "message": "etcdserver: invalid auth token"}},
        {"error": {"grpc_code": 3, "message": "etcdserver: revision of auth store is old"}},
    ):
        source.access._token = "held"
        with pytest.raises(StreamBroken):
            source.message(message)
        assert source.access._token is None, message
    source.access._token = "held"
    with pytest.raises(StreamBroken):  # cancelled for another reason: the token stays
        source.message({"result": {"canceled": True, "cancel_reason": "too many watchers"}})
    assert source.access._token == "held"


def test_credentials_work_before_and_after_authentication_is_turned_on(
    tmp_path: Path, prefix: str
) -> None:
    with EtcdProcess(tmp_path) as server:
        server.put(prefix + "a", naming("10.0.0.1:80"))
        source = Etcd(prefix, endpoints=server.url, username="root", password=PASSWORD)
        # Authentication off: etcd refuses a sign-in; calls go without a token, as its own
        # client's do.
        assert {b.address for b in asyncio.run(source.adiscover()).backends} == {"10.0.0.1:80"}
        assert source.access._token == ""
        server.enable_auth(PASSWORD)
        server.put(prefix + "b", naming("10.0.0.2:80"))
        # On: a call without a token is refused ("user name is empty"); it signs in.
        found = {b.address for b in asyncio.run(source.adiscover()).backends}
        assert found == {"10.0.0.1:80", "10.0.0.2:80"}
        assert source.access._token


def test_a_watch_refused_401_signs_in_again_when_reopened() -> None:
    import httpx

    source = Etcd("svc/", username="root", password=PASSWORD)
    source.access._token = "held"
    request = httpx.Request(
        "POST", "http://127.0.0.1:2379/v3/watch", headers={"Authorization": "held"}
    )
    refused = source.refused(httpx.Response(401, request=request), b'{"code": 16}')
    assert isinstance(refused, StreamBroken)
    assert source.access._token is None
    source.access._token = "newer"  # a 401 for a token since replaced leaves the new one
    assert isinstance(source.refused(httpx.Response(401, request=request), b""), StreamBroken)
    assert source.access._token == "newer"


def test_tls_files_that_cannot_be_used_are_an_error_when_the_source_is_made(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "missing-ca.pem"
    with pytest.raises(ValueError, match=r"missing-ca\.pem"):
        Etcd("svc/", endpoints="https://127.0.0.1:2379", ca_file=missing)
    with pytest.raises(ValueError, match=r"missing-ca\.pem"):
        register("svc/", "10.0.0.1:80", endpoints="https://127.0.0.1:2379", ca_file=missing)
    tls = EtcdTLS(tmp_path)
    # The client certificate with the server's key: they do not match.
    with pytest.raises(ValueError, match="cannot use the TLS files given"):
        Etcd("svc/", ca_file=tls.ca, cert=(tls.client[0], tls.server[1]))
    assert Etcd("svc/", ca_file=tls.ca, cert=tls.client).access.cert == tls.client
