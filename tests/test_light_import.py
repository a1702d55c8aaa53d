"""``import distlaunch`` and ``distlaunch --help`` must not pull in heavy modules."""
from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "mpi4py", "pynvml", "numpy", "psutil")

CHECK = """
import sys
{body}
heavy = [m for m in {heavy!r} if m in sys.modules]
assert not heavy, heavy
print("light")
"""


@pytest.mark.parametrize("body", [
    "import distlaunch",
    "import distlaunch.rank.worker",
    "from distlaunch.cli.main import cli\n"
    "try:\n    cli(['--help'], prog_name='distlaunch')\nexcept SystemExit:\n    pass",
    "from distlaunch.cli.main import cli\n"
    "try:\n    cli(['run', '--help'], prog_name='distlaunch')\nexcept SystemExit:\n    pass",
])
def test_no_heavy_imports(body):
    proc = subprocess.run([sys.executable, "-c", CHECK.format(body=body, heavy=HEAVY)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("light")


def test_help_shows_examples():
    proc = subprocess.run([sys.executable, "-m", "distlaunch", "run", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "Examples:" in proc.stdout and "--ppn" in proc.stdout
