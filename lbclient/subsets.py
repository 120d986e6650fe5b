"""Subsets: which few of many backends one client of a fleet talks to.

With N clients and M backends, every client talking to every backend costs N x M connections
and thins each backend's per-client signal to nothing. A :class:`Subset` gives each client
``size`` backends, chosen in one of two modes:

**Deterministic** (``index`` and ``clients`` given), the Google SRE book's (ch. 20), for clients
that know their index in the fleet and its size. Clients are grouped in rounds; each round
shuffles the backends with a generator seeded by the round, and the clients of the round take
consecutive slices of ``size`` backends from that order. Exactly:

* the shuffle of round ``r``: the backends ordered by ``xxh3_64(address, seed=s_r)``, ties by
  address, where ``s_r = xxh3_64(b"lbclient-subset/" + salt + le64(r))`` (deterministic across
  processes, machines and Python versions; the input order of the backends does not matter);
* with ``n`` backends and ``k = min(size, n)``, a round has ``m = n / gcd(n, k)`` clients (the
  book's ``subset_count = n // k`` when ``k`` divides ``n``);
* client ``index`` is in round ``r = index // m``, slot ``j = index % m``, and takes the ``k``
  backends at positions ``j*k, j*k + 1, ..., j*k + k - 1`` (mod ``n``) of its round's shuffle.

The slots of a round read the shuffle as a ring, end to end, ``k / gcd(n, k)`` times over, so a
full round gives every backend the same number of clients, and the first ``j`` slots of a round
cover every position of the ring either ``floor(j*k / n)`` or ``ceil(j*k / n)`` times. Hence,
for **any** number of clients (a multiple of ``m`` or not) and any ``n`` and ``size``: the
numbers of clients of any two backends differ by at most one, and they add up to
``clients * k``. When ``size`` divides ``n`` and ``clients`` is a multiple of ``n / size``,
every backend has exactly ``clients * size / n`` clients. A slice never holds a backend twice.

The price of this evenness is churn: the number of clients per round and the shuffles follow
the set, so a backend joining or leaving moves most clients' subsets (at 1,000 clients x 1,000
backends with subsets of 20, about 97% of the clients and 19 of their 20 members; the book's own
scheme reshuffles too). It suits fleets whose backend set changes seldom.

**Rendezvous** (``index`` and ``clients`` not given), gRPC A68's ``random_subsetting``, for
clients that do not know their index: a per-client ``salt`` (random by default, from
``os.urandom``: the one place randomness enters; give it for tests and simulations), each
backend ranked by ``xxh3_64(address, seed=xxh3_64(b"lbclient-subset/" + salt))``, highest first,
ties by address; the client takes the top ``size``. One backend joining or leaving changes at
most one member of any client's subset. Random subsets spread clients unevenly (the SRE book's
63% to 121% of the mean); that is the price of not knowing the index.

**Fallbacks.** A subset larger than the current set (discovery shrank it) is the whole set: a
running client keeps working. No backends: no members. Weights play no part in choosing the
members (the algorithm that selects within the subset uses them). A backend listed twice (by
address) counts once.

**Health.** :meth:`Subset.candidates` is the order in which a client prefers the backends: the
subset first, then the replacements (deterministic: the rest of the round's shuffle, from the
position after the slice, around the ring; rendezvous: the rest of the ranking).
:meth:`Subset.members` is the first ``size`` available candidates: an unavailable member is
replaced by the next available candidate outside the subset, and when it is available again
it is back and its replacement gone. Members come in candidate order.

Cost: one hash per backend and a sort; about 0.6 ms for 1,000 backends on the project's
machine, in either mode. It runs when the backend set changes, not per request.

Part of the core: pure values and functions; no I/O, no clock, no thread.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import xxhash

from lbclient.backend import Backend, shown
from lbclient.hashing import le64, xxh3_64

__all__ = ["SALT_BYTES", "Subset", "members"]

#: The length of the random salt a rendezvous subset draws when none is given.
SALT_BYTES: Final = 16

_PREFIX: Final = b"lbclient-subset/"
_seeded = xxhash.xxh3_64_intdigest


def _check_count(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"Subset {name} must be an int, got {shown(value)} ({type(value).__name__})"
        )
    if value < least:
        raise ValueError(f"Subset {name} must be at least {least}, got {shown(value)}")
    return value


def _unique(backends: Iterable[Backend]) -> list[Backend]:
    """``backends`` with each address once (the first kept)."""
    listed = list(backends)
    for backend in listed:
        if not isinstance(backend, Backend):
            raise TypeError(f"expected Backend values, got {shown(backend)}")
    by_address = {b.address: b for b in reversed(listed)}
    if len(by_address) == len(listed):
        return listed
    return list(reversed(by_address.values()))


def _ordered(backends: Sequence[Backend], seed: int) -> list[Backend]:
    """``backends`` by ``xxh3_64(address, seed)``, highest first, ties by address."""
    keyed = [(_seeded(b.address.encode(), seed), b.address, b) for b in backends]
    keyed.sort(key=lambda item: (-item[0], item[1]))
    return [item[2] for item in keyed]


class Subset:
    """Which ``size`` backends one client uses: deterministic (``index`` of ``clients``) or
    rendezvous (a per-client ``salt``). Immutable.

    Raises :class:`TypeError` for a value of the wrong type and :class:`ValueError` for one out
    of range (``size`` or ``clients`` under 1, a negative ``index`` or one not below
    ``clients``, ``index`` without ``clients`` or the other way round); messages name the value.

    ``salt``: in rendezvous mode, random (:data:`SALT_BYTES` bytes from ``os.urandom``) unless
    given. In deterministic mode ``b""`` unless given; every client of one fleet must use the
    same salt there (a salt lets two fleets calling the same backends shuffle differently).
    """

    __slots__ = ("clients", "index", "salt", "size")

    size: int
    index: int | None
    clients: int | None
    salt: bytes

    def __init__(
        self,
        size: int,
        *,
        index: int | None = None,
        clients: int | None = None,
        salt: bytes | None = None,
    ) -> None:
        _check_count("size", size, 1)
        if (index is None) != (clients is None):
            given, missing = ("index", "clients") if clients is None else ("clients", "index")
            raise ValueError(
                f"Subset {given} given without {missing}: a deterministic subset needs both "
                "(the client's index and the fleet's number of clients); give neither for a "
                "rendezvous subset"
            )
        if clients is not None:
            _check_count("clients", clients, 1)
            _check_count("index", index, 0)
            assert index is not None
            if index >= clients:
                raise ValueError(
                    f"Subset index must be below clients ({clients}), got {shown(index)} "
                    "(indexes count from 0)"
                )
        if salt is None:
            salt = b"" if clients is not None else os.urandom(SALT_BYTES)
        elif isinstance(salt, (bytearray, memoryview)):
            salt = bytes(salt)
        elif not isinstance(salt, bytes):
            raise TypeError(f"Subset salt must be bytes, got {shown(salt)} ({type(salt).__name__})")
        setter = object.__setattr__
        setter(self, "size", size)
        setter(self, "index", index)
        setter(self, "clients", clients)
        setter(self, "salt", salt)

    @property
    def deterministic(self) -> bool:
        """True in deterministic mode (``index`` and ``clients`` given), False in rendezvous."""
        return self.index is not None

    @property
    def mode(self) -> str:
        """``"deterministic"`` or ``"rendezvous"``."""
        return "deterministic" if self.deterministic else "rendezvous"

    def clients_per_round(self, backends: int) -> int:
        """Deterministic mode's ``m``: clients in one round over ``backends`` backends
        (``backends / gcd(backends, min(size, backends))``; 1 with no backends)."""
        if backends < 1:
            return 1
        k = min(self.size, backends)
        return backends // math.gcd(backends, k)

    def round_seed(self, round_: int) -> int:
        """The seed of deterministic round ``round_``'s shuffle."""
        return xxh3_64(_PREFIX + self.salt + le64(round_))

    def candidates(self, backends: Iterable[Backend]) -> tuple[Backend, ...]:
        """Every backend, in the order this client prefers them: its subset (the first
        ``min(size, len(backends))``), then its replacements in order (see the module)."""
        unique = _unique(backends)
        n = len(unique)
        if not n:
            return ()
        if self.index is None:
            return tuple(_ordered(unique, xxh3_64(_PREFIX + self.salt)))
        m = self.clients_per_round(n)
        round_, slot = divmod(self.index, m)
        order = _ordered(unique, self.round_seed(round_))
        start = (slot * min(self.size, n)) % n
        return tuple(order[start:] + order[:start])

    def subset(self, backends: Iterable[Backend]) -> tuple[Backend, ...]:
        """The subset regardless of health: the first ``size`` candidates (the whole set
        when it has ``size`` backends or fewer)."""
        return self.candidates(backends)[: self.size]

    def members(
        self,
        backends: Iterable[Backend],
        available: Callable[[Backend], bool] | None = None,
    ) -> tuple[Backend, ...]:
        """The backends this client uses: the first ``size`` candidates for which
        ``available`` is true (all of them when ``available`` is None). Fewer than ``size``
        when fewer are available; empty when none is."""
        order = self.candidates(backends)
        if available is None:
            return order[: self.size]
        chosen: list[Backend] = []
        for backend in order:
            if available(backend):
                chosen.append(backend)
                if len(chosen) == self.size:
                    break
        return tuple(chosen)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Subset is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Subset is immutable; cannot delete {name!r}")

    def _key(self) -> tuple[int, int | None, int | None, bytes]:
        return (self.size, self.index, self.clients, self.salt)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Subset):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return self._key().__hash__()

    def __repr__(self) -> str:
        if self.index is not None:
            salt = f", salt={self.salt!r}" if self.salt else ""
            return f"Subset({self.size}, index={self.index}, clients={self.clients}{salt})"
        return f"Subset({self.size}, salt=bytes.fromhex({self.salt.hex()!r}))"

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (self.size, self.index, self.clients, self.salt))


def _rebuild(size: int, index: int | None, clients: int | None, salt: bytes) -> Subset:
    return Subset(size, index=index, clients=clients, salt=salt)


def members(
    subset: Subset,
    backends: Iterable[Backend],
    available: Callable[[Backend], bool] | None = None,
) -> tuple[Backend, ...]:
    """``subset.members(backends, available)``: the backends a client with ``subset`` uses."""
    return subset.members(backends, available)
