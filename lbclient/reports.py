"""Load the servers report: ORCA's ``endpoint-load-metrics`` header and Prequal's headers, read
into a :class:`LoadReport`.

A client asks for a report with the request header ``endpoint-load-metrics-format: TEXT`` (or
``JSON``); a server that supports it answers with ``endpoint-load-metrics``:

* ``TEXT cpu_utilization=0.3, rps_fractional=120, eps=0.5, named_metrics.kv_cache_usage_perc=0.4``
* ``JSON {"cpu_utilization": 0.3, "named_metrics": {"kv_cache_usage_perc": 0.4}}``

The fields are ORCA's: ``cpu_utilization``, ``mem_utilization``, ``application_utilization``,
``rps_fractional`` (requests per second), ``eps`` (errors per second) and ``named_metrics`` (a
name to a number). Two named metrics have a meaning here: ``named_metrics.rif``, the server's
requests in flight, and ``named_metrics.latency_ms``, its latency estimate in milliseconds (what
:mod:`lbclient.server` reports, and Prequal reads). A server may send Prequal's headers instead:
``x-prequal-rif`` and ``x-prequal-latency-us`` (microseconds).

A report is all or nothing. :func:`parse` raises :class:`BadReport` (its ``reason`` short and
fixed, for counting) for a header that is not one of the two formats; a name outside ORCA's
fields (``unknown field``, as Envoy's parser refuses them); a name given twice; a value that is
not a number (ASCII, as ``float()`` reads it), is NaN or infinite, negative, or above
:data:`MAX_VALUE`; more than :data:`MAX_NAMED` named metrics; or a header longer than
:data:`MAX_LENGTH` characters (read no further). The caller ignores such a report and counts
it; it is never the caller's error.

A TEXT report of the usual shape is read in one quick pass, by a compiled reader where the wheel
was built with one (``lbclient._textreport``, optional: see :data:`COMPILED`), else in Python;
anything else, and everything the quick pass declines, goes to the careful reading, which gives
every refusal its reason. All of them give the same report for the same header.

What may not: I/O, a clock (the arrival time is given), anything of the clients. Part of the
core.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, NamedTuple

__all__ = [
    "COMPILED",
    "FIELDS",
    "FORMAT_HEADER",
    "MAX_LENGTH",
    "MAX_NAMED",
    "MAX_VALUE",
    "PREQUAL_LATENCY_HEADER",
    "PREQUAL_RIF_HEADER",
    "REPORT_HEADER",
    "BadReport",
    "LoadReport",
    "parse",
    "parse_prequal",
    "python_parse",
]

#: The request header that asks for a report, and the format asked (``TEXT`` or ``JSON``).
FORMAT_HEADER: Final = "endpoint-load-metrics-format"
#: The response header that carries it.
REPORT_HEADER: Final = "endpoint-load-metrics"
#: Prequal's headers: requests in flight, and a latency estimate in microseconds.
PREQUAL_RIF_HEADER: Final = "x-prequal-rif"
PREQUAL_LATENCY_HEADER: Final = "x-prequal-latency-us"

#: ORCA's fields besides ``named_metrics``.
FIELDS: Final = (
    "cpu_utilization",
    "mem_utilization",
    "application_utilization",
    "rps_fractional",
    "eps",
)
#: The longest header read (characters); a longer one is refused unread.
MAX_LENGTH: Final = 8192
#: The most named metrics a report may carry.
MAX_NAMED: Final = 64
#: The largest value a field may have (no rate, utilization or count of a real server is near).
MAX_VALUE: Final = 1e9

_NAMED_PREFIX: Final = "named_metrics."
_EMPTY: Mapping[str, float] = MappingProxyType({})

_read_text: (
    Callable[[object, float, type[LoadReport], Mapping[str, float]], LoadReport | None] | None
)
try:  # the optional compiled reader (hatch_build.py builds it where a C compiler is)
    from lbclient._textreport import read_text as _read_text
except ImportError:  # pragma: no cover - a build without a compiler
    _read_text = None

#: Whether usual TEXT reports are read by the compiled reader (else by the Python one; the
#: reports are the same, the compiled one about three times as quick).
COMPILED: Final = _read_text is not None


class BadReport(ValueError):
    """A report that is not used; ``reason`` says why in a few fixed words (for counting),
    the message adds the value at fault (shortened)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class LoadReport(NamedTuple):
    """One report a backend sent, as read (immutable). Fields the server left out are None."""

    #: The clock value at which the response carrying it arrived.
    at: float
    cpu_utilization: float | None = None
    mem_utilization: float | None = None
    application_utilization: float | None = None
    #: Requests per second the server serves.
    rps_fractional: float | None = None
    #: Errors per second.
    eps: float | None = None
    #: Named metrics, by name without the ``named_metrics.`` prefix.
    named_metrics: Mapping[str, float] = _EMPTY
    #: Requests in flight at the server (``named_metrics.rif`` or ``x-prequal-rif``).
    rif: float | None = None
    #: The server's latency estimate in seconds (``named_metrics.latency_ms`` or
    #: ``x-prequal-latency-us``).
    latency: float | None = None

    def get(self, name: str) -> float | None:
        """A field by its ORCA name (``cpu_utilization``, ``named_metrics.<key>``, ...)."""
        if name.startswith(_NAMED_PREFIX):
            return self.named_metrics.get(name[len(_NAMED_PREFIX) :])
        if name in FIELDS:
            value: float | None = getattr(self, name)
            return value
        return None


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _refused(name: str, number: float) -> BadReport:
    """Why ``number`` (a float outside ``0 <= number <= MAX_VALUE``) is refused."""
    if not math.isfinite(number):
        return BadReport("not finite", f"{name}={number!r}")
    if number < 0.0:
        return BadReport("negative", f"{name}={number!r}")
    return BadReport("too large", f"{name}={number!r}")


