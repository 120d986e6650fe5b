"""An attempt's limits alone, with plain values: what :meth:`RequestPlan.limit` and
:meth:`RequestPlan.timeouts` give under an injected clock, and how :class:`Limits` moves from
the attempt's caps to the body's timeouts (the clients that apply them: test_time_limits and
test_limits_and_close)."""

from __future__ import annotations

import time

import pytest
from conftest import Clock

from lbclient import Hash, LoadBalancer
from lbclient._plan import RequestPlan
from lbclient._wire import Limits
from lbclient.retry import RetryPolicy

ADDRS = ["10.0.0.1:80", "10.0.0.2:80"]
GIVEN = {"connect": 5.0, "read": 0.5, "write": None, "pool": 10.0}


def plan(clock: Clock, **policy: float) -> RequestPlan:
    return RequestPlan(LoadBalancer(ADDRS, Hash), b"k", "GET", True, RetryPolicy(**policy), clock)


def test_without_a_cap_an_attempt_has_no_limit_and_keeps_the_clients_timeouts() -> None:
    clock = Clock()
    walk = plan(clock)
    assert walk.limit() == (None, "")
    assert walk.timeouts(GIVEN) is GIVEN
    clock.now += 1e6
    assert walk.limit() == (None, "")


def test_the_attempt_timeout_caps_each_operation_it_is_shorter_than() -> None:
    walk = plan(Clock(), attempt_timeout=2.0)
    assert walk.limit() == (2.0, "attempt")
    # None (no limit) and the longer timeouts become the cap; a shorter one stays.
    assert walk.timeouts(GIVEN) == {"connect": 2.0, "read": 0.5, "write": 2.0, "pool": 2.0}


def test_what_is_left_of_the_deadline_caps_an_attempt_once_it_is_shorter() -> None:
    clock = Clock()
    walk = plan(clock, attempt_timeout=2.0, deadline=5.0)
    assert walk.limit() == (2.0, "attempt")  # 5 s left: the attempt's own cap is shorter
    clock.now = 3.5
    assert walk.limit() == (pytest.approx(1.5), "deadline")
    assert walk.timeouts(GIVEN) == {
        "connect": pytest.approx(1.5),
        "read": 0.5,
        "write": pytest.approx(1.5),
        "pool": pytest.approx(1.5),
    }
    clock.now = 4.9
    cap, why = walk.limit()
    assert (cap, why) == (pytest.approx(0.1), "deadline")
    assert walk.timeouts(GIVEN)["read"] == pytest.approx(0.1)  # now shorter than the read's


def test_a_deadline_alone_caps_and_never_gives_less_than_a_millisecond() -> None:
    clock = Clock()
    walk = plan(clock, deadline=1.0)
    assert walk.limit() == (1.0, "deadline")
    clock.now = 1.0  # run out: the attempt still gets a millisecond, to fail as timed out
    assert walk.limit() == (0.001, "deadline")
    clock.now = 60.0
    assert walk.limit() == (0.001, "deadline")
    assert walk.remaining() == pytest.approx(-59.0)


def test_limits_cap_the_head_then_give_the_body_the_clients_own_timeouts() -> None:
    capped = {"connect": 2.0, "read": 0.5, "write": 2.0, "pool": 2.0}
    before = time.monotonic()
    limits = Limits(GIVEN, capped, 2.0, 30.0, 30.0)
    after = time.monotonic()
    assert (limits.timeouts, limits.read, limits.given) == (capped, 0.5, GIVEN)
    assert limits.until is not None
    assert before + 2.0 <= limits.until <= after + 2.0
    assert limits.ends is not None
    assert before + 30.0 <= limits.ends <= after + 30.0
    assert not limits.expired()
    # The head came: the client's own timeouts, and the I/O bounded by the deadline's end only.
    assert limits.body() is GIVEN
    assert (limits.timeouts, limits.read, limits.until) == (GIVEN, 0.5, limits.ends)


def test_limits_without_a_cap_or_deadline_bound_nothing_and_never_expire() -> None:
    limits = Limits(GIVEN, GIVEN, None, None, None)
    assert (limits.until, limits.ends, limits.deadline) == (None, None, None)
    assert not limits.expired()
    assert limits.body() is GIVEN
    assert limits.until is None


def test_limits_whose_deadline_has_run_out_say_so() -> None:
    limits = Limits(GIVEN, GIVEN, 0.0, 0.0, 0.5)
    assert limits.expired()  # a timeout now is the deadline's doing
    assert limits.deadline == 0.5
