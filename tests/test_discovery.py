"""Service discovery with plain values: the sources (Static, File, Function, DNS's settings),
the refresh rules (backoff, TTL clamping, the empty-answer rule, priority groups), and a
balancer kept current on a thread and on an asyncio task. No DNS server here: see
test_dns_live.py for that.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from lbclient import (
    Backend,
    HealthPolicy,
    LBTransport,
    LoadBalancer,
    NoBackendAvailable,
    Outcome,
)
from lbclient._background import THREAD_NAME
from lbclient.discovery import DNS, Discovered, File, Function, ServiceDiscovery, Static
from lbclient.discovery._refresh import (
    Priorities,
    Progress,
    RefreshJob,
    clamp_ttl,
    groups_of,
    retry_delay,
)
from lbclient.discovery.file import parse_json, parse_lines
from lbclient.testing import TestServer, closed_port

pytestmark = pytest.mark.timeout(60)


class Clock:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """A function source whose answer the test sets; ``error`` makes lookups fail."""

    def __init__(self, *addresses: str) -> None:
        self.answer: list[Backend | str] = list(addresses)
        self.error: Exception | None = None
        self.calls = 0
        #: Set by a test once the balancer is closed; ``late`` counts lookups made after.
        self.closed = False
        self.late = 0

    def __call__(self) -> list[Backend | str]:
        self.calls += 1
        self.late += self.closed
        if self.error is not None:
            raise self.error
        return list(self.answer)


def addresses(lb: LoadBalancer) -> list[str]:
    return [b.address for b in lb.backends]


def step(job: RefreshJob) -> None:
    """One lookup, as the runner makes it."""
    asyncio.run(job.lookup())


def recheck(job: RefreshJob) -> None:
    """One look at health and probes, as the runner makes it between lookups."""
    asyncio.run(job.recheck())


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.005)


def discovery_threads() -> list[str]:
    """The names of the runners' threads (the event loop's first, then its pool's)."""
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(THREAD_NAME))


# -- the rules ---------------------------------------------------------------------------------


def test_ttl_is_clamped() -> None:
    assert clamp_ttl(0.0, 5.0, 300.0) == 5.0  # Consul's default TTL of 0
    assert clamp_ttl(30.0, 5.0, 300.0) == 30.0
    assert clamp_ttl(86400.0, 5.0, 300.0) == 300.0


