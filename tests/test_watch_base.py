"""The shared rules of watched discovery: the line reader, the backoff, endpoints, merging."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import http.server
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import ClassVar

import pytest

from lbclient import Backend, LoadBalancer
from lbclient.discovery import Etcd
from lbclient.discovery._watch import (
    Change,
    LineReader,
    Relist,
    StreamBroken,
    WatchedDiscovery,
    WatchJob,
    backoff,
    endpoints_of,
    merge,
    replaced,
)
from lbclient.discovery.etcd import Registration
from lbclient.health import WatchState


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _lines(reader: LineReader) -> list[bytes]:
    out = []
    while (line := await reader.next()) is not None:
        out.append(line)
    return out


def test_lines_split_across_chunks_and_the_last_without_an_end() -> None:
    reader = LineReader(_chunks(b'{"a":', b' 1}\n{"b"', b": 2}\r\n\nlast"))
    assert asyncio.run(_lines(reader)) == [b'{"a": 1}', b'{"b": 2}', b"", b"last"]


def test_buffered_says_whether_a_whole_line_waits() -> None:
    async def go() -> list[bool]:
        reader = LineReader(_chunks(b"one\ntwo\nthr", b"ee\n"))
        seen = []
        while await reader.next() is not None:
            seen.append(reader.buffered())
        return seen

    assert asyncio.run(go()) == [True, False, False]


def test_a_line_that_never_ends_breaks_the_stream_at_the_cap() -> None:
    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 1000

    reader = LineReader(endless(), max_line=10_000)
    with pytest.raises(StreamBroken, match="longer than 10000 bytes"):
        asyncio.run(reader.next())


def test_backoff_doubles_is_capped_and_jittered() -> None:
    assert backoff(0, 0.2, 5.0, lambda: 0.0) == 0.0
    assert [backoff(n, 0.2, 5.0, lambda: 0.999999) for n in (1, 2, 3)] == pytest.approx(
        [0.2, 0.4, 0.8], rel=1e-5
    )
    assert backoff(1, 0.2, 5.0, lambda: 0.0) == pytest.approx(0.1)
    assert backoff(100, 0.2, 5.0, lambda: 0.0) == pytest.approx(2.5)
    assert backoff(10_000, 0.2, 5.0, lambda: 0.999999) == pytest.approx(5.0, rel=1e-5)


@pytest.mark.parametrize(
    ("value", "error", "text"),
    [
        ([], ValueError, "at least one URL"),
        (["127.0.0.1:2379"], ValueError, "'127.0.0.1:2379' is not an http"),
        (["ftp://host"], ValueError, "'ftp://host' is not an http"),
        (["http://"], ValueError, "'http://' is not an http"),
        (["http://h:99999"], ValueError, "'http://h:99999' is not a URL"),
        ([2379], TypeError, "must hold URL strings, got 2379"),
        (None, TypeError, "must be a list of URLs, got None"),
    ],
)
def test_bad_endpoints_are_named(value: object, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        endpoints_of(value)


def test_endpoints_accept_one_url_and_drop_a_trailing_slash() -> None:
    assert endpoints_of("http://127.0.0.1:2379/") == ("http://127.0.0.1:2379",)
    assert endpoints_of(["https://a:1", "http://[::1]:2"]) == ("https://a:1", "http://[::1]:2")


def test_merge_takes_each_address_once_first_key_first() -> None:
    a, a3, b = Backend("10.0.0.1:80"), Backend("10.0.0.1:80", 3), Backend("10.0.0.2:80")
    assert merge({"k2": (a3,), "k1": (a, b), "k3": ()}) == [a, b]


class _Lines(WatchedDiscovery):
    """A source whose messages are {"put": {key: address}, "rev": n}."""

    endpoints = ("http://127.0.0.1:1",)

    def message(self, data: object) -> Change:
        if not isinstance(data, dict):
            raise ValueError(f"not an object: {data!r}")
        return Change(
            put={k: (Backend(v),) for k, v in data.get("put", {}).items()},
            deleted=tuple(data.get("delete", ())),
            revision=str(data["rev"]),
        )


def test_the_job_applies_changes_skips_garbage_and_reports_its_state() -> None:
    balancer = LoadBalancer([])
    job = WatchJob(_Lines(), balancer)
    job.revision = "1"
    for line in (
        b'{"put": {"a": "10.0.0.1:80", "b": "10.0.0.2:80"}, "rev": 2}',
        b"not json",
        b'{"delete": ["a"], "rev": 3}',
    ):
        if job._take(line):
            job._apply()
    assert [b.address for b in balancer.backends] == ["10.0.0.2:80"]
    state = balancer.snapshot().discovery_watch
    assert state == WatchState(
        connected=False, revision="3", endpoint="http://127.0.0.1:1", events=3, skipped=1
    )
    assert "watch: not connected" in str(balancer.snapshot())


def _numbers(revision: str, than: str) -> bool:
    return int(revision) < int(than)


@pytest.mark.parametrize(
    ("held", "store", "change", "why"),
    [
        ("34", "7", Change(current="34", store="7"), None),
        ("34", "7", Change(current="40", store="7"), None),
        ("34", "7", Change(current="3", store="7"), "went back to 3, below the 34 held"),
        ("34", "7", Change(current="40", store="8"), "another store answers \\(ID 8"),
        ("34", "7", Change(current="3", store="8"), "another store"),
        # What a message or a listing does not say is no evidence.
        ("34", None, Change(current="40", store="8"), None),
        ("34", "7", Change(current="40"), None),
        ("34", "7", Change(revision="35"), None),
        (None, "7", Change(current="3", store="7"), None),
    ],
)
def test_a_store_other_than_the_one_listed_is_told_by_plain_values(
    held: str | None, store: str | None, change: Change, why: str | None
) -> None:
    said = replaced(held, store, change, _numbers)
    if why is None:
        assert said is None
    else:
        assert said is not None
        assert re.search(why, said), said


def test_revisions_a_source_does_not_order_never_go_back() -> None:
    assert not _Lines().older("3", "34")  # Kubernetes' resource versions: opaque
    assert Etcd("p/").older("3", "34")
    assert not Etcd("p/").older("34", "34")
    assert not Etcd("p/").older("x", "34")


def _etcd_message(revision: str, cluster: str, **result: object) -> bytes:
    header = {"cluster_id": cluster, "member_id": "9", "revision": revision, "raft_term": "2"}
    return json.dumps({"result": {"header": header, **result}}).encode()


def test_an_etcd_whose_revision_went_back_or_another_cluster_is_listed_again() -> None:
    job = WatchJob(Etcd("p/", endpoints=["http://127.0.0.1:1"]), LoadBalancer([]))
    job.revision, job.store = "34", "7"
    # A stream created on the store listed, at its revision or past it: nothing moves on.
    assert job._take(_etcd_message("34", "7", created=True)) is None
    assert job._take(_etcd_message("36", "7", created=True)) is None
    # A progress notification moves the revision on.
    assert job._take(_etcd_message("36", "7")) is False
    assert job.revision == "36"
    # etcd lost its data (a wiped member, a restore): its revision is below the one held.
    with pytest.raises(Relist, match="went back to 3, below the 36 held"):
        job._take(_etcd_message("3", "7", created=True))
    # Another cluster at the same address, whatever its revision.
    with pytest.raises(Relist, match="another store answers"):
        job._take(_etcd_message("90", "8", created=True))
    assert job.revision == "36"


class _Pages(http.server.BaseHTTPRequestHandler):
    """An etcd gateway whose listing's second page comes from another cluster."""

    def log_message(self, *_args: object) -> None:
        pass

    def do_POST(self) -> None:
        asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        value = base64.b64encode(b'{"Op": 0, "Addr": "10.0.0.1:80"}').decode()
        kvs = [{"key": base64.b64encode(b"p/a").decode(), "value": value}]
        cluster = "8" if "revision" in asked else "7"  # the pages after the first ask for one
        body = {"header": {"cluster_id": cluster, "revision": "5"}, "kvs": kvs, "more": True}
        self.send_response(200)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())


