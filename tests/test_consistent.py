"""Ketama vectors: Pingora's ketama and load-balancing tests, and nginx's routing of 1,001 keys."""

from __future__ import annotations

import bisect
import csv
import itertools
import zlib
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbclient import Backend, Consistent, LoadBalancer
from lbclient.selection import ConsistentSelector


def ports(picks: list[Backend]) -> list[int]:
    return [b.port for b in picks]


def test_crc32_point_chain() -> None:
    # crc32(base + le32(prev)), chained: the first points of "127.0.0.1\0" "7777".
    sel = Consistent.build(["127.0.0.1:7777"])
    hashes = sorted(h for h, _ in sel.points())
    assert zlib.crc32(b"127.0.0.1\x007777") == 0xA7D7D7B0
    for point in (0x323BD7A0, 0x03F353A8, 0x72869567):
        assert point in hashes
    v6 = sorted(h for h, _ in Consistent(ipv6_brackets=False).build(["[::1]:7777"]).points())
    for point in (0x208D70AF, 0xD437D762, 0x28DDDA6B):
        assert point in v6
    nine = {h for h, _ in Consistent.build(["10.0.0.1:443"]).points()}
    assert {0xEA185C25, 0xDA9647C2, 0x0294F7BB} <= nine


def test_matches_nginx_sample() -> None:
    sel = Consistent.build(["127.0.0.1:7777", "127.0.0.1:7778"])
    expected = {
        "/some/path": 7778,
        "/some/longer/path": 7777,
        "/sad/zaidoon": 7778,
        "/g": 7777,
        "/pingora/team/is/cool/and/this/is/a/long/uri": 7778,
        "/i/am/not/confident/in/this/code": 7777,
    }
    for key, port in expected.items():
        picked = sel.first(key)
        assert picked is not None
        assert picked.port == port, key


def test_consistency_after_adding_host() -> None:
    ten = [f"127.0.0.{i}:6443" for i in range(1, 11)]
    for servers in (ten, [*ten, "127.0.0.11:6443"]):
        sel = Consistent.build(servers)
        assert sel.first(b"a") == Backend("127.0.0.10:6443")
        assert sel.first(b"b") == Backend("127.0.0.5:6443")


def test_node_iter() -> None:
    sel = Consistent.build(["127.0.0.1:7777", "127.0.0.1:7778", "127.0.0.1:7779"])
    assert sel.ring_size == 480
    assert sel.point_index(b"doghash") == 366
    walk = list(itertools.islice(sel.iter(b"doghash"), 8))
    assert ports(walk) == [7778, 7779, 7779, 7777, 7777, 7778, 7778, 7779]
    assert {b.host for b in walk} == {"127.0.0.1"}

    two = Consistent.build(["127.0.0.1:7777", "127.0.0.1:7779"])
    assert ports(list(itertools.islice(two.iter(b"doghash"), 5))) == [7779, 7779, 7777, 7777, 7779]


def test_node_iter_wraps_around() -> None:
    sel = Consistent.build(["127.0.0.1:7777"])
    assert sel.ring_size == 160
    start = sel.point_index(b"doghash")
    owners = [b for _, b in sel.points()]
    walk = list(itertools.islice(sel.iter(b"doghash"), 2 * 160 + 1))
    assert walk == [owners[(start + i) % 160] for i in range(2 * 160 + 1)]


def test_empty() -> None:
    sel = Consistent.build([])
    assert sel.first(b"doghash") is None
    it = sel.iter(b"doghash")
    for _ in range(3):
        assert next(it, None) is None
    assert sel.point_index(b"doghash") == 0
    assert LoadBalancer([], Consistent).select(b"doghash") is None


def test_ipv6_ring_pingora_form() -> None:
    servers = ["[::1]:7777", "[::1]:7778", "[::1]:7779"]
    sel = Consistent(ipv6_brackets=False).build(servers)
    walk = list(itertools.islice(sel.iter(b"doghash"), 7))
    assert ports(walk) == [7777, 7778, 7777, 7778, 7778, 7777, 7779]
    # nginx hashes "[::1]" with its brackets: a different ring.
    nginx = Consistent().build(servers)
    assert [h for h, _ in nginx.points()] != [h for h, _ in sel.points()]


def test_ipv6_ring_nginx_form_hashes_bracketed_text() -> None:
    sel = Consistent.build(["[::1]:7777"])
    base = zlib.crc32(b"[::1]\x007777")
    first = zlib.crc32((0).to_bytes(4, "little"), base)
    assert first in {h for h, _ in sel.points()}


