"""The wheel's build hook: compiles lbclient's optional C reader of load reports
(``lbclient/_textreport.c``) with the C compiler Python was built with.

Optional by design: where there is no compiler (or no Python headers, or the compile fails, or
``LBCLIENT_PURE_PYTHON=1`` is set) the wheel is built pure Python, the build says why, and
lbclient reads reports with its pure-Python reader, giving the same reports. A regular wheel
carries the module and is tagged for this interpreter and platform; an editable install builds
it beside its source (``lbclient/_textreport<suffix>``), where the package is imported from.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("lbclient") / "_textreport.c"
MODULE = "_textreport"


def _compiler() -> list[str] | None:
    """The command that compiles and links a shared module here (``LDSHARED`` from the
    environment, as setuptools takes it, else the one Python was built with), or None where
    there is none (Windows: sysconfig does not name one)."""
    linker = os.environ.get("LDSHARED") or sysconfig.get_config_var("LDSHARED")
    shared = sysconfig.get_config_var("CCSHARED") or ""
    if not linker or sys.platform == "win32":
        return None
    return [*shlex.split(linker), *shlex.split(shared)]


def compile_module(root: Path, target: Path) -> str | None:
    """Compiles the reader into ``target``; None on success, else why it was not built."""
    if os.environ.get("LBCLIENT_PURE_PYTHON", "") not in ("", "0"):
        return "LBCLIENT_PURE_PYTHON is set"
    command = _compiler()
    if command is None:
        return "no C compiler is configured for this Python"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        return f"no Python headers (Python.h) in {include}"
    source = root / SOURCE
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    command += [
        "-O2",
        "-Wall",
        f'-DLBCLIENT_SOURCE_SHA256="{digest}"',
        f"-I{include}",
        str(source),
        "-o",
        str(target),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        return f"the compiler did not run ({error})"
    if done.returncode != 0:
        return f"the compiler failed:\n{done.stderr.strip()}"
    return None


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Builds the optional C reader into the wheel (see the module's account)."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        name = MODULE + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")
        if version == "editable":
            target = root / "lbclient" / name
            target.unlink(missing_ok=True)  # never an old build beside new source
        else:
            target = Path(tempfile.mkdtemp(prefix="lbclient-build-")) / name
        why = compile_module(root, target)
        if why is not None:
            self.app.display_warning(
                f"lbclient: the compiled report reader was not built ({why}); "
                "the pure-Python reader is used, with the same results"
            )
            return
        if version != "editable":
            build_data["force_include"][str(target)] = f"lbclient/{name}"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
