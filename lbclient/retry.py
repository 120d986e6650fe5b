"""What a request may retry: :class:`RetryPolicy`, the kinds of :class:`Failure`, and the record
of each :class:`Attempt`. Plain values; the attempt loop that applies them is private.

The rules:

* ``NEVER_SENT`` failures (connection refused, connect timeout, TLS handshake, DNS, and a
  backend's own connection pool that has no connection free in time) are retried on the next
  backend for every method: the request never left the client.
* ``MAYBE_SENT`` failures (read or write errors and timeouts, server disconnected, protocol
  errors) are retried only for idempotent methods whose body can be sent again, and only when
  ``retry_maybe_sent`` is on. A POST that may have reached a server is never sent twice.
* ``LOCAL`` failures (a malformed request, an unsupported scheme) say nothing about the
  backend: not reported, not retried.
* A response whose status is in ``retry_statuses`` is retried like a maybe-sent failure.
* A backend that timed out or failed its TLS handshake is not tried again by the same request;
  another backend may be. A retry goes to a backend of the current set, untried ones first.
* No wait before an attempt on a backend not tried yet; jittered exponential backoff before
  trying a backend again.
* Timeouts keep their meaning: every attempt gets the client's own timeouts, per operation.
  ``attempt_timeout`` caps one attempt up to its response head, however slowly it comes (the
  body then gets the client's own timeouts); ``deadline`` caps the whole request, attempts,
  waits and the response body together, and no attempt starts without a useful share of it.
* The attempts after a failed first one run in a tenacity ``Retrying`` (``AsyncRetrying`` for
  the async transport) made of these rules; a policy may add tenacity strategies of its own
  (``stop``, ``wait``, ``retry``, ``before_sleep``, ``after``), which can only end the retries
  sooner or wait longer: they never retry what these rules do not.

Plain values only: no I/O, no HTTP client, no tenacity import (the strategies a policy holds are
opaque callables here; the attempt loop composes them).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, NamedTuple

from lbclient.backend import Backend
from lbclient.health import status_set

__all__ = [
    "IDEMPOTENT_METHODS",
    "MAX_ATTEMPTS",
    "Attempt",
    "Failure",
    "RequestOptions",
    "RetryBudget",
    "RetryPolicy",
    "RetryStats",
]

#: Methods that may be sent twice without changing the outcome (RFC 9110 section 9.2.2).
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class Failure(enum.Enum):
    """How far a failed attempt got, which decides whether it may be retried."""

    #: The request never left the client (refused, connect timeout, TLS handshake, no free
    #: connection in that backend's pool in time): safe to retry for every method.
    NEVER_SENT = "never sent"
    #: The request may have reached the server: retry only idempotent, replayable requests.
    MAYBE_SENT = "maybe sent"
    #: A local problem (a malformed request, an unsupported scheme): not the backend's fault,
    #: not retried.
    LOCAL = "local"


#: The most attempts a request may make, the first included: with every one refused and the
#: longest backoffs, about ten seconds of trying (gRPC caps its retry policy at 5 attempts).
MAX_ATTEMPTS: Final = 10


def _seconds(
    name: str,
    value: object,
    optional: bool = False,
    *,
    positive: bool = False,
    what: str = "a number of seconds",
) -> None:
    """Check a number option: finite, ``>= 0`` (``> 0`` when ``positive`` or ``optional``);
    None only when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    above = optional or positive
    if not math.isfinite(value) or not (value > 0 if above else value >= 0):
        bound = "> 0" if above else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _attempts(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_attempts must be an int, got {value!r}")
    if not 1 <= value <= MAX_ATTEMPTS:
        raise ValueError(f"max_attempts must be from 1 to {MAX_ATTEMPTS}, got {value}")


@dataclass(frozen=True)
class RetryBudget:
    """How many retries (or hedges) a transport or adapter may send, as Finagle's and Envoy's
    retry budgets bound them: over the last ``window`` seconds, ``ratio`` per request plus a
    reserve of ``min_per_second`` a second. Retries spend from the policy's ``budget`` and
    hedges from its ``hedge_budget``, so that hedging never takes what failover needs. A retry
    of an attempt that never reached a server (a refused connection, a connect timeout) spends
    nothing: it adds no load to any server. With nothing left, a request is not retried, and
    its error says so.

    A value: each transport or adapter keeps its own account, shared by every request through
    it (see its ``stats()``).

    * ``ratio``: retries allowed per request (0.2).
    * ``min_per_second``: retries per second allowed however few requests there are (10).
    * ``window``: seconds over which requests and retries are counted (10.0).
    """

    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0

    def __post_init__(self) -> None:
        _seconds("ratio", self.ratio, what="a number")
        _seconds("min_per_second", self.min_per_second, what="a number")
        _seconds("window", self.window, positive=True)


@dataclass(frozen=True)
class RetryPolicy:
    """What a request may retry, how often and how fast. Immutable.

    Every option, with its unit and default:

    * ``max_attempts``: attempts per request, the first included, from 1 to
      :data:`MAX_ATTEMPTS` (10) (3).
    * ``retry_maybe_sent``: retry maybe-sent failures of idempotent requests with replayable
      bodies (True).
    * ``retry_statuses``: response statuses retried for idempotent requests, e.g.
      ``{502, 503, 504}`` (none).
    * ``idempotent_methods``: methods considered idempotent (:data:`IDEMPOTENT_METHODS`).
    * ``backoff``: seconds of the first backoff before trying a backend again; doubles per
      retry, with full jitter (0.05).
    * ``backoff_max``: the longest backoff, in seconds (2.0).
    * ``buffer_limit``: bytes; responses to retryable requests with a ``Content-Length`` up
      to this are read before they are returned, so a connection lost mid-body can still be
      retried (262144).
    * ``attempt_timeout``: seconds one attempt may take up to its response head, however
      slowly its bytes come (its body then gets the client's own timeouts); expiry is a
      maybe-sent failure, reported to health and retried under the rules above (None: only
      the client's own timeouts).
    * ``deadline``: seconds for the whole request, all attempts and waits and the response
      body together, whoever reads it; a timeout it caused is not blamed on the backend
      (None: no limit beyond each attempt's timeouts).
    * ``budget``: the :class:`RetryBudget` every retry spends from, but a retry of an attempt
      that never reached a server (``RetryBudget()``; None: retries are bounded by
      ``max_attempts`` alone).
    * ``hedge_budget``: the :class:`RetryBudget` every hedge spends from (``RetryBudget()``;
      None: hedges are bounded by ``max_attempts`` alone).
    * ``retry_after_max``: seconds; a retried response's ``Retry-After`` is waited out up to
      this long (and only if it fits the deadline); a longer one returns the response as it is
      (10.0).
    * ``hedge_after``: seconds without a response head after which an idempotent request with
      a replayable body is also sent to the next backend; the first head wins (None: no
      hedging; async transport only).

    tenacity strategies, composed with the rules above and never overriding them (see the
    README's "Failover through tenacity"): they may end the retries sooner or wait longer, but
    a request these rules do not retry (a POST that may have been sent) is never retried:

    * ``stop``: a tenacity stop strategy, joined to lbclient's with ``|`` (stops when either
      does), e.g. ``tenacity.stop_after_delay(2)``; attempt numbers count the request's first
      attempt as 1 (None).
    * ``wait``: a tenacity wait strategy; each wait is the longer of lbclient's (none before a
      backend not tried yet, backoff before a revisit, ``Retry-After``) and this one's (None).
    * ``retry``: a tenacity retry strategy, joined to lbclient's with ``&`` (retries only when
      both do), e.g. ``tenacity.retry_if_exception_type(httpx.ConnectError)`` (None).
    * ``before_sleep``: called before each retry with tenacity's ``RetryCallState``, e.g.
      ``tenacity.before_sleep_log(log, logging.INFO)`` (None).
    * ``after``: called after each attempt that is followed by a retry (None).
    """

    max_attempts: int = 3
    retry_maybe_sent: bool = True
    retry_statuses: Collection[int] = frozenset()
    idempotent_methods: Collection[str] = IDEMPOTENT_METHODS
    backoff: float = 0.05
    backoff_max: float = 2.0
    buffer_limit: int = 256 * 1024
    attempt_timeout: float | None = None
    deadline: float | None = None
    budget: RetryBudget | None = RetryBudget()
    hedge_budget: RetryBudget | None = RetryBudget()
    retry_after_max: float = 10.0
    hedge_after: float | None = None
    stop: Callable[[Any], bool] | None = None
    wait: Callable[[Any], float] | None = None
    retry: Callable[[Any], bool] | None = None
    before_sleep: Callable[[Any], object] | None = None
    after: Callable[[Any], object] | None = None

    def __post_init__(self) -> None:
        _attempts(self.max_attempts)
        for name in ("budget", "hedge_budget"):
            budget = getattr(self, name)
            if budget is not None and not isinstance(budget, RetryBudget):
                raise TypeError(f"{name} must be a RetryBudget or None, got {budget!r}")
        _seconds("retry_after_max", self.retry_after_max)
        _seconds("hedge_after", self.hedge_after, optional=True)
        if not isinstance(self.retry_maybe_sent, bool):
            raise TypeError(f"retry_maybe_sent must be a bool, got {self.retry_maybe_sent!r}")
        object.__setattr__(
            self, "retry_statuses", status_set("retry_statuses", self.retry_statuses)
        )
        for name in ("stop", "wait", "retry", "before_sleep", "after"):
            strategy = getattr(self, name)
            if strategy is not None and not callable(strategy):
                raise TypeError(
                    f"{name} must be a tenacity strategy (a callable of the retry state) or "
                    f"None, got {strategy!r}"
                )
        if isinstance(self.idempotent_methods, str):
            raise TypeError("idempotent_methods must be a collection of method names, not a str")
        object.__setattr__(
            self, "idempotent_methods", frozenset(m.upper() for m in self.idempotent_methods)
        )
        limit = self.buffer_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"buffer_limit must be an int >= 0, got {limit!r}")
        _seconds("backoff", self.backoff)
        _seconds("backoff_max", self.backoff_max)
        _seconds("attempt_timeout", self.attempt_timeout, optional=True)
        _seconds("deadline", self.deadline, optional=True)


