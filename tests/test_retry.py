"""The retry rules and the attempt loop, with plain values (no I/O)."""

from __future__ import annotations

import asyncio

import pytest

from lbclient import Backend, Hash, LoadBalancer
from lbclient._attempt import RequestPlan, run_async, run_sync
from lbclient.retry import Failure, RetryPolicy

ADDRS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plan_for(method: str = "GET", replayable: bool = True, budget: float | None = None,
             clock: Clock | None = None, **policy: object) -> RequestPlan:
    lb = LoadBalancer(ADDRS, Hash)
    return RequestPlan(lb, b"key", method, replayable, RetryPolicy(**policy),  # type: ignore[arg-type]
                       budget, clock or Clock())


class Boom(Exception):
    pass


def failing(plan: RequestPlan, kinds: list[Failure]) -> object:
    seen: list[Backend] = []

    def attempt(backend: Backend) -> str:
        seen.append(backend)
        if len(seen) <= len(kinds):
            error = Boom(f"attempt {len(seen)}")
            plan.failed(backend, kinds[len(seen) - 1], error)
            raise error
        plan.responded(backend, 200)
        return f"ok from {backend.address}"

    attempt.seen = seen  # type: ignore[attr-defined]
    return attempt


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "DELETE"])
def test_never_sent_is_retried_for_every_method(method: str) -> None:
    plan = plan_for(method)
    first = plan.first()
    assert first is not None
    attempt = failing(plan, [Failure.NEVER_SENT, Failure.NEVER_SENT])
    result = run_sync(plan, first, attempt, lambda r: None)  # type: ignore[arg-type]
    seen = attempt.seen  # type: ignore[attr-defined]
    assert len(seen) == 3
    assert len(set(seen)) == 3  # never the same backend twice while another remains
    assert result == f"ok from {seen[2].address}"


@pytest.mark.parametrize(("method", "replayable", "retried"), [
    ("GET", True, True), ("PUT", True, True), ("DELETE", True, True), ("HEAD", True, True),
    ("OPTIONS", True, True), ("TRACE", True, True),
    ("POST", True, False), ("PATCH", True, False), ("GET", False, False),
])
def test_maybe_sent_only_for_idempotent_replayable(method: str, replayable: bool,
                                                   retried: bool) -> None:
    plan = plan_for(method, replayable)
    first = plan.first()
    assert first is not None
    attempt = failing(plan, [Failure.MAYBE_SENT])
    if retried:
        run_sync(plan, first, attempt, lambda r: None)  # type: ignore[arg-type]
        assert len(attempt.seen) == 2  # type: ignore[attr-defined]
    else:
        with pytest.raises(Boom, match="attempt 1"):
            run_sync(plan, first, attempt, lambda r: None)  # type: ignore[arg-type]
        assert len(attempt.seen) == 1  # type: ignore[attr-defined]
        assert "not retried" in plan.describe()


def test_local_failures_neither_retried_nor_reported() -> None:
    plan = plan_for()
    first = plan.first()
    assert first is not None
    with pytest.raises(Boom):
        run_sync(plan, first, failing(plan, [Failure.LOCAL]), lambda r: None)  # type: ignore[arg-type]
    assert plan.balancer.ready(first)


def test_unrecorded_errors_are_not_retried() -> None:
    plan = plan_for()
    first = plan.first()
    assert first is not None
    calls = []

    def attempt(backend: Backend) -> str:
        calls.append(backend)
        if len(calls) == 1:
            error = Boom("recorded")
            plan.failed(backend, Failure.NEVER_SENT, error)
            raise error
        raise KeyError("a bug, not a network failure")

    with pytest.raises(KeyError):
        run_sync(plan, first, attempt, lambda r: None)
    assert len(calls) == 2


