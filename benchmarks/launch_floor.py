"""A launcher with none of distlaunch's own code: what is left under ``distlaunch run``'s launch.

    python benchmarks/launch_floor.py MODULES MPIRUN [ARGS...]

Imports every module named in MODULES (comma-separated; may be empty), then runs the
command as a child and exits with its status. It treats the collector as
``distlaunch``'s ``main()`` does: off while importing, the imports then frozen, and a
collection and a freeze again at exit. perf_table.py times it beside
``distlaunch run --ppn 2 noop.py`` and bare mpirun, three ways:

- no modules, bare mpirun's argv: what a Python parent costs at all;
- the modules ``distlaunch run`` has loaded by the end of a run that are not
  distlaunch's (click, the standard library modules it and distlaunch use), and bare
  mpirun's argv;
- those modules, and the mpirun argv and environment of that real run: its MPI flags
  and exports, and its rank worker and bootstrap in every rank (the run's folder, made
  once, serves every round: no run folder, snapshot or record is made here).

What ``distlaunch run`` takes over the last is its own code: the import of its modules
and all it does around mpirun (plan, run folder, snapshot, run record, supervision).
Not an irreducible floor: some of those standard library modules are there only because
distlaunch's code uses them. It reads nothing else (no argparse, no json), so that it
costs no more than it says.
"""
import atexit
import gc
import importlib
import subprocess
import sys


def _before_exit() -> None:
    gc.collect()
    gc.freeze()


def main() -> None:
    gc.disable()
    for name in filter(None, sys.argv[1].split(",")):
        importlib.import_module(name)
    gc.freeze()
    gc.enable()
    atexit.register(_before_exit)
    sys.exit(subprocess.run(sys.argv[2:]).returncode)


if __name__ == "__main__":
    main()
