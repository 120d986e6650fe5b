"""The retry rules and the attempt loop, with plain values (no I/O)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import AsyncFakeWire, Boom, Clock, FakeWire

from lbclient import Backend, Hash, HealthPolicy, LoadBalancer, RoundRobin
from lbclient._config import AdapterConfig, policy_from
from lbclient._loop import drive_async, drive_sync
from lbclient._plan import Fault, RequestPlan
from lbclient._redact import redact
from lbclient.errors import KeyFunctionError, NoBackendAvailable
from lbclient.retry import Failure, RequestOptions, RetryPolicy

ADDRS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]


NEVER = Fault(Failure.NEVER_SENT)
MAYBE = Fault(Failure.MAYBE_SENT)
LOCAL = Fault(Failure.LOCAL)
TIMEOUT = Fault(Failure.MAYBE_SENT, timed_out=True, barred=True)


def config(balancer: object, **given: object) -> AdapterConfig[str]:
    """An adapter's configuration, with the defaults an adapter gives."""
    options: dict[str, object] = {
        "key": None,
        "algorithm": None,
        "failure_statuses": None,
        "policy": RetryPolicy(),
        "hosts": None,
        "unavailable": lambda m, r: NoBackendAvailable(m),
        "name": "Fake",
        "hedges": False,
    }
    options.update(given)
    return AdapterConfig(balancer, **options)  # type: ignore[arg-type]


def plan_for(
    method: str = "GET",
    replayable: bool = True,
    clock: Clock | None = None,
    balancer: LoadBalancer | None = None,
    **policy: object,
) -> RequestPlan:
    lb = balancer or LoadBalancer(ADDRS, Hash)
    return RequestPlan(
        lb,
        b"key",
        method,
        replayable,
        RetryPolicy(**policy),  # type: ignore[arg-type]
        clock or Clock(),
    )


def run(plan: RequestPlan, wire: FakeWire) -> str:
    first = plan.take()
    assert first is not None
    return drive_sync(plan, first, wire)


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr("lbclient._failover.time.sleep", slept.append)
    return slept


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "DELETE"])
def test_never_sent_is_retried_for_every_method(method: str) -> None:
    plan = plan_for(method)
    wire = FakeWire([NEVER, NEVER])
    assert run(plan, wire) == f"200 from {wire.seen[2].address}"
    assert len(set(wire.seen)) == 3  # never the same backend twice while another remains


@pytest.mark.parametrize(
    ("method", "replayable", "retried"),
    [
        ("GET", True, True),
        ("PUT", True, True),
        ("DELETE", True, True),
        ("HEAD", True, True),
        ("OPTIONS", True, True),
        ("TRACE", True, True),
        ("POST", True, False),
        ("PATCH", True, False),
        ("GET", False, False),
    ],
)
def test_maybe_sent_only_for_idempotent_replayable(
    method: str, replayable: bool, retried: bool
) -> None:
    plan = plan_for(method, replayable)
    wire = FakeWire([MAYBE])
    if retried:
        run(plan, wire)
        assert len(wire.seen) == 2
    else:
        with pytest.raises(Boom, match="attempt 1"):
            run(plan, wire)
        assert len(wire.seen) == 1
        assert "not retried" in plan.describe()


def test_local_failures_neither_retried_nor_reported() -> None:
    plan = plan_for()
    wire = FakeWire([LOCAL])
    with pytest.raises(Boom):
        run(plan, wire)
    assert len(wire.seen) == 1
    assert plan.balancer.health(wire.seen[0]).consecutive_failures == 0


def test_errors_that_are_not_failures_propagate_unretried() -> None:
    plan = plan_for()
    wire = FakeWire()

    def send(backend: Backend, *_: object) -> str:
        wire.seen.append(backend)
        raise KeyError("a bug, not a network failure")

    wire.send = send  # type: ignore[method-assign]
    with pytest.raises(KeyError):
        run(plan, wire)
    assert len(wire.seen) == 1
    assert plan.attempts == []


def test_max_attempts_and_failures_reported() -> None:
    plan = plan_for(max_attempts=2)
    wire = FakeWire([NEVER] * 5)
    with pytest.raises(Boom, match="attempt 2"):
        run(plan, wire)
    assert len(wire.seen) == 2
    assert all(plan.balancer.health(b).consecutive_failures == 1 for b in wire.seen)
    assert plan.describe().startswith("GET failed after 2 attempts: ")
    assert [a.failure for a in plan.attempts] == [Failure.NEVER_SENT] * 2


