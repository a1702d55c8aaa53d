"""Skip accounting itself: a skip that is not on the allow-list fails a strict session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def strict_run(tmp_path: Path, reason: str) -> subprocess.CompletedProcess[str]:
    test = tmp_path / "test_one.py"
    test.write_text(f"import pytest\n\ndef test_passes():\n    pass\n\n"
                    f"def test_skips():\n    pytest.skip({reason!r})\n")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "skips", str(test)],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "DISTLAUNCH_STRICT_SKIPS": "1", "PYTHONPATH": str(REPO / "tests")})


def test_unlisted_skip_fails_a_strict_session(tmp_path):
    proc = strict_run(tmp_path, "rsync is not installed")
    assert proc.returncode == 1, proc.stdout
    assert "not on the allow-list" in proc.stdout and "rsync is not installed" in proc.stdout


def test_listed_skip_passes(tmp_path):
    proc = strict_run(tmp_path, "this machine has GPUs")
    assert proc.returncode == 0, proc.stdout
