"""The load report a server sends, and its forms on the wire: the ORCA ``endpoint-load-metrics``
header in TEXT and JSON (as vLLM and Triton write it) and Prequal's probe headers.

What lives here: :class:`ServerReport` (a plain value), the header names, which format a request
asks for, how a number is written, a service's metric read so that it never breaks a report
(:class:`Reading`). What may not: counting, clocks, I/O, any HTTP client or
framework.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final, NamedTuple

from lbclient.reports import (  # the names and bounds the clients read, defined once
    FORMAT_HEADER,
    MAX_LENGTH,
    MAX_NAMED,
    MAX_VALUE,
    PREQUAL_LATENCY_HEADER,
    PREQUAL_RIF_HEADER,
    REPORT_HEADER,
)

__all__ = [
    "FORMATS",
    "FORMAT_HEADER",
    "PREQUAL_LATENCY_HEADER",
    "PREQUAL_RIF_HEADER",
    "REPORT_HEADER",
    "Metric",
    "Reading",
    "ServerReport",
    "check_metric_name",
    "check_named",
    "number",
    "reading",
    "requested_format",
    "usable",
]

logger = logging.getLogger("lbclient.server")

#: A metric the service reports: called when a report is made, returns a number >= 0.
Metric = Callable[[], float]

#: The formats this package writes (the binary form is not offered).
FORMATS: Final = ("TEXT", "JSON")

#: A named metric's name: letters, digits, ``_``, ``.`` and ``-`` (nothing the TEXT form or a
#: JSON string would need to escape).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")


def requested_format(value: str | bytes | None) -> str | None:
    """The format a request's ``endpoint-load-metrics-format`` value asks for, ``"TEXT"`` or
    ``"JSON"``; None for no value or one this package does not write (no report is sent then)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    asked = value.strip().upper()
    return asked if asked in FORMATS else None


