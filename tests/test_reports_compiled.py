"""The compiled reader of usual TEXT reports (lbclient/_textreport.c, built by hatch_build.py where
a C compiler is) gives, for every header it reads, the careful reading's report, the same
doubles bit for bit; it declines (None) whatever else, and the careful reading has the last
word. Without it, lbclient reads with Python alone: the same reports."""

from __future__ import annotations

import hashlib
import math
import struct
import tracemalloc
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import pytest
from conftest import compiled_module
from hypothesis import given
from hypothesis import strategies as st
from test_reports_quick import USUAL, near_usual, outcome

import lbclient
from lbclient import reports
from lbclient.reports import (
    MAX_LENGTH,
    MAX_NAMED,
    MAX_VALUE,
    BadReport,
    LoadReport,
    _careful,
    parse,
    python_parse,
)

SOURCE = Path(lbclient.__file__).parent / "_textreport.c"


def _compiled() -> ModuleType:
    return compiled_module(
        "lbclient._textreport", "compiled report reader", "the pure-Python reader serves"
    )


def bits(report: LoadReport | str) -> object:
    """A report with every float as its bits, and the named metrics in their order."""
    if isinstance(report, str):
        return report

    def exact(value: Any) -> object:
        if isinstance(value, float):
            return ("float", struct.pack("<d", value))
        return (type(value).__name__, value)

    named = [(key, exact(value)) for key, value in report.named_metrics.items()]
    return [exact(value) for value in report[:6]], named, [exact(v) for v in report[7:]]


def read(header: object) -> LoadReport | None:
    made: LoadReport | None = _compiled().read_text(header, 7.5, LoadReport, reports._EMPTY)
    return made


def holds(header: str) -> LoadReport | None:
    """The compiled reader's report of ``header``, held to the careful reading's."""
    quick = read(header)
    careful = outcome(_careful, header)
    if quick is not None:
        assert type(quick) is LoadReport
        assert type(quick.named_metrics) is MappingProxyType
        assert bits(quick) == bits(careful), header
    assert outcome(parse, header) == careful
    return quick


def test_it_is_built_from_this_source_with_the_pythons_bounds() -> None:
    compiled = _compiled()
    assert reports.COMPILED
    assert hashlib.sha256(SOURCE.read_bytes()).hexdigest() == compiled.SOURCE_SHA256, (
        "lbclient/_textreport.c changed since it was built: reinstall (pip install -e .)"
    )
    assert (compiled.MAX_LENGTH, compiled.MAX_NAMED, compiled.MAX_VALUE) == (
        MAX_LENGTH,
        MAX_NAMED,
        MAX_VALUE,
    )


def test_the_usual_reports_are_read_by_it() -> None:
    for header in USUAL:
        assert holds(header) is not None, header
    report = read(USUAL[1])
    assert report is not None
    assert (report.at, report.rif, report.latency) == (7.5, 3.0, 0.512 / 1000)
    assert dict(report.named_metrics) == {"rif": 3.0, "latency_ms": 0.512}


@given(near_usual())
def test_it_agrees_with_the_careful_reading_near_the_usual_shape(header: str) -> None:
    holds(header)


@given(
    st.text(
        alphabet=st.sampled_from(list("TEXT named_metrics.rif=0.5e-+, \t\x1cnaNIE_,")),
        max_size=80,
    )
)
def test_it_agrees_with_the_careful_reading_on_any_text_of_their_letters(body: str) -> None:
    holds("TEXT " + body)
    holds(body)


NUMBER = st.from_regex(r"\A[0-9]{1,30}(\.[0-9]{0,30})?([eE][+-]?[0-9]{1,4})?\Z")


@given(NUMBER, st.sampled_from(["eps", "named_metrics.q"]))
def test_every_plain_number_is_the_double_float_reads(text: str, name: str) -> None:
    header = f"TEXT {name}={text}"
    quick = holds(header)
    number = float(text)
    within = 0.0 <= number <= MAX_VALUE and len(text) <= 63
    assert (quick is not None) == within, text
    if quick is not None:
        assert struct.pack("<d", quick.get(name) or 0.0) == struct.pack("<d", number)