def test_backoff_only_when_revisiting(no_sleep: list[float]) -> None:
    lb = LoadBalancer(ADDRS[:2], Hash)
    plan = plan_for(balancer=lb, max_attempts=5, backoff=0.2, backoff_max=0.3)
    wire = FakeWire([NEVER] * 4)
    run(plan, wire)
    seen = wire.seen
    assert seen[0] != seen[1]
    assert seen[2] == seen[0]
    assert seen[3] == seen[1]
    # No sleep before the second backend; jittered, capped sleeps before revisits; never 0.
    assert len(no_sleep) <= 3
    assert all(0 < s <= 0.3 for s in no_sleep)


def test_a_timed_out_backend_is_never_tried_again() -> None:
    lb = LoadBalancer(ADDRS[:2], Hash)
    plan = plan_for(balancer=lb, max_attempts=5)
    wire = FakeWire([TIMEOUT, TIMEOUT])
    with pytest.raises(Boom, match="attempt 2"):
        run(plan, wire)
    assert len(wire.seen) == 2
    assert len(set(wire.seen)) == 2
    assert "no other backend to try" in plan.describe()


def test_the_only_backend_that_timed_out_is_not_sent_the_request_again() -> None:
    plan = plan_for(balancer=LoadBalancer(ADDRS[:1]), max_attempts=3)
    wire = FakeWire([TIMEOUT] * 3)
    with pytest.raises(Boom, match="attempt 1"):
        run(plan, wire)
    assert len(wire.seen) == 1


def test_status_retry_discards_the_retried_response() -> None:
    plan = plan_for(retry_statuses={503})
    wire = FakeWire(statuses=[503, 503, 200])
    assert run(plan, wire).startswith("200")
    assert len(wire.discarded) == 2
    assert all(c.startswith("503") for c in wire.discarded)


def test_status_retry_returns_last_response_when_out_of_attempts() -> None:
    plan = plan_for(retry_statuses={503}, max_attempts=2)
    wire = FakeWire(statuses=[503, 503])
    result = run(plan, wire)
    assert result.startswith("503")
    assert len(wire.discarded) == 1
    assert result not in wire.discarded


def test_deadline_stops_retries() -> None:
    clock = Clock()
    plan = plan_for(clock=clock, deadline=1.0)
    wire = FakeWire([MAYBE] * 3, clock=clock, took=0.6)
    with pytest.raises(Boom):
        run(plan, wire)
    assert len(plan.attempts) == 2
    assert "the deadline of 1 s ran out" in plan.describe()


def test_no_attempt_without_a_useful_share_of_the_deadline() -> None:
    clock = Clock()
    plan = plan_for(clock=clock, deadline=1.0)
    wire = FakeWire([NEVER] * 3, clock=clock, took=0.95)  # leaves less than a tenth
    with pytest.raises(Boom):
        run(plan, wire)
    assert len(plan.attempts) == 1
    assert "deadline" in plan.describe()


def test_backoff_wait_counts_against_the_deadline(
    monkeypatch: pytest.MonkeyPatch, no_sleep: list[float]
) -> None:
    monkeypatch.setattr("random.uniform", lambda low, high: high)
    clock = Clock()
    lb = LoadBalancer(ADDRS[:1], Hash)  # one backend: every retry is a revisit
    plan = plan_for(balancer=lb, clock=clock, retry_statuses={503}, backoff=0.5, deadline=1.0)
    wire = FakeWire(statuses=[503, 503, 503], clock=clock, took=0.3)

    def sleep(seconds: float) -> None:
        no_sleep.append(seconds)
        clock.now += seconds

    monkeypatch.setattr("lbclient._failover.time.sleep", sleep)
    # After 0.3 s, a 0.5 s backoff would leave 0.2 s: enough (>= 0.1). After the second
    # attempt (0.3 + 0.5 + 0.3 = 1.1 s) nothing is left: the last 503 is returned.
    assert run(plan, wire).startswith("503")
    assert len(plan.attempts) == 2
    assert no_sleep == [0.5]


def test_timeouts_are_capped_by_attempt_timeout_and_deadline() -> None:
    clock = Clock()
    plan = plan_for(clock=clock, attempt_timeout=0.2, deadline=1.0)
    given = {"connect": 5.0, "read": 0.1, "write": None, "pool": 5.0}
    assert plan.timeouts(given) == {"connect": 0.2, "read": 0.1, "write": 0.2, "pool": 0.2}
    clock.now = 0.9
    assert plan.timeouts(given) == pytest.approx(
        {"connect": 0.1, "read": 0.1, "write": 0.1, "pool": 0.1}
    )
    unlimited = plan_for()
    assert unlimited.timeouts(given) is given  # the client's own, per operation


