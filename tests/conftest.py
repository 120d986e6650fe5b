"""Shared test helpers.

Data from real nginx lives in the sibling ``../shared/`` folder of the development workspace, not
in this repository. Tests that read it skip where it is absent (a user's clone has none), unless
``LBCLIENT_REQUIRE_SHARED=1`` is set, as CI does, which turns that skip into a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _shared_dir() -> Path:
    configured = os.environ.get("LBCLIENT_SHARED")
    return Path(configured) if configured else ROOT.parent / "shared"


def require(condition: bool, reason: str, env: str) -> None:
    """Skip with ``reason`` unless ``condition``; fail instead when ``$env`` is ``1``."""
    if condition:
        return
    if os.environ.get(env) == "1":
        pytest.fail(f"{reason} ({env}=1 makes this a failure)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_vectors() -> Path:
    """The ``vectors/`` folder of the workspace's ``../shared/`` data."""
    path = _shared_dir() / "vectors"
    require(
        path.is_dir(),
        f"{path} not found: the nginx vector data lives beside the repository in the "
        "development workspace only (a user's clone has no ../shared/)",
        "LBCLIENT_REQUIRE_SHARED",
    )
    return path