def test_crate_doc_example() -> None:
    sel = Consistent.build(
        [
            Backend("127.0.0.1:12345", 1),
            Backend("127.0.0.2:12345", 2),
            Backend("127.0.0.3:12345", 3),
        ]
    )
    assert sel.first("some_key") == Backend("127.0.0.3:12345", 3)
    assert sel.first("another_key") == Backend("127.0.0.3:12345", 3)
    assert sel.first("last_key") == Backend("127.0.0.2:12345", 2)


def test_load_balancing_test_ketama() -> None:
    b1, b2, b3 = Backend("1.1.1.1:80"), Backend("1.0.0.1:80"), Backend("1.0.0.255:80")
    sel = Consistent.build([b1, b2, b3])
    assert sel.backends == (b2, b3, b1)
    keys = [f"test{i}" for i in range(10)]
    assert [sel.first(k) for k in keys] == [b2, b1, b1, b1, b1, b3, b1, b3, b1, b2]
    after = Consistent.build([b1, b2])
    assert [after.first(k) for k in keys] == [b2, b1, b1, b1, b1, b2, b1, b1, b1, b2]
    lb = LoadBalancer([b1, b2, b3], Consistent)
    assert [lb.select(k) for k in keys] == [sel.first(k) for k in keys]
    assert lb.update([b1, b2])
    assert [lb.select(k) for k in keys] == [after.first(k) for k in keys]


def test_host_names_hash_as_written() -> None:
    sel = Consistent.build(["backend.local:80"])
    base = zlib.crc32(b"backend.local\x0080")
    assert zlib.crc32((0).to_bytes(4, "little"), base) in {h for h, _ in sel.points()}


def test_duplicate_point_hashes_keep_first_backend_in_sorted_order() -> None:
    # Two backends can only share every point if they hash the same text, which distinct
    # addresses never do; so check the rule on the packed ring directly: every hash once,
    # sorted, each owned by the earliest backend that produced it.
    servers = [Backend(f"10.1.{i}.{j}:80", 1 + (i + j) % 3) for i in range(3) for j in range(1, 40)]
    sel = Consistent.build(servers)
    hashes = [h for h, _ in sel.points()]
    assert hashes == sorted(set(hashes))
    owner: dict[int, Backend] = {}
    for backend in sel.backends:
        base = zlib.crc32(f"{backend.host}\0{backend.port}".encode())
        prev = 0
        for _ in range(backend.weight * 160):
            prev = zlib.crc32(prev.to_bytes(4, "little"), base)
            owner.setdefault(prev, backend)
    assert dict(sel.points()) == owner


def test_points_per_weight_option() -> None:
    sel = Consistent(points_per_weight=40).build([Backend("10.0.0.1:80", 2), "10.0.0.2:80"])
    assert sel.ring_size == 120
    assert isinstance(sel, ConsistentSelector)
    assert "points_per_weight=40" in repr(Consistent(points_per_weight=40))


@pytest.mark.parametrize(
    ("value", "error"), [(0, ValueError), (-5, ValueError), (True, TypeError), (1.5, TypeError)]
)
def test_points_per_weight_validated(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="points_per_weight"):
        Consistent(points_per_weight=value)  # type: ignore[arg-type]


def test_ipv6_brackets_validated() -> None:
    with pytest.raises(TypeError, match="ipv6_brackets"):
        Consistent(ipv6_brackets="no")  # type: ignore[arg-type]


def test_scale_1000_backends() -> None:
    servers = [f"10.0.{i // 250}.{i % 250 + 1}:8080" for i in range(1000)]
    sel = Consistent.build(servers)
    assert 159_000 < sel.ring_size <= 160_000
    assert len(sel.backends) == 1000


def test_matches_nginx_sample_data(shared_vectors: Path) -> None:
    path = shared_vectors / "pingora-ketama" / "sample-nginx-upstream.csv"
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert len(rows) == 1001
    lb = LoadBalancer([Backend(f"10.0.0.{i}:443", 100) for i in range(1, 10)], Consistent)
    mismatches = []
    for uri, upstream in rows:
        picked = lb.select(uri)
        assert picked is not None
        if picked.address != upstream:
            mismatches.append((uri, upstream, picked.address))
    assert mismatches == []
    counts = Counter(upstream for _, upstream in rows)
    assert counts["10.0.0.2:443"] == 124
    assert counts["10.0.0.7:443"] == 105


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=40),
    probes=st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=200),
)
def test_bucket_index_agrees_with_plain_binary_search(n: int, probes: list[int]) -> None:
    sel = Consistent(points_per_weight=1 + n % 7).build([f"10.2.0.{i + 1}:80" for i in range(n)])
    hashes = [h for h, _ in sel.points()]
    edges = [0, 2**32 - 1, *hashes, *(h - 1 for h in hashes if h), *(h + 1 for h in hashes)]
    for h in [*probes, *edges]:
        i = bisect.bisect_left(hashes, h)
        assert sel._locate(h) == (0 if i == len(hashes) else i)