_KNOWN: Final = frozenset(FIELDS)
_CPU, _MEM, _APP, _RPS, _EPS = FIELDS
_new = tuple.__new__
_PREFIX_LENGTH: Final = len(_NAMED_PREFIX)


def _number(name: str, value: str) -> float:
    """``value`` (a field's text, ASCII) as a checked float."""
    try:
        number = float(value)
    except ValueError:
        raise BadReport("not a number", f"{name}={_short(value.strip())}") from None
    if not 0.0 <= number <= MAX_VALUE:  # NaN fails this too
        raise _refused(name, number)
    return number


def _text(body: str, at: float) -> LoadReport:
    # One pass, the fields sorted as they come: a report is read for every response.
    fields: dict[str, float] = {}
    named: dict[str, float] | None = None
    for item in body.split(","):
        name, equals, value = item.partition("=")
        if not equals:
            raise BadReport("malformed", _short(item.strip()) if item.strip() else "an empty item")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            raise BadReport("not a number", f"{name}={_short(value.strip())}") from None
        if not 0.0 <= number <= MAX_VALUE:  # NaN fails this too
            raise _refused(name, number)
        if name in _KNOWN:
            if name in fields:
                raise BadReport("duplicate field", _short(name))
            fields[name] = number
        elif name[:_PREFIX_LENGTH] == _NAMED_PREFIX and len(name) > _PREFIX_LENGTH:
            if named is None:
                named = {}
            key = name[_PREFIX_LENGTH:]
            if key in named:
                raise BadReport("duplicate field", _short(name))
            named[key] = number
        else:
            raise BadReport("unknown field", _short(name))
    return _made(at, fields, named)


