from __future__ import annotations

import pickle
import random

import pytest

from lbclient import Backend
from lbclient.backend import MAX_WEIGHT, SHOWN_MAX, shown


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
        ("10.0.0.1:65535", "10.0.0.1:65535", "10.0.0.1", 65535),
        ("10.0.0.1:00080", "10.0.0.1:80", "10.0.0.1", 80),
        (
            "svc_a.ns.svc.cluster.local.:9000",
            "svc_a.ns.svc.cluster.local.:9000",
            "svc_a.ns.svc.cluster.local.",
            9000,
        ),
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
    assert repr(text) in str(info.value)


def _assert_names_address(text: str, fragment: str) -> None:
    """The message names the address: whole when it is of a sensible size; an absurd one cut
    short, its start and end shown and its length said."""
    with pytest.raises(ValueError, match=r"^backend address") as info:
        Backend(text)
    message = str(info.value)
    if len(repr(text)) <= SHOWN_MAX:
        assert repr(text) in message
    else:
        assert repr(text)[:20] in message
        assert repr(text)[-10:] in message
        assert f"({len(repr(text)):,} characters)" in message
        assert len(message) < 250
    assert fragment in message
    assert "integer string conversion" not in message


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:" + "9" * 5000,  # beyond int()'s digit limit
        "127.0.0.1:" + "9" * 4301,
        "127.0.0.1:" + "1" * 6,
        "127.0.0.1:" + "0" * 5000 + "1" * 6,
        "[::1]:" + "9" * 5000,
        "users.internal:" + "9" * 5000,
        "127.0.0.1:99999",
    ],
)
def test_port_of_any_length_outside_range(text: str) -> None:
    _assert_names_address(text, "outside 1..65535")


def test_port_with_many_leading_zeros_stays_valid() -> None:
    assert Backend("127.0.0.1:" + "0" * 5000 + "8080").address == "127.0.0.1:8080"


@pytest.mark.parametrize(
    "host",
    [
        "0x7f.0.0.1",
        "0X7F.0.0.1",
        "0177.0.0.1",
        "127.1",
        "127.0.1",
        "2130706433",
        "0x7f000001",
        "010.0.0.1",
        "1.2.3.256",
        "1.2.3.4.5",
        "0x7f.1",
        "0177.0x0.1",
        "127.0.0.0x1",
        "0x.0.0.1",
        "127.0.0.1.",
        "127.1.",
        "08.0.0.1",
    ],
)
def test_non_canonical_ipv4_rejected(host: str) -> None:
    _assert_names_address(f"{host}:80", "is not a canonical IPv4 address")


@pytest.mark.parametrize(
    "host",
    ["users.1", "users.internal.8080", "svc.0x1f", "a.b.0X0", "users.007", "x.0x"],
)
def test_numeric_last_label_rejected(host: str) -> None:
    _assert_names_address(f"{host}:80", "is numeric")


@pytest.mark.parametrize(
    "text",
    [
        " 10.0.0.1:80",
        "10.0.0.1:80 ",
        "  10.0.0.1:65535 ",
        "\t10.0.0.1:80",
        "10.0.0.1:80\n",
        "10.0.0.1 :80",
        "10.0.0.1: 80",
        "users .internal:80",
        "[::1 ]:80",
        " [::1]:80",
        "10.0.0.1:80\u00a0",
        "10.0.0.1:80\u3000",
    ],
)
def test_whitespace_rejected_not_stripped(text: str) -> None:
    _assert_names_address(text, "whitespace")


@pytest.mark.parametrize(
    ("text", "host"),
    [
        ("1password.com:443", "1password.com"),
        ("3com.example:80", "3com.example"),
        ("3com:80", "3com"),
        ("a0x1.internal:80", "a0x1.internal"),
        ("0x1g.internal:80", "0x1g.internal"),
        ("0xdead.beef:80", "0xdead.beef"),
        ("127.0.0.1.example:80", "127.0.0.1.example"),
        ("1.2.3.4a:80", "1.2.3.4a"),
        ("10.0.0.x1:80", "10.0.0.x1"),
        ("users-1:80", "users-1"),
        ("svc.ns.svc.cluster.local:80", "svc.ns.svc.cluster.local"),
        ("svc.ns.svc.cluster.local.:80", "svc.ns.svc.cluster.local."),
    ],
)
def test_numeric_looking_host_names_stay_valid(text: str, host: str) -> None:
    b = Backend(text)
    assert (b.address, b.host, b.is_ip) == (text, host, False)


@pytest.mark.parametrize(
    ("weight", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (MAX_WEIGHT + 1, ValueError),
        (True, TypeError),
        (False, TypeError),
        (1.0, TypeError),
        (2.5, TypeError),
        ("2", TypeError),
        (None, TypeError),
    ],
)
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


def test_shown_names_a_value_whole_or_cut_short() -> None:
    assert shown("10.0.0.1:80") == "'10.0.0.1:80'"
    assert shown(65536) == "65536"
    long = shown("x" * 5000)
    assert long.startswith("'xxxx")
    assert long.endswith("xx' (5,002 characters)")
    assert len(long) <= SHOWN_MAX + 30
    assert shown(10**5000) == "an int of 5,001 digits"  # too long for Python to print
    assert shown(-(10**300)) == "an int of 301 digits"
    assert shown(10**70) == repr(10**70)


def test_an_absurd_weight_is_named_cut_short() -> None:
    with pytest.raises(ValueError, match=r"weight must be in 1\.\.65535, got an int of 5,001"):
        Backend("10.0.0.1:80", 10**5000)
