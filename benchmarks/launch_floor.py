"""A launcher with none of distlaunch's own code: the floor under ``distlaunch run``'s launch.

    python benchmarks/launch_floor.py MODULES MPIRUN [ARGS...]

Imports every module named in MODULES (comma-separated; may be empty), then runs the
command as a child and exits with its status. perf_table.py times it beside
``distlaunch run --ppn 2 noop.py`` and bare mpirun, three ways:

- no modules, bare mpirun's argv: what a Python parent costs at all;
- the modules ``distlaunch run`` has loaded by the end of a run, less its own (click,
  the standard library, anything else it pulled in), and bare mpirun's argv;
- those modules, and the argv and environment distlaunch gave mpirun in a real run: its
  rank worker and bootstrap in every rank.

What ``distlaunch run`` takes over the last is its own code: the import of its modules
and all it does around mpirun (plan, snapshot, run record, supervision). It reads
nothing else (no argparse, no json), so that it costs no more than it says.
"""
import importlib
import subprocess
import sys


def main() -> None:
    for name in filter(None, sys.argv[1].split(",")):
        importlib.import_module(name)
    sys.exit(subprocess.run(sys.argv[2:]).returncode)


if __name__ == "__main__":
    main()
