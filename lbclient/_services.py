"""The services layer: who starts and stops what runs beside a balancer.

What lives here: :class:`Services`, the background work of one balancer (its discovery and its
active check, as its ``discovery=`` and ``health_check=`` settings say) on one runner of
:mod:`lbclient._background`, started by its first user and stopped by its last
(reference-counted: every start needs its stop). The discovery is looked up once before the
first start returns, then the jobs start, the check's first round on the discovered set. A
start waits for that first lookup at most the discovery's ``timeout`` (the lookup goes on if it
takes longer); a user that may wait less (a request with its own timeout) enters without
waiting (:meth:`Services.enter`) and waits as long as it may (:meth:`Services.ready`).
:func:`services_of` is how the layer above (the transports' configuration) finds a balancer's
services; :meth:`LoadBalancer.start() <lbclient.LoadBalancer.start>` and ``with balancer:``
reach the same object through the balancer's :class:`~lbclient.balancer.Lifecycle` port.

How the arrows hold (DESIGN.md, rule 5): transports -> services -> runner, and services ->
balancer. A setting binds itself to a balancer (``health_check.bind(balancer)``,
``discovery.bind(balancer, refresh)``) into a :class:`Keeper`: the runner's jobs and what must
be done before the first start returns; its jobs call the balancer's public methods only
(``report_check``, ``update``, ``report_discovery``). The balancer imports nothing from here:
this module installs itself as the maker of the lifecycle of every balancer given a check or a
discovery (:func:`lbclient.balancer.install_lifecycle`) when it is imported, and the modules
that define checks and discovery sources import it, so a balancer that has one always finds it.

What may not: the balancer's internals, the rules of checks and discovery (theirs), threads or
tasks of its own (the runner's).
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from lbclient._background import Job, Runner, start_runner, wait_future
from lbclient.balancer import LoadBalancer, bad_setting, install_lifecycle

__all__ = ["Keeper", "Services", "services_of"]


class Keeper(Protocol):
    """What a balancer's setting (a check, a discovery source) binds itself into: a check or a
    polled source gives an :class:`~lbclient._background.Every` job; a watched source (etcd,
    Kubernetes) would give a :class:`~lbclient._background.Watch`, its first listing as its
    preparation."""

    def jobs(self) -> Sequence[Job]:
        """The jobs that run on the balancer's runner while it has users."""
        ...

    async def prepare(self) -> None:
        """Work done on the runner before the first start returns (discovery's first lookup;
        a start waits for it at most the discovery's timeout); what it raises, the starts
        waiting for it raise."""
        ...