@dataclass(frozen=True)
class RetryStats:
    """What one transport or adapter has sent, as its ``stats()`` saw it at one moment."""

    #: Requests started, since it was made.
    requests: int
    #: Attempts after a request's first (retries and hedges), since it was made.
    retries: int
    #: Hedged attempts, since it was made.
    hedges: int
    #: Requests whose response came from a hedge rather than the first attempt.
    hedge_wins: int
    #: Retries and hedges not sent because their budget was empty.
    exhaustions: int
    #: Retries the budget allows now (None without a budget).
    budget_remaining: float | None
    #: Retries spent within the budget's current window.
    budget_spent: int
    #: Retries of attempts that never reached a server (free of the budget), since it was made.
    requeues: int = 0
    #: Hedges the hedge budget allows now (None without one).
    hedge_budget_remaining: float | None = None
    #: Hedges spent within the hedge budget's current window.
    hedge_budget_spent: int = 0
    #: Load probes sent (Prequal), since it was made.
    probes_sent: int = 0
    #: Probes sent that brought no report (no connection, a timeout, a bad status or report).
    probes_failed: int = 0
    #: Probes not sent because too many were in flight (or no runner could take them).
    probes_dropped: int = 0


_OVERRIDABLE = ("max_attempts", "attempt_timeout", "deadline", "hedge_after")


