"""How a response's httpcore body reaches a caller of the httpx transports.

What lives here: :class:`SyncBody` and :class:`AsyncBody`, the streams of an ``httpx.Response``
whose body the caller reads, which report the body's end (see
:class:`~lbclient._wire.ReportingBody`), read it within the attempt's limits (the deadline's
end, if any) and give httpcore's errors as httpx's; the async one gives the attempt's slot back
once closed. What may not: a retry or health rule, sending anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import httpcore
import httpx

from lbclient._httpx_faults import HTTPCORE_ERRORS, httpx_error
from lbclient._pools import shut
from lbclient._wire import ReportingBody, abounded, bounded

__all__ = ["AsyncBody", "SyncBody"]


class SyncBody(ReportingBody, httpx.SyncByteStream):
    """The body as the caller reads it, reporting its end (see :class:`ReportingBody`)."""

    def __init__(self, inner: Any) -> None:
        ReportingBody.__init__(self)
        self._inner: Iterable[bytes] = inner

    def __iter__(self) -> Iterator[bytes]:
        self._begin()
        limits = self.limits
        try:
            if limits is None or limits.until is None:
                yield from self._inner
            else:  # each read bounded by the deadline's end
                yield from bounded(self._inner, limits)
        except HTTPCORE_ERRORS as exc:
            timed_out = isinstance(exc, httpcore.TimeoutException)
            raise self._fail(httpx_error(exc), timed_out) from exc
        self._end(True)

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        try:
            if close is not None:
                close()
        finally:
            self._close()


class AsyncBody(ReportingBody, httpx.AsyncByteStream):
    """The async twin of :class:`SyncBody`; once closed, ``release`` gives the attempt's
    slot back (its connection then idle, or closed)."""

    def __init__(
        self, inner: Any, release: Callable[[], httpcore.AsyncConnectionPool | None]
    ) -> None:
        ReportingBody.__init__(self)
        self._inner = inner
        self._release: Callable[[], httpcore.AsyncConnectionPool | None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self._begin()
        limits = self.limits
        chunks = (
            self._inner if limits is None or limits.until is None else abounded(self._inner, limits)
        )
        try:
            async for chunk in chunks:
                yield chunk
        except HTTPCORE_ERRORS as exc:
            timed_out = isinstance(exc, httpcore.TimeoutException)
            raise self._fail(httpx_error(exc), timed_out) from exc
        self._end(True)

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        try:
            if aclose is not None:
                await aclose()
        finally:
            self._close()
            release, self._release = self._release, None
            closing = None if release is None else release()
            if closing is not None:
                await shut(closing)
