"""The house: a core that stands alone, one exception tree, a narrow public surface."""

from __future__ import annotations

import ast
import asyncio
import importlib
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import requests

import lbclient
from lbclient import (
    AsyncLBTransport,
    LBAdapter,
    LBClientError,
    LBTransport,
    LoadBalancer,
    NoBackendAvailable,
)
from lbclient.retry import Attempt, Failure
from lbclient.testing import TestServer, closed_port

PACKAGE = Path(lbclient.__file__).parent
# The core, and the pure values the errors refer to (lbclient.retry: RetryPolicy, Attempt).
CORE = [
    "backend",
    "hashing",
    "selection",
    "subsets",
    "zones",
    "health",
    "_book",
    "_load",
    "reports",
    "_view",
    "_subset_view",
    "_zone_view",
    "_lifecycle",
    "balancer",
    "errors",
    "retry",
]
#: The core's compiled part (optional; C): it may include Python's headers and string.h alone.
COMPILED_CORE = {"_textreport": {"Python.h", "string.h"}}
CLIENTS = {"httpx", "httpcore", "requests", "urllib3", "tenacity", "anyio", "h11"}
IO = {"socket", "ssl", "asyncio", "selectors", "subprocess", "lbclient.checks", "checks"}

BLOCKED = (
    "import sys; sys.modules['httpx'] = sys.modules['requests'] = None; "
    "from lbclient import LoadBalancer, Backend, Consistent, HealthPolicy, "
    "NoBackendAvailable, LBClientError; LoadBalancer(['10.0.0.1:80']).select()"
)


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_core_works_with_both_clients_blocked() -> None:
    done = run(BLOCKED)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_import_lbclient_loads_no_client_and_adapters_load_on_first_use() -> None:
    code = (
        "import sys, lbclient\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(CLIENTS)!r}))\n"
        "from lbclient import LBTransport, LBAdapter\n"
        "print(LBTransport.__module__, LBAdapter.__module__, 'httpx' in sys.modules)\n"
    )
    done = run(code)
    assert done.returncode == 0, done.stderr
    loaded, adapters = done.stdout.splitlines()
    assert loaded == "[]"
    assert adapters == "lbclient.httpx_transport lbclient.requests_adapter True"


def _core_files() -> list[Path]:
    files: list[Path] = []
    for name in CORE:
        path = PACKAGE / name
        files += sorted(path.glob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    return files


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_core_modules_import_no_client_and_no_io(path: Path) -> None:
    imported = _imports(path)
    tops = {name.split(".")[0] for name in imported}
    assert not tops & CLIENTS, f"{path.name} imports {sorted(tops & CLIENTS)}"
    assert not (tops | imported) & IO, f"{path.name} imports {sorted((tops | imported) & IO)}"
    # lbclient modules outside the core (checks, transports, the attempt loop) are off limits.
    outside = {
        name
        for name in imported
        if name.startswith("lbclient.")
        and name.split(".")[1] not in CORE
        and name.split(".")[1] not in COMPILED_CORE
    }
    assert not outside, f"{path.name} imports {sorted(outside)}"


@pytest.mark.parametrize("name", sorted(COMPILED_CORE))
def test_the_compiled_core_includes_nothing_but_pythons_headers_and_strings(name: str) -> None:
    source = (PACKAGE / name).with_suffix(".c").read_text()
    included = set(re.findall(r'^#include [<"]([^>"]+)[>"]', source, flags=re.MULTILINE))
    assert included == COMPILED_CORE[name]


#: The longest a library module may be: one job per module. The command line and the test
#: servers are programs of their own, not the library.
MODULE_LINES = 600


@pytest.mark.parametrize(
    "path",
    [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if "cli" not in p.relative_to(PACKAGE).parts and p.name != "testing.py"
    ],
    ids=lambda p: p.relative_to(PACKAGE).as_posix(),
)
def test_no_library_module_is_over_600_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MODULE_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines"


def test_core_starts_no_thread() -> None:
    for path in _core_files():
        source = path.read_text()
        assert "Thread(" not in source, path.name
        assert "create_task" not in source, path.name


# -- rule 5: transports -> services -> runner; services -> balancer ---------------------------

SERVICE_MODULES = {
    "lbclient._services",
    "lbclient._background",
    "lbclient.checks",
    "lbclient.discovery",
}


def test_the_balancer_binds_starts_and_reads_nothing_of_its_checks_or_discovery() -> None:
    tree = ast.parse((PACKAGE / "balancer.py").read_text())
    imported = _imports(PACKAGE / "balancer.py")
    assert not {m for m in imported if m.startswith(tuple(SERVICE_MODULES))}
    # Its health_check and discovery settings are kept (__init__), handed back (the
    # properties, pickling) and nothing else: no method reads, binds or starts them.
    keeping = set()
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.Attribute) and node.attr in {"_health_check", "_discovery"}:
                    keeping.add(function.name)
    assert keeping == {"__init__", "health_check", "discovery", "__reduce__"}
    called = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert not called & {"bind", "describe", "spawn", "call", "prepare", "jobs"}

    # What starts and stops is the port, and only in the lifecycle methods (the balancer's
    # base in _lifecycle forwards them).
    def forwarding(module: ast.Module) -> set[str]:
        return {
            function.name
            for function in ast.walk(module)
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(function)
            if isinstance(node, ast.Attribute) and node.attr == "_services"
        }

    assert forwarding(tree) == {"__init__", "services"}
    base = ast.parse((PACKAGE / "_lifecycle.py").read_text())
    assert forwarding(base) == {"start", "astart", "close", "aclose"}


