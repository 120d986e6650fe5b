"""What an adapter is configured with: :class:`AdapterConfig`.

What lives here: everything the httpx transports and the requests adapter are given and share,
defined once: the balancer (or the backends to build one), the hosts served, the key
function's contract, the retry policy and its per-request overrides, the retry budget's account
(:class:`~lbclient._ledger.Ledger`), the observers attached (metrics, tracing), who starts and
stops the balancer's services for the adapter, and how a request's plan starts (its first
backend, or the no-backend error and why). Also the flat-options helper :func:`policy_from`.

What may not: an HTTP client (an adapter passes in its own ``NoBackendAvailable`` maker), the
attempt loop, or a retry or health rule (those are the plan's).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

import anyio

from lbclient._ledger import Ledger
from lbclient._observe import Observer, enlist, watched_plan
from lbclient._plan import RequestPlan
from lbclient._probes import Probes, probes_of
from lbclient._redact import redact
from lbclient._services import Services, services_of
from lbclient.backend import Backend
from lbclient.balancer import LoadBalancer
from lbclient.errors import KeyFunctionError, NoBackendAvailable
from lbclient.health import HealthPolicy
from lbclient.reports import FORMAT_HEADER
from lbclient.retry import RequestOptions, RetryPolicy, RetryStats
from lbclient.selection.base import AlgorithmLike
from lbclient.subsets import Subset
from lbclient.zones import Zone

if TYPE_CHECKING:
    from lbclient._wire import Facts

__all__ = ["DEFAULT", "AdapterConfig", "Default", "Zone", "config_of", "policy_from"]

_R = TypeVar("_R")


class Default:
    """The type of :data:`DEFAULT`."""

    def __repr__(self) -> str:
        return "DEFAULT"


#: "Not given", where None is a meaningful value (``budget=None`` turns the budget off).
DEFAULT: Final = Default()


def policy_from(policy: RetryPolicy | None, **options: Any) -> RetryPolicy:
    """The policy an adapter runs with: ``policy``, or one made from the flat options that were
    given (those left at None, or at DEFAULT, keep RetryPolicy's defaults). Both at once is a
    TypeError."""
    given = {
        name: value
        for name, value in options.items()
        if value is not DEFAULT and (value is not None or name in ("budget", "hedge_budget"))
    }
    if policy is not None:
        if not isinstance(policy, RetryPolicy):
            raise TypeError(f"policy must be a RetryPolicy, got {policy!r}")
        if given:
            names = ", ".join(sorted(given))
            raise TypeError(f"give either policy= or {names}, not both (policy={policy!r})")
        return policy
    return RetryPolicy(**given)


def asks_for(load_reports: object, balancer: LoadBalancer) -> Mapping[str, str] | None:
    """The header asking for load reports in the format ``load_reports`` names: ``"TEXT"``
    (or True) or ``"JSON"``; False: never; None: in TEXT when the balancer's algorithm reads
    them (its ``load_reports`` attribute is true), else never."""
    if load_reports is None:
        load_reports = bool(getattr(balancer.algorithm, "load_reports", False))
    if load_reports is False:
        return None
    if load_reports is True:
        return {FORMAT_HEADER: "TEXT"}
    if isinstance(load_reports, str) and load_reports.upper() in ("TEXT", "JSON"):
        return {FORMAT_HEADER: load_reports.upper()}
    raise ValueError(
        f"load_reports must be True, False, None, 'TEXT' or 'JSON', got {load_reports!r}"
    )


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _balancer(
    balancer: LoadBalancer | Iterable[Backend | str],
    algorithm: AlgorithmLike | None,
    failure_statuses: Collection[int] | None,
    subset: Subset | None = None,
    zone: str | Zone | None = None,
) -> LoadBalancer:
    """The balancer an adapter uses: ``balancer``, or one built of the backends given."""
    if isinstance(balancer, LoadBalancer):
        if algorithm is not None:
            raise TypeError("algorithm= applies only when backends are given, not a balancer")
        for name, value in (("subset", subset), ("zone", zone)):
            if value is not None:
                raise TypeError(
                    f"{name}= applies only when backends are given, not a balancer: "
                    f"give the balancer LoadBalancer(..., {name}=...)"
                )
        if failure_statuses is not None:
            raise TypeError(
                "failure_statuses= applies only when backends are given, not a balancer: "
                "give the balancer HealthPolicy(failure_statuses=...)"
            )
        return balancer
    health = None if failure_statuses is None else HealthPolicy(failure_statuses=failure_statuses)
    if algorithm is None:
        return LoadBalancer(balancer, health=health, subset=subset, zone=zone)
    return LoadBalancer(balancer, algorithm, health=health, subset=subset, zone=zone)


class AdapterConfig(Generic[_R]):
    """What one httpx transport or requests adapter is configured with, and how a request's
    plan starts. Client-agnostic: both adapters build on it.

    * ``name``: the adapter's class name, for messages.
    * ``hedges``: whether the adapter can hedge (the async transport); the others refuse a
      policy with ``hedge_after``.
    * ``unavailable``: makes the adapter's own NoBackendAvailable (message, request).
    """

    def __init__(
        self,
        balancer: LoadBalancer | Iterable[Backend | str],
        *,
        key: Callable[[Any], bytes | str | None] | None,
        algorithm: AlgorithmLike | None,
        failure_statuses: Collection[int] | None,
        policy: RetryPolicy,
        hosts: Iterable[str] | None,
        unavailable: Callable[[str, Any], NoBackendAvailable],
        name: str,
        hedges: bool,
        load_reports: object = None,
        subset: Subset | None = None,
        zone: str | Zone | None = None,
    ) -> None:
        self.balancer = _balancer(balancer, algorithm, failure_statuses, subset, zone)
        #: The header that asks every backend for a load report, or None (see
        #: :func:`asks_for`).
        self.asks = asks_for(load_reports, self.balancer)
        #: The algorithm's load probes (Prequal), sent beside requests; None for the others.
        #: The requests adapter's are sent with urllib3, the httpx transports' with httpcore.
        self.probes: Probes | None = probes_of(
            self.balancer, "urllib3" if name == "LBAdapter" else "httpcore"
        )
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function of the request, got {key!r}")
        self.key = key
        self.name = name
        self.hedges = hedges
        self.policy = self.refuse_hedging(policy)
        #: The account every request through this adapter spends its retries from.
        self.ledger = Ledger(policy.budget, policy.hedge_budget)
        self.hosts = _hosts(hosts)
        self.unavailable = unavailable
        #: The balancer's background work (active check, discovery), or None: started by the
        #: adapter's first request (or ``with``), stopped when the adapter closes.
        self.services: Services | None = services_of(self.balancer)
        #: True until the services were started for this adapter (False at once when there are
        #: none): the per-request test is one attribute read.
        self.services_pending = self.services is not None
        self._serving = False
        self._lock = threading.Lock()
        self._starting = threading.Lock()  # held while the services start (a thread waits)
        self._astarting = anyio.Lock()  # the same for tasks, without blocking the event loop
        #: What watches this adapter's requests (:func:`~lbclient._observe.attach`); while it
        #: is empty, the per-request test is one attribute read and nothing else is paid.
        self.observers: tuple[Observer, ...] = ()
        enlist(self)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        del state["_starting"]
        del state["_astarting"]
        del state["observers"]  # they watch this process's adapters, not a copy's
        del state["services"]  # a copy's balancer has services of its own
        state["_serving"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.services = services_of(self.balancer)
        self.services_pending = self.services is not None
        self._lock = threading.Lock()
        self._starting = threading.Lock()
        self._astarting = anyio.Lock()
        enlist(self)

    # -- hosts and policy ------------------------------------------------------------------

    def serves(self, host: str) -> bool:
        """Whether requests for ``host`` go to the backends. Without ``hosts=``, the host of
        the first request is the one served from then on."""
        hosts = self.hosts
        if hosts is None:
            with self._lock:
                if self.hosts is None:
                    self.hosts = frozenset({host.lower()})
                hosts = self.hosts
        return host.lower() in hosts

    def refuse_hedging(self, policy: RetryPolicy) -> RetryPolicy:
        """``policy``, or a ValueError if it hedges and this adapter cannot."""
        if policy.hedge_after is not None and not self.hedges:
            raise ValueError(
                f"hedge_after={policy.hedge_after:g}: {self.name} does not hedge requests (it "
                "is synchronous: each hedge would need a thread of its own); use httpx with "
                "AsyncLBTransport to hedge"
            )
        return policy

    def policy_for(self, options: object) -> RetryPolicy:
        """The policy of a request with these per-request ``options`` (a
        :class:`~lbclient.RequestOptions` or a mapping of its fields)."""
        return self.refuse_hedging(RequestOptions.coerce(options).apply(self.policy))

    # -- services: active checks and discovery ---------------------------------------------

    def start_services(self, wire: Facts | None = None) -> None:
        """Start the balancer's services (active checks, discovery), once for this adapter.
        The request ``wire`` carries then waits for discovery's first answer, as do the
        requests after it until it has come, each at most its own time (:func:`first_wait`)
        and the discovery's ``timeout``; if no answer came by then and the balancer has no
        backends, it fails with the adapter's NoBackendAvailable, saying so (the lookup goes
        on). Without a request (an adapter's ``with``), it starts them and returns."""
        services = self.services
        if services is None or not self.services_pending:
            return
        with self._starting:
            self._enter(services)
        if wire is None:
            return
        wait = first_wait(wire, self._policy_of(wire))
        try:
            ready = services.ready(wait)
        except BaseException:
            self._leave(services)
            raise
        self._after_wait(services, ready, wire, wait)

    async def astart_services(self, wire: Facts | None = None) -> None:
        """:meth:`start_services` on the running event loop: tasks that arrive meanwhile wait,
        without blocking the event loop."""
        services = self.services
        if services is None or not self.services_pending:
            return
        async with self._astarting:
            with self._lock:
                begin = self.services_pending and not self._serving
            if begin:
                await services.aenter()
                with self._lock:
                    self._serving = True
        if wire is None:
            return
        wait = first_wait(wire, self._policy_of(wire))
        try:
            ready = await services.aready(wait)
        except BaseException:
            self._leave(services)
            raise
        self._after_wait(services, ready, wire, wait)

    def _enter(self, services: Services) -> None:
        """Count this adapter as a user of ``services``, once (the caller holds _starting)."""
        with self._lock:
            begin = self.services_pending and not self._serving
        if begin:
            services.enter()
            with self._lock:
                self._serving = True

    def _leave(self, services: Services) -> None:
        """The first start failed: this adapter is no user (a later request tries again)."""
        with self._lock:
            started, self._serving = self._serving, False
        if started:
            services.stop()

    def _after_wait(self, services: Services, ready: bool, wire: Facts, wait: float | None) -> None:
        """After the wait for discovery's first answer: done waiting once it came; else a
        request with no backend to go to fails, naming the wait."""
        if ready:
            with self._lock:
                if self._serving:
                    self.services_pending = False
            return
        if len(self.balancer):
            return  # a set to serve until the answer comes
        waited = services.bound(wait) or 0.0
        error = self.unavailable(
            f"no backend available for {wire.method} {redact(str(wire.url))}: it has no "
            f"backends: discovery {self.balancer.discovery!r} has not answered within "
            f"{waited:g} s (its first lookup goes on)",
            wire.request,
        )
        if self.observers:  # counted like every request that found no backend
            plan = watched_plan(
                self.observers,
                wire.request,
                wire.url,
                self.balancer,
                b"",
                wire.method,
                wire.replayable,
                self._policy_of(wire),
                self.ledger,
            )
            watch = plan.watch
            if watch is not None:
                watch.ended(plan, None, error)
        raise error

    def _policy_of(self, wire: Facts) -> RetryPolicy:
        options = wire.options
        return self.policy if options is None else self.policy_for(options)

    def _stop(self) -> bool:
        with self._lock:
            self.services_pending = False
            started, self._serving = self._serving, False
            return started

    def stop_services(self) -> None:
        """Stop the services this adapter started (others' keep running), and its probes."""
        if self.probes is not None:
            self.probes.close()
        if self._stop() and self.services is not None:
            self.services.stop()

    async def astop_services(self) -> None:
        """Stop the services this adapter started, awaiting their tasks, and its probes."""
        if self.probes is not None:
            await self.probes.aclose()
        if self._stop() and self.services is not None:
            await self.services.astop()

    # -- one request -------------------------------------------------------------------------

    def key_of(self, request: object, method: str, url: object) -> bytes:
        """The selection key of ``request``; KeyFunctionError if the key function fails.
        ``url`` is the request's URL, or an object whose ``str()`` is (made only for a
        message)."""
        fn = self.key
        if fn is None:
            return b""
        try:
            value = fn(request)
            if type(value) is bytes:
                return value
            if isinstance(value, str):
                return value.encode("utf-8")
        except Exception as exc:
            what = (
                f"returned a str that cannot be encoded as UTF-8 ({exc})"
                if isinstance(exc, UnicodeEncodeError)
                else f"raised {type(exc).__name__}: {exc}"
            )
            raise KeyFunctionError(
                f"key function {_name(fn)} {what} for {method} {redact(str(url))}; nothing was sent"
            ) from exc
        if value is None:
            return b""
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        raise KeyFunctionError(
            f"key function {_name(fn)} returned {value!r} ({type(value).__name__}) for "
            f"{method} {redact(str(url))}; it must return bytes, str or None; nothing was sent"
        )

    def start(self, wire: Facts) -> tuple[RequestPlan, Backend]:
        """The plan for the request ``wire`` carries and its first backend; NoBackendAvailable
        if none."""
        request, method, url = wire.request, wire.method, wire.url
        options = wire.options
        policy = self.policy if options is None else self.policy_for(options)
        key = self.key_of(request, method, url)
        ledger = self.ledger
        observers = self.observers
        plan = (
            watched_plan(
                observers,
                request,
                url,
                self.balancer,
                key,
                method,
                wire.replayable,
                policy,
                ledger,
            )
            if observers
            else RequestPlan(self.balancer, key, method, wire.replayable, policy, ledger=ledger)
        )
        if self.asks is not None:
            plan.asks = self.asks
        ledger.deposit(plan.start)
        first = plan.take()
        if first is None:
            error = self.unavailable(
                f"no backend available for {method} {redact(str(url))}: {self._why_none()}",
                request,
            )
            watch = plan.watch
            if watch is not None:
                watch.ended(plan, None, error)  # type: ignore[arg-type]
            raise error
        return plan, first

    def stats(self) -> RetryStats:
        """Requests, retries, hedges, the retry budget's state and probes, as of now."""
        stats = self.ledger.stats(time.monotonic())
        probes = self.probes
        return stats if probes is None else dataclasses.replace(stats, **probes.counts())

    def _why_none(self) -> str:
        snapshot = self.balancer.snapshot()
        count = len(snapshot.backends)
        if not count:
            if snapshot.discovery_error is not None:
                return f"it has no backends: discovery failed: {snapshot.discovery_error}"
            if self.balancer.discovery is None:
                return "it has no backends"
            if snapshot.discovery_refreshes:
                return "it has no backends: discovery found none"
            return "it has no backends: discovery has not answered (is the balancer started?)"
        enabled = sum(b.enabled for b in snapshot.backends)
        if not enabled:
            return f"all {count} backends are disabled"
        return (
            f"none of its {enabled} enabled backends is healthy and panic mode is off "
            f"(panic_threshold={self.balancer.policy.panic_threshold:g})"
        )


def first_wait(wire: Facts, policy: RetryPolicy) -> float | None:
    """The longest a request waits for discovery's first answer: the smallest of its client's
    ``connect`` and ``pool`` timeouts (the time it gives to getting a connection, which a
    backend set comes before) and its ``deadline``; None when it has none of them."""
    timeouts = wire.timeouts or {}
    limits = [timeouts.get("connect"), timeouts.get("pool"), policy.deadline]
    given = [float(v) for v in limits if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return min(given) if given else None


def config_of(target: object) -> AdapterConfig[Any] | None:
    """The :class:`AdapterConfig` of an httpx transport or a requests adapter, or None for
    anything else."""
    config = getattr(target, "_config", None)
    return config if isinstance(config, AdapterConfig) else None


def _hosts(hosts: Iterable[str] | None) -> frozenset[str] | None:
    if hosts is None:
        return None
    if isinstance(hosts, str):
        hosts = [hosts]
    names: set[str] = set()
    for name in hosts:
        names.update(_spellings(name))
    if not names:
        raise ValueError("hosts must name at least one host, got none")
    return frozenset(names)


def _spellings(name: object) -> tuple[str, ...]:
    """The forms of a logical host name a request's URL gives: lower case, and for a name
    beyond ASCII both its Unicode form (httpx's ``url.host``) and its ASCII one (what
    requests sends). A ValueError for anything that is not a host name alone."""
    if not isinstance(name, str) or not name or any(c in _NOT_IN_NAMES for c in name):
        unbracket = " (an IPv6 address without its brackets)" if "[" in str(name) else ""
        raise ValueError(f"hosts must be host names like 'users'{unbracket}, got {name!r}")
    lowered = name.lower()
    if ":" in name:  # an IPv6 address, as a URL's host gives it (no brackets), or a port
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            raise ValueError(
                f"hosts must be host names without a port, like 'users', got {name!r}"
            ) from None
        return (lowered,)
    if lowered.isascii() and "xn--" not in lowered:
        return (lowered,)
    import idna  # a dependency of httpx and requests both; needed for such names alone

    try:
        ascii_name = idna.encode(name, uts46=True).decode("ascii")
        return (lowered, ascii_name, idna.decode(ascii_name))
    except idna.IDNAError as error:
        raise ValueError(f"hosts must be host names like 'users', got {name!r}: {error}") from None


#: What no host name holds (a URL's separators, brackets, white space).
_NOT_IN_NAMES: Final = frozenset("/@?#[]\\ \t\r\n")
