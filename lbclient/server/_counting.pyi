"""The compiled per-request path of the server companion (lbclient/server/_counting.c)."""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

MOST_PER_SLOT: Final[int]
#: The largest windows a Counter keeps (a tracker with larger ones counts in Python).
MOST_WINDOW: Final[int]
MOST_RATE_WINDOW: Final[int]
MOST_FOUND: Final[int]
#: The SHA-256 of the source it was compiled from (hex).
SOURCE_SHA256: Final[str]

class Counter:
    """What a tracker counts per request: its requests in flight (``len``, ``append`` and
    ``pop`` as a list of one entry per request; published in the server's shared file once
    :meth:`share` is called), and each request's end, for its rates and latencies."""

    def __init__(
        self,
        clock: Callable[[], float] | None,
        origin: float,
        latency_window: int,
        rate_window: int,
        max_found: int,
        found_age: float,
    ) -> None: ...
    def __len__(self) -> int: ...
    def append(self, entry: object, /) -> None: ...
    def pop(self) -> None: ...
    def share(
        self,
        words: object,
        own: int = ...,
        check: Callable[[float], tuple[int, float, tuple[int, ...], int]] = ...,
        /,
    ) -> None: ...
    def begin(self) -> tuple[float, int]: ...
    def end(self, arrival: tuple[float, int] | float, error: bool, /) -> None: ...
    def rates(self, now: float, /) -> tuple[float, float]: ...
    def samples(self, rif: int, now: float, /) -> list[float]: ...
    def others(self, now: float, /) -> int: ...
    @property
    def shared(self) -> bool: ...

class Reply:
    """The ``send`` an app gets: keeps the status, adds the report where it was asked."""

    def __call__(self, message: MutableMapping[str, Any], /) -> Awaitable[None]: ...
    def end(self, raised: bool, /) -> None: ...
    def drop(self) -> None: ...
    @property
    def status(self) -> int: ...
    @property
    def arrival(self) -> tuple[float, int]: ...

class Gate:
    """LoadReportingASGI's per-request path up to the app."""

    def __init__(
        self,
        counter: Counter,
        tracker: object,
        probe_path: str | None,
        requested: Callable[[bytes], str | None],
        lines: dict[str, Any] | None,
        refresh: float,
    ) -> None: ...
    def enter(
        self, scope: MutableMapping[str, Any], send: Callable[..., Awaitable[None]], /
    ) -> Reply | None: ...

class Call:
    """One call of a :class:`Middleware`: awaited, stepped, thrown into and closed as the
    coroutine of an ``async def`` would be."""

    def __await__(self) -> Call: ...
    def __iter__(self) -> Call: ...
    def __next__(self) -> Any: ...
    def send(self, value: object, /) -> Any: ...
    def throw(self, kind: object, value: object = ..., traceback: object = ..., /) -> Any: ...
    def close(self) -> None: ...
    @property
    def cr_await(self) -> Any: ...
    @property
    def cr_running(self) -> bool: ...

class Middleware:
    """LoadReportingASGI's base where compiled: calling it makes a :class:`Call`."""

    app: Callable[..., Awaitable[None]]
    _gate: Gate | None
    def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[..., Awaitable[Any]],
        send: Callable[..., Awaitable[None]],
    ) -> Call: ...