def check_metric_name(name: str) -> str:
    """``name`` if it may name a metric (see ``_NAME``); ValueError naming it otherwise."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"a metric name is letters, digits, '_', '.' and '-' (not starting with '.' or '-'),"
            f" got {name!r}"
        )
    return name


def number(value: float) -> str:
    """``value`` (finite, not negative) as the report writes it, in both TEXT and JSON: six
    significant digits, without trailing zeros (``120``, ``0.3``, ``4.2``, ``0.666667``), in
    exponent form below 0.0001 and from a million on (``1e-05``, ``1.23457e+06``), as C's
    ``%.6g`` writes it. ``float()`` and JSON read it."""
    return f"{value:.6g}"


class ServerReport(NamedTuple):
    """One server process's load, as it stands when the report is made.

    ``rif`` and ``latency_ms`` are written as the named metrics ``named_metrics.rif`` and
    ``named_metrics.latency_ms`` (the names lbclient's clients read); ``named_metrics`` holds the
    others. A utilization that is None is left out.
    """

    rif: int  # requests in flight
    latency_ms: float  # the latency estimate for ``rif`` in flight (per RIF); 0 before any
    rps_fractional: float  # requests finished per second, over the tracker's rate window
    eps: float  # of those, errors per second
    cpu_utilization: float | None = None
    application_utilization: float | None = None
    named_metrics: Mapping[str, float] = MappingProxyType({})

    @property
    def latency_us(self) -> int:
        """The latency estimate in whole microseconds (Prequal's ``x-prequal-latency-us``)."""
        return round(self.latency_ms * 1000)

    def _utilizations(self, pattern: str) -> str:
        """The utilizations given, each written as ``pattern`` % (name, value) and a comma."""
        head = ""
        if self.cpu_utilization is not None:
            head = pattern % ("cpu_utilization", number(self.cpu_utilization))
        if self.application_utilization is not None:
            head += pattern % ("application_utilization", number(self.application_utilization))
        return head

    def text(self) -> str:
        """``TEXT cpu_utilization=0.3, rps_fractional=120, eps=0.5, named_metrics.rif=3, ...``"""
        head = self._utilizations("%s=%s, ")
        text = (
            f"TEXT {head}rps_fractional={self.rps_fractional:.6g}, "
            f"eps={self.eps:.6g}, named_metrics.rif={self.rif}, "
            f"named_metrics.latency_ms={self.latency_ms:.6g}"
        )
        for name, value in self.named_metrics.items():
            text += f", named_metrics.{name}={value:.6g}"
        return text

    def json(self) -> str:
        """``JSON {"cpu_utilization": 0.3, ..., "named_metrics": {"rif": 3, ...}}``"""
        head = self._utilizations('"%s": %s, ')
        text = (
            f'JSON {{{head}"rps_fractional": {self.rps_fractional:.6g}, '
            f'"eps": {self.eps:.6g}, "named_metrics": {{"rif": {self.rif}, '
            f'"latency_ms": {self.latency_ms:.6g}'
        )
        for name, value in self.named_metrics.items():
            text += f', "{name}": {value:.6g}'
        return text + "}}"

    def render(self, form: str) -> str:
        """The header value in ``form``, ``"TEXT"`` or ``"JSON"`` (as :func:`requested_format`
        returns it)."""
        if form == "JSON":
            return self.json()
        if form == "TEXT":
            return self.text()
        raise ValueError(f"the report is written as TEXT or JSON, not {form!r}")


def usable(value: object) -> bool:
    """Whether a metric's ``value`` may go into a report: a real number, finite, not negative,
    and at most :data:`~lbclient.reports.MAX_VALUE` (a client refuses a report with more)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= MAX_VALUE
    )


class Reading:
    """A metric callable that never breaks a report: a value that raises, is not a finite
    number, or is negative reads as None, and is logged once per metric."""

    __slots__ = ("_function", "_logged", "name")

    def __init__(self, name: str, function: Metric) -> None:
        if not callable(function):
            raise TypeError(f"metric {name!r} must be a callable returning a float")
        self.name = name
        self._function = function
        self._logged = False

    def read(self) -> float | None:
        try:
            value = self._function()
        except Exception as error:
            self._complain("raised %r", error)
            return None
        if value.__class__ is float and 0.0 <= value <= MAX_VALUE:  # the usual case, quickly
            return value
        if not usable(value):
            self._complain(f"returned %r (not a number from 0 to {MAX_VALUE:g})", value)
            return None
        return float(value)

    def _complain(self, what: str, detail: object) -> None:
        if not self._logged:
            self._logged = True
            logger.warning(
                "load metric %s " + what + "; left out of the report (logged once)",
                self.name,
                detail,
            )


def reading(name: str, function: Metric | None) -> Reading | None:
    return None if function is None else Reading(name, function)


#: The longest a metric's value is written (``%.6g`` of a number from 0 to MAX_VALUE: down to
#: ``1.23457e-100``), and what a TEXT report holds besides its named metrics, at most.
_VALUE_LENGTH: Final = 12
_FIXED_LENGTH: Final = (
    len(
        "TEXT cpu_utilization=, application_utilization=, rps_fractional=, eps=, "
        "named_metrics.rif=, named_metrics.latency_ms="
    )
    + 6 * _VALUE_LENGTH
)


def check_named(names: list[str]) -> None:
    """A ValueError where reports with the named metrics ``names`` (besides the tracker's own
    ``rif`` and ``latency_ms``) could hold more than a client reads: more than
    :data:`~lbclient.reports.MAX_NAMED` named metrics, or more than
    :data:`~lbclient.reports.MAX_LENGTH` characters."""
    if len(names) + 2 > MAX_NAMED:
        raise ValueError(
            f"{len(names)} named metrics: a report holds at most {MAX_NAMED} (rif and "
            f"latency_ms among them), so at most {MAX_NAMED - 2} of your own"
        )
    longest = _FIXED_LENGTH + sum(
        len(", named_metrics.=") + len(name) + _VALUE_LENGTH for name in names
    )
    if longest > MAX_LENGTH:
        raise ValueError(
            f"named metrics whose names take {sum(map(len, names))} characters: a report could "
            f"be {longest} characters long, and clients read at most {MAX_LENGTH}"
        )
