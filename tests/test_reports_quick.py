"""The quick reading of a usual TEXT report and the careful one agree on every input: the quick
one either gives the careful one's report or leaves the header to it. The same for Prequal's two
headers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lbclient.reports import (
    MAX_LENGTH,
    BadReport,
    LoadReport,
    _careful,
    _careful_prequal,
    _plain_prequal,
    _plain_text,
    parse,
    parse_prequal,
)

#: The usual reports: vLLM's kind, the server companion's, every field at once.
USUAL = [
    "TEXT cpu_utilization=0.3, rps_fractional=120, eps=0.5, named_metrics.kv_cache_usage_perc=0.4",
    "TEXT rps_fractional=812.4, eps=0, named_metrics.rif=3, named_metrics.latency_ms=0.512",
    "TEXT cpu_utilization=0.0312, rps_fractional=1.23457e+06, eps=1e-05, named_metrics.rif=0, "
    "named_metrics.latency_ms=12.5, named_metrics.queue=7",
    "TEXT cpu_utilization=1, mem_utilization=0.25, application_utilization=0.75, "
    "rps_fractional=3, eps=0.1",
    "TEXT eps=0",
]

NAMES = [
    "cpu_utilization",
    "mem_utilization",
    "application_utilization",
    "rps_fractional",
    "eps",
    "named_metrics.rif",
    "named_metrics.latency_ms",
    "named_metrics.kv_cache_usage_perc",
    "named_metrics.a b",
    "named_metrics.",
    "named_metrics.a,b",
    "named_metrics.a ",
    "named_metrics.a\x1c",
    "named_metrics.\x01",
    " eps",
    "eps ",
    "EPS",
    "flux",
    "",
]
VALUES = [
    "0",
    "0.3",
    "120",
    "1e-05",
    "1e9",
    "1000000001",
    "1e308",
    "-0.0",
    "-1",
    "nan",
    "inf",
    "-inf",
    "1_0",
    " 1",
    "1 ",
    "1\t",
    "",
    "0x1",
    "1,2",
    "1=2",
    "true",
    "\u0661",
]
SEPARATORS = [", ", ",", " , ", ",  ", ", , "]
EQUALS = ["=", " = ", "==", ""]
HEADS = ["TEXT ", "TEXT  ", " TEXT ", "text ", "JSON ", "TEXT"]
TAILS = ["", " ", "\t", "\x1c", ",", ", "]


def outcome(read: object, header: str) -> LoadReport | str:
    """The report read, or the reason it was refused."""
    try:
        return read(header, 7.5)  # type: ignore[operator, no-any-return]
    except BadReport as bad:
        return bad.reason


def agree(header: str) -> None:
    careful = outcome(_careful, header)
    assert outcome(parse, header) == careful
    usual = header.startswith("TEXT ") and header.isascii() and len(header) <= MAX_LENGTH
    quick = _plain_text(header, 7.5) if usual else None  # what parse asks it
    assert quick is None or quick == careful
    if isinstance(careful, LoadReport) and quick is not None:
        assert type(quick.named_metrics) is type(careful.named_metrics)
        assert [type(value) for value in quick] == [type(value) for value in careful]


def test_the_usual_reports_are_read_quickly_and_as_the_careful_reading_does() -> None:
    for header in USUAL:
        quick = _plain_text(header, 7.5)
        assert quick is not None, header
        assert quick == _careful(header, 7.5)
        agree(header)
    assert parse(USUAL[1], 0.0).latency == 0.512 / 1000


@st.composite
def near_usual(draw: st.DrawFn) -> str:
    """A header made of usual and unusual pieces: names, values, separators, ends."""
    items = draw(
        st.lists(
            st.tuples(st.sampled_from(NAMES), st.sampled_from(EQUALS), st.sampled_from(VALUES)),
            min_size=1,
            max_size=6,
        )
    )
    separators = draw(st.lists(st.sampled_from(SEPARATORS), min_size=len(items)))
    body = ""
    for (name, equals, value), separator in zip(items, separators, strict=False):
        body += f"{name}{equals}{value}{separator}"
    body = body[: -len(separators[len(items) - 1])] if separators[len(items) - 1] else body
    return draw(st.sampled_from(HEADS)) + body + draw(st.sampled_from(TAILS))


@given(near_usual())
def test_the_quick_and_careful_readings_agree_near_the_usual_shape(header: str) -> None:
    agree(header)


@given(
    st.text(
        alphabet=st.sampled_from(list("TEXT named_metrics.rif=0.5e-+, \t\x1cnaNI_")), max_size=80
    )
)
def test_the_quick_and_careful_readings_agree_on_any_text_of_their_letters(body: str) -> None:
    agree("TEXT " + body)
    agree(body)


def test_many_named_metrics_and_duplicates_are_left_to_the_careful_reading() -> None:
    many = "TEXT " + ", ".join(f"named_metrics.m{i}=1" for i in range(65))
    assert _plain_text(many, 0.0) is None
    assert outcome(parse, many) == "too many fields"
    for header in ("TEXT eps=1, eps=2", "TEXT named_metrics.a=1, named_metrics.a=2"):
        assert _plain_text(header, 0.0) is None
        assert outcome(parse, header) == "duplicate field"


def prequal_outcome(read: object, rif: str | None, latency_us: str | None) -> LoadReport | str:
    try:
        return read(rif, latency_us, 2.5)  # type: ignore[operator, no-any-return]
    except BadReport as bad:
        return bad.reason


PREQUAL_VALUES = [*VALUES, "7", "2500", "0.5", "1" * 65, "\u00b2"]


@given(
    st.one_of(st.none(), st.sampled_from(PREQUAL_VALUES), st.text(max_size=70)),
    st.one_of(st.none(), st.sampled_from(PREQUAL_VALUES), st.text(max_size=70)),
)
def test_the_quick_and_careful_prequal_readings_agree(
    rif: str | None, latency_us: str | None
) -> None:
    careful = prequal_outcome(_careful_prequal, rif, latency_us)
    assert prequal_outcome(parse_prequal, rif, latency_us) == careful
    if rif is not None and latency_us is not None:
        quick = _plain_prequal(rif, latency_us, 2.5)
        assert quick is None or quick == careful
        if quick is not None:
            assert [type(value) for value in quick] == [type(value) for value in careful]


def test_the_usual_prequal_headers_are_read_quickly() -> None:
    quick = _plain_prequal("7", "2500", 2.5)
    assert quick == _careful_prequal("7", "2500", 2.5) == LoadReport(2.5, rif=7.0, latency=0.0025)
