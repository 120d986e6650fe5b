"""pytest plugin of test_cli and test_docs (their ``pytest_plugins``): the tests that read the
session's run of ``python -m lbclient bench --quick`` (marked ``reads_bench_quick``) go last, and
the run starts in the background as soon as the tests are collected, if one of them is to run
(under pytest-xdist, in the first worker to get there; the others read what it writes). See
:mod:`cli_runs`.
"""

from __future__ import annotations

import pytest
from cli_runs import BENCH_QUICK, READS_BENCH_QUICK, finish, start


def _reads(item: pytest.Item) -> bool:
    return item.get_closest_marker(READS_BENCH_QUICK) is not None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that read the bench run go last, so that it has run by then."""
    items[:] = [item for item in items if not _reads(item)] + list(filter(_reads, items))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the bench run if a test of this session reads it."""
    if session.config.option.collectonly:
        return
    if any(map(_reads, session.items)):
        start(BENCH_QUICK, session.config)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Wait for the run started here, or kill it if the session was interrupted."""
    finish(interrupted=exitstatus == pytest.ExitCode.INTERRUPTED)
