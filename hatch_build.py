"""The wheel's build hook: compiles lbclient's optional C modules with the C compiler Python
was built with: the reader of load reports (``lbclient/_textreport.c``) and the server
companion's per-request path (``lbclient/server/_counting.c``).

Optional by design: where there is no compiler (or no Python headers, or a compile fails, or
``LBCLIENT_PURE_PYTHON=1`` is set) the wheel is built pure Python, the build says why, and
lbclient does the same in Python, with the same results. A regular wheel carries the modules and
is tagged for this interpreter and platform; an editable install builds them beside their source
(``lbclient/_textreport<suffix>``, ``lbclient/server/_counting<suffix>``), where the package is
imported from.
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

#: The modules: each one's C source; the module is built beside it, named as it is.
SOURCES = (Path("lbclient") / "_textreport.c", Path("lbclient") / "server" / "_counting.c")


def _compiler() -> list[str] | None:
    """The command that compiles and links a shared module here (``LDSHARED`` from the
    environment, as setuptools takes it, else the one Python was built with), or None where
    there is none (Windows: sysconfig does not name one)."""
    linker = os.environ.get("LDSHARED") or sysconfig.get_config_var("LDSHARED")
    shared = sysconfig.get_config_var("CCSHARED") or ""
    if not linker or sys.platform == "win32":
        return None
    return [*shlex.split(linker), *shlex.split(shared)]


def compile_module(root: Path, source: Path, target: Path) -> str | None:
    """Compiles ``source`` (relative to ``root``) into ``target``; None on success, else why
    it was not built."""
    if os.environ.get("LBCLIENT_PURE_PYTHON", "") not in ("", "0"):
        return "LBCLIENT_PURE_PYTHON is set"
    command = _compiler()
    if command is None:
        return "no C compiler is configured for this Python"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        return f"no Python headers (Python.h) in {include}"
    source = root / source
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
    """Builds the optional C modules into the wheel (see the module's account): all of them,
    or none (one warning says why)."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        built: dict[str, str] = {}  # the module built -> its place in the wheel
        scratch = Path(tempfile.mkdtemp(prefix="lbclient-build-"))
        for source in SOURCES:
            place = source.with_suffix(suffix)
            if version == "editable":
                target = root / place
                target.unlink(missing_ok=True)  # never an old build beside new source
            else:
                target = scratch / place.name
            why = compile_module(root, source, target)
            if why is not None:
                for made in built:
                    Path(made).unlink(missing_ok=True)  # all or none: one build, one story
                self.app.display_warning(
                    f"lbclient: the compiled report reader and server path were not built "
                    f"({source.name}: {why}); the pure-Python ones are used, with the same "
                    "results"
                )
                return
            built[str(target)] = place.as_posix()
        if version != "editable":
            build_data["force_include"].update(built)
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
