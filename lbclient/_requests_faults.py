"""How requests and urllib3 errors are read, for :class:`~lbclient.LBAdapter`.

What lives here: :func:`classify`, which sorts an error requests raised for an attempt into
never-sent, maybe-sent and local failures (a TLS handshake that timed out is reported by
urllib3 as a read timeout, though no request byte was sent, and a TLS error is the same
``SSLError`` before the request and after it: the traceback tells), and
:func:`requests_error`, the error requests itself raises for a urllib3 error met while reading a
body. What may not: a retry or health rule (the plan's), or sending anything.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator

import requests
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    DecodeError,
    EmptyPoolError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.exceptions import HTTPError as URLLib3HTTPError
from urllib3.exceptions import SSLError as URLLib3SSLError

from lbclient._plan import Fault
from lbclient.retry import Failure

__all__ = ["classify", "requests_error"]

_HANDSHAKE_FRAMES = frozenset(
    {"_ssl_wrap_socket_and_match_hostname", "ssl_wrap_socket", "do_handshake", "_new_conn"}
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        if current.args and isinstance(current.args[0], BaseException):
            yield from _chain(current.args[0])
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            yield from _chain(reason)
        current = current.__cause__ or current.__context__


def _during_handshake(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while connecting: urllib3 reports a TLS handshake timeout as
    a read timeout, although no request byte was sent, and a TLS error as the same
    ``SSLError`` whether the handshake failed or a record of the response was broken."""
    for error in _chain(exc):
        frames = traceback.extract_tb(error.__traceback__)
        if any(frame.name in _HANDSHAKE_FRAMES for frame in frames):
            return True
    return False


def _timed_out(error: ProtocolError) -> bool:
    return any(isinstance(arg, TimeoutError) for arg in error.args)


def classify(exc: BaseException) -> Fault | None:
    """How far a request got when requests or urllib3 raised ``exc``; None for an error that
    is not a failure of the attempt."""
    if not isinstance(exc, requests.RequestException):
        return None
    errors = list(_chain(exc))
    if isinstance(exc, requests.exceptions.SSLError) or any(
        isinstance(e, URLLib3SSLError) for e in errors
    ):
        # A failed handshake sent nothing; a TLS record broken after it may follow the request.
        sent = Failure.NEVER_SENT if _during_handshake(exc) else Failure.MAYBE_SENT
        return Fault(sent, barred=True)
    if any(isinstance(e, EmptyPoolError) for e in errors):
        # This backend's own pool is full: nothing was sent, another backend may do; the
        # limit is the client's own, not the backend's failure.
        return Fault(Failure.NEVER_SENT, timed_out=True, barred=True, ours=True)
    if any(isinstance(e, NewConnectionError) for e in errors):
        return Fault(Failure.NEVER_SENT)
    if any(isinstance(e, ConnectTimeoutError) for e in errors):
        return Fault(Failure.NEVER_SENT, timed_out=True, barred=True)
    if any(isinstance(e, ClosedPoolError) for e in errors):
        return Fault(Failure.NEVER_SENT)
    if isinstance(exc, requests.exceptions.ReadTimeout) or any(
        isinstance(e, ReadTimeoutError) for e in errors
    ):
        sent = Failure.NEVER_SENT if _during_handshake(exc) else Failure.MAYBE_SENT
        return Fault(sent, timed_out=True, barred=True)
    if any(isinstance(e, ProtocolError) and _timed_out(e) for e in errors):
        # A write that timed out: urllib3 reports it as "Connection aborted." with the timeout.
        return Fault(Failure.MAYBE_SENT, timed_out=True, barred=True)
    if isinstance(
        exc,
        (
            requests.exceptions.InvalidURL,
            requests.exceptions.InvalidHeader,
            requests.exceptions.InvalidSchema,
        ),
    ):
        return Fault(Failure.LOCAL)
    if _during_handshake(exc):  # a connection reset in the TLS handshake, say: nothing sent
        return Fault(Failure.NEVER_SENT)
    return Fault(Failure.MAYBE_SENT)


def requests_error(exc: URLLib3HTTPError) -> requests.RequestException:
    """What requests itself raises for a urllib3 error met while reading a body."""
    if isinstance(exc, DecodeError):
        return requests.exceptions.ContentDecodingError(exc)
    if isinstance(exc, ProtocolError):
        return requests.exceptions.ChunkedEncodingError(exc)
    if isinstance(exc, URLLib3SSLError):
        return requests.exceptions.SSLError(exc)
    return requests.ConnectionError(exc)
