"""Wall time of ``distlaunch run`` against bare ``mpirun``, ``torchrun`` and ``horovodrun``
(where installed) for the same payload, side by side.

mpirun gets the flags distlaunch would add (as ``--dry-run`` shows them); horovodrun gets
``--binding-args`` (its own defaults fail on Open MPI 5). Runs are interleaved
(A, B, C, A, B, C, ...) so that machine noise hits all alike. Prints medians and ratios
to bare mpirun, and writes the raw times as JSON. ``--matrix`` runs the noop and
mpi4py payloads for 1, 2 and 4 ranks.

    python benchmarks/launch_overhead.py --ranks 2 --repeats 5
    python benchmarks/launch_overhead.py --matrix --repeats 5 --json launch.json
    python benchmarks/launch_overhead.py --payload train --repeats 3
    python -m tests.containerimage /tmp/image &&
        python benchmarks/launch_overhead.py --payload train --container /tmp/image   # + inside an image
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
    from distlaunch.plan.mpi import find_mpirun

    argv = [find_mpirun(), "-n", str(ranks)]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    if ranks > (os.cpu_count() or 1):
        argv += ["--oversubscribe", "--bind-to", "none"]
    return argv + ["--mca", "btl", "^ofi", *payload]


def timed(argv: list[str], cwd: str) -> float | None:
    """Seconds, or None when that launcher cannot run this here."""
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return elapsed


def launchers(ranks: int, payload: list[str], container: str | None = None) -> dict[str, list[str]]:
    """Every launcher present, set up to run ``payload`` on ``ranks`` local ranks (and
    distlaunch with ``--container`` too, given an image)."""
    import shutil

    over = ["--oversubscribe"] if ranks > (os.cpu_count() or 1) else []
    found = {
        "mpirun": bare_mpirun_argv(ranks, payload),
        "distlaunch": [sys.executable, "-m", "distlaunch", "run", "--ppn", str(ranks), *over, *payload],
    }
    if container:  # like for like: the same distlaunch run (a .py script is snapshotted), then in the image
        script = payload[2:] if payload[:2] == [sys.executable, "-u"] else payload
        found["dl-script"] = [sys.executable, "-m", "distlaunch", "run", "--ppn", str(ranks), *over, *script]
        found["dl+image"] = [*found["dl-script"][:-len(script)], "--container", container, *script]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if Path(torchrun).exists():
        found["torchrun"] = [torchrun, "--standalone", f"--nproc-per-node={ranks}", "--no-python", *payload]
    horovodrun = shutil.which("horovodrun") or str(Path(sys.executable).parent / "horovodrun")
    if Path(horovodrun).exists():
        found["horovodrun"] = [horovodrun, "-np", str(ranks), "--binding-args=--bind-to none --map-by slot",
                               *(["--mpi-args=--allow-run-as-root --oversubscribe"] if os.geteuid() == 0 else []),
                               *payload]
    return found


def measure(ranks: int, payload: list[str], repeats: int, cwd: str,
            container: str | None = None) -> dict[str, list[float]]:
    variants = launchers(ranks, payload, container)
    for name, argv in list(variants.items()):  # warm-up: page cache, pyc files; drop what cannot run
        if timed(argv, cwd) is None:
            del variants[name]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, argv in variants.items():
            elapsed = timed(argv, cwd)
            if elapsed is not None:
                times[name].append(elapsed)
    return {name: values for name, values in times.items() if values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--payload", choices=sorted(PAYLOADS), default="noop")
    parser.add_argument("--json", default=None, help="write raw times here")
    parser.add_argument("--matrix", action="store_true", help="noop and mpi4py payloads, 1, 2 and 4 ranks")
    parser.add_argument("--container", metavar="IMAGE", help="also time distlaunch run --container IMAGE")
    args = parser.parse_args()
    if args.matrix:
        matrix(args)
        return

    with tempfile.TemporaryDirectory() as cwd:
        times = measure(args.ranks, PAYLOADS[args.payload], args.repeats, cwd, args.container)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"payload {args.payload}, {args.ranks} ranks, {args.repeats} interleaved repeats (medians)")
    for name, value in med.items():
        print(f"  {name:<11} {value:.3f} s  x{value / med['mpirun']:.2f} of mpirun (+{value - med['mpirun']:.3f} s)")
    if "dl+image" in med:
        print(f"  in the image: x{med['dl+image'] / med['dl-script']:.3f} of the same distlaunch run without one "
              f"(+{med['dl+image'] - med['dl-script']:.3f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "times": times, "medians": med}, indent=2))


def matrix(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as cwd:
        for payload in ("noop", "mpi4py"):
            for ranks in (1, 2, 4):
                times = measure(ranks, PAYLOADS[payload], args.repeats, cwd)
                med = {name: statistics.median(values) for name, values in times.items()}
                rows.append({"payload": payload, "ranks": ranks, "medians": med, "times": times})
                print(f"done: {payload}, {ranks} ranks", file=sys.stderr)
    names = list(dict.fromkeys(name for row in rows for name in row["medians"]))
    print(f"{'payload':<8} {'N':>2} " + " ".join(f"{name:>11}" for name in names) + "   (s, medians; x mpirun)")
    for row in rows:
        base = row["medians"]["mpirun"]
        cells = [f"{row['medians'][n]:6.2f} x{row['medians'][n] / base:4.1f}" if n in row["medians"] else
                 f"{'-':>11}" for n in names]
        print(f"{row['payload']:<8} {row['ranks']:>2} " + " ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
