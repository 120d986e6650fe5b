"""How httpcore and httpx errors are read, for the httpx transports.

What lives here: :func:`httpx_error`, the httpx exception for an httpcore one (as httpx itself
maps them), and :func:`fault`, which sorts an error the transport raised for an attempt into
never-sent, maybe-sent and local failures, or none (the transport's closed error: no attempt
was made). What may not: a retry or health rule (the plan's), or sending anything.
"""

from __future__ import annotations

import ssl
from typing import Final

import httpcore
import httpx

from lbclient._plan import Fault
from lbclient.errors import TransportClosed
from lbclient.retry import Failure

__all__ = ["HTTPCORE_ERRORS", "fault", "httpx_error"]

#: What httpcore raises for a failure of the exchange (anything else propagates as it is).
HTTPCORE_ERRORS: Final = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.ProxyError,
    httpcore.UnsupportedProtocol,
)


def httpx_error(exc: Exception) -> httpx.TransportError:
    """The httpx exception for an httpcore one (same class name, as httpx itself maps them)."""
    for cls in type(exc).__mro__:
        mapped = getattr(httpx, cls.__name__, None)
        if isinstance(mapped, type) and issubclass(mapped, httpx.TransportError):
            return mapped(str(exc))
    return httpx.TransportError(str(exc))


def _tls_failure(error: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def fault(error: Exception) -> Fault | None:
    """How far a request got when the transport raised ``error`` (an httpx error); None when
    the attempt was never made (the transport was closed) or ``error`` is not httpx's."""
    if not isinstance(error, httpx.TransportError) or isinstance(error, TransportClosed):
        return None
    if isinstance(error, httpx.PoolTimeout):
        # This backend's pool is full: nothing was sent, another backend may do; the limit
        # is the client's own, not the backend's failure.
        return Fault(Failure.NEVER_SENT, timed_out=True, barred=True, ours=True)
    if isinstance(error, httpx.ConnectTimeout):
        return Fault(Failure.NEVER_SENT, timed_out=True, barred=True)
    if isinstance(error, httpx.ConnectError):
        return Fault(Failure.NEVER_SENT, barred=_tls_failure(error))
    if isinstance(error, httpx.TimeoutException):
        return Fault(Failure.MAYBE_SENT, timed_out=True, barred=True)
    if isinstance(error, (httpx.LocalProtocolError, httpx.UnsupportedProtocol)):
        return Fault(Failure.LOCAL)
    return Fault(Failure.MAYBE_SENT)
