from __future__ import annotations

import pickle
import random

import pytest

from lbclient import MAX_WEIGHT, Backend


@pytest.mark.parametrize(
    ("text", "address", "host", "port"),
    [
        ("1.2.3.4:80", "1.2.3.4:80", "1.2.3.4", 80),
        ("users.internal:8080", "users.internal:8080", "users.internal", 8080),
        ("localhost:1", "localhost:1", "localhost", 1),
        ("[::1]:80", "[::1]:80", "[::1]", 80),
        ("[2001:DB8:0:0:0:0:0:1]:443", "[2001:db8::1]:443", "[2001:db8::1]", 443),
        ("[::ffff:1.2.3.4]:80", "[::ffff:1.2.3.4]:80", "[::ffff:1.2.3.4]", 80),
        ("[::ffff:102:304]:80", "[::ffff:1.2.3.4]:80", "[::ffff:1.2.3.4]", 80),
        ("  10.0.0.1:65535 ", "10.0.0.1:65535", "10.0.0.1", 65535),
        ("svc_a.ns.svc.cluster.local.:9000", "svc_a.ns.svc.cluster.local.:9000",
         "svc_a.ns.svc.cluster.local.", 9000),
    ],
)
def test_parses_and_normalises(text: str, address: str, host: str, port: int) -> None:
    b = Backend(text)
    assert (b.address, b.host, b.port, b.weight) == (address, host, port, 1)
    assert b.is_ip == (not host[0].isalpha())


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("1.2.3.4", "has no port"),
        ("1.2.3.4:", "has no port"),
        (":80", "empty host"),
        ("1.2.3.4:0", "outside 1..65535"),
        ("1.2.3.4:65536", "outside 1..65535"),
        ("1.2.3.4:http", "invalid port 'http'"),
        ("1.2.3.4:-1", "invalid port '-1'"),
        ("1.2.3.4:\uff18\uff10", "invalid port"),
        ("::1:80", "without brackets"),
        ("[::1]", "no port after"),
        ("[::1:80", "unclosed"),
        ("[::g]:80", "invalid IPv6 address '::g'"),
        ("[fe80::1%eth0]:80", "scoped"),
        ("1.2.3.256:80", "invalid IPv4 address '1.2.3.256'"),
        ("010.0.0.1:80", "invalid IPv4 address '010.0.0.1'"),
        ("bad_host!:80", "invalid host name 'bad_host!'"),
        ("-lead.example:80", "invalid host name"),
        ("a..b:80", "invalid host name"),
        ("http://x:80", "looks like a URL"),
        ("x/y:80", "looks like a URL"),
    ],
)
def test_bad_addresses_name_the_value(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="backend") as info:
        Backend(text)
    assert fragment in str(info.value)
    assert repr(text) in str(info.value) or repr(text.strip()) in str(info.value)


@pytest.mark.parametrize(("weight", "error"), [
    (0, ValueError), (-1, ValueError), (MAX_WEIGHT + 1, ValueError),
    (True, TypeError), (False, TypeError), (1.0, TypeError), (2.5, TypeError),
    ("2", TypeError), (None, TypeError),
])
def test_bad_weights_name_the_value(weight: object, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        Backend("1.2.3.4:80", weight)  # type: ignore[arg-type]
    assert repr(weight) in str(info.value)


def test_non_string_address_and_metadata_rejected() -> None:
    with pytest.raises(TypeError, match=r"\('1.2.3.4', 80\)"):
        Backend(("1.2.3.4", 80))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="metadata"):
        Backend("1.2.3.4:80", metadata=[1, 2])  # type: ignore[arg-type]


def test_immutable_and_metadata_ignored_for_identity() -> None:
    a = Backend("1.2.3.4:80", 2, {"zone": "a"})
    b = Backend("1.2.3.4:80", 2, {"zone": "b"})
    assert a == b
    assert hash(a) == hash(b)
    assert a != Backend("1.2.3.4:80", 3)
    assert a != "1.2.3.4:80"
    assert len({a, b, Backend("1.2.3.4:80", 3)}) == 2
    with pytest.raises(AttributeError):
        a.weight = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del a.address
    with pytest.raises(TypeError):
        a.metadata["zone"] = "c"  # type: ignore[index]
    assert a.metadata["zone"] == "a"


def test_metadata_is_copied() -> None:
    source = {"zone": "a"}
    b = Backend("1.2.3.4:80", metadata=source)
    source["zone"] = "b"
    assert b.metadata == {"zone": "a"}


def test_pingora_ordering() -> None:
    # IPv4 by numeric value (not text), then IPv6 by value, then names by text; then port, weight.
    expected = [
        Backend("1.0.0.1:80"),
        Backend("1.0.0.255:80"),
        Backend("1.1.1.1:80"),
        Backend("9.0.0.0:80"),
        Backend("10.0.0.1:80"),
        Backend("10.0.0.1:443"),
        Backend("10.0.0.1:443", 2),
        Backend("255.255.255.255:1"),
        Backend("[::]:80"),
        Backend("[::1]:79"),
        Backend("[::ffff:0.0.0.1]:1"),
        Backend("[2001:db8::1]:80"),
        Backend("[fe80::1]:80"),
        Backend("a.example:80"),
        Backend("b.example:1"),
    ]
    shuffled = expected[:]
    random.Random(7).shuffle(shuffled)
    assert sorted(shuffled) == expected
    assert Backend("1.0.0.1:80") < Backend("[::1]:80") < Backend("a:80")
    assert Backend("a:80") > Backend("[::1]:80") >= Backend("[::1]:80")
    assert Backend("[::1]:80") <= Backend("[::1]:80")


def test_with_weight_pickle_and_repr() -> None:
    b = Backend("[::1]:80", 2, {"k": 1})
    assert b.with_weight(5) == Backend("[::1]:80", 5)
    assert b.with_weight(5).metadata == {"k": 1}
    clone = pickle.loads(pickle.dumps(b))
    assert clone == b
    assert clone.metadata == {"k": 1}
    assert repr(b) == "Backend('[::1]:80', weight=2, metadata={'k': 1})"


def test_coerce() -> None:
    b = Backend("1.2.3.4:80")
    assert Backend.coerce(b) is b
    assert Backend.coerce("1.2.3.4:80") == b
    with pytest.raises(TypeError, match="42"):
        Backend.coerce(42)  # type: ignore[arg-type]