def test_a_listing_whose_pages_come_from_two_clusters_fails() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ConnectionError, match="cluster changed during the listing"):
            Etcd("p/", endpoints=[url], page_size=1, timeout=2.0).discover()
    finally:
        server.shutdown()
        server.server_close()


# -- etcd's values and bad input ---------------------------------------------------------------


def test_etcd_values_in_both_formats() -> None:
    from lbclient.discovery.etcd import parse_value

    (named,) = parse_value("k", b'{"Op": 0, "Addr": "10.0.0.1:80", "Metadata": {"weight": 4}}')
    assert (named.address, named.weight) == ("10.0.0.1:80", 4)
    assert parse_value("k", b'{"Op": 1, "Addr": "10.0.0.1:80"}') == ()
    (entry,) = parse_value("k", b'{"address": "[::1]:80", "priority": 2, "metadata": {"z": 1}}')
    assert (entry.address, dict(entry.metadata)) == ("[::1]:80", {"z": 1, "priority": 2})
    assert parse_value("k", b'"10.0.0.9:80"')[0].address == "10.0.0.9:80"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (b"10.0.0.1:80", "key 'k': the value is not JSON"),
        (b"\xff\xfe", "key 'k': the value is not JSON"),
        (b"[1, 2]", "key 'k': expected etcd's naming JSON"),
        (b'{"Op": 2, "Addr": "10.0.0.1:80"}', "'Op' must be 0 \\(add\\) or 1"),
        (b'{"Addr": 80}', "'Addr' must be a 'host:port' string, got 80"),
        (b'{"Addr": "10.0.0.1"}', "key 'k'"),
        (b'{"address": "10.0.0.1:80", "weight": -1}', "key 'k'"),
        (b'{"address": "10.0.0.1:80", "port": 1}', "unknown key 'port'"),
    ],
)
def test_bad_etcd_values_are_named(value: bytes, text: str) -> None:
    from lbclient.discovery.etcd import parse_value

    with pytest.raises(ValueError, match=text):
        parse_value("k", value)


