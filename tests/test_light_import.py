"""``import distlaunch`` and ``distlaunch --help`` must not pull in heavy modules."""
from __future__ import annotations

import ast
import os
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
import gc, sys, types
import click
from distlaunch.cli import main as m

seen = []
real = m._imported
def spy():
    if m._collector_was is not None:  # main() runs and has not frozen yet
        seen.append(("importing", gc.isenabled()))
        real()
        hosts = sys.modules.get("distlaunch.cli.hosts")
        seen.append(("frozen", hosts is not None and not any(o is hosts.hosts_command for o in gc.get_objects())))
m._imported = spy

@click.command()
def probe():
    seen.append(("command", gc.isenabled()))
fake = types.ModuleType("distlaunch.cli._gc_probe")
fake.probe = probe
sys.modules[fake.__name__] = fake
m.COMMANDS["probe"] = "_gc_probe:probe"
m.COMMANDS["hosts-probe"] = m.COMMANDS["hosts"]  # a real command module, imported with the collector off

for argv, collecting in ((["hosts-probe", "--help"], True), (["probe"], True), (["probe"], True),
                         (["--version"], True), (["probe"], False)):
    (gc.enable if collecting else gc.disable)()
    sys.argv = ["distlaunch", *argv]
    try:
        m.main()
    except SystemExit:
        pass
    seen.append(("after", gc.isenabled()))
print(seen)
"""

LIBRARY_GC_PROBE = """
import gc, sys
from click.testing import CliRunner
from distlaunch.cli import main as m

result = CliRunner().invoke(m.cli, ["hosts", "--help"])
assert result.exit_code == 0, result.output
print("RESULT", {"frozen": gc.get_freeze_count(), "collecting": gc.isenabled()})
sys.argv = ["distlaunch", "runs", "--help"]
try:
    m.main()
except SystemExit:
    pass
frozen = gc.get_freeze_count()
gc.disable()
result = CliRunner().invoke(m.cli, ["download", "--help"])  # after a main(): her collector is still hers
assert result.exit_code == 0, result.output
print("RESULT", {"frozen since": gc.get_freeze_count() - frozen, "collecting": gc.isenabled()})
"""


def test_the_command_freezes_its_imports_for_the_collector_and_a_library_user_keeps_hers():
    """main() imports the command's modules with the collector off, then freezes them (they
    live as long as the process) and collects again while the command runs, the second
    time it is called in a process too, and leaves the collector as the caller had it; the
    CLI called from someone's own process (CliRunner, a notebook) never touches it."""
    proc = subprocess.run([sys.executable, "-c", GC_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ast.literal_eval(proc.stdout.strip().splitlines()[-1]) == [
        ("importing", False), ("frozen", True), ("after", True),  # hosts --help: imported, frozen
        ("importing", False), ("frozen", True), ("command", True), ("after", True),
        ("importing", False), ("frozen", True), ("command", True), ("after", True),  # main() again
        ("after", True),  # --version: no command chosen, the collector back on
        ("importing", False), ("frozen", True), ("command", False), ("after", False),  # hers was off
    ]
    proc = subprocess.run([sys.executable, "-c", LIBRARY_GC_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, last = (ast.literal_eval(line[len("RESULT "):]) for line in proc.stdout.splitlines()
                   if line.startswith("RESULT "))
    assert first == {"frozen": 0, "collecting": True}
    assert last["frozen since"] <= 0 and last["collecting"] is False, last  # (frozen objects can still be freed)


RUN_PROBE = """
import json, sys
from distlaunch.cli.main import main
sys.argv = ["distlaunch", "run", "--ppn", "2", "--run-dir", sys.argv[1], *sys.argv[2:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "loaded": sorted(set(sys.modules) & set({modules!r}))}}))
"""
NOT_FOR_ONE_HOST = ("distlaunch.nodes.treesync", "distlaunch.launch.snapshot", "distlaunch.launch.health",
                    "distlaunch.plan.slurm", "distlaunch.launch.slurm", "pathspec", "distlaunch.nodes.inputs",
                    "socket")


@pytest.mark.slow
@pytest.mark.parametrize("program, ignore_file, loaded", [
    (["python", "-c", "pass"], False, []),  # runs in place: no snapshot either
    (["noop.py"], False, ["distlaunch.launch.snapshot", "distlaunch.nodes.treesync"]),
    (["noop.py"], True, ["distlaunch.launch.snapshot", "distlaunch.nodes.treesync", "pathspec"]),
])
def test_a_run_on_this_host_imports_only_what_it_uses(tmp_path, program, ignore_file, loaded):
    """A real localhost launch does not import what only other nodes (code sync, node
    health, socket for their addresses), restarts, Slurm or --input need: ~5 ms of every
    launch, and 3-6 ms more for socket and nodes.inputs. A .py script's run imports the
    code snapshot's modules, and only those (which also shows the probe sees imports);
    pathspec (12 ms) only where an ignore file needs it, not for the secret patterns."""
    import json

    (tmp_path / "noop.py").write_text("pass\n")
    if ignore_file:
        (tmp_path / ".gitignore").write_text("*.tmp\n")
    argv = [sys.executable if word == "python" else word for word in program]
    # nothing of an allocation, an outer launcher or the caller's DISTLAUNCH_* options: a plain run on this host
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("OMPI_", "PMI", "PMIX_", "SLURM_", "PBS_", "LSB_", "DISTLAUNCH_"))
           or key == "DISTLAUNCH_STATE_DIR"}
    proc = subprocess.run([sys.executable, "-c", RUN_PROBE.format(modules=NOT_FOR_ONE_HOST), str(tmp_path / "runs"),
                           *argv], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "loaded": loaded}, (result, proc.stderr[-2000:])