@dataclass(frozen=True)
class RequestOptions:
    """Limits for one request that override the transport's or adapter's policy; None keeps
    the policy's value.

    With httpx: ``client.get(url, extensions={"lbclient": RequestOptions(deadline=0.5)})`` (a
    plain dict with the same keys works too). With requests: ``session.get(url,
    timeout=LBTimeout(1.0, deadline=0.5))`` (see :class:`lbclient.requests_adapter.LBTimeout`).

    * ``max_attempts``: attempts for this request, the first included.
    * ``attempt_timeout``: seconds one attempt may take up to its response head.
    * ``deadline``: seconds for the whole request, its response body included.
    * ``hedge_after``: seconds without a response head before a hedge (async transport only).
    """

    max_attempts: int | None = None
    attempt_timeout: float | None = None
    deadline: float | None = None
    hedge_after: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts is not None:
            _attempts(self.max_attempts)
        _seconds("attempt_timeout", self.attempt_timeout, optional=True)
        _seconds("deadline", self.deadline, optional=True)
        _seconds("hedge_after", self.hedge_after, optional=True)

    @classmethod
    def coerce(cls, value: object) -> RequestOptions:
        """``value`` if it is RequestOptions, else one made from a mapping of its fields."""
        if isinstance(value, RequestOptions):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - set(_OVERRIDABLE)
            if unknown:
                raise TypeError(
                    f"unknown lbclient request options {sorted(map(str, unknown))}; expected "
                    f"{', '.join(_OVERRIDABLE)}"
                )
            return cls(**value)
        raise TypeError(
            f"lbclient request options must be a RequestOptions or a mapping, got {value!r}"
        )

    def apply(self, policy: RetryPolicy) -> RetryPolicy:
        """``policy`` with these options in place of its own."""
        changes = {
            name: value for name in _OVERRIDABLE if (value := getattr(self, name)) is not None
        }
        return replace(policy, **changes) if changes else policy


class Attempt(NamedTuple):
    """One attempt of a request: where it went and how it ended. Immutable.

    The final error of a request whose attempts all failed carries them as ``.attempts``.
    """

    #: The backend the attempt went to.
    backend: Backend
    #: How far a failed attempt got, or None when a response came back.
    failure: Failure | None = None
    #: Text of the error, or ``"HTTP <status>"``.
    outcome: str = ""
    #: The response status, or None when there was no response.
    status: int | None = None
    #: The error the attempt raised (of the client's own classes), or None.
    error: BaseException | None = None
    #: Seconds from choosing the backend to the outcome.
    seconds: float = 0.0

    def describe(self) -> str:
        """``address (outcome)``, as the final error's message lists attempts."""
        return f"{self.backend.address} ({self.outcome})"

    def __repr__(self) -> str:
        return (
            f"Attempt({self.backend.address!r}, failure={self.failure}, "
            f"outcome={self.outcome!r}, seconds={self.seconds:.3f})"
        )