def test_retry_delay_doubles_up_to_the_interval() -> None:
    assert [retry_delay(n, 30.0) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert retry_delay(1, 0.25) == 0.25  # never later than a normal refresh
    assert retry_delay(0, 10.0) == 10.0
    assert retry_delay(10_000, 5.0) == 5.0


def test_failures_back_off_and_an_answer_resets_them() -> None:
    progress = Progress(empty_after=3)
    assert [progress.failure("timed out", 10.0) for _ in range(5)] == [1, 2, 4, 8, 10]
    assert (progress.failures, progress.failed, progress.error) == (5, 5, "timed out")
    assert progress.answer(2, 10.0, now=0.0) == (True, 10.0)
    assert (progress.refreshes, progress.failures, progress.failed, progress.error) == (
        1,
        5,
        0,
        None,
    )
    assert progress.failure("SERVFAIL", 10.0) == 1


def test_an_empty_answer_is_taken_only_when_it_repeats_and_has_held() -> None:
    progress = Progress(empty_after=3, empty_for=10.0)
    assert progress.answer(2, 30.0, now=0.0) == (True, 30.0)
    assert progress.answer(0, 30.0, now=100.0) == (False, 1.0)  # kept; asked again sooner
    assert progress.answer(0, 30.0, now=101.0) == (False, 2.0)
    # Three in a row, but for 3 s only: kept, and asked again no later than when 10 s are up.
    assert progress.answer(0, 30.0, now=103.0) == (False, 4.0)
    assert progress.answer(0, 30.0, now=107.0) == (False, 3.0)
    assert progress.answer(0, 30.0, now=110.0) == (True, 30.0)  # 3+ in a row over 10 s
    assert progress.answer(0, 30.0, now=140.0) == (True, 30.0)
    assert progress.answer(1, 30.0, now=170.0) == (True, 30.0)
    assert (progress.empty, progress.empty_since) == (0, None)


def test_empty_answers_in_quick_succession_never_empty_the_set() -> None:
    # A file emptied for a moment, read every 0.2 s: dozens of empty answers, all kept.
    progress = Progress(empty_after=3, empty_for=10.0)
    progress.answer(4, 0.2, now=0.0)
    taken = [progress.answer(0, 0.2, now=0.2 * i)[0] for i in range(1, 50)]
    assert taken == [False] * 49
    assert progress.answer(4, 0.2, now=10.0) == (True, 0.2)  # written again: the count resets
    assert [progress.answer(0, 0.2, now=10.0 + 0.2 * i)[0] for i in range(1, 4)] == [False] * 3


def test_failures_between_empty_answers_neither_count_nor_reset() -> None:
    progress = Progress(empty_after=2, empty_for=5.0)
    assert progress.answer(0, 10.0, now=0.0)[0] is False
    progress.failure("timed out", 10.0)
    assert progress.answer(0, 10.0, now=4.0)[0] is False  # two, but over 4 s
    progress.failure("timed out", 10.0)
    assert progress.answer(0, 10.0, now=5.0)[0] is True


def test_empty_for_zero_takes_the_count_alone() -> None:
    assert Progress(empty_after=1).answer(0, 10.0, now=0.0) == (True, 10.0)
    progress = Progress(empty_after=2, empty_for=0.0)
    assert progress.answer(0, 10.0, now=0.0) == (False, 1.0)
    assert progress.answer(0, 10.0, now=0.0) == (True, 10.0)


def test_an_answer_in_part_is_taken_and_its_failed_parts_counted() -> None:
    progress = Progress(empty_after=3)
    refused = ("AAAA", "AAAA users.svc: NoNameservers: REFUSED")
    assert progress.answer(2, 30.0, now=0.0, failed=[refused]) == (True, 30.0)
    assert (progress.refreshes, progress.failures, progress.error) == (1, 0, None)
    assert progress.parts == {"AAAA": 1}
    assert progress.partial == "AAAA users.svc: NoNameservers: REFUSED"
    progress.answer(2, 30.0, now=1.0, failed=[refused, ("A", "A b.svc: SERVFAIL")])
    assert progress.parts == {"AAAA": 2, "A": 1}
    assert progress.partial == "AAAA users.svc: NoNameservers: REFUSED; A b.svc: SERVFAIL"
    progress.answer(2, 30.0, now=2.0)
    assert (progress.parts, progress.partial) == ({"AAAA": 2, "A": 1}, None)  # whole again


def test_no_backends_while_a_part_failed_is_a_failed_lookup() -> None:
    progress = Progress(empty_after=1, empty_for=0.0)
    assert progress.answer(0, 30.0, now=0.0, failed=[("AAAA", "AAAA x: timed out")]) == (
        False,
        1.0,
    )
    assert (progress.refreshes, progress.failures, progress.empty) == (0, 1, 0)
    assert progress.error == "no backends found, and part of the lookup failed: AAAA x: timed out"
    assert progress.parts == {}


def _b(address: str, priority: int | None, weight: int = 1) -> Backend:
    return Backend(address, weight, None if priority is None else {"priority": priority})


def test_groups_by_priority_lowest_first() -> None:
    a, b, c, d = (
        _b("10.0.0.1:80", 10),
        _b("10.0.0.2:80", 20),
        _b("10.0.0.3:80", 10),
        _b("10.0.0.4:80", None),
    )
    assert groups_of([a, b, c, d]) == {0: (d,), 10: (a, c), 20: (b,)}


def test_priorities_fail_over_to_the_next_group_and_back() -> None:
    a, b, c = _b("10.0.0.1:80", 1), _b("10.0.0.2:80", 1), _b("10.0.0.3:80", 2)
    p = Priorities()
    assert p.choose() == (None, None)  # before any answer: leave the balancer alone
    p.take([a, b, c])
    assert p.choose() == ((a, b), None)
    backends, note = p.choose(active_down=True)
    assert backends == (c,)
    assert note == "every backend of priority 1 is down; priority 2 takes over"
    assert p.down == {1}
    assert p.choose() == ((c,), None)  # group 1 stays out until a probe of it succeeds
    assert p.choose(active_down=True) == ((c,), None)  # the last group stays when down too
    backends, note = p.choose(recovered=[1])
    assert backends == (a, b)
    assert note == "priority 1 is back; it takes over from priority 2"
    assert p.down == set()


def test_priorities_follow_new_answers() -> None:
    a, b, c = _b("10.0.0.1:80", 5), _b("10.0.0.2:80", 7), _b("10.0.0.3:80", 3)
    p = Priorities()
    p.take([a, b])
    p.choose()
    p.choose(active_down=True)
    assert p.active == 7
    p.take([a, b, c])  # a lower group appears: it serves at once
    assert p.choose() == ((c,), "priority 3 is back; it takes over from priority 7")
    p.take([b])  # the group in use leaves: the lowest that is left serves
    assert p.choose() == ((b,), None)
    assert p.down == set()  # group 5 left, so it is forgotten
    p.take([])
    assert p.choose() == ((), None)
    assert p.active is None


# -- the sources -------------------------------------------------------------------------------


def test_static_answers_its_backends_sorted() -> None:
    source = Static(["10.0.0.2:80", Backend("10.0.0.1:80", 3)])
    assert [(b.address, b.weight) for b in source.discover().backends] == [
        ("10.0.0.1:80", 3),
        ("10.0.0.2:80", 1),
    ]
    assert asyncio.run(source.adiscover()) is source.discover()
    assert repr(source) == "Static(['10.0.0.1:80', '10.0.0.2:80'])"
    with pytest.raises(ValueError, match="no port"):
        Static(["10.0.0.1"])


def test_discovered_checks_its_values() -> None:
    assert Discovered(["10.0.0.2:80", "10.0.0.1:80"], ttl=5).ttl == 5.0
    with pytest.raises(ValueError, match="ttl must be a finite number > 0"):
        Discovered([], ttl=0)
    with pytest.raises(ValueError, match="listed twice"):
        Discovered([Backend("10.0.0.1:80", 1), Backend("10.0.0.1:80", 2)])


def test_function_returns_backends_or_an_answer() -> None:
    assert [b.address for b in Function(lambda: ["10.0.0.1:80"]).discover().backends] == [
        "10.0.0.1:80"
    ]
    answer = Discovered(["10.0.0.1:80"], ttl=3)
    assert Function(lambda: answer).discover() is answer
    with pytest.raises(TypeError, match="must return a Discovered or a list of backends"):
        Function(lambda: "10.0.0.1:80").discover()
    with pytest.raises(TypeError, match="fn must be callable"):
        Function("10.0.0.1:80")  # type: ignore[arg-type]


def test_function_may_be_async() -> None:
    async def fetch() -> list[str]:
        await asyncio.sleep(0)
        return ["10.0.0.7:80"]

    source = Function(fetch)
    assert [b.address for b in asyncio.run(source.adiscover()).backends] == ["10.0.0.7:80"]
    assert [b.address for b in source.discover().backends] == ["10.0.0.7:80"]  # own loop


def test_a_sync_function_runs_off_the_event_loop() -> None:
    seen: list[str] = []

    def fetch() -> list[str]:
        seen.append(threading.current_thread().name)
        return ["10.0.0.1:80"]

    async def main() -> Discovered:
        return await Function(fetch).adiscover()

    asyncio.run(main())
    assert len(seen) == 1
    assert seen[0] != threading.main_thread().name


def test_a_source_of_your_own() -> None:
    class Registry(ServiceDiscovery):
        refresh = 10.0

        def discover(self) -> Discovered:
            return Discovered(["10.0.0.8:80"], ttl=2)

    async def main() -> None:
        async with LoadBalancer(discovery=Registry()) as lb:  # adiscover: on a worker thread
            assert addresses(lb) == ["10.0.0.8:80"]

    asyncio.run(main())
    with LoadBalancer(discovery=Registry()) as lb:
        assert addresses(lb) == ["10.0.0.8:80"]
    with pytest.raises(NotImplementedError):
        ServiceDiscovery().discover()


def test_every_source_checks_its_options() -> None:
    with pytest.raises(ValueError, match="empty_after must be >= 1"):
        Static([], empty_after=0)
    with pytest.raises(ValueError, match="timeout must be a finite number > 0"):
        Function(list, timeout=0)
    with pytest.raises(ValueError, match="timeout must be a finite number > 0, got an int of"):
        Function(list, timeout=10**5000)
    with pytest.raises(TypeError, match="failover_interval must be a number"):
        Static([], failover_interval="1")


# -- File ----------------------------------------------------------------------------------------


def test_lines_with_weights_comments_and_ipv6() -> None:
    text = "# pool A\n\n10.0.3.7:8080 3\n  10.0.3.8:8080   # no weight\n[2001:db8::7]:8080 2\n"
    backends = parse_lines(text, "users.txt")
    assert [(b.address, b.weight) for b in backends] == [
        ("10.0.3.7:8080", 3),
        ("10.0.3.8:8080", 1),
        ("[2001:db8::7]:8080", 2),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.1:80\n10.0.0.2\n", r"users\.txt, line 2: .*'10\.0\.0\.2' has no port"),
        ("10.0.0.1:80 heavy\n", r"users\.txt, line 1: the weight must be a whole number"),
        ("\n\n10.0.0.1:80 2 x\n", r"users\.txt, line 3: expected 'host:port \[weight\]'"),
        ("10.0.0.1:80 0\n", r"users\.txt, line 1: backend '10\.0\.0\.1:80' weight must be in"),
        ("10.0.0.1:80\n# x\n10.0.0.1:80 2\n", r"line 3: 10\.0\.0\.1:80 is listed again .*\(line 1"),
        ("http://10.0.0.1:80\n", r"users\.txt, line 1: .*looks like a URL"),
    ],
)
def test_a_bad_line_is_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_lines(text, "users.txt")


