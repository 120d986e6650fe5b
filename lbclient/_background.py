"""Periodic work in the background: a :class:`Job` run by a :class:`Schedule`.

What lives here: the runners (one daemon thread, or one asyncio task of the running loop) that
run a job's rounds every ``interval`` seconds, fanning each round out over the job's items (up to
:data:`PARALLEL` at once); and :class:`Schedule`, which starts a runner for its first user and
stops it after its last (reference-counted), replacing a task that cannot serve a new user (it
runs on another event loop) by a thread.

What may not: anything about checks, discovery or the balancer. A job says what to do for one
item and what to do with the result; it knows the rest. After ``stop()`` returns (or
``astop()`` completes) no result is delivered any more.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Final, Generic, Protocol, TypeVar

__all__ = ["PARALLEL", "Job", "Schedule"]

#: How many items of one round run at once.
PARALLEL: Final = 32

_I = TypeVar("_I")
_R = TypeVar("_R")


class Job(Protocol[_I, _R]):
    """Periodic work over a changing list of items."""

    #: The name of the runner's thread or task (its worker threads add ``-worker``).
    name: str
    #: Seconds between the end of one round and the start of the next.
    interval: float
    #: Seconds one item may take; stopping from another thread waits about this long at most.
    timeout: float

    def items(self) -> Sequence[_I]:
        """The items of the next round."""
        ...

    def run(self, item: _I) -> _R:
        """Do one item's work, blocking (on a worker thread); must not raise."""
        ...

    async def arun(self, item: _I) -> _R:
        """Do one item's work on the event loop; must not raise (but may be cancelled)."""
        ...

    def deliver(self, item: _I, result: _R) -> None:
        """Take one item's result (not called once the runner is stopping)."""
        ...


class _Runner(Protocol):
    def serves(self, asynchronous: bool) -> bool: ...

    def stop(self) -> None: ...

    async def astop(self) -> None: ...


class _ThreadRunner(Generic[_I, _R]):
    """Runs rounds from a daemon thread, each item on a short-lived daemon worker thread."""

    def __init__(self, job: Job[_I, _R]) -> None:
        self._job = job
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=job.name, daemon=True)
        #: The runner's own threads: a stop from one of them (an on_change callback that
        #: closes the balancer) must not wait for itself.
        self._own: set[threading.Thread] = {self._thread}
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            pending = list(self._job.items())
            lock = threading.Lock()
            workers = [
                threading.Thread(
                    target=self._work,
                    args=(pending, lock),
                    name=f"{self._job.name}-worker",
                    daemon=True,
                )
                for _ in range(min(PARALLEL, len(pending)))
            ]
            self._own.update(workers)
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            self._own.difference_update(workers)
            self._stopping.wait(self._job.interval)

    def _work(self, pending: list[_I], lock: threading.Lock) -> None:
        while not self._stopping.is_set():
            with lock:
                if not pending:
                    return
                item = pending.pop()
            result = self._job.run(item)
            if not self._stopping.is_set():
                self._job.deliver(item, result)

    def stop(self) -> None:
        self._stopping.set()
        if threading.current_thread() not in self._own:
            self._thread.join()

    async def astop(self) -> None:
        # Wait for the round in flight on a worker thread, not on the event loop.
        import anyio.to_thread

        self._stopping.set()
        await anyio.to_thread.run_sync(self.stop)

    def serves(self, asynchronous: bool) -> bool:
        """Whether this runner can serve one more user (a thread serves everyone)."""
        return self._thread.is_alive() and not self._stopping.is_set()


class _TaskRunner(Generic[_I, _R]):
    """Runs rounds from an asyncio task, up to :data:`PARALLEL` items at once."""

    def __init__(self, job: Job[_I, _R], loop: asyncio.AbstractEventLoop) -> None:
        self._job = job
        self._loop = loop
        self._stopping = threading.Event()
        self._finished = threading.Event()
        self._task = loop.create_task(self._run(), name=job.name)

    async def _run(self) -> None:
        limit = asyncio.Semaphore(PARALLEL)
        try:
            while True:
                await asyncio.gather(*(self._one(item, limit) for item in self._job.items()))
                await asyncio.sleep(self._job.interval)
        finally:
            self._finished.set()

    async def _one(self, item: _I, limit: asyncio.Semaphore) -> None:
        async with limit:
            result = await self._job.arun(item)
        if not self._stopping.is_set():
            self._job.deliver(item, result)

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def stop(self) -> None:
        self._stopping.set()  # from here on, nothing is delivered
        if self._on_loop():
            self._task.cancel()
            return
        if self._loop.is_closed() or self._task.done():
            return
        self._loop.call_soon_threadsafe(self._task.cancel)
        if self._loop.is_running():  # wait for the cancellation to land, within reason
            self._finished.wait(self._job.timeout + 1.0)

    async def astop(self) -> None:
        if not self._on_loop():  # started on another event loop
            import anyio.to_thread

            self._stopping.set()
            await anyio.to_thread.run_sync(self.stop)
            return
        self._stopping.set()
        self._task.cancel()
        await asyncio.wait([self._task])

    def serves(self, asynchronous: bool) -> bool:
        """Whether this runner can serve one more user: only async users of its own loop, and
        only while it runs."""
        return (
            asynchronous
            and self._on_loop()
            and not self._task.done()
            and not self._stopping.is_set()
        )


def _start(job: Job[_I, _R], asynchronous: bool) -> _Runner:
    """A runner for ``job``: an asyncio task of the running loop when ``asynchronous`` and one
    is running, a daemon thread otherwise (sync code, or another async library)."""
    if asynchronous:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            return _TaskRunner(job, loop)
    return _ThreadRunner(job)


class Schedule(Generic[_I, _R]):
    """Runs ``job`` while it has users: the first :meth:`start` (or :meth:`astart`) starts it,
    the :meth:`stop` (or :meth:`astop`) matching the last start stops it."""

    def __init__(self, job: Job[_I, _R]) -> None:
        self.job = job
        self._lock = threading.Lock()
        self._runner: _Runner | None = None
        self._users = 0

    @property
    def running(self) -> bool:
        """Whether a runner is up."""
        return self._runner is not None

    def start(self) -> None:
        """Add a user; start on a daemon thread if none runs."""
        self._acquire(asynchronous=False)

    async def astart(self) -> None:
        """Add a user; start on an asyncio task of the running loop if none runs (a daemon
        thread outside asyncio)."""
        self._acquire(asynchronous=True)

    def _acquire(self, asynchronous: bool) -> None:
        with self._lock:
            self._users += 1
            stale = self._runner
            if stale is not None and stale.serves(asynchronous):
                return
            # None yet; or a task on another (or a finished) event loop, which cannot serve
            # this user: a thread serves users of every kind.
            self._runner = _start(self.job, asynchronous and stale is None)
        if stale is not None:
            stale.stop()

    def _release(self) -> _Runner | None:
        with self._lock:
            if self._users == 0:
                return None
            self._users -= 1
            if self._users:
                return None
            runner, self._runner = self._runner, None
            return runner

    def stop(self) -> None:
        """Remove a user; after the last, stop: when this returns nothing more is delivered (an
        asyncio task is cancelled; prefer :meth:`astop` there)."""
        runner = self._release()
        if runner is not None:
            runner.stop()

    async def astop(self) -> None:
        """Remove a user; after the last, stop, awaiting an asyncio task's end."""
        runner = self._release()
        if runner is not None:
            await runner.astop()