def _made(at: float, fields: dict[str, float], named: dict[str, float] | None) -> LoadReport:
    """The report of checked ``fields`` (ORCA's own) and ``named`` metrics."""
    get = fields.get
    if named is None:
        return _new(
            LoadReport,
            (at, get(_CPU), get(_MEM), get(_APP), get(_RPS), get(_EPS), _EMPTY, None, None),
        )
    if len(named) > MAX_NAMED:
        raise BadReport("too many fields", f"{len(named)} named metrics")
    latency_ms = named.get("latency_ms")
    return _new(  # the tuple's own constructor: a report is made per response
        LoadReport,
        (
            at,
            get(_CPU),
            get(_MEM),
            get(_APP),
            get(_RPS),
            get(_EPS),
            MappingProxyType(named),
            named.get("rif"),
            None if latency_ms is None else latency_ms / 1000.0,
        ),
    )


def _decoded(name: str, value: object) -> float:
    """``value`` (a decoded JSON value) as a checked float: JSON numbers alone."""
    if type(value) is not float and type(value) is not int:
        raise BadReport("not a number", f"{name}={_short(repr(value))}")
    number = float(value)
    if not 0.0 <= number <= MAX_VALUE:
        raise _refused(name, number)
    return number


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for name, value in pairs:
        if name in seen:
            raise BadReport("duplicate field", _short(name))
        seen[name] = value
    return seen


def _constant(name: str) -> float:
    raise BadReport("not finite", name)


def _json(body: str, at: float) -> LoadReport:
    try:
        decoded = json.loads(body, object_pairs_hook=_pairs, parse_constant=_constant)
    except BadReport:
        raise
    except (ValueError, RecursionError):
        raise BadReport("malformed", "not JSON") from None
    if not isinstance(decoded, dict):
        raise BadReport("malformed", "not a JSON object")
    fields: dict[str, float] = {}
    named: dict[str, float] | None = None
    for name, value in decoded.items():  # duplicate names were refused as they were read
        if name == "named_metrics":
            if not isinstance(value, dict):
                raise BadReport("malformed", "named_metrics is not an object")
            named = {}
            for key, number in value.items():
                if not key:
                    raise BadReport("unknown field", _short(_NAMED_PREFIX))
                named[key] = _decoded(_NAMED_PREFIX + key, number)
        elif name in _KNOWN:
            fields[name] = _decoded(name, value)
        else:  # named_metrics.<key> too: only as a key of named_metrics
            raise BadReport("unknown field", _short(name))
    return _made(at, fields, named or None)


_FORMATS: Final[dict[str, Callable[[str, float], LoadReport]]] = {"TEXT": _text, "JSON": _json}


#: ORCA's fields by their place in a :class:`LoadReport` (``at`` is at 0).
_PLACES: Final = {name: place for place, name in enumerate(FIELDS, start=1)}


def _plain_text(header: str, at: float) -> LoadReport | None:
    """The report of a TEXT header of the usual shape, read quickly; None for anything else.
    ``header`` is ASCII, at most :data:`MAX_LENGTH` long, and begins with ``TEXT ``.

    The usual shape: ``TEXT name=value, name=value, ...`` with one space after ``TEXT`` and
    after each comma, every name an ORCA field or ``named_metrics.<key>`` written exactly (no
    space around it, no comma in it), given once, every value a number ``float()`` reads
    within range. Whatever this returns, :func:`_careful` returns too (a property test holds
    them to it); None sends the header there, where every refusal is made."""
    report: list[Any] = [at, None, None, None, None, None, _EMPTY, None, None]
    named: dict[str, float] | None = None
    places = _PLACES
    try:
        for item in header[5:].split(", "):
            name, _, value = item.partition("=")
            number = float(value)
            if not 0.0 <= number <= MAX_VALUE:  # NaN fails this too
                return None
            place = places.get(name)
            if place is not None:
                if report[place] is not None:
                    return None
                report[place] = number
            elif (
                name[:_PREFIX_LENGTH] == _NAMED_PREFIX
                and len(name) > _PREFIX_LENGTH
                and name[-1] > " "  # no space (nor control character) for strip() to take
                and "," not in name
            ):
                if named is None:
                    named = {}
                key = name[_PREFIX_LENGTH:]
                if key in named:
                    return None
                named[key] = number
            else:
                return None
    except ValueError:  # a value float() does not read
        return None
    if named is not None:
        if len(named) > MAX_NAMED:
            return None
        report[6] = MappingProxyType(named)
        report[7] = named.get("rif")
        latency_ms = named.get("latency_ms")
        if latency_ms is not None:
            report[8] = latency_ms / 1000.0
    return _new(LoadReport, report)


