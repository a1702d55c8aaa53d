"""How long planning takes for big allocations: hostlist → placement → hostfile → argv.

Simulates a Slurm allocation of N nodes (``node[00001-N]``, 8 tasks per node), then times
``place()`` and ``plan()``, which is all the launcher does before starting mpirun.
Prints per-stage medians for 10 to 10,000 hosts and writes JSON with --json.

    python benchmarks/plan_scale.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from distlaunch.plan.gpus import Inventory
from distlaunch.plan.mpi import Flavour, MPIInstall
from distlaunch.plan.mpirun import LaunchContext, plan
from distlaunch.plan.placement import place
from distlaunch.plan.spec import JobSpec, TargetSpec, resolve_program

REPO = Path(__file__).resolve().parent.parent


def measure(nodes: int, repeats: int) -> dict[str, float]:
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": f"node[00001-{nodes:05d}]",
           "SLURM_TASKS_PER_NODE": f"8(x{nodes})"}
    spec = JobSpec(str(REPO / "examples" / "train.py"), python=sys.executable)
    mpi = MPIInstall("/usr/bin/mpirun", Flavour.OPENMPI, "5.0.0")
    ctx = LaunchContext(is_root=False, local_cores=64)
    no_gpu = Inventory((), "none")
    program = resolve_program(spec)
    stages: dict[str, list[float]] = {"place": [], "plan": [], "total": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        placed = place(TargetSpec(), env=env, inv=no_gpu)
        t1 = time.perf_counter()
        the_plan = plan(spec, placed, mpi, "RUN", "/tmp/run", ctx, program)
        t2 = time.perf_counter()
        assert the_plan.nranks == 8 * nodes and the_plan.hostfile_text.count("\n") == nodes
        stages["place"].append(t1 - t0)
        stages["plan"].append(t2 - t1)
        stages["total"].append(t2 - t0)
    return {name: statistics.median(values) for name, values in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {}
    print(f"{'hosts':>7} {'ranks':>7} {'place ms':>9} {'plan ms':>8} {'total ms':>9}")
    for nodes in (int(n) for n in args.sizes.split(",")):
        med = measure(nodes, args.repeats)
        results[nodes] = med
        print(f"{nodes:>7} {8 * nodes:>7} {med['place'] * 1e3:>9.1f} {med['plan'] * 1e3:>8.1f} "
              f"{med['total'] * 1e3:>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
