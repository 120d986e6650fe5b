"""The runner: where background work runs, and how it stops.

What lives here: the two kinds of job, as plain values, and the two runners that run them.

* :class:`Every`: a round awaited again and again, ``interval()`` seconds apart (a poll).
* :class:`Watch`: a coroutine that runs until the runner stops (a watched stream); awaited again
  ``retry`` seconds after it returns or raises early.
* :class:`ThreadRunner`, for sync code and for async libraries other than asyncio (trio): one
  daemon thread running an asyncio event loop, on which every job runs as a task, and a pool of
  at most :data:`WORKERS` threads for blocking work (the loop's default executor:
  ``asyncio.to_thread``, name lookups). So :data:`THREADS` threads at most, whatever the jobs
  and however many rounds; no thread is created per round or per job, and none is left once
  :meth:`~ThreadRunner.stop` returns.
* :class:`TaskRunner`, for asyncio code: every job is a task of the running loop; no thread.
* :class:`Lane`, for blocking work that may not keep its timeout (a function of the user's):
  one call at a time, on a daemon thread of its own, awaited within a timeout and then left to
  end by itself; neither a stop (beyond :data:`LINGER`), nor ``asyncio.run()``, nor the
  interpreter's exit waits for it. One more thread per lane while a call runs, none after.

A stop made from one of the runner's own threads or tasks (a callback that closes the balancer
while a job reports to it) cancels the jobs and returns without waiting for itself.

What may not: anything about checks, discovery, probes or the balancer: a job is a name, an
interval and coroutine functions, nothing more. Who starts a runner for whom, and when it
stops (reference counting), is the services layer's (:mod:`lbclient._services`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

__all__ = [
    "LINGER",
    "THREADS",
    "WORKERS",
    "Busy",
    "Every",
    "Job",
    "Lane",
    "Runner",
    "TaskRunner",
    "ThreadRunner",
    "start_runner",
    "wait_future",
]

logger = logging.getLogger("lbclient")

#: Threads of a :class:`ThreadRunner`'s pool for blocking work.
WORKERS: Final = 4
#: The most threads a :class:`ThreadRunner` runs: its event loop's, and its pool's.
THREADS: Final = 1 + WORKERS
#: The name of a :class:`ThreadRunner`'s thread (its pool's threads add ``-worker_<n>``, a
#: :class:`Lane`'s ``-worker_call``).
THREAD_NAME: Final = "lbclient-runner"
#: Seconds a :class:`Lane` call that is cancelled (its runner stops) waits for the call to
#: return, blocking, so that a call about to end leaves no thread behind; one that takes
#: longer is left to end on its own thread.
LINGER: Final = 0.1

_T = TypeVar("_T")


@dataclass(frozen=True)
class Every:
    """A job run in rounds: ``round()`` is awaited, then the runner waits ``interval()``
    seconds, and so on until it stops. A round that raises is logged; the next one comes as
    usual."""

    #: The name of the job's task.
    name: str
    round: Callable[[], Awaitable[object]]
    #: Seconds from the end of one round to the start of the next, asked after each round.
    interval: Callable[[], float]
    #: Seconds one round may take: how long a stop made from another thread waits at most for
    #: a task runner's job to end (a round that holds the loop).
    timeout: float = 1.0


@dataclass(frozen=True)
class Watch:
    """A job that runs until the runner stops: ``watch()`` is awaited, and cancelled at the
    stop. If it returns or raises first (a lost connection), it is awaited again after
    ``retry`` seconds."""

    name: str
    watch: Callable[[], Awaitable[object]]
    retry: float = 1.0
    timeout: float = 1.0


#: What a runner runs.
Job = Every | Watch


async def _run(job: Job) -> None:
    """A job's life on a task: until cancelled (a CancelledError is never caught here)."""
    while True:
        try:
            if isinstance(job, Every):
                await job.round()
            else:
                await job.watch()
                logger.info("%s: the watch ended; it starts again", job.name)
        except Exception:
            logger.exception("%s failed; it goes on", job.name)
        await asyncio.sleep(job.interval() if isinstance(job, Every) else job.retry)


