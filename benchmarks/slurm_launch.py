"""Slurm launch costs on a real local Slurm (tests/slurmbox, root): inside one
``salloc -N2 -n4``, 4 ranks of a no-op script through ``distlaunch run`` with
``--launcher mpirun`` and ``--launcher srun``, and plain ``srun`` beside them (runs
interleaved, medians); then ``distlaunch submit`` to the first rank's output line.

    python benchmarks/slurm_launch.py --repeats 5 --json slurm.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.slurmbox.box import SlurmBox, missing  # noqa: E402
from tests.stopsignals import unwinding  # noqa: E402

INNER = """import json, subprocess, sys, time
variants = json.loads(sys.argv[1])
repeats = int(sys.argv[2])
walls = {name: [] for name in variants}
for _ in range(repeats):
    for name, argv in variants.items():
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        walls[name].append(time.perf_counter() - start)
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
print(json.dumps(walls))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    if missing():
        raise SystemExit(f"needs {', '.join(missing())}")
    work = Path(tempfile.mkdtemp(prefix="slurmbench-"))
    work.chmod(0o755)
    (work / "src").mkdir()
    (work / "src").chmod(0o755)
    (work / "src" / "noop.py").write_text("pass\n")
    py = sys.executable
    dl = [py, "-m", "distlaunch", "run", "--ppn", "2", "--run-dir", str(work / "runs")]
    variants = {
        "srun (plain)": ["srun", "-N2", "--ntasks-per-node=2", py, str(work / "src" / "noop.py")],
        "distlaunch --launcher srun": [*dl, "--launcher", "srun", str(work / "src" / "noop.py")],
        "distlaunch --launcher mpirun": [*dl, "--mpi-arg", "--bind-to none", str(work / "src" / "noop.py")],
    }
    with SlurmBox(work / "box") as box:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **box.env}
        proc = subprocess.run(["salloc", "-N2", "-n4", py, "-c", INNER, json.dumps(variants), str(args.repeats)],
                              cwd=work, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        walls = json.loads(proc.stdout.strip().splitlines()[-1])
        submit_to_output = []
        for _ in range(max(1, args.repeats // 2)):
            start = time.perf_counter()
            sub = subprocess.run([py, "-m", "distlaunch", "submit", "--nodes", "2", "--ppn", "2", "--run-dir",
                                  str(work / "runs"), str(REPO / "tests" / "scripts" / "rank_file.py")],
                                 cwd=work, env={**env, "OUT_DIR": str(work)}, capture_output=True, text=True)
            run_id = sub.stdout.strip()
            log = work / "runs" / run_id / "logs" / "output.log"
            while not (log.exists() and log.read_text().startswith("[")):
                time.sleep(0.02)
            submit_to_output.append(time.perf_counter() - start)
            subprocess.run([py, "-m", "distlaunch", "logs", run_id, "--follow", "--run-dir", str(work / "runs")],
                           env=env, capture_output=True)
    base = statistics.median(walls["srun (plain)"])
    print(f"{'variant':<30} {'median s':>9} {'min s':>7} {'max s':>7} {'x srun':>7}")
    for name, values in walls.items():
        print(f"{name:<30} {statistics.median(values):9.2f} {min(values):7.2f} {max(values):7.2f} "
              f"{statistics.median(values) / base:7.2f}")
    print(f"submit -> first rank output: median {statistics.median(submit_to_output):.2f} s "
          f"({', '.join(f'{v:.2f}' for v in submit_to_output)})")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"walls": walls, "submit_to_output": submit_to_output}, indent=1))


if __name__ == "__main__":
    with unwinding():  # SIGTERM or SIGHUP: out through every finally, the nodes and daemons stopped
        main()
