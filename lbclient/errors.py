"""lbclient's exceptions. This module imports no HTTP client.

The tree of what lbclient raises itself::

    LBClientError                      root of every error lbclient raises itself
     +-- NoBackendAvailable            no backend could be chosen; nothing was sent
     |    +-- httpx_transport.NoBackendAvailableError    also an httpx.ConnectError
     |    +-- requests_adapter.NoBackendAvailableError   also a requests.ConnectionError
     +-- KeyFunctionError              the key function raised or returned a bad value
     |                                 (also a TypeError); nothing was sent
     +-- CheckFailed                   an active health check did not pass (lbclient.checks)
     +-- TransportClosed               the transport was closed before the request (or, with
          |                            no failure before, its next attempt) was sent
          +-- httpx_transport.TransportClosedError       also an httpx.TransportError and a
                                                         RuntimeError

The two ``NoBackendAvailableError`` classes live with their adapter, so that
``except lbclient.NoBackendAvailable``, ``except httpx.ConnectError`` and
``except requests.ConnectionError`` all catch what the adapters raise.

When every attempt of a request failed, the adapters raise what the client itself would have
raised for the last failure (``httpx.ConnectError``, ``httpx.ReadTimeout``,
``requests.ConnectionError``...). Its message names every backend tried and why, and its
``attempts`` attribute holds them as data: a tuple of :class:`lbclient.retry.Attempt`
(backend, failure kind, error, seconds), as urllib3's ``Retry.history`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lbclient.retry import Attempt

__all__ = [
    "CheckFailed",
    "KeyFunctionError",
    "LBClientError",
    "NoBackendAvailable",
    "TransportClosed",
]


class LBClientError(Exception):
    """Base class of the errors lbclient raises itself (not those of the network)."""


class NoBackendAvailable(LBClientError):
    """No backend could be chosen for the request (the set is empty, every backend is disabled,
    or none is healthy and panic mode is off); nothing was sent.

    The adapters raise a subclass that is also their client's connection error.
    """

    #: The attempts made before no backend was left (empty when none was made).
    attempts: tuple[Attempt, ...] = ()


class KeyFunctionError(LBClientError, TypeError):
    """The key function raised or returned a value of the wrong type; nothing was sent."""


class CheckFailed(LBClientError):
    """An active health check did not pass; the message says why."""


class TransportClosed(LBClientError):
    """The transport was closed (``close()``, ``aclose()``): nothing more is sent. Raised for
    a request that begins after, or waits for a connection when, it is closed. A request that
    had already failed an attempt ends with that failure instead (see the loop).

    The httpx transports raise a subclass that is also an ``httpx.TransportError`` (with
    ``.request``) and a ``RuntimeError``.
    """
