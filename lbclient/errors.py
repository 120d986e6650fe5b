"""lbclient's exceptions.

* :class:`NoBackendAvailable`: no backend could be chosen for a request (the set is empty, or
  every backend is disabled). It is an ``httpx.ConnectError`` and a
  ``requests.ConnectionError``, so code that already catches connection failures keeps working.
* :class:`KeyFunctionError`: the user's key function raised, or returned something other than
  ``bytes``, ``str`` or ``None``. Nothing was sent.

When every attempt of a request failed, the adapters raise an exception of the last failure's
own class (``httpx.ConnectError``, ``httpx.ReadTimeout``, ``requests.ConnectionError``...) whose
message names every backend tried and why.
"""

from __future__ import annotations

from typing import Any

import httpx
import requests

__all__ = ["KeyFunctionError", "LBClientError", "NoBackendAvailable"]


class LBClientError(Exception):
    """Base class of errors raised by lbclient itself (not by the network)."""


class KeyFunctionError(LBClientError, TypeError):
    """The key function raised or returned a value of the wrong type; nothing was sent."""


class NoBackendAvailable(httpx.ConnectError, requests.ConnectionError):  # type: ignore[misc]
    """No backend could be chosen for the request; nothing was sent."""

    def __init__(self, message: str, *, request: Any = None) -> None:
        httpx.ConnectError.__init__(self, message, request=request)
        self.response = None