@given(st.floats(min_value=0.0, max_value=MAX_VALUE), st.sampled_from(["r", ".6g", ".17g"]))
def test_numbers_as_servers_write_them_are_read_exactly(number: float, form: str) -> None:
    text = repr(number) if form == "r" else format(number, form)
    report = holds(f"TEXT cpu_utilization={text}, named_metrics.rif=1")
    assert report is not None, text
    assert struct.pack("<d", report.cpu_utilization or 0.0) == struct.pack("<d", float(text))


def test_what_it_declines_the_careful_reading_reads_or_refuses() -> None:
    declined = [
        "TEXT eps=1_0",  # float() reads it; the careful reading does
        "TEXT eps= 1",
        "TEXT eps=+1",
        "TEXT eps=-0.0",
        "TEXT eps=.5e",
        "TEXT eps=1e400",  # an infinity: refused
        "TEXT eps=nan",
        "TEXT eps=1000000001",
        "TEXT eps=1, eps=2",
        "TEXT named_metrics.a=1, named_metrics.a=2",
        "TEXT named_metrics.=1",
        "TEXT named_metrics.a,b=1",
        "TEXT named_metrics.a =1",
        "TEXT flux=1",
        "TEXT eps=1,",
        "TEXT eps=1, ",
        "TEXT ",
        "TEXT",
        "text eps=1",
        " TEXT eps=1",
        "TEXT eps=\u0661",
        "TEXT eps=" + "1" * 64,
        "TEXT " + ", ".join(f"named_metrics.m{i}=1" for i in range(MAX_NAMED + 1)),
        "TEXT " + "named_metrics.x=1, " * 10 + "eps=" + "0" * MAX_LENGTH,
    ]
    for header in declined:
        assert read(header) is None, header
        holds(header)
    assert outcome(parse, "TEXT eps=1_0") == LoadReport(7.5, eps=10.0)
    assert outcome(parse, "TEXT eps=1e400") == "not finite"
    most = "TEXT " + ", ".join(f"named_metrics.m{i}=1" for i in range(MAX_NAMED))
    assert holds(most) is not None


def test_only_an_exact_str_is_read_and_the_arguments_are_checked() -> None:
    class Text(str):
        pass

    assert read(b"TEXT eps=1") is None
    assert read(Text("TEXT eps=1")) is None
    assert read(None) is None
    assert parse(Text("TEXT eps=1"), 7.5) == LoadReport(7.5, eps=1.0)
    compiled = _compiled()
    with pytest.raises(TypeError, match="4 arguments"):
        compiled.read_text("TEXT eps=1", 1.0)
    with pytest.raises(TypeError, match="tuple subclass"):
        compiled.read_text("TEXT eps=1", 1.0, dict, reports._EMPTY)
    assert compiled.read_text("TEXT eps=1", "when", LoadReport, reports._EMPTY).at == "when"


def test_it_keeps_no_memory_of_what_it_read() -> None:
    headers = [*USUAL, "TEXT eps=1, eps=2", "TEXT named_metrics.a=1, flux=2", "TEXT eps=x"]

    def rounds(count: int) -> None:
        for _ in range(count):
            for header in headers:
                read(header)

    rounds(200)
    tracemalloc.start()
    try:
        rounds(200)
        before = tracemalloc.get_traced_memory()[0]
        rounds(5_000)  # 40,000 readings: a float, a key or a dict kept per reading shows
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown


def test_without_it_python_reads_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reports, "_read_text", None)
    for header in [*USUAL, "TEXT eps=1_0", "TEXT eps=1, eps=2", "JSON {}", "TEXT eps=inf"]:
        careful = outcome(_careful, header)
        assert outcome(parse, header) == careful
        assert outcome(python_parse, header) == careful
    with pytest.raises(BadReport, match="duplicate"):
        parse("TEXT eps=1, eps=2", 0.0)
    assert math.isclose(parse(USUAL[0], 0.0).cpu_utilization or 0.0, 0.3)
