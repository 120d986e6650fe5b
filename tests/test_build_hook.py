"""The wheel's build hook (hatch_build.py): with a C compiler the wheel carries the compiled report
reader and is tagged for this interpreter; without one (none configured, one that fails, or
LBCLIENT_PURE_PYTHON=1) the wheel is pure Python, the build says why, and lbclient installed from
it reads reports in Python. Wheels are built in process by hatchling, as pip's build does."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"


class Shown:
    """What the build displays, kept (hatchling's application interface, the parts used)."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def display_warning(self, message: str = "", **_: object) -> None:
        self.warnings.append(message)

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None


def build(out: Path) -> tuple[Path, list[str]]:
    """A regular wheel of this checkout in ``out``, and the warnings the build displayed."""
    from hatchling.builders.wheel import WheelBuilder

    shown = Shown()
    builder = WheelBuilder(str(ROOT), app=shown)  # type: ignore[arg-type]
    (wheel,) = builder.build(directory=str(out), versions=["standard"])
    return Path(wheel), shown.warnings


#: Run in an interpreter that sees lbclient unpacked from a wheel alone: whether that is the
#: lbclient imported, whether its compiled parts are there (the report reader's, the server
#: companion's), a report read, and two requests served through the ASGI middleware (what
#: ``__call__`` reads as, the requests left in flight, whether they were counted).
_INSTALLED = """
import asyncio, inspect, sys
sys.path.insert(0, {into!r})
import lbclient.reports as r, lbclient.server as s

async def app(scope, receive, send):
    await send({{"type": "http.response.start", "status": 200, "headers": []}})

async def ignore(message):
    pass

middleware = s.LoadReportingASGI(app, tracker=s.LoadTracker(share_in_flight=False))
asyncio.run(middleware({{"type": "http", "path": "/", "headers": []}}, None, ignore))
asyncio.run(middleware({{"type": "http", "path": "/", "headers": []}}, None, ignore))
served = [inspect.iscoroutinefunction(middleware.__call__), middleware.tracker.rif,
          middleware.tracker.report().rps_fractional > 0]
print(r.__file__.startswith({into!r}), r.COMPILED, s.COMPILED,
      r.parse("TEXT eps=0.5, named_metrics.rif=2", 1.0).rif, *served)
"""


def installed(wheel: Path, into: Path) -> str:
    """What lbclient, unpacked from ``wheel`` alone, says (see _INSTALLED)."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(into)
    done = subprocess.run(
        [sys.executable, "-I", "-c", _INSTALLED.format(into=str(into))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


@pytest.fixture
def hook_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    pytest.importorskip("hatchling", reason="hatchling (the dev extra) builds the wheels here")
    if not (ROOT / "hatch_build.py").is_file():
        pytest.skip("not a source checkout: no hatch_build.py beside the tests")
    monkeypatch.delenv("LBCLIENT_PURE_PYTHON", raising=False)
    monkeypatch.delenv("LDSHARED", raising=False)
    return monkeypatch


def test_a_wheel_built_with_a_compiler_carries_the_compiled_reader(
    hook_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if os.environ.get("LBCLIENT_REQUIRE_COMPILED") != "1" and not sysconfig.get_config_var(
        "LDSHARED"
    ):
        pytest.skip("no C compiler is configured for this Python")
    wheel, warnings = build(tmp_path / "dist")
    assert warnings == []
    inside = names(wheel)
    assert f"lbclient/_textreport{SUFFIX}" in inside
    assert f"lbclient/server/_counting{SUFFIX}" in inside
    assert not [name for name in inside if name.endswith(".c")]
    assert not wheel.name.endswith("-py3-none-any.whl"), wheel.name
    assert (
        "Root-Is-Purelib: false"
        in zipfile.ZipFile(wheel)
        .read(next(name for name in inside if name.endswith(".dist-info/WHEEL")))
        .decode()
    )
    assert installed(wheel, tmp_path / "site") == "True True True 2.0 True 0 True"


@pytest.mark.parametrize(
    ("variable", "value", "why"),
    [
        ("LBCLIENT_PURE_PYTHON", "1", "LBCLIENT_PURE_PYTHON is set"),
        ("LDSHARED", "false", "the compiler failed"),
        ("LDSHARED", "/nonexistent/cc", "the compiler did not run"),
    ],
)
def test_without_a_working_compiler_the_wheel_is_pure_python_and_says_why(
    hook_env: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str, why: str
) -> None:
    hook_env.setenv(variable, value)
    wheel, warnings = build(tmp_path / "dist")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    assert not [name for name in names(wheel) if name.endswith((".so", ".pyd", ".c"))]
    assert len(warnings) == 1
    assert "compiled report reader and server path were not built" in warnings[0]
    assert why in warnings[0]
    assert installed(wheel, tmp_path / "site") == "True False False 2.0 True 0 True"


def test_the_sdist_builds_the_same_wheel(hook_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # What pip does with the sdist where no wheel fits: the C source and the hook travel in it.
    import tarfile

    from hatchling.builders.sdist import SdistBuilder

    (sdist,) = SdistBuilder(str(ROOT)).build(directory=str(tmp_path / "sdist"))
    with tarfile.open(sdist) as archive:
        inside = archive.getnames()
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12 and later
            archive.extractall(tmp_path / "source", filter="data")
        else:  # pragma: no cover
            archive.extractall(tmp_path / "source")
    assert not [name for name in inside if name.endswith((".so", ".pyd"))]
    (unpacked,) = (tmp_path / "source").iterdir()
    from hatchling.builders.wheel import WheelBuilder

    shown = Shown()
    (wheel,) = WheelBuilder(str(unpacked), app=shown).build(  # type: ignore[arg-type]
        directory=str(tmp_path / "dist"), versions=["standard"]
    )
    compiled = f"lbclient/_textreport{SUFFIX}" in names(Path(wheel))
    assert compiled == (f"lbclient/server/_counting{SUFFIX}" in names(Path(wheel)))
    assert compiled == (not shown.warnings), shown.warnings
    assert compiled or os.environ.get("LBCLIENT_REQUIRE_COMPILED") != "1"
    assert (
        installed(Path(wheel), tmp_path / "site") == f"True {compiled} {compiled} 2.0 True 0 True"
    )