def test_json_list_object_priority_and_metadata() -> None:
    text = (
        '{"backends": [{"address": "10.0.3.7:8080", "weight": 3, "metadata": {"zone": "a"}},'
        ' {"address": "10.0.9.1:8080", "priority": 1}, "10.0.3.8:8080"]}'
    )
    backends = parse_json(text, "users.json")
    assert [(b.address, b.weight, dict(b.metadata)) for b in backends] == [
        ("10.0.3.7:8080", 3, {"zone": "a"}),
        ("10.0.9.1:8080", 1, {"priority": 1}),
        ("10.0.3.8:8080", 1, {}),
    ]
    assert parse_json('["10.0.0.1:80"]') == (Backend("10.0.0.1:80"),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('["10.0.0.1:80",\n  "10.0.0.2:80" "x"]', r"users\.json, line 2 column 17: not valid JSON"),
        ('[{"address": "10.0.0.1:80", "wieght": 2}]', r"backends\[0\]: unknown key 'wieght'"),
        ('["10.0.0.1:80", 7]', r"backends\[1\]: expected 'host:port' or an object, got 7"),
        ('[{"weight": 2}]', r"backends\[0\]: 'address' must be a 'host:port' string"),
        ('[{"address": "10.0.0.1:80", "priority": -1}]', r"backends\[0\]: 'priority' must be"),
        ('[{"address": "10.0.0.1:80", "weight": 0}]', r"backends\[0\]: backend .* weight must be"),
        ('{"servers": []}', r"a JSON object must hold only 'backends'"),
        ('"10.0.0.1:80"', r"expected a JSON list of backends, got str"),
    ],
)
def test_a_bad_json_entry_is_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_json(text, "users.json")


