"""``import distlaunch`` and ``distlaunch --help`` must not pull in heavy modules."""
from __future__ import annotations

import ast
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


GC_PROBE = """
import atexit, gc, sys
from distlaunch.cli import main as m

seen = {}
real = m._imported
def spy():
    seen["collecting while importing"] = gc.isenabled()
    real()
    seen["frozen"], seen["collecting after"] = gc.get_freeze_count(), gc.isenabled()
m._imported = spy
atexit.register(lambda: print(seen))  # runs after main()'s own exit handler
sys.argv = ["distlaunch", "hosts", "--help"]
m.main()
"""

LIBRARY_GC_PROBE = """
import gc
from click.testing import CliRunner
from distlaunch.cli.main import cli

result = CliRunner().invoke(cli, ["hosts", "--help"])
assert result.exit_code == 0, result.output
print({"frozen": gc.get_freeze_count(), "collecting": gc.isenabled()})
"""


def test_the_command_freezes_its_imports_for_the_collector_and_a_library_user_keeps_hers():
    """The distlaunch command imports its modules with the collector off, then freezes them
    (they live as long as the process) and collects again; the CLI called from someone's
    own process (CliRunner, a notebook) never touches her collector."""
    proc = subprocess.run([sys.executable, "-c", GC_PROBE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    seen = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert seen["collecting while importing"] is False and seen["collecting after"] is True
    assert seen["frozen"] > 1000, seen
    proc = subprocess.run([sys.executable, "-c", LIBRARY_GC_PROBE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert ast.literal_eval(proc.stdout.strip().splitlines()[-1]) == {"frozen": 0, "collecting": True}
