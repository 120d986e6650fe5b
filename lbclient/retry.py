"""What a request may retry: :class:`RetryPolicy`, the kinds of :class:`Failure`, and the record
of each :class:`Attempt`. Plain values; the attempt loop that applies them is private.

The rules:

* ``NEVER_SENT`` failures (connection refused, connect timeout, TLS handshake, DNS) are retried
  on the next backend for every method: the request never left the client.
* ``MAYBE_SENT`` failures (read or write errors and timeouts, server disconnected, protocol
  errors) are retried only for idempotent methods whose body can be sent again, and only when
  ``retry_maybe_sent`` is on. A POST that may have reached a server is never sent twice.
* ``LOCAL`` failures (a full local connection pool, a malformed request) say nothing about the
  backend: not reported, not retried.
* A response whose status is in ``retry_statuses`` is retried like a maybe-sent failure.
* No wait before an attempt on a backend not tried yet; jittered exponential backoff before
  trying a backend again. All attempts together stay within the request's own timeout.

Plain values only: no I/O, no HTTP client, no tenacity (those are the attempt loop's).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Final

from lbclient.backend import Backend

__all__ = ["IDEMPOTENT_METHODS", "Attempt", "Failure", "RetryPolicy"]

#: Methods that may be sent twice without changing the outcome (RFC 9110 section 9.2.2).
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class Failure(enum.Enum):
    """How far a failed attempt got, which decides whether it may be retried."""

    #: The request never left the client: safe to retry for every method.
    NEVER_SENT = "never sent"
    #: The request may have reached the server: retry only idempotent, replayable requests.
    MAYBE_SENT = "maybe sent"
    #: A local problem (pool exhausted, bad request): not the backend's fault, not retried.
    LOCAL = "local"


def _status_set(name: str, value: Iterable[int]) -> frozenset[int]:
    try:
        statuses = frozenset(value)
    except TypeError:
        raise TypeError(f"{name} must be a collection of status codes, got {value!r}") from None
    for status in statuses:
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError(f"{name} must hold HTTP status codes 100..599, got {status!r}")
    return statuses


@dataclass(frozen=True)
class RetryPolicy:
    """What a request may retry, how often and how fast. Immutable.

    Every option, with its unit and default:

    * ``max_attempts``: attempts per request, the first included (3).
    * ``retry_maybe_sent``: retry maybe-sent failures of idempotent requests with replayable
      bodies (True).
    * ``retry_statuses``: response statuses retried for idempotent requests, e.g.
      ``{502, 503, 504}`` (none).
    * ``failure_statuses``: response statuses reported to passive health as server errors
      (500..599).
    * ``idempotent_methods``: methods considered idempotent (:data:`IDEMPOTENT_METHODS`).
    * ``backoff``: seconds of the first backoff before trying a backend again; doubles per
      retry, with full jitter (0.05).
    * ``backoff_max``: the longest backoff, in seconds (2.0).
    * ``buffer_limit``: bytes; responses to retryable requests with a ``Content-Length`` up
      to this are read before they are returned, so a connection lost mid-body can still be
      retried (262144).
    """

    max_attempts: int = 3
    retry_maybe_sent: bool = True
    retry_statuses: Collection[int] = frozenset()
    failure_statuses: Collection[int] = frozenset(range(500, 600))
    idempotent_methods: Collection[str] = IDEMPOTENT_METHODS
    backoff: float = 0.05
    backoff_max: float = 2.0
    buffer_limit: int = 256 * 1024

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int):
            raise TypeError(f"max_attempts must be an int, got {attempts!r}")
        if attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {attempts}")
        if not isinstance(self.retry_maybe_sent, bool):
            raise TypeError(f"retry_maybe_sent must be a bool, got {self.retry_maybe_sent!r}")
        object.__setattr__(
            self, "retry_statuses", _status_set("retry_statuses", self.retry_statuses)
        )
        object.__setattr__(
            self, "failure_statuses", _status_set("failure_statuses", self.failure_statuses)
        )
        if isinstance(self.idempotent_methods, str):
            raise TypeError("idempotent_methods must be a collection of method names, not a str")
        object.__setattr__(
            self, "idempotent_methods", frozenset(m.upper() for m in self.idempotent_methods)
        )
        limit = self.buffer_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"buffer_limit must be an int >= 0, got {limit!r}")
        for name in ("backoff", "backoff_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number of seconds, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class Attempt:
    """One attempt of a request: where it went and how it ended.

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
    error: BaseException | None = field(default=None, repr=False)
    #: Seconds from choosing the backend to the outcome.
    seconds: float = 0.0

    def describe(self) -> str:
        """``address (outcome)``, as the final error's message lists attempts."""
        return f"{self.backend.address} ({self.outcome})"
