"""One real nginx for a test module: found (or the tests skip, unless
``LBCLIENT_REQUIRE_NGINX=1`` makes that a failure), configured to run as a single process on
loopback with its config, pid, logs and temp dirs in a pytest tmp dir, and stopped afterwards.
Shared by the nginx compatibility tests; each writes its own ``http`` block after
:func:`conf_head`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import require

NGINX_MISSING = "nginx not installed (Debian: apt-get install nginx-light)"
STARTUP_DEADLINE_S = 10.0
STOP_GRACE_S = 5.0
#: Modules whose temp path is set only when the build has them.
OPTIONAL_TEMP_MODULES = ("fastcgi", "uwsgi", "scgi")


def skip_or_fail(reason: str) -> None:
    require(False, reason, "LBCLIENT_REQUIRE_NGINX")


def nginx_with(modules: Sequence[str]) -> tuple[str, str]:
    """(path, ``nginx -V`` output) of an nginx built with every one of ``modules``."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    if found is None:
        skip_or_fail(NGINX_MISSING)
        raise AssertionError("unreachable")  # pragma: no cover
    try:
        done = subprocess.run(
            [found, "-V"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        skip_or_fail(f"{found} -V failed: {exc}")
        raise AssertionError("unreachable") from exc  # pragma: no cover
    info = done.stdout + done.stderr
    missing = [m for m in modules if f"--without-http_{m}_module" in info]
    if missing:
        skip_or_fail(f"{found} lacks required modules: {', '.join(missing)}")
    return found, info


def conf_head(directory: Path, info: str) -> list[str]:
    """The config's lines up to and including the opening of the ``http`` block."""

    def path(name: str) -> str:
        return f'"{directory / name}"'

    lines = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        import grp
        import pwd

        # As root nginx would otherwise chown its temp dirs to (and look up) "nobody".
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
        lines.append(f"user {user} {group};")
    lines += [
        "daemon off;",
        "master_process off;",
        "worker_processes 1;",
        f"pid {path('nginx.pid')};",
        f"lock_file {path('nginx.lock')};",
        f"error_log {path('error.log')} notice;",
        "events { worker_connections 256; }",
        "http {",
        "    access_log off;",
        "    default_type text/plain;",
        "    keepalive_requests 100000;",
        f"    client_body_temp_path {path('client_body_temp')};",
        f"    proxy_temp_path {path('proxy_temp')};",
    ]
    lines += [
        f"    {module}_temp_path {path(module + '_temp')};"
        for module in OPTIONAL_TEMP_MODULES
        if f"--without-http_{module}_module" not in info
    ]
    return lines


@contextlib.contextmanager
def running(
    nginx: str, directory: Path, conf_text: str, endpoints: Sequence[tuple[str, int]]
) -> Iterator[None]:
    """nginx running ``conf_text`` until the block ends; the test fails (with nginx's logs)
    if it does not accept connections on every endpoint in time."""
    conf = directory / "nginx.conf"
    error_log = directory / "error.log"
    output = directory / "nginx.out"
    conf.write_text(conf_text)
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [nginx, "-p", f"{directory}/", "-c", str(conf), "-e", str(error_log)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            problem = _wait_until_listening(proc, endpoints)
            if problem:
                pytest.fail(
                    f"nginx did not come up: {problem}\n{_tail(error_log, output, conf)}",
                    pytrace=False,
                )
            yield
        finally:
            _stop(proc)


def _tail(*files: Path, limit: int = 4000) -> str:
    parts = []
    for file in files:
        text = file.read_text(errors="replace") if file.exists() else "(missing)"
        parts.append(f"--- {file.name} ---\n{text[-limit:]}")
    return "\n".join(parts)


def _wait_until_listening(
    proc: subprocess.Popen[bytes], endpoints: Sequence[tuple[str, int]]
) -> str:
    """Empty string once every endpoint accepts TCP connections, otherwise why not."""
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    pending = list(endpoints)
    while pending:
        if proc.poll() is not None:
            return f"nginx exited with status {proc.returncode}"
        host, port = pending[0]
        try:
            with socket.create_connection((host, port), timeout=0.5):
                pending.pop(0)
        except OSError as exc:
            if time.monotonic() > deadline:
                return f"{host}:{port} not accepting after {STARTUP_DEADLINE_S:.0f} s: {exc}"
            time.sleep(0.05)
    return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: nginx fast shutdown
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # own session: only nginx is in this group
            proc.wait(STOP_GRACE_S)
