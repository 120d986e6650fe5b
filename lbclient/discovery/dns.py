"""Backends from DNS: A and AAAA records of a name, or its SRV records, with dnspython.

``DNS(name, port=...)`` asks for the name's A and AAAA records: one backend per address, all on
``port``. ``DNS.srv(name)`` asks for SRV records (RFC 2782): each target is looked up in turn
(A and AAAA) and every address becomes a backend with the record's port, its weight as the
backend's weight (0 becomes 1, the smallest a backend has) and its priority in the metadata,
where the refresh reads priority groups from.

Each answer holds for the smallest TTL of the records it used, clamped to
``[min_ttl, max_ttl]``: that is when the next lookup is made. A name that does not exist, or has
none of the records asked for, is an empty answer (the set empties only when that repeats); any
other failure (a timeout, SERVFAIL, REFUSED, no server) fails the lookup and keeps the last set.

dnspython is an optional dependency: ``pip install 'lbclient[dns]'``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from lbclient.backend import MAX_WEIGHT, Backend, check_weight
from lbclient.discovery._refresh import clamp_ttl
from lbclient.discovery.base import Discovered, ServiceDiscovery, positive

if TYPE_CHECKING:
    import dns.asyncresolver
    import dns.name
    import dns.resolver

__all__ = ["DNS"]

#: The record types of an address lookup.
ADDRESS_RECORDS: Final = ("A", "AAAA")
_MISSING = (
    "lbclient.discovery.DNS needs dnspython, which is not installed: pip install 'lbclient[dns]'"
)


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
    * ``empty_after``, ``failover_interval``: as for
      :class:`~lbclient.discovery.ServiceDiscovery`.

    Names are asked as written, fully qualified (no search domains): give
    ``users.default.svc.cluster.local``, not ``users``.
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
        failover_interval: float = 1.0,
        _srv: bool = False,
    ) -> None:
        _dnspython()
        super().__init__(
            empty_after=empty_after, timeout=timeout, failover_interval=failover_interval
        )
        if not isinstance(name, str) or not name.strip(".") or any(c.isspace() for c in name):
            raise ValueError(f"name must be a DNS name like 'users.internal', got {name!r}")
        self.name = name
        self.srv_lookup = _srv
        if _srv:
            self.port: int | None = None
        else:
            if port is None:
                raise TypeError(
                    f"DNS({name!r}) needs port=, the backends' port (or use DNS.srv for SRV "
                    "records, which carry their ports)"
                )
            self.port = _port("port", port)
        self.weight = check_weight(weight, "DNS")
        kinds = (records,) if isinstance(records, str) else tuple(records)
        if not kinds or any(kind not in ADDRESS_RECORDS for kind in kinds):
            raise ValueError(f"records must be 'A', 'AAAA' or both, got {records!r}")
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
                        f"nameservers must be IP addresses like '127.0.0.1', got {server!r}"
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

        def ask(qname: str | dns.name.Name, kind: str) -> tuple[list[Any], float | None]:
            import dns.resolver

            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer within {self.timeout:g} s")
            try:
                answer = resolver.resolve(qname, kind, lifetime=left, raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                return [], None
            return _records(answer)

        if not self.srv_lookup:
            found = [ask(self.name, kind) for kind in self.records]
            return self._answer(self._plain(found), [t for _r, t in found])
        records, ttl = ask(self.name, "SRV")
        ttls = [ttl]
        backends: list[Backend] = []
        for record in _usable(records):
            found = [ask(record.target, kind) for kind in self.records]
            backends += _addresses(found, record.port, *_srv_fields(self.name, record))
            ttls += [t for _r, t in found]
        return self._answer(_dedupe(backends), ttls)

    async def adiscover(self) -> Discovered:
        resolver = self._aresolver()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout

        async def ask(qname: str | dns.name.Name, kind: str) -> tuple[list[Any], float | None]:
            import dns.resolver

            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no answer within {self.timeout:g} s")
            try:
                answer = await resolver.resolve(
                    qname, kind, lifetime=left, raise_on_no_answer=False
                )
            except dns.resolver.NXDOMAIN:
                return [], None
            return _records(answer)

        if not self.srv_lookup:
            found = list(await asyncio.gather(*(ask(self.name, k) for k in self.records)))
            return self._answer(self._plain(found), [t for _r, t in found])
        records, ttl = await ask(self.name, "SRV")
        usable = _usable(records)
        lookups = await asyncio.gather(
            *(asyncio.gather(*(ask(r.target, k) for k in self.records)) for r in usable)
        )
        ttls = [ttl]
        backends: list[Backend] = []
        for record, found in zip(usable, lookups, strict=True):
            backends += _addresses(list(found), record.port, *_srv_fields(self.name, record))
            ttls += [t for _r, t in found]
        return self._answer(_dedupe(backends), ttls)

    def _plain(self, found: list[tuple[list[Any], float | None]]) -> list[Backend]:
        """The backends of an address lookup."""
        assert self.port is not None
        return _addresses(found, self.port, self.weight, {"name": self.name})

    def _answer(self, backends: list[Backend], ttls: list[float | None]) -> Discovered:
        """The answer: ``backends``, good for the smallest TTL seen, clamped (an empty one
        for ``min_ttl``: an empty name is asked again soon)."""
        known = [t for t in ttls if t is not None]
        if not backends or not known:
            return Discovered(backends, self.min_ttl)
        return Discovered(backends, clamp_ttl(min(known), self.min_ttl, self.max_ttl))

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
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if not 1 <= value <= 65_535:
        raise ValueError(f"{name} must be in 1..65535, got {value}")
    return value


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
    found: list[tuple[list[Any], float | None]],
    port: int,
    weight: int,
    metadata: dict[str, Any],
) -> list[Backend]:
    """A backend on ``port`` for every A or AAAA record in ``found``."""
    backends = []
    for records, _ttl in found:
        for record in records:
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
