"""Wall time of ``distlaunch run`` against bare ``mpirun`` for the same job, side by side.

Both launch the same payload with the same mpirun flags (as ``--dry-run`` shows them);
runs are interleaved (A, B, A, B, ...) so that machine noise hits both alike. Prints
medians and the ratio of medians, and writes the raw times as JSON.

    python benchmarks/launch_overhead.py --ranks 2 --repeats 5
    python benchmarks/launch_overhead.py --payload train --repeats 3
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
PAYLOADS = {
    "noop": [sys.executable, "-c", "pass"],
    "mpi4py": [sys.executable, "-c", "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"],
    "train": [sys.executable, "-u", str(REPO / "examples" / "train.py"), "--epochs", "2"],
}


def bare_mpirun_argv(ranks: int, payload: list[str]) -> list[str]:
    """The flags distlaunch would add, minus its worker shim, hostfile and exports."""
    from distlaunch.mpi import find_mpirun

    argv = [find_mpirun(), "-n", str(ranks)]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    if ranks > (os.cpu_count() or 1):
        argv += ["--oversubscribe", "--bind-to", "none"]
    return argv + ["--mca", "btl", "^ofi", *payload]


def timed(argv: list[str], cwd: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]}... failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--payload", choices=sorted(PAYLOADS), default="noop")
    parser.add_argument("--json", default=None, help="write raw times here")
    args = parser.parse_args()

    payload = PAYLOADS[args.payload]
    over = ["--oversubscribe"] if args.ranks > (os.cpu_count() or 1) else []
    variants = {
        "mpirun": bare_mpirun_argv(args.ranks, payload),
        "distlaunch": [sys.executable, "-m", "distlaunch", "run", "--ppn", str(args.ranks), *over, *payload],
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as cwd:
        for argv in variants.values():  # warm-up: page cache, pyc files
            timed(argv, cwd)
        for i in range(args.repeats):
            for name, argv in variants.items():
                times[name].append(timed(argv, cwd))
            print(f"repeat {i + 1}/{args.repeats}: " +
                  ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), file=sys.stderr)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"payload {args.payload}, {args.ranks} ranks, {args.repeats} interleaved repeats (medians)")
    for name, value in med.items():
        print(f"  {name:<11} {value:.3f} s")
    print(f"  distlaunch / mpirun = {med['distlaunch'] / med['mpirun']:.2f}"
          f" (+{med['distlaunch'] - med['mpirun']:.3f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "times": times, "medians": med}, indent=2))


if __name__ == "__main__":
    main()