def test_timeouts_cut_by_the_deadline_are_not_blamed_on_the_backend() -> None:
    clock = Clock()
    plan = plan_for(clock=clock, deadline=1.0)
    first = plan.take()
    assert first is not None
    plan.timeouts({"read": 5.0}, first)  # capped by the deadline
    plan.failed(first, TIMEOUT, Boom("timed out", TIMEOUT))
    assert plan.balancer.health(first).consecutive_failures == 0
    assert not plan.may_retry()
    assert "the deadline of 1 s ran out" in plan.describe()
    other = plan_for(attempt_timeout=0.2)
    second = other.take()
    assert second is not None
    other.timeouts({"read": 5.0}, second)  # capped by the attempt timeout: the backend's fault
    other.failed(second, TIMEOUT, Boom("timed out", TIMEOUT))
    assert other.balancer.health(second).consecutive_failures == 1


def test_async_loop_matches_sync() -> None:
    plan = plan_for("POST")
    wire = AsyncFakeWire([NEVER])

    async def main() -> str:
        first = plan.take()
        assert first is not None
        return await drive_async(plan, first, wire)

    assert asyncio.run(main()).startswith("200")
    assert len(set(wire.seen)) == 2


def test_deciding_and_describing_never_claim_a_probe() -> None:
    clock = Clock()
    lb = LoadBalancer(
        ADDRS[:2],
        Hash,
        clock=clock,
        health=HealthPolicy(consecutive_failures=1, base_ejection_time=10, panic_threshold=0),
    )
    plan = plan_for("POST", balancer=lb, clock=clock)
    first = plan.take()
    assert first is not None
    other = next(b for b in lb.backends if b != first)
    lb.report(other, False)  # ejected for 10 s
    clock.now = 11.0  # its probe is due
    plan.failed(first, MAYBE, Boom("protocol error", MAYBE))  # a POST: not retried
    assert not plan.may_retry()
    plan.describe()
    plan.wait()
    assert lb.snapshot().backends[lb.backends.index(other)].probing is False
    assert lb.admit(other)  # the probe is still there for a request that is sent


def test_a_retry_goes_to_the_current_set_untried_first() -> None:
    lb = LoadBalancer(ADDRS[:2], Hash)
    plan = plan_for(balancer=lb, max_attempts=4)
    first = plan.take()
    assert first is not None
    plan.failed(first, NEVER, Boom("refused", NEVER))
    lb.update(["10.0.0.7:80", "10.0.0.8:80"])  # the old set is gone
    assert plan.may_retry()
    chosen = [plan.take()]
    plan.failed(chosen[0], NEVER, Boom("refused", NEVER))  # type: ignore[arg-type]
    assert plan.may_retry()
    chosen.append(plan.take())
    assert {b.address for b in chosen if b} == {"10.0.0.7:80", "10.0.0.8:80"}


def test_round_robin_first_attempts_stay_fair_when_a_backend_fails() -> None:
    lb = LoadBalancer(
        ADDRS[:2], RoundRobin, health=HealthPolicy(consecutive_failures=None, consecutive_5xx=None)
    )
    bad = lb.backends[0]
    firsts = []
    for _ in range(1000):
        plan = RequestPlan(lb, b"", "GET", True, RetryPolicy(retry_statuses={503}), Clock())
        first = plan.take()
        assert first is not None
        firsts.append(first)
        plan.responded(first, 503 if first == bad else 200)
        if plan.retries_response and plan.may_retry():
            following = plan.take()
            assert following is not None
            plan.responded(following, 200)
            plan.describe()
    assert firsts.count(bad) == 500


def test_no_backend_says_why() -> None:
    lb = LoadBalancer(
        ADDRS[:2],
        health=HealthPolicy(consecutive_failures=1, panic_threshold=0, max_ejection_percent=100),
    )
    client: AdapterConfig[str] = config(lb)
    for b in lb.backends:
        lb.report(b, False)
    wire = FakeWire(RequestPlan(lb, b"", "GET", True, RetryPolicy()), url="http://user:secret@svc/")
    with pytest.raises(
        NoBackendAvailable, match="none of its 2 enabled backends is healthy"
    ) as caught:
        client.start(wire)
    assert "secret" not in str(caught.value)
    assert "user:[secure]@svc" in str(caught.value)