def parse(header: str | bytes, at: float) -> LoadReport:
    """The report in an ``endpoint-load-metrics`` header that arrived at clock value ``at``.

    Raises :class:`BadReport` for any report that is not used (see the module's account)."""
    if _read_text is not None:
        report = _read_text(header, at, LoadReport, _EMPTY)
        if report is not None:
            return report
        return _careful(header, at)
    return python_parse(header, at)


def python_parse(header: str | bytes, at: float) -> LoadReport:
    """:func:`parse` by the pure-Python readers alone, whether or not the compiled one is built
    (the same reports; for comparing them)."""
    if (
        header.__class__ is str
        and header[:5] == "TEXT "
        and len(header) <= MAX_LENGTH
        and header.isascii()
    ):
        report = _plain_text(header, at)
        if report is not None:
            return report
    return _careful(header, at)


def _careful(header: str | bytes, at: float) -> LoadReport:
    """:func:`parse`, every rule checked in turn: any header, the refusals' reasons."""
    if len(header) > MAX_LENGTH:
        raise BadReport("too long", f"{len(header)} characters")
    if isinstance(header, bytes):
        try:
            header = header.decode("ascii")
        except UnicodeDecodeError:
            raise BadReport("malformed", "not ASCII") from None
    if not header.isascii():
        raise BadReport("malformed", "not ASCII")
    kind, space, body = header.strip().partition(" ")
    reader = _FORMATS.get(kind)
    if reader is None or not space:
        if kind == "BIN":
            raise BadReport("unsupported format", "BIN")
        raise BadReport("malformed", f"no TEXT or JSON format in {_short(header)}")
    return reader(body, at)


def _plain_prequal(rif: str, latency_us: str, at: float) -> LoadReport | None:
    """Both of Prequal's headers, read at once when both are plain numbers in range; None for
    anything else (refused, with its reason, by the rest of :func:`parse_prequal`)."""
    if len(rif) > 64 or len(latency_us) > 64 or not (rif.isascii() and latency_us.isascii()):
        return None
    try:
        load, micros = float(rif), float(latency_us)
    except ValueError:
        return None
    if 0.0 <= load <= MAX_VALUE and 0.0 <= micros <= MAX_VALUE:  # NaN fails this too
        return _new(LoadReport, (at, None, None, None, None, None, _EMPTY, load, micros / 1e6))
    return None


def parse_prequal(rif: str | None, latency_us: str | None, at: float) -> LoadReport:
    """The report in Prequal's headers (either may be missing, not both)."""
    if isinstance(rif, str) and isinstance(latency_us, str):
        report = _plain_prequal(rif, latency_us, at)
        if report is not None:
            return report
    return _careful_prequal(rif, latency_us, at)


def _careful_prequal(rif: str | None, latency_us: str | None, at: float) -> LoadReport:
    """:func:`parse_prequal`, every rule checked in turn: any pair, the refusals' reasons."""
    if rif is None and latency_us is None:
        raise BadReport("missing")
    for text in (rif, latency_us):
        if text is not None and len(text) > 64:
            raise BadReport("too long", f"{len(text)} characters")
    for text in (rif, latency_us):
        if text is not None and not text.isascii():
            raise BadReport("not a number", _short(text))
    load = None if rif is None else _number(PREQUAL_RIF_HEADER, rif)
    micros = None if latency_us is None else _number(PREQUAL_LATENCY_HEADER, latency_us)
    return LoadReport(at, rif=load, latency=None if micros is None else micros / 1e6)
