"""The compiled reader of a usual TEXT load report (lbclient/_textreport.c)."""

from collections.abc import Mapping
from typing import Final, TypeVar

_Report = TypeVar("_Report", bound=tuple[object, ...])

MAX_LENGTH: Final[int]
MAX_NAMED: Final[int]
MAX_VALUE: Final[float]
#: The SHA-256 of the source it was compiled from (hex).
SOURCE_SHA256: Final[str]

def read_text(
    header: object, at: float, report_type: type[_Report], empty: Mapping[str, float], /
) -> _Report | None: ...