class Services:
    """The background work of ``balancer``: its discovery, then its active check, on one
    runner while it has users.

    A sync user (:meth:`start`) gets a :class:`~lbclient._background.ThreadRunner`; an async
    user on asyncio (:meth:`astart`) gets tasks of its running loop; on trio, a thread. A
    runner that cannot serve a new user (tasks of another, or a finished, event loop) is
    replaced by a thread, with the same jobs.
    """

    def __init__(self, balancer: LoadBalancer) -> None:
        keepers: list[Keeper] = []
        discovery, check = balancer.discovery, balancer.health_check
        if discovery is not None:  # first: the check starts on the discovered set
            bind = getattr(discovery, "bind", None)
            if not callable(bind):
                raise bad_setting("discovery", discovery)
            keepers.append(bind(balancer, balancer.refresh))
        if check is not None:
            bind = getattr(check, "bind", None)
            if not callable(bind):
                raise bad_setting("health_check", check)
            keepers.append(bind(balancer))
        self.keepers: tuple[Keeper, ...] = tuple(keepers)
        #: The longest a start waits for the first lookup: the discovery's ``timeout`` (None:
        #: until the preparations end; without a discovery there is nothing to wait for).
        self.patience = _timeout_of(discovery)
        self._lock = threading.Lock()
        self._users = 0
        self._runner: Runner | None = None
        #: Done once the first start's preparations are; later starts wait for it.
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()

    @property
    def running(self) -> bool:
        """Whether a runner is up (between the first start and the last stop)."""
        return self._runner is not None

    @property
    def users(self) -> int:
        """Starts not yet matched by a stop."""
        return self._users

    def _acquire(
        self, asynchronous: bool
    ) -> tuple[Runner | None, Runner | None, bool, concurrent.futures.Future[None]]:
        """Count a user; return the runner to launch (None: the current one serves), the stale
        one it replaces, whether this is a first start, and what to wait for."""
        with self._lock:
            self._users += 1
            stale = self._runner
            if stale is not None and stale.serves(asynchronous):
                return None, None, False, self._ready
            first = stale is None
            if first:
                self._ready = concurrent.futures.Future()
            # None yet; or tasks of another (or a finished) event loop, which cannot serve
            # this user: a thread serves users of every kind.
            fresh = self._runner = start_runner(asynchronous and first)
            return fresh, stale, first, self._ready

    def _release(self) -> Runner | None:
        with self._lock:
            if self._users == 0:  # one stop too many is harmless
                return None
            self._users -= 1
            if self._users:
                return None
            runner, self._runner = self._runner, None
            return runner

    async def _launch(
        self, runner: Runner, first: bool, ready: concurrent.futures.Future[None]
    ) -> None:
        """On the runner: the first start's preparations, then every job. What the
        preparations raise goes to ``ready``, for the starts that wait on it."""
        try:
            if first:
                for keeper in self.keepers:
                    await keeper.prepare()
            for keeper in self.keepers:
                for job in keeper.jobs():
                    runner.spawn(job)
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
        finally:
            if not ready.done():
                ready.set_result(None)

    def bound(self, wait: float | None) -> float | None:
        """Seconds to wait for the first lookup: ``wait``, at most :attr:`patience`."""
        limits = [w for w in (wait, self.patience) if w is not None]
        return max(0.0, min(limits)) if limits else None

    def enter(self) -> None:
        """Add a user without waiting for anything: for the first, start a thread runner and
        the first lookup on it. Pair with :meth:`stop`; :meth:`ready` says when it is done."""
        fresh, stale, first, ready = self._acquire(asynchronous=False)
        try:
            if stale is not None:
                stale.stop()
            if fresh is not None:
                fresh.submit(lambda: self._launch(fresh, first, ready))
        except BaseException:
            self.stop()  # this user did not start: its count goes
            raise

    async def aenter(self) -> None:
        """:meth:`enter` from async code: tasks on the running asyncio loop (a thread runner
        on another async library)."""
        fresh, stale, first, ready = self._acquire(asynchronous=True)
        try:
            if stale is not None:
                await stale.astop()
            if fresh is not None:
                fresh.submit(lambda: self._launch(fresh, first, ready))
        except BaseException:
            self.stop()
            raise

    def ready(self, wait: float | None = None) -> bool:
        """Wait until the first start's preparations (the first lookup) are done, at most
        ``wait`` seconds and at most :attr:`patience`; return whether they are. Raises what
        they raised."""
        try:
            self._ready.result(self.bound(wait))
        except (TimeoutError, concurrent.futures.TimeoutError):
            return False
        return True

    async def aready(self, wait: float | None = None) -> bool:
        """:meth:`ready`, awaited without blocking the event loop."""
        try:
            await wait_future(self._ready, self.bound(wait))
        except (TimeoutError, concurrent.futures.TimeoutError):
            return False
        return True

    def start(self) -> None:
        """Add a user; for the first, start a thread runner, looking the discovery up before
        returning (waiting at most its timeout). Pair with :meth:`stop`."""
        self.enter()
        try:
            self.ready()
        except BaseException:
            self.stop()  # this user did not start: its count goes
            raise

    async def astart(self) -> None:
        """Add a user; for the first, start tasks on the running asyncio loop (a thread runner
        on another async library), looking the discovery up first (waiting at most its
        timeout). Pair with :meth:`astop`."""
        await self.aenter()
        try:
            await self.aready()
        except BaseException:  # cancelled, say: this user did not start
            self.stop()
            raise

    def submit(self, fn: Callable[[], Awaitable[object]]) -> bool:
        """Start awaiting ``fn()`` once on the runner (a probe), without waiting for it;
        whether it was taken (False while no runner runs, or one that cannot take it)."""
        runner = self._runner
        if runner is None:
            return False
        try:
            runner.submit(fn)
        except RuntimeError:  # a task runner, from another thread or loop
            return False
        return True

    def stop(self) -> None:
        """Remove a user; after the last, stop the runner: when this returns nothing more runs
        (tasks of a running loop are cancelled; prefer :meth:`astop` there)."""
        runner = self._release()
        if runner is not None:
            runner.stop()

    async def astop(self) -> None:
        """Remove a user; after the last, stop the runner, awaiting its end."""
        runner = self._release()
        if runner is not None:
            await runner.astop()

    def __repr__(self) -> str:
        state = f"running ({self._users} users)" if self.running else "stopped"
        return f"<Services {[type(k).__name__ for k in self.keepers]} {state}>"


def _timeout_of(discovery: object) -> float | None:
    """A discovery's ``timeout`` in seconds, if it has a sound one."""
    value = getattr(discovery, "timeout", None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return max(0.0, float(value))


#: The services of balancers that have neither discovery nor check but whose algorithm probes
#: (Prequal): their adapters' probes run on them, one runner per balancer.
_PROBING: weakref.WeakKeyDictionary[LoadBalancer, Services] = weakref.WeakKeyDictionary()
_PROBING_LOCK = threading.Lock()


def services_of(balancer: LoadBalancer) -> Services | None:
    """The services of ``balancer`` (its discovery and active check), or None when it has
    neither. The same object ``with balancer:`` starts, so users of both share one count. A
    balancer with neither whose algorithm probes (it has a ``probe_path``) gets services with
    no job, shared by its adapters, for their probes to run on."""
    services = balancer.services
    if isinstance(services, Services):
        return services
    if services is not None or not isinstance(getattr(balancer.algorithm, "probe_path", None), str):
        return None
    with _PROBING_LOCK:
        found = _PROBING.get(balancer)
        if found is None:
            found = _PROBING[balancer] = Services(balancer)
        return found


install_lifecycle(Services)