def test_file_is_read_again_only_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "users.txt"
    path.write_text("10.0.0.1:80\n")
    source = File(path)
    first = source.discover()
    assert [b.address for b in first.backends] == ["10.0.0.1:80"]
    assert source.discover() is first  # unchanged: not parsed again
    path.write_text("10.0.0.1:80\n10.0.0.2:80 4\n")
    second = source.discover()
    assert [(b.address, b.weight) for b in second.backends] == [
        ("10.0.0.1:80", 1),
        ("10.0.0.2:80", 4),
    ]
    # Replaced by a rename, as editors and config managers do.
    other = tmp_path / "users.txt.new"
    other.write_text("10.0.0.3:80\n")
    os.replace(other, path)
    assert [b.address for b in source.discover().backends] == ["10.0.0.3:80"]
    assert repr(source) == f"File({str(path)!r})"


def test_file_format_by_name_or_content(tmp_path: Path) -> None:
    lines = tmp_path / "v6.txt"
    lines.write_text("[::1]:80\n")  # a bracket, but not JSON
    assert [b.address for b in File(lines).discover().backends] == ["[::1]:80"]
    data = tmp_path / "users.json"
    data.write_text('["10.0.0.1:80"]')
    assert [b.address for b in File(data).discover().backends] == ["10.0.0.1:80"]
    sniffed = tmp_path / "users"
    sniffed.write_text('[ {"address": "10.0.0.2:80"} ]')
    assert [b.address for b in File(sniffed).discover().backends] == ["10.0.0.2:80"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", r"users, backends\[0\]: expected 'host:port' or an object, got 1$"),
        ('[["10.0.0.1:80"]]', r"users, backends\[0\]: expected 'host:port' or an object"),
        ('{"servers": []}', r"users: a JSON object must hold only 'backends'"),
        ("[]\n", None),
    ],
)
def test_a_file_that_is_json_is_read_as_json(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "users"  # no .json: what the text is decides
    path.write_text(text)
    if message is None:
        assert File(path).discover().backends == ()
        return
    with pytest.raises(ValueError, match=str(tmp_path)) as caught:
        File(path).discover()
    assert re.search(message, str(caught.value).replace(str(tmp_path) + "/", "")), caught.value
    assert "whole number" not in str(caught.value)


def test_lines_that_open_with_a_bracket_are_still_lines(tmp_path: Path) -> None:
    path = tmp_path / "users.txt"
    path.write_text("[::1]:80 2\n[2001:db8::7]:8080\n")
    assert [(b.address, b.weight) for b in File(path).discover().backends] == [
        ("[::1]:80", 2),
        ("[2001:db8::7]:8080", 1),
    ]
    path.write_text("[1, 2\n")  # broken: not JSON, so a line, named
    with pytest.raises(ValueError, match=r"line 1: backend address '\[1,' has an unclosed"):
        File(path).discover()


def test_absurd_values_in_a_file_are_named_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "users.txt"
    path.write_text("10.0.0.1:80 " + "9" * 5000 + "\n")
    with pytest.raises(ValueError, match="the weight must be in") as caught:
        File(path).discover()
    message = str(caught.value)
    assert "line 1: the weight must be in 1..65535, got '99999" in message
    assert "(5,002 characters)" in message
    assert len(message) < 300
    path.write_text("10.0.0.1:" + "8" * 5000 + "\n")
    with pytest.raises(ValueError, match=r"line 1: .*5,000-digit port") as caught:
        File(path).discover()
    assert len(str(caught.value)) < 300


def test_a_bad_file_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "users.txt"
    path.write_text("10.0.0.1:80\n10.0.0.2:80 x\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2: the weight must be a whole number"):
        File(path).discover()
    with pytest.raises(FileNotFoundError):
        File(tmp_path / "missing.txt").discover()
    with pytest.raises(TypeError, match="path must be a str or a path"):
        File(3)  # type: ignore[arg-type]


# -- DNS's settings (lookups: test_dns_live.py) ------------------------------------------------


def test_dns_settings_are_checked() -> None:
    pytest.importorskip("dns.resolver")
    with pytest.raises(TypeError, match=r"needs port=.*DNS\.srv"):
        DNS("users.internal")
    with pytest.raises(TypeError, match=r"DNS\.srv takes no port="):
        DNS.srv("_http._tcp.users.service.consul", port=80)
    with pytest.raises(ValueError, match="records must be 'A', 'AAAA' or both"):
        DNS("users.internal", port=80, records=["MX"])
    with pytest.raises(ValueError, match="nameservers must be IP addresses"):
        DNS("users.internal", port=80, nameservers=["dns.google"])
    with pytest.raises(ValueError, match=r"nameserver_port must be in 1\.\.65535"):
        DNS("users.internal", port=80, nameserver_port=0)
    with pytest.raises(ValueError, match=r"min_ttl \(10\) is more than max_ttl \(5\)"):
        DNS("users.internal", port=80, min_ttl=10, max_ttl=5)
    with pytest.raises(ValueError, match="name must be a DNS name"):
        DNS("users internal", port=80)
    dns = DNS("users.internal", port=8080, nameservers="127.0.0.1", nameserver_port=5353)
    assert dns.nameservers == ("127.0.0.1",)
    assert repr(dns) == (
        "DNS('users.internal', port=8080, nameservers=['127.0.0.1'], nameserver_port=5353)"
    )
    assert repr(DNS.srv("_http._tcp.users.service.consul")) == (
        "DNS.srv('_http._tcp.users.service.consul')"
    )


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("-bad-.test", r"the label '-bad-' may hold only letters, digits, '-' and '_'"),
        ("a.-b.test", r"the label '-b' may hold only"),
        ("a" * 300 + ".test", r"is 300 characters long \(at most 63\)"),
        (".".join(["a" * 60] * 5), r"it is 304 characters long \(at most 253\)"),
        ("users..test", "it has an empty label"),
        ("users.te$t", r"the label 'te\$t' may hold only"),
        ("☃.test", r"'☃' is not a valid international label"),
        ("", r"got ''$"),
        (".", r"got '\.'$"),
    ],
)
def test_dns_rejects_names_that_no_lookup_could_answer(name: str, why: str) -> None:
    pytest.importorskip("dns.resolver")
    with pytest.raises(
        ValueError, match=r"name must be a DNS name like 'users\.internal', got "
    ) as e:
        DNS(name, port=80)
    message = str(e.value)
    assert re.search(why, message), message
    assert len(message) < 300  # a 300-character label is named, cut short
    with pytest.raises(TypeError, match=r"name must be a str like 'users.internal', got 7 \(int\)"):
        DNS(7, port=80)  # type: ignore[arg-type]