def _identifiers(path: Path) -> set[str]:
    """The names a module's code uses (its strings and comments left out)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def test_the_runner_knows_nothing_of_checks_discovery_or_the_balancer() -> None:
    imported = _imports(PACKAGE / "_background.py")
    assert not {m for m in imported if m.startswith("lbclient")}
    for name in _identifiers(PACKAGE / "_background.py"):
        for word in ("check", "discover", "balancer", "probe", "backend", "refresh"):
            assert word not in name.lower(), name


def test_the_services_layer_imports_the_runner_and_the_balancer_only() -> None:
    imported = {m for m in _imports(PACKAGE / "_services.py") if m.startswith("lbclient")}
    assert imported == {"lbclient._background", "lbclient.balancer"}


def test_with_balancer_only_forwards_to_its_lifecycle_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lbclient.balancer as core
    from lbclient.checks import TcpCheck

    calls: list[str] = []

    class Recorder:
        def start(self) -> None:
            calls.append("start")

        async def astart(self) -> None:
            calls.append("astart")

        def stop(self) -> None:
            calls.append("stop")

        async def astop(self) -> None:
            calls.append("astop")

    before = set(threading.enumerate())
    monkeypatch.setattr(core, "_make_lifecycle", lambda balancer: Recorder())
    lb = LoadBalancer(["10.0.0.1:80"], health_check=TcpCheck())
    with lb:
        pass

    async def use() -> None:
        async with lb:
            pass

    asyncio.run(use())
    assert calls == ["start", "stop", "astart", "astop"]
    assert set(threading.enumerate()) <= before  # it started nothing of its own


def test_a_balancer_with_a_check_or_a_source_always_finds_the_services_layer() -> None:
    code = (
        "import sys, lbclient\n"
        "lbclient.LoadBalancer(['10.0.0.1:80']).select()\n"
        "print(sorted(m for m in sys.modules if m in {'lbclient._services', "
        "'lbclient._background', 'asyncio'}))\n"
        "from lbclient import TcpCheck, LoadBalancer\n"
        "print(type(LoadBalancer(['10.0.0.1:80'], health_check=TcpCheck()).services).__name__)\n"
        "from lbclient.discovery import Static\n"
        "print(type(LoadBalancer(discovery=Static([])).services).__name__)\n"
        "print(LoadBalancer(['10.0.0.1:80']).services)\n"
    )
    done = run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "Services", "Services", "None"]


# -- one exception tree ---------------------------------------------------------------------


def test_no_backend_available_is_an_lbclient_error() -> None:
    assert issubclass(NoBackendAvailable, LBClientError)
    assert issubclass(lbclient.KeyFunctionError, LBClientError)
    assert issubclass(lbclient.errors.CheckFailed, LBClientError)
    assert not issubclass(NoBackendAvailable, (httpx.HTTPError, requests.RequestException))


def test_httpx_no_backend_is_caught_three_ways() -> None:
    for catch in (NoBackendAvailable, httpx.ConnectError, LBClientError):
        with (
            httpx.Client(transport=LBTransport([]), base_url="http://users") as client,
            pytest.raises(catch) as caught,
        ):
            client.get("/x")
        error = caught.value
        assert isinstance(error, NoBackendAvailable)
        assert isinstance(error, httpx.ConnectError)
        assert error.request.url == "http://users/x"
        assert error.args == ("no backend available for GET http://users/x: it has no backends",)
        assert error.attempts == ()


def test_async_httpx_no_backend_is_caught_three_ways() -> None:
    async def main() -> None:
        for catch in (NoBackendAvailable, httpx.ConnectError, LBClientError):
            transport = AsyncLBTransport([])
            async with httpx.AsyncClient(transport=transport, base_url="http://users") as client:
                with pytest.raises(catch) as caught:
                    await client.get("/x")
            assert isinstance(caught.value, NoBackendAvailable)
            assert isinstance(caught.value, httpx.ConnectError)

    asyncio.run(main())


def test_requests_no_backend_is_caught_three_ways() -> None:
    for catch in (NoBackendAvailable, requests.ConnectionError, LBClientError):
        with requests.Session() as session:
            session.mount("http://users/", LBAdapter([]))
            with pytest.raises(catch) as caught:
                session.get("http://users/x")
        error = caught.value
        assert isinstance(error, NoBackendAvailable)
        assert isinstance(error, requests.ConnectionError)
        assert error.request is not None
        assert error.request.url == "http://users/x"
        assert str(error) == "no backend available for GET http://users/x: it has no backends"


def _check_attempts(error: BaseException, dead: list[str], kind: type[BaseException]) -> None:
    attempts = error.attempts  # type: ignore[attr-defined]
    assert isinstance(attempts, tuple)
    assert [a.backend.address for a in attempts] == dead
    for attempt in attempts:
        assert isinstance(attempt, Attempt)
        assert attempt.failure is Failure.NEVER_SENT
        assert attempt.status is None
        assert isinstance(attempt.error, kind)
        assert attempt.seconds >= 0
        assert attempt.backend.address in str(error)


def test_failed_httpx_request_carries_its_attempts_as_data() -> None:
    dead = sorted(f"127.0.0.1:{closed_port()}" for _ in range(2))
    balancer = LoadBalancer(dead)
    with (
        httpx.Client(transport=LBTransport(balancer, max_attempts=2)) as client,
        pytest.raises(httpx.ConnectError) as caught,
    ):
        client.get("http://users/")
    assert not isinstance(caught.value, NoBackendAvailable)
    tried = [a.backend.address for a in caught.value.attempts]  # type: ignore[attr-defined]
    assert sorted(tried) == dead
    _check_attempts(caught.value, tried, httpx.ConnectError)


def test_failed_requests_request_carries_its_attempts_as_data() -> None:
    dead = sorted(f"127.0.0.1:{closed_port()}" for _ in range(2))
    with requests.Session() as session:
        session.mount("http://users/", LBAdapter(dead, max_attempts=2))
        with pytest.raises(requests.ConnectionError) as caught:
            session.get("http://users/")
    tried = [a.backend.address for a in caught.value.attempts]  # type: ignore[attr-defined]
    assert sorted(tried) == dead
    _check_attempts(caught.value, tried, requests.ConnectionError)


def test_maybe_sent_attempt_is_recorded_as_such() -> None:
    with (
        TestServer(mode="close") as closing,
        httpx.Client(transport=LBTransport([closing.address], max_attempts=1)) as client,
        pytest.raises(httpx.RemoteProtocolError) as caught,
    ):
        client.post("http://users/", content=b"x")
    (attempt,) = caught.value.attempts  # type: ignore[attr-defined]
    assert attempt.failure is Failure.MAYBE_SENT
    assert attempt.backend.address == closing.address
    assert isinstance(attempt.error, httpx.RemoteProtocolError)


# -- a narrow public surface ---------------------------------------------------------------

PUBLIC = [
    "lbclient",
    "lbclient.backend",
    "lbclient.balancer",
    "lbclient.checks",
    "lbclient.errors",
    "lbclient.hashing",
    "lbclient.health",
    "lbclient.httpx_transport",
    "lbclient.requests_adapter",
    "lbclient.retry",
    "lbclient.selection",
    "lbclient.server",
    "lbclient.testing",
]
MACHINERY = {
    "Adapter",
    "RequestPlan",
    "run_sync",
    "run_async",
    "budget_of",
    "policy_from",
    "Runner",
    "start_runner",
    "Schedule",
    "HealthBook",
}


@pytest.mark.parametrize("name", PUBLIC)
def test_public_modules_export_what_users_call(name: str) -> None:
    module = importlib.import_module(name)
    exported = set(module.__all__)
    assert not exported & MACHINERY, sorted(exported & MACHINERY)
    for attribute in exported:
        assert getattr(module, attribute) is not None


def test_top_level_names_are_few_and_all_resolve() -> None:
    assert len(lbclient.__all__) <= 30
    for name in lbclient.__all__:
        assert getattr(lbclient, name) is not None
    # Nothing more is offered: each other name lives in its own module only.
    elsewhere = {
        "HealthCheck",
        "CheckFailed",
        "Failure",
        "IDEMPOTENT_METHODS",
        "HealthState",
        "MAX_WEIGHT",
        "DEFAULT_MAX_ITERATIONS",
        "Algorithm",
        "Selector",
        "UniqueIterator",
        "Weighted",
        "WeightedIterator",
        "WeightedSelector",
        "ConsistentSelector",
        "Maglev",
        "MaglevSelector",
        "Rendezvous",
        "RendezvousSelector",
        "LibKetama",
        "LibKetamaSelector",
        "ServiceDiscovery",
        "Discovered",
        "Static",
        "DNS",
        "File",
        "Function",
    }
    assert not elsewhere & set(dir(lbclient))
    for name in elsewhere:
        with pytest.raises(AttributeError):
            getattr(lbclient, name)


def test_unknown_top_level_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lbclient.Nope  # type: ignore[attr-defined]  # noqa: B018