@pytest.mark.parametrize("value", ["\ud800", b"\xff", 12])
def test_every_unusable_key_is_a_key_function_error(value: object) -> None:
    client: AdapterConfig[str] = config(ADDRS, key=lambda r: value)
    if isinstance(value, bytes):
        assert client.key_of(None, "GET", "http://svc/") == value
        return
    with pytest.raises(KeyFunctionError, match="key function"):
        client.key_of(None, "GET", "http://u:pw@svc/")


def test_redact_hides_passwords_only() -> None:
    assert redact("GET http://user:pw@svc:8080/x?q=1") == "GET http://user:[secure]@svc:8080/x?q=1"
    assert redact("http://user@svc/") == "http://user@svc/"
    assert redact("no url here") == "no url here"


def test_hosts_served_default_to_the_first_request() -> None:
    client = config(ADDRS)
    assert client.serves("Users")
    assert client.serves("users")
    assert not client.serves("login.example.com")
    pinned = config(ADDRS, hosts=["a", "B"])
    assert pinned.serves("b")
    assert not pinned.serves("c")
    with pytest.raises(ValueError, match="hosts"):
        config(ADDRS, hosts=["http://a/"])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_attempts": 0}, ValueError),
        ({"max_attempts": True}, TypeError),
        ({"retry_statuses": {600}}, ValueError),
        ({"retry_statuses": 503}, TypeError),
        ({"backoff": -1}, ValueError),
        ({"backoff_max": "1"}, TypeError),
        ({"retry_maybe_sent": 1}, TypeError),
        ({"idempotent_methods": "GET"}, TypeError),
        ({"buffer_limit": -1}, ValueError),
        ({"attempt_timeout": 0}, ValueError),
        ({"deadline": -1}, ValueError),
        ({"deadline": float("inf")}, ValueError),
        ({"attempt_timeout": True}, TypeError),
    ],
)
def test_policy_validation(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_normalises() -> None:
    policy = RetryPolicy(retry_statuses=[503, 503], idempotent_methods=["get"])
    assert policy.retry_statuses == frozenset({503})
    assert policy.idempotent_methods == frozenset({"GET"})
    health = HealthPolicy(failure_statuses=[503, 503])
    assert health.failure_statuses == frozenset({503})
    assert 500 in HealthPolicy().failure_statuses
    assert 499 not in HealthPolicy().failure_statuses
    for bad, error in ((["500"], ValueError), (500, TypeError), ("500", TypeError)):
        with pytest.raises(error, match="failure_statuses"):
            HealthPolicy(failure_statuses=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="failure_statuses"):
        RetryPolicy(failure_statuses={500})  # type: ignore[call-arg]  # the balancer's rule now


def test_policy_and_a_conflicting_flat_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="max_attempts"):
        policy_from(RetryPolicy(max_attempts=5), max_attempts=1)
    assert policy_from(RetryPolicy(max_attempts=5), max_attempts=None).max_attempts == 5
    assert policy_from(None, max_attempts=2, deadline=None).max_attempts == 2


def test_request_options_override_the_policy() -> None:
    policy = RetryPolicy(max_attempts=3, deadline=5.0)
    options = RequestOptions.coerce({"deadline": 0.5, "max_attempts": 1})
    applied = options.apply(policy)
    assert (applied.max_attempts, applied.deadline, applied.attempt_timeout) == (1, 0.5, None)
    assert RequestOptions().apply(policy) is policy
    with pytest.raises(TypeError, match="timeout_s"):
        RequestOptions.coerce({"timeout_s": 1})
    with pytest.raises(ValueError, match="deadline"):
        RequestOptions(deadline=0)


def test_max_attempts_is_capped_and_a_budget_needs_a_window() -> None:
    from lbclient import LBTransport, RetryBudget
    from lbclient.retry import MAX_ATTEMPTS

    assert RetryPolicy(max_attempts=MAX_ATTEMPTS).max_attempts == 10
    for bad in (MAX_ATTEMPTS + 1, 10**6):
        with pytest.raises(ValueError, match=f"from 1 to 10, got {bad}"):
            RetryPolicy(max_attempts=bad)
        with pytest.raises(ValueError, match="max_attempts"):
            LBTransport(ADDRS, max_attempts=bad)
    for window in (None, 0, "10"):
        with pytest.raises((TypeError, ValueError), match="window"):
            RetryBudget(window=window)  # type: ignore[arg-type]