def test_prefix_end() -> None:
    from lbclient.discovery.etcd import prefix_end

    assert prefix_end(b"svc/") == b"svc0"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"


@pytest.mark.parametrize(
    ("call", "error", "text"),
    [
        (lambda: Etcd(""), ValueError, "prefix must not be empty"),
        (lambda: Etcd(None), TypeError, "prefix must be a str, got None"),
        (lambda: Etcd("s/", endpoints=["localhost:2379"]), ValueError, "'localhost:2379' is not"),
        (lambda: Etcd("s/", endpoints=[]), ValueError, "at least one URL"),
        (lambda: Etcd("s/", page_size=0), ValueError, "page_size must be an int >= 1, got 0"),
        (lambda: Etcd("s/", idle=0), ValueError, "idle must be a finite number > 0, got 0"),
        (lambda: Registration("", "10.0.0.1:80"), ValueError, "prefix must not be empty"),
        (lambda: Registration("s", "10.0.0.1"), ValueError, "10.0.0.1"),
        (lambda: Registration("s", "10.0.0.1:80", ttl=0), ValueError, "ttl must be a whole"),
        (lambda: Registration("s", "h:1", endpoints="x"), ValueError, "'x' is not an http"),
        (
            lambda: Registration("s", "h:1", metadata={"a": object()}),
            ValueError,
            "metadata must be JSON",
        ),
    ],
)
def test_bad_etcd_input_is_named(call: object, error: type[Exception], text: str) -> None:
    assert callable(call)
    with pytest.raises(error, match=text):
        call()


def test_register_with_no_etcd_says_so() -> None:
    from lbclient.testing import closed_port

    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ConnectionError, match=f"every endpoint: {url}: ConnectError"):
        Registration("s", "10.0.0.1:80", endpoints=[url], timeout=2.0).start()


class _Gateway(http.server.BaseHTTPRequestHandler):
    """An etcd gateway that lists one key, then streams a created message, a garbage line, a
    change, and a line that never ends."""

    def log_message(self, *_args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))

        def kv(key: str, address: str, revision: str) -> dict[str, str]:
            value = json.dumps({"Op": 0, "Addr": address}).encode()
            return {
                "key": base64.b64encode(key.encode()).decode(),
                "value": base64.b64encode(value).decode(),
                "mod_revision": revision,
            }

        self.send_response(200)
        self.end_headers()
        if self.path == "/v3/kv/range":
            body = {"header": {"revision": "5"}, "kvs": [kv("p/a", "10.0.0.1:80", "5")]}
            self.wfile.write(json.dumps(body).encode())
            return
        change = {"header": {"revision": "6"}, "events": [{"kv": kv("p/b", "10.0.0.2:80", "6")}]}
        for message in (
            b'{"result": {"created": true}}',
            b"garbage",
            json.dumps({"result": change}).encode(),
        ):
            self.wfile.write(message + b"\n")
        self.wfile.write(b"x" * 5000)  # and never a newline
        self.wfile.flush()
        time.sleep(2)


def test_a_stream_of_garbage_and_an_endless_line_keeps_the_set() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    source = Etcd("p/", endpoints=[url], max_line=1000, backoff=0.05, backoff_max=0.1)
    balancer = LoadBalancer(discovery=source)
    try:
        with balancer:
            end = time.monotonic() + 15  # a hang guard
            while "longer than 1000 bytes" not in str(balancer.snapshot().discovery_watch):
                assert time.monotonic() < end, balancer.snapshot().discovery_watch
                time.sleep(0.01)
            state = balancer.snapshot().discovery_watch
            assert state is not None
            assert state.skipped >= 1
            assert state.revision == "6"
            assert [b.address for b in balancer.backends] == ["10.0.0.1:80", "10.0.0.2:80"]
    finally:
        server.shutdown()
        server.server_close()