async def _await(fn: Callable[[], Awaitable[_T]]) -> _T:
    return await fn()


async def wait_future(future: concurrent.futures.Future[_T], timeout: float | None = None) -> _T:
    """The result of ``future`` (set on another thread), awaited without blocking the event
    loop: on asyncio, with no thread; on another async library (trio), from one of its worker
    threads. ``timeout``: seconds to wait at most (None: until it is done), then TimeoutError.
    Cancelling the wait leaves ``future`` alone (others may wait for it too)."""
    if future.done():
        return future.result()
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # another async library
        import anyio.to_thread

        return await anyio.to_thread.run_sync(lambda: future.result(timeout))
    arrived: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not arrived.done():
            arrived.set_result(None)

    def tell(_done: object) -> None:
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there
            loop.call_soon_threadsafe(settle)

    future.add_done_callback(tell)
    await asyncio.wait({arrived}, timeout=timeout)
    if not future.done():
        raise TimeoutError(f"not done within {timeout:g} s")
    return future.result()


class Busy(RuntimeError):
    """A :class:`Lane` was asked for a call while its previous one still runs."""


class Lane:
    """Blocking calls made one at a time, each on a daemon thread of its own, awaited within a
    timeout: for work that may block past any timeout (a function of the user's).

    A call still running at its timeout fails the wait with TimeoutError and is left to end on
    its thread (its result is dropped); until it has, the lane refuses another call
    (:class:`Busy`), so a function that hangs holds one thread, not one per attempt. No one
    waits for such a thread: a runner's stop waits at most :data:`LINGER` for a call in flight,
    and neither ``asyncio.run()`` nor the interpreter's exit waits for it (it is no executor's).
    """

    def __init__(self, name: str = f"{THREAD_NAME}-worker_call") -> None:
        self.name = name
        self._lock = threading.Lock()
        #: The thread of the latest call, and when it started (monotonic seconds).
        self._latest: tuple[threading.Thread, float] | None = None

    async def run(self, fn: Callable[[], _T], timeout: float, what: str) -> _T:
        """``fn()``, called on a thread of its own and awaited for ``timeout`` seconds at most;
        ``what`` names it in the errors (TimeoutError, :class:`Busy`)."""
        loop = asyncio.get_running_loop()
        arrived: asyncio.Future[_T] = loop.create_future()

        def deliver(value: _T | None, error: Exception | None) -> None:
            if arrived.done():
                return
            if error is not None:
                arrived.set_exception(error)
            else:
                arrived.set_result(value)  # type: ignore[arg-type]

        def body() -> None:
            value: _T | None = None
            error: Exception | None = None
            try:
                value = fn()
            except Exception as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(deliver, value, error)

        with self._lock:
            latest = self._latest
            if latest is not None and latest[0].is_alive():
                raise Busy(
                    f"{what} has not returned from its call of "
                    f"{time.monotonic() - latest[1]:.3g} s ago; it is not called again until "
                    "it does"
                )
            thread = threading.Thread(target=body, name=self.name, daemon=True)
            self._latest = (thread, time.monotonic())
            thread.start()
        try:
            await asyncio.wait({arrived}, timeout=timeout)
        except asyncio.CancelledError:
            # A stop: a call about to return ends first, leaving no thread behind. A join, not
            # an await: a stop may cancel again at once (a thread runner's does).
            thread.join(LINGER)
            raise
        if not arrived.done():
            raise TimeoutError(f"{what} did not return within {timeout:g} s")
        thread.join()  # its last step was to deliver: it is ending
        return arrived.result()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Lane, (self.name,))

    def __repr__(self) -> str:
        latest = self._latest
        state = "busy" if latest is not None and latest[0].is_alive() else "idle"
        return f"<Lane {self.name} {state}>"


