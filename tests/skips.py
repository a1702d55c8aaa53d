"""The skips CI accepts, each with the reason it is acceptable.

With ``DISTLAUNCH_STRICT_SKIPS=1`` (CI sets it) a test session that skips anything whose
reason matches none of these patterns fails, and so does every inner MPI run of the
suite (the variable reaches the ranks), so a missing prerequisite cannot pass as green.
"""
from __future__ import annotations

import os
import re

import pytest

ALLOWED = [
    # GPU-only paths on a machine without a GPU (the GPU machine runs them)
    (r"this machine has GPUs", "the no-GPU fallback cannot be seen where GPUs exist"),
    # real Horovod runs its collectives in its own background thread: fusion buckets are
    # counted for the torch backend, whose fusion is ours
    (r"real Horovod fuses in its own thread", "nothing to count from Python"),
    # CI's root run builds Horovod and requires it (DISTLAUNCH_REQUIRE_HOROVOD=1); the
    # unprivileged run does not build it a second time
    (r"Horovod is not installed", "only where DISTLAUNCH_REQUIRE_HOROVOD is unset"),
    # an unprivileged user cannot start, stop or restart simulated nodes, mount a tmpfs or
    # create users; CI runs those as root
    (r"needs root", "the root run covers it"),
]


def allowed(reason: str) -> bool:
    return any(re.search(pattern, reason) for pattern, _why in ALLOWED)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Skip accounting: with DISTLAUNCH_STRICT_SKIPS=1, a skip not on tests/skips.py's list fails the run."""
    if os.environ.get("DISTLAUNCH_STRICT_SKIPS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reports = reporter.stats.get("skipped", []) if reporter is not None else []
    bad = []
    for report in reports:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        if not allowed(reason):
            bad.append(f"{report.nodeid}: {reason}")
    if bad:
        if reporter is not None:
            reporter.write_line(f"distlaunch: {len(bad)} skip(s) not on the allow-list in tests/skips.py:", red=True)
            for line in bad:
                reporter.write_line(f"  {line}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