class _Misbehaving(http.server.BaseHTTPRequestHandler):
    """An etcd gateway whose listing is good and whose watch misbehaves as ``mode`` says:
    ``error`` (accepted, then an error message), ``silent`` (created, then no byte), ``gzip``
    (the stream gzip-encoded, then held open)."""

    mode = "error"
    watches = 0

    def log_message(self, *_args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v3/kv/range":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(json.dumps({"header": {"revision": "5"}, "kvs": []}).encode())
            return
        type(self).watches += 1
        change = {
            "header": {"revision": "6"},
            "events": [
                {
                    "kv": {
                        "key": base64.b64encode(b"p/b").decode(),
                        "value": base64.b64encode(b'{"Op": 0, "Addr": "10.0.0.2:80"}').decode(),
                        "mod_revision": "6",
                    }
                }
            ],
        }
        lines = {
            "error": b'{"error": {"grpc_code": 7, "message": "permission denied"}}\n',
            "silent": b'{"result": {"created": true}}\n',
            "gzip": gzip.compress(
                b'{"result": {"created": true}}\n' + json.dumps({"result": change}).encode() + b"\n"
            ),
        }[self.mode]
        self.send_response(200)
        if self.mode == "gzip":
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        self.wfile.write(lines)
        self.wfile.flush()
        if self.mode != "error":
            time.sleep(1.5)


@contextlib.contextmanager
def _gateways(mode: str, count: int = 1) -> Iterator[list[str]]:
    handler = type("Gateway", (_Misbehaving,), {"mode": mode, "watches": 0})
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(count)]
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def _until(check: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + 15  # a hang guard
    while not check():
        assert time.monotonic() < end, what
        time.sleep(0.005)


def test_a_stream_accepted_then_broken_counts_its_failures_in_a_row(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="lbclient")
    with _gateways("error", count=2) as urls:
        source = Etcd("p/", endpoints=urls, backoff=0.01, backoff_max=0.05)
        with LoadBalancer(discovery=source):
            # The answer does not end the run of failures: the backoff grows with it (without
            # that, two endpoints were asked thousands of times a second).
            _until(lambda: "(4 in a row)" in caplog.text, caplog.text[-500:])


def test_a_silent_stream_is_reopened_without_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lbclient")
    with _gateways("silent") as urls:
        source = Etcd("p/", endpoints=urls, idle=0.2, backoff=0.01, backoff_max=0.05)
        balancer = LoadBalancer(discovery=source)
        with balancer:
            _until(lambda: balancer.snapshot().discovery_watch is not None, "watching")
            state = balancer.snapshot
            _until(lambda: (state().discovery_watch or WatchState()).reconnects >= 2, "reopened")
            assert balancer.snapshot().discovery_failures == 0
            assert (state().discovery_watch or WatchState()).error is None
    assert "ReadTimeout" not in caplog.text


def test_a_gzip_encoded_stream_is_read() -> None:
    with _gateways("gzip") as urls:
        balancer = LoadBalancer(discovery=Etcd("p/", endpoints=urls))
        with balancer:
            _until(lambda: [b.address for b in balancer.backends] == ["10.0.0.2:80"], "the change")
            state = balancer.snapshot().discovery_watch
            assert state is not None
            assert state.skipped == 0


class _NoPut(http.server.BaseHTTPRequestHandler):
    """An etcd gateway that grants leases, refuses every put, and records what it is asked."""

    calls: ClassVar[list[tuple[str, dict[str, object]]]] = []

    def log_message(self, *_args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        type(self).calls.append((self.path, body))
        status, answer = {
            "/v3/lease/grant": (200, {"ID": "7", "TTL": "10"}),
            "/v3/lease/revoke": (200, {}),
        }.get(self.path, (500, {"error": "no"}))
        self.send_response(status)
        self.end_headers()
        self.wfile.write(json.dumps(answer).encode())


def test_a_lease_whose_key_cannot_be_put_is_revoked() -> None:
    handler = type("NoPut", (_NoPut,), {"calls": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ConnectionError, match="/v3/kv/put failed"):
            Registration("s", "10.0.0.1:80", endpoints=[url], timeout=2.0).start()
    finally:
        server.shutdown()
        server.server_close()
    assert [path for path, _ in handler.calls] == [
        "/v3/lease/grant",
        "/v3/kv/put",
        "/v3/lease/revoke",
    ]
    assert handler.calls[-1][1] == {"ID": "7"}