def test_max_attempts_and_failures_reported() -> None:
    plan = plan_for(max_attempts=2)
    first = plan.first()
    assert first is not None
    attempt = failing(plan, [Failure.NEVER_SENT] * 5)
    with pytest.raises(Boom, match="attempt 2"):
        run_sync(plan, first, attempt, lambda r: None)  # type: ignore[arg-type]
    tried = attempt.seen  # type: ignore[attr-defined]
    assert len(tried) == 2
    assert all(plan.balancer.health(b).consecutive_failures == 1 for b in tried)
    assert plan.describe().startswith("GET failed after 2 attempts: ")


def test_backoff_only_when_revisiting(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("lbclient._attempt.time.sleep", slept.append)
    lb = LoadBalancer(ADDRS[:2], Hash)
    plan = RequestPlan(lb, b"k", "GET", True, RetryPolicy(max_attempts=5, backoff=0.2,
                                                        backoff_max=0.3), None, Clock())
    first = plan.first()
    assert first is not None
    attempt = failing(plan, [Failure.NEVER_SENT] * 4)
    run_sync(plan, first, attempt, lambda r: None)  # type: ignore[arg-type]
    seen = attempt.seen  # type: ignore[attr-defined]
    assert seen[:2] != [seen[0], seen[0]]
    assert seen[2] == seen[0]
    assert seen[3] == seen[1]
    # No sleep before the second backend; jittered, capped sleeps before revisits; never 0.
    assert len(slept) <= 3
    assert all(0 < s <= 0.3 for s in slept)


def test_status_retry_closes_the_discarded_response() -> None:
    plan = plan_for(retry_statuses={503})
    first = plan.first()
    assert first is not None
    closed: list[str] = []
    statuses = iter([503, 503, 200])

    def attempt(backend: Backend) -> str:
        status = next(statuses)
        plan.responded(backend, status)
        return f"{status} from {backend.address}"

    result = run_sync(plan, first, attempt, closed.append)
    assert result.startswith("200")
    assert len(closed) == 2
    assert all(c.startswith("503") for c in closed)


def test_status_retry_returns_last_response_when_out_of_attempts() -> None:
    plan = plan_for(retry_statuses={503}, max_attempts=2)
    first = plan.first()
    assert first is not None
    closed: list[str] = []

    def attempt(backend: Backend) -> str:
        plan.responded(backend, 503)
        return f"503 from {backend.address}"

    result = run_sync(plan, first, attempt, closed.append)
    assert result.startswith("503")
    assert len(closed) == 1
    assert result not in closed


def test_budget_stops_retries() -> None:
    clock = Clock()
    plan = plan_for(budget=1.0, clock=clock)
    first = plan.first()
    assert first is not None

    def attempt(backend: Backend) -> str:
        clock.now += 0.6
        error = Boom("slow")
        plan.failed(backend, Failure.MAYBE_SENT, error)
        raise error

    with pytest.raises(Boom):
        run_sync(plan, first, attempt, lambda r: None)
    assert len(plan.attempts) == 2
    assert "time budget" in plan.describe()


def test_async_loop_matches_sync() -> None:
    plan = plan_for("POST")
    first = plan.first()
    assert first is not None
    seen: list[Backend] = []

    async def attempt(backend: Backend) -> str:
        seen.append(backend)
        if len(seen) == 1:
            error = Boom("refused")
            plan.failed(backend, Failure.NEVER_SENT, error)
            raise error
        plan.responded(backend, 200)
        return "ok"

    async def discard(result: str) -> None:
        raise AssertionError("nothing to discard")

    assert asyncio.run(run_async(plan, first, attempt, discard)) == "ok"
    assert len(set(seen)) == 2


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"max_attempts": 0}, ValueError), ({"max_attempts": True}, TypeError),
    ({"retry_statuses": {600}}, ValueError), ({"retry_statuses": 503}, TypeError),
    ({"failure_statuses": ["500"]}, ValueError), ({"backoff": -1}, ValueError),
    ({"backoff_max": "1"}, TypeError), ({"retry_maybe_sent": 1}, TypeError),
    ({"idempotent_methods": "GET"}, TypeError), ({"buffer_limit": -1}, ValueError),
])
def test_policy_validation(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_normalises() -> None:
    policy = RetryPolicy(retry_statuses=[503, 503], idempotent_methods=["get"])
    assert policy.retry_statuses == frozenset({503})
    assert policy.idempotent_methods == frozenset({"GET"})
    assert 500 in policy.failure_statuses
    assert 499 not in policy.failure_statuses


def test_no_attempt_without_time_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    plan = plan_for(budget=1.0, clock=clock)
    first = plan.first()
    assert first is not None

    def attempt(backend: Backend) -> str:
        clock.now += 0.95  # leaves 0.05 s: less than a tenth of the budget
        error = Boom("slow")
        plan.failed(backend, Failure.NEVER_SENT, error)
        raise error

    with pytest.raises(Boom):
        run_sync(plan, first, attempt, lambda r: None)
    assert len(plan.attempts) == 1
    assert "time budget" in plan.describe()


def test_backoff_wait_counts_against_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lbclient._attempt.random.uniform", lambda low, high: high)
    clock = Clock()
    lb = LoadBalancer(ADDRS[:1], Hash)  # one backend: every retry is a revisit
    plan = RequestPlan(lb, b"k", "GET", True, RetryPolicy(retry_statuses={503}, backoff=0.5),
                       1.0, clock)
    first = plan.first()
    assert first is not None

    def attempt(backend: Backend) -> str:
        clock.now += 0.3
        plan.responded(backend, 503)
        return "503"

    # After 0.3 s, a 0.5 s backoff would leave 0.2 s: enough (>= 0.1). After the second
    # attempt (0.3 + 0.5 + 0.3 = 1.1 s) nothing is left: the last 503 is returned, not a timeout.
    slept: list[float] = []
    monkeypatch.setattr("lbclient._attempt.time.sleep", lambda s: (slept.append(s), None)[1])
    assert run_sync(plan, first, attempt, lambda r: None) == "503"
    assert len(plan.attempts) == 2
    assert slept == [0.5]


def test_revisit_waits_before_the_second_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("lbclient._attempt.time.sleep", slept.append)
    lb = LoadBalancer(ADDRS[:1], Hash)
    plan = RequestPlan(lb, b"k", "GET", True, RetryPolicy(max_attempts=3), None, Clock())
    first = plan.first()
    assert first is not None
    attempt = failing(plan, [Failure.NEVER_SENT] * 3)
    with pytest.raises(Boom):
        run_sync(plan, first, attempt, lambda r: None)  # type: ignore[arg-type]
    assert len(slept) == 2  # before attempts 2 and 3, both on the same backend
    assert all(s > 0 for s in slept)


def test_clipped_timeouts_are_not_blamed_on_the_backend() -> None:
    clock = Clock()
    plan = plan_for(budget=1.0, clock=clock)
    first = plan.first()
    assert first is not None
    plan.failed(first, Failure.NEVER_SENT, Boom("refused"))
    second = plan.next()
    clock.now = 0.5
    assert plan.clip(1.0) == 0.5  # cut to what is left
    assert plan.clip(None) is None
    plan.failed(second, Failure.MAYBE_SENT, Boom("timed out"), timed_out=True)
    assert plan.balancer.health(second).consecutive_failures == 0  # not reported
    assert plan.balancer.health(first).consecutive_failures == 1


@pytest.mark.parametrize(("phases", "pool", "budget"), [
    ([1.0, 2.0, 3.0], None, 3.0), ([1.0, 1.0, 1.0], 5.0, 5.0), ([1.0, None, 1.0], 1.0, None),
    ([], None, None), ([0.5, 0.3], None, 0.5),
])
def test_budget_of(phases: list[float | None], pool: float | None, budget: float | None) -> None:
    from lbclient._attempt import budget_of

    assert budget_of(phases, pool) == budget
