"""``hosts=``: what names a transport or adapter takes, and that every spelling of one a
request's URL carries reaches the backends (real servers on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import requests

from lbclient import LBAdapter, LBTransport
from lbclient.requests_adapter import mount
from lbclient.testing import TestServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server() -> Iterator[TestServer]:
    backend = TestServer().start()
    yield backend
    backend.close()


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("users:80", "without a port"),
        ("USERS:8080", "without a port"),
        ("[::1]", "without its brackets"),
        ("users/v1", "host names like"),
        ("me@users", "host names like"),
        ("two words", "host names like"),
        ("", "host names like"),
        ("xn--", "host names like"),
    ],
)
def test_a_name_no_url_carries_is_refused(server: TestServer, name: str, says: str) -> None:
    for make in (LBTransport, LBAdapter):
        with pytest.raises(ValueError, match=says) as caught:
            make([server.address], hosts=[name])
        assert repr(name) in str(caught.value)


def test_not_a_string_is_refused(server: TestServer) -> None:
    with pytest.raises(ValueError, match="got 7"):
        LBTransport([server.address], hosts=["users", 7])  # type: ignore[list-item]


@pytest.mark.parametrize("given", ["Bücher", "xn--bcher-kva", "BÜCHER"])
def test_an_international_name_in_either_form(server: TestServer, given: str) -> None:
    # httpx gives a URL's host in Unicode, requests in its ASCII (IDNA) form: both are served.
    transport = LBTransport([server.address], hosts=[given])
    with httpx.Client(transport=transport) as client:
        for url in ("http://bücher/a", "http://xn--bcher-kva/b"):
            assert client.get(url).json()["path"] in ("/a", "/b")
    session = requests.Session()
    mount(session, LBAdapter([server.address], hosts=[given]))
    with session:
        assert session.get("http://bücher/c").json()["host"] == "xn--bcher-kva"
    assert server.count("GET") == 3


def test_an_ipv6_address_as_a_url_gives_it(server: TestServer) -> None:
    transport = LBTransport([server.address], hosts=["::1"])
    with httpx.Client(transport=transport) as client:
        assert client.get("http://[::1]:1/v").json()["path"] == "/v"  # port 1: not dialled
    assert server.count("GET") == 1