def test_dns_asks_an_international_name_in_its_idna_form() -> None:
    pytest.importorskip("dns.resolver")
    assert DNS("bücher.test", port=80).name == "xn--bcher-kva.test"  # as httpx encodes it
    assert DNS("Bücher.Test.", port=80).name == "xn--bcher-kva.Test."
    assert DNS.srv("_http._tcp.bücher.test").name == "_http._tcp.xn--bcher-kva.test"
    assert repr(DNS("bücher.test", port=80)) == "DNS('xn--bcher-kva.test', port=80)"
    assert httpx.URL("http://bücher.test/").raw_host == b"xn--bcher-kva.test"


def test_dns_settings_name_absurd_values_cut_short() -> None:
    pytest.importorskip("dns.resolver")
    with pytest.raises(ValueError, match=r"port must be in 1\.\.65535, got an int of 5,001 digits"):
        DNS("users.internal", port=10**5000)
    with pytest.raises(ValueError, match=r"timeout must be a finite number > 0, got -1"):
        DNS("users.internal", port=80, timeout=-1)


def test_dns_without_dnspython_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "dns" or m.startswith("dns.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "dns", None)
    with pytest.raises(ImportError, match=r"pip install 'lbclient\[dns\]'"):
        DNS("users.internal", port=80)


# -- a balancer kept current -------------------------------------------------------------------


def test_the_balancer_checks_discovery_and_refresh() -> None:
    with pytest.raises(TypeError, match=r"Function\(fn\) around a function of your own"):
        LoadBalancer(discovery=lambda: ["10.0.0.1:80"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="refresh= applies only with discovery="):
        LoadBalancer(["10.0.0.1:80"], refresh=5)
    with pytest.raises(ValueError, match="refresh must be a finite number > 0"):
        LoadBalancer(discovery=Static([]), refresh=0)
    source = Static(["10.0.0.1:80"])
    lb = LoadBalancer(discovery=source)
    assert lb.discovery is source


def test_nothing_is_looked_up_before_start_and_start_looks_up_once() -> None:
    source = Source("10.0.0.1:80", "10.0.0.2:80")
    lb = LoadBalancer(["10.0.0.9:80"], discovery=Function(source), refresh=3600)
    assert source.calls == 0
    assert addresses(lb) == ["10.0.0.9:80"]  # the given backends serve until the first answer
    with lb:
        assert source.calls == 1
        assert addresses(lb) == ["10.0.0.1:80", "10.0.0.2:80"]
        snapshot = lb.snapshot()
        assert (snapshot.discovery_refreshes, snapshot.discovery_failures) == (1, 0)
        assert snapshot.discovery_error is None
        assert snapshot.discovery_priority is None
        assert "discovery: 1 answers, 0 failed lookups" in str(snapshot)
    assert discovery_threads() == []


def test_refreshes_keep_survivors_health_on_a_thread() -> None:
    source = Source("10.0.0.1:80", "10.0.0.2:80")
    clock = Clock()
    lb = LoadBalancer(
        discovery=Function(source),
        refresh=0.01,
        health=HealthPolicy(consecutive_failures=1),
        clock=clock,
    )
    with lb:
        assert discovery_threads()[:1] == [THREAD_NAME]
        lb.report("10.0.0.2:80", Outcome.CONNECTION_FAILURE)
        assert lb.health("10.0.0.2:80").ejected
        source.answer = ["10.0.0.2:80", "10.0.0.3:80"]
        wait_until(lambda: addresses(lb) == ["10.0.0.2:80", "10.0.0.3:80"], "the new set")
        assert lb.health("10.0.0.2:80").ejected  # the survivor stays ejected
        assert lb.health("10.0.0.3:80").healthy
        assert lb.select().address == "10.0.0.3:80"
    source.closed = True
    # close() joined the runner's thread and its pool: nothing is left to look anything up.
    assert discovery_threads() == []
    assert source.late == 0


def test_refreshes_on_an_asyncio_task() -> None:
    source = Source("10.0.0.1:80")

    async def main() -> None:
        lb = LoadBalancer(discovery=Function(source), refresh=0.01)
        async with lb:
            assert addresses(lb) == ["10.0.0.1:80"]
            assert discovery_threads() == []
            assert any(t.get_name() == "lbclient-discovery" for t in asyncio.all_tasks())
            source.answer = ["10.0.0.1:80", "10.0.0.2:80"]
            deadline = time.monotonic() + 10
            while len(lb) != 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
        assert not any(t.get_name() == "lbclient-discovery" for t in asyncio.all_tasks())

    asyncio.run(main())
    assert discovery_threads() == []


def test_async_start_outside_asyncio_runs_on_a_thread() -> None:
    trio = pytest.importorskip("trio")
    source = Source("10.0.0.1:80")

    async def main() -> None:
        lb = LoadBalancer(discovery=Function(source), refresh=0.01)
        async with lb:
            assert addresses(lb) == ["10.0.0.1:80"]
            assert discovery_threads()[:1] == [THREAD_NAME]
            source.answer = ["10.0.0.2:80"]
            deadline = time.monotonic() + 10
            while addresses(lb) != ["10.0.0.2:80"]:
                assert time.monotonic() < deadline
                await trio.sleep(0.005)

    trio.run(main)
    assert discovery_threads() == []


def test_async_sources_are_awaited_on_the_task() -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    async def fetch() -> list[str]:
        loops.append(asyncio.get_running_loop())
        return ["10.0.0.5:80"]

    async def main() -> None:
        async with LoadBalancer(discovery=Function(fetch), refresh=3600) as lb:
            assert addresses(lb) == ["10.0.0.5:80"]
            assert loops == [asyncio.get_running_loop()]

    asyncio.run(main())


def test_a_failed_lookup_keeps_the_last_set_and_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = Source("10.0.0.1:80")
    lb = LoadBalancer(discovery=Function(source), refresh=3600)
    job = RefreshJob(Function(source), lb, 3600)
    step(job)
    source.error = RuntimeError("registry down")
    with caplog.at_level(logging.WARNING, logger="lbclient"):
        step(job)
        step(job)
    assert addresses(lb) == ["10.0.0.1:80"]
    snapshot = lb.snapshot()
    assert (snapshot.discovery_refreshes, snapshot.discovery_failures) == (1, 2)
    assert snapshot.discovery_error == "RuntimeError: registry down"
    assert "latest: RuntimeError: registry down" in str(snapshot)
    assert "lookup failed (2 in a row): RuntimeError: registry down; keeping the last 1" in (
        caplog.text
    )
    assert job.interval == pytest.approx(2.0, abs=0.1)  # backing off: 1 s, then 2 s
    source.error = None
    source.answer = ["10.0.0.2:80"]
    step(job)
    assert addresses(lb) == ["10.0.0.2:80"]
    assert lb.snapshot().discovery_error is None
    assert job.interval == pytest.approx(3600, abs=1)


def test_an_empty_answer_empties_the_set_only_when_it_repeats_and_holds() -> None:
    source = Source("10.0.0.1:80", "10.0.0.2:80")
    lb = LoadBalancer()
    clock = Clock()
    job = RefreshJob(Function(source), lb, 60, clock=clock)
    step(job)
    source.answer = []
    for _ in range(5):  # five empty answers within a second: kept
        clock.now += 0.2
        step(job)
    assert addresses(lb) == ["10.0.0.1:80", "10.0.0.2:80"]
    clock.now += 10.0
    step(job)
    assert addresses(lb) == []
    source.answer = ["10.0.0.3:80"]
    step(job)
    assert addresses(lb) == ["10.0.0.3:80"]


def test_empty_after_and_empty_for_are_the_sources() -> None:
    source = Source("10.0.0.1:80")
    lb = LoadBalancer()
    job = RefreshJob(Function(source, empty_after=1, empty_for=0), lb, 60, clock=Clock())
    step(job)
    source.answer = []
    step(job)
    assert addresses(lb) == []
    with pytest.raises(ValueError, match=r"empty_for must be a finite number >= 0, got -1"):
        Function(source, empty_for=-1)


def test_a_file_emptied_for_a_moment_keeps_the_set(tmp_path: Path) -> None:
    # An editor's non-atomic save, a tool that truncates then writes: the file is read empty
    # several times in a row, for well under empty_for (10 s). The set stays.
    path = tmp_path / "users.txt"
    path.write_text("10.0.0.1:80\n10.0.0.2:80\n")
    lb = LoadBalancer()
    clock = Clock()
    job = RefreshJob(File(path), lb, 0.2, clock=clock)
    step(job)
    path.write_text("")
    for _ in range(3):  # read empty every 0.2 s for 0.6 s
        clock.now += 0.2
        step(job)
    assert addresses(lb) == ["10.0.0.1:80", "10.0.0.2:80"]
    path.write_text("10.0.0.1:80\n10.0.0.2:80\n10.0.0.3:80\n")
    clock.now += 0.2
    step(job)
    assert addresses(lb) == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    # Left empty: once empty answers have held for empty_for, the set empties.
    path.write_text("")
    while addresses(lb):
        clock.now += job.interval  # the next lookup, when the job says it is due
        step(job)
        assert clock.now < 2000
    assert job.progress.empty_since is not None
    assert clock.now - job.progress.empty_since >= 10.0


def test_a_file_emptied_for_a_moment_under_traffic_takes_nothing_down(tmp_path: Path) -> None:
    # The live version: the balancer re-reads the file every 0.2 s on its runner while the
    # file stays empty for three reads; not one read empties the set.
    path = tmp_path / "users.txt"
    path.write_text("10.0.0.1:80\n10.0.0.2:80\n")
    sizes: list[int] = []
    lb = LoadBalancer(discovery=File(path), refresh=0.2)
    with lb:
        path.write_text("")
        seen = lb.snapshot().discovery_refreshes
        while lb.snapshot().discovery_refreshes < seen + 4:  # three reads of it empty, at least
            sizes.append(len(lb))
            time.sleep(0.005)
        path.write_text("10.0.0.1:80\n10.0.0.2:80\n")
        sizes.append(len(lb))
    assert min(sizes) == 2


def test_ttl_sets_the_next_lookup_and_refresh_the_rest() -> None:
    lb = LoadBalancer()
    job = RefreshJob(Function(lambda: Discovered(["10.0.0.1:80"], ttl=7)), lb, 60)
    step(job)
    assert job.interval == pytest.approx(7, abs=0.1)
    job = RefreshJob(Function(lambda: ["10.0.0.1:80"]), lb, 60)
    step(job)
    assert job.interval == pytest.approx(60, abs=0.1)
    assert RefreshJob(File("x"), lb, None).refresh == 1.0  # the source's own default
    assert RefreshJob(Function(list), lb, None).refresh == 30.0


def test_a_request_fails_naming_the_discovery_error() -> None:
    source = Source()
    source.error = RuntimeError("registry down")
    lb = LoadBalancer(discovery=Function(source), refresh=3600)
    with (
        lb,
        httpx.Client(transport=LBTransport(lb), base_url="http://users") as client,
        pytest.raises(NoBackendAvailable) as caught,
    ):
        client.get("/")
    assert str(caught.value) == (
        "no backend available for GET http://users/: it has no backends: "
        "discovery failed: RuntimeError: registry down"
    )


def test_a_request_says_when_discovery_found_none() -> None:
    lb = LoadBalancer(discovery=Static([]))
    with (
        lb,
        httpx.Client(transport=LBTransport(lb), base_url="http://users") as client,
        pytest.raises(NoBackendAvailable, match="it has no backends: discovery found none"),
    ):
        client.get("/")


def test_the_core_loads_no_discovery_and_the_names_load_on_first_use() -> None:
    code = (
        "import sys, lbclient\n"
        "lbclient.LoadBalancer(['10.0.0.1:80']).select()\n"
        "print(sorted(m for m in sys.modules if m.startswith(('lbclient.discovery', 'dns'))))\n"
        "from lbclient.discovery import DNS, File, Function, Static\n"
        "print(all(callable(c) for c in (DNS, File, Function, Static)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "True"]


def test_a_balancer_with_discovery_pickles() -> None:
    lb = LoadBalancer(discovery=File("users.txt"), refresh=2)
    copy = pickle.loads(pickle.dumps(lb))
    assert isinstance(copy.discovery, File)
    assert copy.discovery.path == Path("users.txt")


# -- priority groups --------------------------------------------------------------------------


@pytest.fixture
def primary() -> Iterator[TestServer]:
    with TestServer(name="primary") as server:
        yield server


def test_a_group_that_is_down_hands_over_and_takes_back_after_a_probe(
    primary: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    a = Backend(primary.address, 1, {"priority": 0})
    b = Backend(f"127.0.0.1:{closed_port()}", 1, {"priority": 0})
    c = Backend("127.0.0.1:9", 2, {"priority": 1})
    lb = LoadBalancer(
        health=HealthPolicy(consecutive_failures=1, max_ejection_percent=100, panic_threshold=0),
        clock=Clock(),
    )
    job = RefreshJob(Function(lambda: [a, b, c], timeout=2.0), lb, 60)
    step(job)
    assert set(lb.backends) == {a, b}
    assert lb.snapshot().discovery_priority == 0
    recheck(job)
    assert set(lb.backends) == {a, b}  # healthy: nothing changes
    lb.report(a, False)
    recheck(job)
    assert set(lb.backends) == {a, b}  # one of the group is still up
    lb.report(b, False)
    primary.kill()
    with caplog.at_level(logging.WARNING, logger="lbclient"):
        recheck(job)
    assert lb.backends == (c,)
    assert lb.backends[0].weight == 2
    assert lb.snapshot().discovery_priority == 1
    assert "every backend of priority 0 is down; priority 1 takes over" in caplog.text
    recheck(job)  # the probe of group 0 fails: it stays out
    assert lb.backends == (c,)
    primary.start()
    recheck(job)  # the probe reaches the primary: group 0 is back, afresh
    assert set(lb.backends) == {a, b}
    assert lb.health(a).healthy
    assert lb.health(b).healthy


def test_a_group_switched_off_by_hand_is_not_down() -> None:
    a = Backend("10.0.0.1:80", 1, {"priority": 0})
    c = Backend("10.0.0.3:80", 1, {"priority": 1})
    lb = LoadBalancer()
    job = RefreshJob(Function(lambda: [a, c]), lb, 60)
    step(job)
    lb.set_enabled(a, False)
    recheck(job)
    assert lb.backends == (a,)


def test_transports_start_discovery_with_their_first_request() -> None:
    import asyncio
    import threading

    import httpx
    import requests

    from lbclient import AsyncLBTransport, LBAdapter, LBTransport, LoadBalancer
    from lbclient.discovery import Function
    from lbclient.testing import TestServer

    with TestServer(name="found") as server:
        calls: list[int] = []

        def lookup() -> list[str]:
            calls.append(1)
            return [server.address]

        lb = LoadBalancer(discovery=Function(lookup), refresh=60)
        transport = LBTransport(lb)
        with httpx.Client(transport=transport) as client:
            answers: list[str] = []
            threads = [
                threading.Thread(
                    target=lambda: answers.append(client.get("http://users/").json()["server"])
                )
                for _ in range(4)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert answers == ["found"] * 4  # every first request waited for the first answer
        assert calls

        async def main() -> list[str]:
            alb = LoadBalancer(discovery=Function(lookup), refresh=60)
            async with httpx.AsyncClient(transport=AsyncLBTransport(alb)) as client:
                responses = await asyncio.gather(*(client.get("http://users/") for _ in range(4)))
            return [r.json()["server"] for r in responses]

        assert asyncio.run(main()) == ["found"] * 4
        with requests.Session() as session:
            rlb = LoadBalancer(discovery=Function(lookup), refresh=60)
            session.mount("http://users/", LBAdapter(rlb))
            assert session.get("http://users/").json()["server"] == "found"
