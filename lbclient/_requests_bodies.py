"""How a response's urllib3 body reaches a caller of :class:`~lbclient.LBAdapter`.

What lives here: :class:`ReportingRaw`, the ``response.raw`` of a body read by the caller,
which reports the body's end (a file object, as the urllib3 response it wraps), and
:func:`buffered`, the ``response.raw`` of a body the adapter read before returning (to retry a
connection lost mid-body), which gives the same bytes through every interface. What may not:
a retry or health rule, sending anything.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from urllib3 import HTTPResponse
from urllib3.exceptions import ReadTimeoutError

from lbclient._wire import ReportingBody

__all__ = ["ReportingRaw", "buffered"]


class ReportingRaw(ReportingBody):
    """Wraps a response's urllib3 body, reporting its end (see :class:`ReportingBody`)."""

    def __init__(self, raw: Any) -> None:
        ReportingBody.__init__(self)
        self._raw = raw

    def stream(
        self, amt: int | None = 2**16, decode_content: bool | None = None
    ) -> Iterator[bytes]:
        self._begin()
        try:
            yield from self._raw.stream(amt, decode_content=decode_content)
        except Exception as exc:
            raise self._fail(exc, isinstance(exc, ReadTimeoutError)) from None
        self._end(True)

    def read(self, amt: int | None = None, *args: Any, **kwargs: Any) -> Any:
        self._begin()
        try:
            data = self._raw.read(amt, *args, **kwargs)
        except Exception as exc:
            raise self._fail(exc, isinstance(exc, ReadTimeoutError)) from None
        if amt is None or not data:
            self._end(True)
        return data

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            self._close()

    def release_conn(self) -> None:
        try:
            self._raw.release_conn()
        finally:
            self._close()

    def __iter__(self) -> Iterator[bytes]:
        """Lines, as urllib3's response gives them (decoded, each with its newline)."""
        pending: list[bytes] = []  # a line's start, in pieces (no newline in any)
        for chunk in self.stream(decode_content=True):
            if b"\n" not in chunk:
                pending.append(chunk)
                continue
            lines = chunk.split(b"\n")
            pending.append(lines[0])
            yield b"".join(pending) + b"\n"
            for line in lines[1:-1]:
                yield line + b"\n"
            pending = [lines[-1]] if lines[-1] else []
        if pending:
            yield b"".join(pending)

    def __enter__(self) -> ReportingRaw:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


io.IOBase.register(ReportingRaw)  # a file object, as the urllib3 response it wraps


def buffered(raw: HTTPResponse, data: bytes) -> HTTPResponse:
    """A urllib3 response that gives ``data`` (the body as it came, undecoded) through every
    interface, as ``raw`` would have: ``read()``, ``stream()``, ``requests``' ``content``."""
    return HTTPResponse(
        body=_Body(data),
        headers=raw.headers,
        status=raw.status,
        version=raw.version,
        version_string=getattr(raw, "version_string", "HTTP/?"),
        reason=raw.reason,
        preload_content=False,
        decode_content=raw.decode_content,
        request_method=getattr(raw, "_request_method", None),
        request_url=raw.geturl(),
        # requests reads Set-Cookie (and digest auth its challenge) from the original.
        original_response=getattr(raw, "_original_response", None),
    )


class _Body(io.BytesIO):
    """A buffered body, closed once read to its end as a socket's response is: urllib3's
    ``stream(None)`` reads until its body says it is closed."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self._length = len(data)
        self._read = False  # an empty body, too, is closed only once read

    def read(self, size: int | None = -1, /) -> bytes:
        self._read = True
        return super().read(size)

    def read1(self, size: int | None = -1, /) -> bytes:
        self._read = True
        return super().read1(size)

    def readinto(self, buffer: Any, /) -> int:
        self._read = True
        return super().readinto(buffer)

    def isclosed(self) -> bool:
        return self.closed or (self._read and self.tell() >= self._length)
