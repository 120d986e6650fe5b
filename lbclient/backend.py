"""Backend: one upstream server, as a value.

A backend is an address (``host:port``) and a weight. Addresses are parsed and normalised once,
when the value is made, so every later use (ordering, hashing, routing) works on checked data:

* ``1.2.3.4:80``: an IPv4 address, dotted decimal, no leading zeros;
* ``[::1]:80``: an IPv6 address in brackets, normalised to RFC 5952 text (``[::1]``);
* ``users.internal:8080``: a host name, kept as written (it is not resolved here).

Anything else is a :class:`ValueError` naming the address: whitespace anywhere, a port outside
1..65535 (however many digits it has), and any other spelling a resolver would read as IPv4
(``127.1``, ``0x7f.0.0.1``, ``0177.0.0.1``, ``2130706433``), so the address that is checked is
the address that is dialled. Messages name a bad value as :func:`shown` writes it: whole when
it is of a sensible size, cut short (saying how long it was) when it is absurd.

Equality and hashing use ``(address, weight)``; ``metadata`` rides along and is ignored by both.
Backends sort as Pingora sorts them: IPv4 addresses by numeric value, then IPv6 addresses by
numeric value, then host names by text; then port; then weight.

Part of the core: no I/O (a host name is never resolved here), no HTTP client, no clock.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

__all__ = ["MAX_WEIGHT", "SHOWN_MAX", "Backend", "shown"]

#: The largest weight a backend may have. Weights expand into table entries and ring points,
#: so an absurd weight would turn into an absurd amount of memory.
MAX_WEIGHT: Final = 65_535

_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")
# A label that inet_aton-style parsers read as a number: decimal, octal (leading 0) or hex (0x).
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0[xX][0-9A-Fa-f]*)\Z")
_EMPTY: Mapping[str, Any] = MappingProxyType({})

# Ordering classes, as Pingora orders socket addresses: IPv4 < IPv6; host names come last.
_V4, _V6, _NAME = 0, 1, 2

#: The longest text of a value an error message shows whole (see :func:`shown`).
SHOWN_MAX: Final = 80


def shown(value: object, limit: int = SHOWN_MAX) -> str:
    """``repr(value)`` for an error message; one longer than ``limit`` characters is cut in
    the middle and says how long it was, and an int too long to print says how many digits it
    has (Python refuses to print ints of more than 4,300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        digits = int(math.log10(abs(value))) + 1
        return f"an int of {digits:,} digits"
    text = repr(value)
    if len(text) <= limit:
        return text
    keep = max(limit // 2 - 8, 8)
    return f"{text[:keep]}...{text[-(keep // 2) :]} ({len(text):,} characters)"


def _parse_port(text: str, address: str) -> int:
    if not text:
        raise ValueError(f"backend address {shown(address)} has no port (expected host:port)")
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"backend address {shown(address)} has an invalid port {shown(text)}")
    digits = text.lstrip("0")
    if len(digits) > 5:
        # Too long to be a port; judged by length, before int() could hit its digit limit.
        raise ValueError(
            f"backend address {shown(address)} has a {len(text):,}-digit port, outside 1..65535"
        )
    port = int(digits or "0")
    if not 1 <= port <= 65_535:
        raise ValueError(f"backend address {shown(address)} has port {port}, outside 1..65535")
    return port


def _check_hostname(host: str, address: str) -> None:
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        raise ValueError(f"backend address {shown(address)} has an invalid host name {shown(host)}")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise ValueError(
                f"backend address {shown(address)} has an invalid host name {shown(host)}"
            )
    labels = name.split(".")
    if all(_NUMERIC_LABEL.match(label) for label in labels):
        # Numbers and dots only, yet not dotted-quad decimal: "127.1", "0x7f.0.0.1", "010.0.0.1",
        # "2130706433" (resolvers read these as some other IPv4 address) or "1.2.3.256".
        raise ValueError(
            f"backend address {shown(address)} is not a canonical IPv4 address: invalid IPv4 "
            f"address {shown(host)} (write four decimal parts 0..255 without leading zeros, "
            "e.g. '127.0.0.1')"
        )
    if _NUMERIC_LABEL.match(labels[-1]):
        # No top-level domain is numeric (RFC 3696, section 2), and resolvers may take such a
        # name for an IPv4 address.
        raise ValueError(
            f"backend address {shown(address)} has an invalid host name {shown(host)} "
            f"(its last label {labels[-1]!r} is numeric)"
        )


def _parse(address: str) -> tuple[str, str, int, tuple[int, int | str]]:
    """Return (normalised address, host text, port, ordering key of the host)."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise ValueError(f"backend address {shown(address)} has an unclosed '['")
        inner = address[1:end]
        rest = address[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError(
                f"backend address {shown(address)} has no port after ']' (expected [ip]:port)"
            )
        port = _parse_port(rest[1:], address)
        if "%" in inner:
            raise ValueError(
                f"backend address {shown(address)}: scoped IPv6 addresses are not supported"
            )
        try:
            ip6 = ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(
                f"backend address {shown(address)} has an invalid IPv6 address {shown(inner)}"
            ) from None
        mapped = ip6.ipv4_mapped
        # RFC 5952 text; IPv4-mapped addresses in mixed notation on every Python version.
        host = f"[::ffff:{mapped}]" if mapped is not None else f"[{ip6.compressed}]"
        return f"{host}:{port}", host, port, (_V6, int(ip6))
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise ValueError(f"backend address {shown(address)} has no port (expected host:port)")
    if "/" in address:
        raise ValueError(
            f"backend address {shown(address)} looks like a URL; give host:port "
            "(e.g. '10.0.0.1:8080')"
        )
    if ":" in host:
        raise ValueError(
            f"backend address {shown(address)} looks like an IPv6 address without brackets "
            "(write it as [addr]:port)"
        )
    if not host:
        raise ValueError(f"backend address {shown(address)} has an empty host")
    port = _parse_port(port_text, address)
    try:
        ip4 = ipaddress.IPv4Address(host)
    except ValueError:
        _check_hostname(host, address)
        return f"{host}:{port}", host, port, (_NAME, host)
    host = str(ip4)
    return f"{host}:{port}", host, port, (_V4, int(ip4))


def check_weight(weight: object, where: str = "backend") -> int:
    """Return ``weight`` if it is a valid weight, else raise an error naming the value."""
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise TypeError(
            f"{where} weight must be an int, got {shown(weight)} ({type(weight).__name__})"
        )
    if not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"{where} weight must be in 1..{MAX_WEIGHT}, got {shown(weight)}")
    return weight


class Backend:
    """One upstream server: a normalised ``host:port`` address, a weight and opaque metadata.

    Immutable. Raises :class:`ValueError` for a malformed address or an out-of-range weight or
    port, and :class:`TypeError` for a value of the wrong type; the message names the value.
    """

    __slots__ = ("_hash", "_host", "_ip", "_order", "_port", "address", "metadata", "weight")

    address: str
    weight: int
    metadata: Mapping[str, Any]
    _host: str
    _port: int
    _ip: bool
    _order: tuple[int, int | str, int, int]
    _hash: int

    def __init__(
        self, address: str, weight: int = 1, metadata: Mapping[str, Any] | None = None
    ) -> None:
        if not isinstance(address, str):
            raise TypeError(
                f"backend address must be a str like 'host:port', got {shown(address)} "
                f"({type(address).__name__})"
            )
        if not address or address.isspace():
            raise ValueError(f"backend address must not be empty, got {shown(address)}")
        if any(char.isspace() for char in address):
            raise ValueError(f"backend address {shown(address)} contains whitespace")
        check_weight(weight, f"backend {shown(address)}")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(
                f"backend metadata must be a mapping or None, got {type(metadata).__name__}"
            )
        normalised, host, port, order = _parse(address)
        setter = object.__setattr__
        setter(self, "address", normalised)
        setter(self, "weight", weight)
        setter(self, "metadata", MappingProxyType(dict(metadata)) if metadata else _EMPTY)
        setter(self, "_host", host)
        setter(self, "_port", port)
        setter(self, "_ip", order[0] != _NAME)
        setter(self, "_order", (order[0], order[1], port, weight))
        # In-process identity for dict and set membership only; routing never uses it.
        setter(self, "_hash", (normalised, weight).__hash__())

    @classmethod
    def coerce(cls, value: Backend | str) -> Backend:
        """Return ``value`` if it is a Backend, or parse it as an address with weight 1."""
        if isinstance(value, Backend):
            return value
        if isinstance(value, str):
            return cls(value)
        raise TypeError(
            f"expected a Backend or an address string like 'host:port', got {shown(value)} "
            f"({type(value).__name__})"
        )

    @property
    def host(self) -> str:
        """The host: IPv4 dotted decimal, IPv6 in brackets (``[::1]``), or the host name."""
        return self._host

    @property
    def port(self) -> int:
        """The port, 1..65535."""
        return self._port

    @property
    def is_ip(self) -> bool:
        """True when the host is an IP address, False for a host name."""
        return self._ip

    def with_weight(self, weight: int) -> Backend:
        """Return a copy of this backend with another weight."""
        return Backend(self.address, weight, self.metadata)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Backend is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Backend is immutable; cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Backend):
            return NotImplemented
        return self.address == other.address and self.weight == other.weight

    def __hash__(self) -> int:
        return self._hash

    def __lt__(self, other: Backend) -> bool:
        if not isinstance(other, Backend):
            return NotImplemented
        return self._order < other._order

    def __le__(self, other: Backend) -> bool:
        if not isinstance(other, Backend):
            return NotImplemented
        return self._order <= other._order

    def __gt__(self, other: Backend) -> bool:
        if not isinstance(other, Backend):
            return NotImplemented
        return self._order > other._order

    def __ge__(self, other: Backend) -> bool:
        if not isinstance(other, Backend):
            return NotImplemented
        return self._order >= other._order

    def __repr__(self) -> str:
        extra = f", metadata={dict(self.metadata)!r}" if self.metadata else ""
        return f"Backend({self.address!r}, weight={self.weight}{extra})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Backend, (self.address, self.weight, dict(self.metadata) or None))
