"""Load reports read: the ORCA header in both formats, Prequal's headers, every bad input refused
with its reason, and what a backend's load keeps."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbclient import LoadBalancer
from lbclient._load import Load
from lbclient.reports import (
    MAX_LENGTH,
    MAX_NAMED,
    BadReport,
    LoadReport,
    parse,
    parse_prequal,
)

TYPICAL = (
    "TEXT cpu_utilization=0.3, rps_fractional=120, eps=0.5, named_metrics.kv_cache_usage_perc=0.4"
)


def test_text_reads_every_field() -> None:
    report = parse(
        "TEXT cpu_utilization=0.3, mem_utilization=0.6, application_utilization=0.7, "
        "rps_fractional=120, eps=0.5, named_metrics.kv_cache_usage_perc=0.4, "
        "named_metrics.rif=3, named_metrics.latency_ms=4.5",
        12.5,
    )
    assert report.at == 12.5
    assert report.cpu_utilization == 0.3
    assert report.mem_utilization == 0.6
    assert report.application_utilization == 0.7
    assert report.rps_fractional == 120.0
    assert report.eps == 0.5
    assert dict(report.named_metrics) == {"kv_cache_usage_perc": 0.4, "rif": 3.0, "latency_ms": 4.5}
    assert report.rif == 3.0
    assert report.latency == pytest.approx(0.0045)
    assert report.get("named_metrics.kv_cache_usage_perc") == 0.4
    assert report.get("cpu_utilization") == 0.3
    assert report.get("named_metrics.missing") is None
    assert report.get("at") is None  # not an ORCA field


def test_json_reads_the_same_report_as_text() -> None:
    text = parse(TYPICAL, 1.0)
    json = parse(
        'JSON {"cpu_utilization": 0.3, "rps_fractional": 120, "eps": 0.5, '
        '"named_metrics": {"kv_cache_usage_perc": 0.4}}',
        1.0,
    )
    assert json == text


def test_fields_left_out_are_none_and_bytes_are_read() -> None:
    report = parse(b"TEXT rps_fractional=10", 0.0)
    assert report == LoadReport(0.0, rps_fractional=10.0)
    assert report.named_metrics == {}
    assert report.rif is None
    assert report.latency is None


def test_spaces_around_names_and_values_are_allowed() -> None:
    assert parse("  TEXT   eps = 1 ,cpu_utilization=0.25  ", 0.0) == LoadReport(
        0.0, cpu_utilization=0.25, eps=1.0
    )


def test_a_report_is_immutable() -> None:
    report = parse(TYPICAL, 0.0)
    with pytest.raises(AttributeError):
        report.eps = 3.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        report.named_metrics["x"] = 1.0  # type: ignore[index]


BAD = [
    ("TEXT cpu_utilization=nan", "not finite"),
    ("TEXT cpu_utilization=inf", "not finite"),
    ("TEXT cpu_utilization=-infinity", "not finite"),
    ('JSON {"cpu_utilization": NaN}', "not finite"),
    ('JSON {"eps": Infinity}', "not finite"),
    ('JSON {"eps": 1e999}', "not finite"),
    ("TEXT cpu_utilization=-1", "negative"),
    ('JSON {"named_metrics": {"a": -0.5}}', "negative"),
    ("TEXT cpu_utilization=1e308", "too large"),
    ('JSON {"rps_fractional": 1e308}', "too large"),
    ("TEXT cpu_utilization=1, cpu_utilization=2", "duplicate field"),
    ("TEXT named_metrics.a=1, named_metrics.a=2", "duplicate field"),
    ('JSON {"eps": 1, "eps": 2}', "duplicate field"),
    ('JSON {"named_metrics": {"a": 1, "a": 2}}', "duplicate field"),
    ("TEXT cpu_utilization=0.5, flux=1", "unknown field"),
    ('JSON {"flux": 1}', "unknown field"),
    ("TEXT named_metrics.=1", "unknown field"),
    ('JSON {"named_metrics.a": 1}', "unknown field"),
    ("TEXT cpu_utilization=true", "not a number"),
    ("TEXT cpu_utilization=", "not a number"),
    ("TEXT cpu_utilization=\u0661", "malformed"),  # an Arabic-Indic digit: not ASCII
    ('JSON {"eps": true}', "not a number"),
    ('JSON {"eps": "1"}', "not a number"),
    ('JSON {"named_metrics": {"a": null}}', "not a number"),
    ("TEXT cpu_utilization=1,", "malformed"),
    ("TEXT cpu_utilization", "malformed"),
    ("TEXT", "malformed"),
    ("cpu_utilization=0.5", "malformed"),
    ("XML <load/>", "malformed"),
    ("JSON {", "malformed"),
    ("JSON [1, 2]", "malformed"),
    ('JSON {"named_metrics": [1]}', "malformed"),
    ("BIN CgQIARAB", "unsupported format"),
    ("TEXT " + "named_metrics.a=1, " * 4000 + "eps=1", "too long"),
    ("JSON " + "[" * 5000, "malformed"),
]


@pytest.mark.parametrize(("header", "reason"), BAD, ids=[b[0][:40] for b in BAD])
def test_a_bad_report_is_refused_with_its_reason(header: str, reason: str) -> None:
    with pytest.raises(BadReport) as refused:
        parse(header, 0.0)
    assert refused.value.reason == reason
    assert isinstance(refused.value, ValueError)
    assert len(str(refused.value)) < 120  # the value at fault is shortened


def test_a_64_kb_header_is_refused_unread() -> None:
    header = "TEXT eps=" + "1" * 65_536
    with pytest.raises(BadReport, match="too long"):
        parse(header, 0.0)
    assert len(header) > MAX_LENGTH


def test_too_many_named_metrics_are_refused() -> None:
    many = ", ".join(f"named_metrics.m{i}=1" for i in range(MAX_NAMED + 1))
    with pytest.raises(BadReport) as refused:
        parse("TEXT " + many, 0.0)
    assert refused.value.reason == "too many fields"
    kept = parse("TEXT " + ", ".join(f"named_metrics.m{i}=1" for i in range(MAX_NAMED)), 0.0)
    assert len(kept.named_metrics) == MAX_NAMED


def test_prequal_headers() -> None:
    report = parse_prequal("7", "2500", 3.0)
    assert report == LoadReport(3.0, rif=7.0, latency=0.0025)
    assert parse_prequal(None, "1000", 0.0).rif is None
    assert parse_prequal("2", None, 0.0).latency is None
    for rif, reason in [("-1", "negative"), ("nan", "not finite"), ("x", "not a number")]:
        with pytest.raises(BadReport) as refused:
            parse_prequal(rif, None, 0.0)
        assert refused.value.reason == reason
    with pytest.raises(BadReport, match="missing"):
        parse_prequal(None, None, 0.0)


@given(st.text(max_size=300))
def test_any_text_gives_a_report_or_a_bad_report(header: str) -> None:
    try:
        report = parse(header, 0.0)
    except BadReport:
        return
    for value in (*report[1:6], *report.named_metrics.values()):
        assert value is None or (math.isfinite(value) and value >= 0)


@given(
    st.dictionaries(
        st.sampled_from(["cpu_utilization", "eps", "rps_fractional", "named_metrics.x"]),
        st.floats(allow_nan=True, allow_infinity=True),
        min_size=1,
    )
)
def test_any_numbers_are_kept_only_when_finite_and_in_range(values: dict[str, float]) -> None:
    header = "TEXT " + ", ".join(f"{name}={value!r}" for name, value in values.items())
    good = all(0.0 <= v <= 1e9 for v in values.values())
    if good:
        report = parse(header, 0.0)
        assert report.get("cpu_utilization") == values.get("cpu_utilization")
        assert report.get("named_metrics.x") == values.get("named_metrics.x")
    else:
        with pytest.raises(BadReport):
            parse(header, 0.0)


def test_a_load_keeps_the_latest_report_and_refuses_an_older_one() -> None:
    load = Load()
    newer = parse("TEXT eps=1", 5.0)
    older = parse("TEXT eps=2", 4.0)
    assert load.reported(newer)
    assert not load.reported(older)
    assert load.report is newer
    assert load.reports == 1
    assert load.refused == {"stale": 1}
    load.refuse("not finite")
    assert load.refused == {"stale": 1, "not finite": 1}


def test_the_balancer_reads_reports_with_its_clock_and_snapshot_shows_them() -> None:
    now = [100.0]
    balancer = LoadBalancer(["10.0.0.1:80", "10.0.0.2:80"], clock=lambda: now[0])
    kept = balancer.report_load("10.0.0.1:80", TYPICAL)
    assert kept is not None
    assert kept.at == 100.0
    assert balancer.report_load("10.0.0.1:80", "TEXT eps=nan") is None
    assert balancer.report_load("10.0.0.2:80", rif="4", latency_us="1500") is not None
    assert balancer.report_load("10.0.0.2:80") is None  # nothing given: nothing counted
    now[0] = 102.5
    first, second = balancer.snapshot().backends
    assert first.report == parse(TYPICAL, 100.0)
    assert first.report_age == 2.5
    assert first.reports == 1
    assert first.reports_refused == {"not finite": 1}
    assert second.report is not None
    assert second.report.rif == 4.0
    assert second.reports_refused == {}
    with pytest.raises(ValueError, match=r"10\.0\.0\.9:80"):
        balancer.report_load("10.0.0.9:80", TYPICAL)