class Runner(Protocol):
    """What the services layer asks of a runner."""

    def spawn(self, job: Job) -> None:
        """Run ``job`` until the runner stops (nothing, once it is stopping)."""
        ...

    def call(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Await ``fn()`` once on the runner's event loop, blocking until it is done (from
        sync code; a thread runner's only)."""
        ...

    async def acall(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Await ``fn()`` once on the runner's event loop (from any async code)."""
        ...

    def submit(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Start awaiting ``fn()`` once on the runner's event loop, without waiting for it; it
        is cancelled by a stop like a job (a task runner: from its own loop only)."""
        ...

    def serves(self, asynchronous: bool) -> bool:
        """Whether this runner can serve one more user of that kind, from here."""
        ...

    def stop(self) -> None:
        """Cancel every job; when this returns, none runs (unless called from the runner's
        own thread or task, which it does not wait for)."""
        ...

    async def astop(self) -> None:
        """:meth:`stop`, awaited without blocking the event loop."""
        ...


class ThreadRunner:
    """Jobs as tasks of an event loop on one daemon thread; blocking work on a pool of
    ``workers`` threads (the loop's default executor, made as the work comes). Runs from
    construction to :meth:`stop`, which waits for blocking work in flight (each piece keeps its
    own timeout). The pool's threads are Python's executor threads: a process that exits with
    a runner still up waits for such work too, not for the runner.
    """

    def __init__(self, name: str = THREAD_NAME, workers: int = WORKERS) -> None:
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        #: The runner's own threads: a stop from one of them must not wait for itself.
        self._own: set[threading.Thread] = set()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix=f"{name}-worker", initializer=self._enlist
        )
        self._loop.set_default_executor(self._executor)
        self._stopping = threading.Event()
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._own.add(self._thread)
        self._thread.start()

    def _enlist(self) -> None:
        with self._lock:
            self._own.add(threading.current_thread())

    def _mine(self) -> bool:
        with self._lock:
            return threading.current_thread() in self._own

    def _main(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()  # until _halt
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            # Blocking work in flight ends first (each is trusted to keep its own timeout).
            self._executor.shutdown(wait=True)
            asyncio.set_event_loop(None)
            loop.close()
            self._done.set_result(None)

    def _halt(self) -> None:
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.stop()

    def _spawn(self, job: Job) -> None:
        if not self._stopping.is_set():
            self._loop.create_task(_run(job), name=job.name)

    def spawn(self, job: Job) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: stopped
            self._loop.call_soon_threadsafe(self._spawn, job)

    def call(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Await ``fn()`` once on the runner's loop and return its result, blocking (not from
        the runner's own loop)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("ThreadRunner.call from its own event loop would wait forever")
        return asyncio.run_coroutine_threadsafe(_await(fn), self._loop).result()

    async def acall(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        return await wait_future(asyncio.run_coroutine_threadsafe(_await(fn), self._loop))

    def submit(self, fn: Callable[[], Awaitable[object]]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: stopped
            asyncio.run_coroutine_threadsafe(_await(fn), self._loop)

    def serves(self, asynchronous: bool) -> bool:
        """A thread serves users of every kind while it runs."""
        return not self._stopping.is_set() and self._thread.is_alive()

    def _signal(self) -> bool:
        """Ask the loop to cancel every job and end; return whether to wait for it (False on
        the runner's own threads)."""
        self._stopping.set()
        if threading.current_thread() is self._thread:
            self._halt()  # at once: no job takes another step
            return False
        with contextlib.suppress(RuntimeError):  # the loop is closed: stopped already
            self._loop.call_soon_threadsafe(self._halt)
        return not self._mine()

    def stop(self) -> None:
        if self._signal():
            self._thread.join()

    async def astop(self) -> None:
        if self._signal():
            await wait_future(self._done)
            self._thread.join()  # it has set _done: this is its last step

    def __repr__(self) -> str:
        state = "stopping" if self._stopping.is_set() else "running"
        return f"<ThreadRunner {self.name} {state}>"


class TaskRunner:
    """Jobs as tasks of ``loop`` (the running loop); no thread of its own."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = asyncio.get_running_loop() if loop is None else loop
        self._tasks: list[asyncio.Task[None]] = []
        #: Tasks of :meth:`submit`: cancelled and awaited by a stop like the jobs.
        self._calls: list[asyncio.Task[object]] = []
        self._stopping = threading.Event()
        #: Set once every job's (and submitted) task has ended (at once while there is none).
        self._ended = threading.Event()
        self._ended.set()
        self._patience = 1.0

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _spawn(self, job: Job) -> None:
        if self._stopping.is_set():
            return
        task = self._loop.create_task(_run(job), name=job.name)
        self._tasks.append(task)
        self._ended.clear()
        task.add_done_callback(self._note_end)
        self._patience = max(self._patience, job.timeout + 1.0)

    def _note_end(self, _task: asyncio.Task[Any]) -> None:
        if all(task.done() for task in self._all()):
            self._ended.set()

    def _all(self) -> list[asyncio.Task[Any]]:
        return [*self._tasks, *self._calls]

    def spawn(self, job: Job) -> None:
        if self._on_loop():
            self._spawn(job)
        else:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._spawn, job)

    def call(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        raise RuntimeError("a task runner serves async users of its own loop only")

    async def acall(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        if not self._on_loop():
            raise RuntimeError("TaskRunner.acall from another event loop")
        return await fn()

    def submit(self, fn: Callable[[], Awaitable[object]]) -> None:
        if not self._on_loop():
            raise RuntimeError("TaskRunner.submit from another event loop")
        if self._stopping.is_set():
            return
        self._calls = [task for task in self._calls if not task.done()]
        task = self._loop.create_task(_await(fn))
        self._calls.append(task)
        self._ended.clear()
        task.add_done_callback(self._note_end)
        self._patience = max(self._patience, LINGER + 1.0)

    def serves(self, asynchronous: bool) -> bool:
        """Only async users of its own loop, while its jobs run."""
        return (
            asynchronous
            and self._on_loop()
            and not self._stopping.is_set()
            and not any(task.done() for task in self._tasks)
        )

    def _halt(self) -> None:
        for task in self._all():
            task.cancel()

    def stop(self) -> None:
        self._stopping.set()  # from here on, no job is spawned
        if self._on_loop():
            self._halt()  # each job's next step is its cancellation
            return
        if self._loop.is_closed() or self._ended.is_set():
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._halt)
        if self._loop.is_running():  # wait for the cancellations to land, within reason
            self._ended.wait(self._patience)

    async def astop(self) -> None:
        if not self._on_loop():  # started on another event loop
            import anyio.to_thread

            self._stopping.set()
            await anyio.to_thread.run_sync(self.stop)
            return
        self._stopping.set()
        self._halt()
        pending = set(self._all())
        # A job may swallow one cancellation (one landing as a timeout of its own expires
        # is taken for that timeout): cancel again what is left, within the patience.
        deadline = self._loop.time() + self._patience
        while pending:
            _, pending = await asyncio.wait(pending, timeout=0.05)
            if self._loop.time() >= deadline:
                break
            for task in pending:
                task.cancel()

    def __repr__(self) -> str:
        state = "stopping" if self._stopping.is_set() else "running"
        return f"<TaskRunner {len(self._tasks)} jobs {state}>"


def start_runner(asynchronous: bool) -> ThreadRunner | TaskRunner:
    """A runner for a user of that kind: tasks of the running loop for asyncio code, a
    :class:`ThreadRunner` otherwise (sync code, or another async library)."""
    if asynchronous:
        try:
            return TaskRunner(asyncio.get_running_loop())
        except RuntimeError:
            pass
    return ThreadRunner()
