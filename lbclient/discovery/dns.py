"""Backends from DNS: A and AAAA records of a name, or its SRV records, with dnspython.

``DNS(name, port=...)`` asks for the name's A and AAAA records: one backend per address, all on
``port``. ``DNS.srv(name)`` asks for SRV records (RFC 2782): each target is looked up in turn
(A and AAAA) and every address becomes a backend with the record's port, its weight as the
backend's weight (0 becomes 1, the smallest a backend has) and its priority in the metadata,
where the refresh reads priority groups from.

Each answer holds for the smallest TTL of the records it used, clamped to
``[min_ttl, max_ttl]``: that is when the next lookup is made. A name that does not exist, or has
none of the records asked for, is an empty answer (the set empties only when that holds: see
``empty_after``). A query that fails (a timeout, SERVFAIL, REFUSED, no server) leaves out what
it would have found, and the answer says so (:attr:`Discovered.failed`, by record type: counted
in the balancer's snapshot and metrics): what the other queries found is used, as
``getaddrinfo`` uses the A records when the AAAA query fails, and one SRV target whose lookup
fails leaves the others in. The lookup fails, keeping the last set, only when every query of
it failed (or the SRV query itself), or when it found no backend while a query failed.

Names are checked when the source is made (letters, digits, ``-`` and ``_`` in labels of at most
63 characters, 253 in all), and an international name is asked in its IDNA form, as httpx
encodes a URL's host: ``DNS("bücher.test", port=80).name == "xn--bcher-kva.test"``.

dnspython is an optional dependency: ``pip install 'lbclient[dns]'``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from lbclient.backend import MAX_WEIGHT, Backend, check_weight, shown
from lbclient.discovery._refresh import clamp_ttl, describe
from lbclient.discovery.base import Discovered, ServiceDiscovery, positive

if TYPE_CHECKING:
    import dns.asyncresolver
    import dns.name
    import dns.resolver

__all__ = ["DNS", "dns_name"]

#: The record types of an address lookup.
ADDRESS_RECORDS: Final = ("A", "AAAA")
_MISSING = (
    "lbclient.discovery.DNS needs dnspython, which is not installed: pip install 'lbclient[dns]'"
)
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


def dns_name(name: object) -> str:
    """``name`` as it is asked: checked, and IDNA-encoded where it is not ASCII (each such
    label lower-cased first, as httpx does); a ValueError naming the name and what is wrong."""
    if not isinstance(name, str):
        raise TypeError(
            f"name must be a str like 'users.internal', got {shown(name)} ({type(name).__name__})"
        )
    bad = f"name must be a DNS name like 'users.internal', got {shown(name)}"
    dot = "." if name.endswith(".") else ""
    text = name[:-1] if dot else name
    if not text or any(c.isspace() for c in text):
        raise ValueError(bad)
    labels = text.split(".")
    for i, label in enumerate(labels):
        if not label:
            raise ValueError(f"{bad}: it has an empty label (a dot too many)")
        if not label.isascii():
            labels[i] = _idna(label, bad)
    for label in labels:
        if len(label) > 63:
            raise ValueError(
                f"{bad}: the label {shown(label)} is {len(label):,} characters long (at most 63)"
            )
        if not _DNS_LABEL.match(label):
            raise ValueError(
                f"{bad}: the label {shown(label)} may hold only letters, digits, '-' and '_', "
                "and may not start or end with '-'"
            )
    ascii_name = ".".join(labels)
    if len(ascii_name) > 253:
        raise ValueError(f"{bad}: it is {len(ascii_name):,} characters long (at most 253)")
    return ascii_name + dot


def _idna(label: str, bad: str) -> str:
    """One international label in its IDNA (``xn--``) form."""
    try:
        import idna  # httpx's own dependency, for the same encoding as httpx's

        return idna.encode(label.lower()).decode("ascii")
    except ImportError:  # pragma: no cover (httpx needs idna)
        encode = label.lower().encode
        try:
            return encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(
                f"{bad}: {shown(label)} is not a valid international label ({exc})"
            ) from None
    except UnicodeError as exc:  # idna.IDNAError is one
        raise ValueError(
            f"{bad}: {shown(label)} is not a valid international label ({exc})"
        ) from None


class _Asked(NamedTuple):
    """One query's outcome: its records and their TTL, or why it failed."""

    kind: str
    qname: str
    records: list[Any]
    ttl: float | None
    error: Exception | None = None


def _dnspython() -> None:
    try:
        import dns.asyncresolver
        import dns.resolver  # noqa: F401
    except ImportError as exc:
        raise ImportError(_MISSING, name="dns") from exc


class DNS(ServiceDiscovery):
    """The addresses of ``name`` from DNS, each a backend on ``port``.

    * ``port``: the backends' port (required; :meth:`srv` takes ports from the records).
    * ``weight``: every backend's weight (1).
    * ``records``: the record types asked for, ``"A"``, ``"AAAA"`` or both (both).
    * ``nameservers``: IP addresses of the servers to ask (None: the system's, from
      ``/etc/resolv.conf``).
    * ``nameserver_port``: the port they answer on (None: 53).
    * ``min_ttl``, ``max_ttl``: bounds, in seconds, on the TTL that sets the next lookup
      (5.0 and 300.0; a TTL of 0, as Consul gives by default, means ``min_ttl``).
    * ``timeout``: seconds one lookup may take, all its queries together (5.0).
    * ``empty_after``, ``empty_for``, ``failover_interval``: as for
      :class:`~lbclient.discovery.ServiceDiscovery`.

    Names are asked as written, fully qualified (no search domains): give
    ``users.default.svc.cluster.local``, not ``users``; an international name in its IDNA form
    (:attr:`name` is what is asked). A query of one record type that fails leaves that type
    out of the answer (see the module's text).
    """

    def __init__(
        self,
        name: str,
        port: int | None = None,
        *,
        weight: int = 1,
        records: Sequence[str] = ADDRESS_RECORDS,
        nameservers: Iterable[str] | None = None,
        nameserver_port: int | None = None,
        min_ttl: float = 5.0,
        max_ttl: float = 300.0,
        timeout: float = 5.0,
        empty_after: int = 3,
        empty_for: float = 10.0,
        failover_interval: float = 1.0,
        _srv: bool = False,
    ) -> None:
        _dnspython()
        super().__init__(
            empty_after=empty_after,
            empty_for=empty_for,
            timeout=timeout,
            failover_interval=failover_interval,
        )
        #: The name asked (IDNA-encoded where it was not ASCII).
        self.name = dns_name(name)
        self.srv_lookup = _srv
        if _srv:
            self.port: int | None = None
        else:
            if port is None:
                raise TypeError(
                    f"DNS({shown(name)}) needs port=, the backends' port (or use DNS.srv for "
                    "SRV records, which carry their ports)"
                )
            self.port = _port("port", port)
        self.weight = check_weight(weight, "DNS")
        kinds = (records,) if isinstance(records, str) else tuple(records)
        if not kinds or any(kind not in ADDRESS_RECORDS for kind in kinds):
            raise ValueError(f"records must be 'A', 'AAAA' or both, got {shown(records)}")
        self.records = tuple(dict.fromkeys(kinds))
        if nameservers is None:
            self.nameservers: tuple[str, ...] | None = None
        else:
            if isinstance(nameservers, str):
                nameservers = [nameservers]
            servers = tuple(nameservers)
            for server in servers:
                try:
                    ipaddress.ip_address(server)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"nameservers must be IP addresses like '127.0.0.1', got {shown(server)}"
                    ) from None
            if not servers:
                raise ValueError("nameservers is empty; give None for the system's")
            self.nameservers = servers
        self.nameserver_port = (
            None if nameserver_port is None else _port("nameserver_port", nameserver_port)
        )
        self.min_ttl = positive("min_ttl", min_ttl)
        self.max_ttl = positive("max_ttl", max_ttl)
        if self.min_ttl > self.max_ttl:
            raise ValueError(f"min_ttl ({min_ttl!r}) is more than max_ttl ({max_ttl!r})")

    @classmethod
    def srv(cls, name: str, **options: Any) -> DNS:
        """The SRV records of ``name`` (``_http._tcp.users.service.consul``): each target's
        addresses, with the record's port, weight and priority. Options as for :class:`DNS`,
        without ``port`` and ``weight``."""
        for given in ("port", "weight"):
            if given in options:
                raise TypeError(f"DNS.srv takes no {given}=: the SRV records carry it")
        return cls(name, _srv=True, **options)

    # -- resolvers -----------------------------------------------------------------------

    def _configure(self, resolver: Any) -> Any:
        if self.nameservers is not None:
            resolver.nameservers = list(self.nameservers)
        if self.nameserver_port is not None:
            resolver.port = self.nameserver_port
        resolver.timeout = min(2.0, self.timeout)
        resolver.lifetime = self.timeout
        return resolver

    def _resolver(self) -> dns.resolver.Resolver:
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=self.nameservers is None)
        result: dns.resolver.Resolver = self._configure(resolver)
        return result

    def _aresolver(self) -> dns.asyncresolver.Resolver:
        import dns.asyncresolver

        resolver = dns.asyncresolver.Resolver(configure=self.nameservers is None)
        result: dns.asyncresolver.Resolver = self._configure(resolver)
        return result

    # -- lookups -------------------------------------------------------------------------

    def discover(self) -> Discovered:
        resolver = self._resolver()
        deadline = time.monotonic() + self.timeout

        def ask(qname: str | dns.name.Name, kind: str) -> _Asked:
            import dns.exception
            import dns.resolver

            text = str(qname).rstrip(".")
            left = deadline - time.monotonic()
            if left <= 0:
                return _Asked(kind, text, [], None, self._late())
            try:
                answer = resolver.resolve(qname, kind, lifetime=left, raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                return _Asked(kind, text, [], None)
            except (dns.exception.DNSException, OSError) as exc:
                return _Asked(kind, text, [], None, exc)
            return _Asked(kind, text, *_records(answer))

        if not self.srv_lookup:
            return self._plain([ask(self.name, kind) for kind in self.records])
        srv = ask(self.name, "SRV")
        if srv.error is not None:
            raise srv.error
        usable = _usable(srv.records)
        return self._service(srv, [[ask(r.target, kind) for kind in self.records] for r in usable])

    async def adiscover(self) -> Discovered:
        resolver = self._aresolver()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout

        async def ask(qname: str | dns.name.Name, kind: str) -> _Asked:
            import dns.exception
            import dns.resolver

            text = str(qname).rstrip(".")
            left = deadline - loop.time()
            if left <= 0:
                return _Asked(kind, text, [], None, self._late())
            try:
                answer = await resolver.resolve(
                    qname, kind, lifetime=left, raise_on_no_answer=False
                )
            except dns.resolver.NXDOMAIN:
                return _Asked(kind, text, [], None)
            except (dns.exception.DNSException, OSError) as exc:
                return _Asked(kind, text, [], None, exc)
            return _Asked(kind, text, *_records(answer))

        if not self.srv_lookup:
            return self._plain(
                list(await asyncio.gather(*(ask(self.name, k) for k in self.records)))
            )
        srv = await ask(self.name, "SRV")
        if srv.error is not None:
            raise srv.error
        usable = _usable(srv.records)
        lookups = await asyncio.gather(
            *(asyncio.gather(*(ask(r.target, k) for k in self.records)) for r in usable)
        )
        return self._service(srv, [list(found) for found in lookups])

    def _late(self) -> TimeoutError:
        return TimeoutError(f"no answer within {self.timeout:g} s")

    def _plain(self, asked: list[_Asked]) -> Discovered:
        """The answer of an address lookup; raises if every query failed."""
        assert self.port is not None
        _every_query_failed(asked)
        backends = _addresses(asked, self.port, self.weight, {"name": self.name})
        return self._answer(backends, [a.ttl for a in asked], asked)

    def _service(self, srv: _Asked, targets: list[list[_Asked]]) -> Discovered:
        """The answer of an SRV lookup, ``targets`` the address queries of each usable record
        in turn; raises if every one of them failed."""
        asked = [a for found in targets for a in found]
        _every_query_failed(asked)
        backends: list[Backend] = []
        for record, found in zip(_usable(srv.records), targets, strict=True):
            backends += _addresses(found, record.port, *_srv_fields(self.name, record))
        return self._answer(_dedupe(backends), [srv.ttl] + [a.ttl for a in asked], asked)

    def _answer(
        self, backends: list[Backend], ttls: list[float | None], asked: list[_Asked]
    ) -> Discovered:
        """The answer: ``backends``, good for the smallest TTL seen, clamped (an empty one
        for ``min_ttl``: an empty name is asked again soon), naming the queries that failed."""
        failed = [
            (a.kind, f"{a.kind} {a.qname}: {describe(a.error)}")
            for a in sorted(asked, key=lambda a: (a.qname, a.kind))  # records come in any order
            if a.error is not None
        ]
        known = [t for t in ttls if t is not None]
        if not backends or not known:
            return Discovered(backends, self.min_ttl, failed)
        return Discovered(backends, clamp_ttl(min(known), self.min_ttl, self.max_ttl), failed)

    def __repr__(self) -> str:
        where = ""
        if self.nameservers is not None:
            where = f", nameservers={list(self.nameservers)!r}"
        if self.nameserver_port is not None:
            where += f", nameserver_port={self.nameserver_port}"
        if self.srv_lookup:
            return f"DNS.srv({self.name!r}{where})"
        return f"DNS({self.name!r}, port={self.port}{where})"


def _port(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {shown(value)} ({type(value).__name__})")
    if not 1 <= value <= 65_535:
        raise ValueError(f"{name} must be in 1..65535, got {shown(value)}")
    return value


def _every_query_failed(asked: list[_Asked]) -> None:
    """Raise the first query's error if every query in ``asked`` failed (none were made:
    nothing failed)."""
    if asked and all(a.error is not None for a in asked):
        error = asked[0].error
        assert error is not None
        raise error


def _records(answer: Any) -> tuple[list[Any], float | None]:
    rrset = answer.rrset
    if rrset is None:
        return [], None
    return list(rrset), float(rrset.ttl)


def _usable(records: list[Any]) -> list[Any]:
    """SRV records that name a target ("." says the service is not offered there)."""
    return [r for r in records if len(r.target.labels) > 1 or r.target.labels[0]]


def _srv_fields(service: str, record: Any) -> tuple[int, dict[str, Any]]:
    """The backend weight and metadata of one SRV record."""
    weight = min(MAX_WEIGHT, max(1, int(record.weight)))
    metadata = {
        "name": service,
        "target": record.target.to_text(omit_final_dot=True),
        "priority": int(record.priority),
        "srv_weight": int(record.weight),
    }
    return weight, metadata


def _addresses(
    found: list[_Asked], port: int, weight: int, metadata: dict[str, Any]
) -> list[Backend]:
    """A backend on ``port`` for every A or AAAA record in ``found``."""
    backends = []
    for asked in found:
        for record in asked.records:
            host = record.address
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            backends.append(Backend(address, weight, metadata))
    return backends


def _dedupe(backends: list[Backend]) -> list[Backend]:
    """Each address once: from the record of lowest priority, then the highest weight."""
    best: dict[str, Backend] = {}
    for backend in backends:
        seen = best.get(backend.address)
        if seen is None or (
            (seen.metadata.get("priority", 0), -seen.weight)
            > (backend.metadata.get("priority", 0), -backend.weight)
        ):
            best[backend.address] = backend
    return list(best.values())
