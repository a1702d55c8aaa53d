"""Training throughput per launcher and runtime, side by side in one sitting.

Runs benchmarks/train_payload.py (Horovod's synthetic benchmark loop) with N ranks on
this host for every row whose parts are installed, rows interleaved round by round so
that noise hits all alike, and prints samples/s (median over the timed batches of all
rounds, with min and max) and each row's ratio to torchrun + DDP:

- distlaunch run + distlaunch.hvd, torch backend
- torchrun --standalone + torch DDP (gloo)
- horovodrun --gloo + real Horovod
- distlaunch run + real Horovod, MPI operations (DISTLAUNCH_HVD_OPS=mpi, the default)
- distlaunch run + real Horovod, Gloo operations (DISTLAUNCH_HVD_OPS=gloo)
- plain mpirun + real Horovod

    python benchmarks/train_throughput.py [--ranks 2] [--model resnet18|transformer]
        [--rounds 2] [--json out.json] [--plot out.png]

Every rank runs with OMP_NUM_THREADS=1 (one core per rank, as on a busy node).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAYLOAD = str(HERE / "train_payload.py")


def horovod_installed() -> bool:
    return subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True).returncode == 0


def rows(ranks: int, runs: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Row name -> (argv, extra environment)."""
    from distlaunch.plan.mpi import find_mpirun

    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    distlaunch = [sys.executable, "-m", "distlaunch", "run", "--ppn", str(ranks), "--run-dir", runs, PAYLOAD]
    table = {
        "distlaunch + hvd (torch backend)": (distlaunch, {"DISTLAUNCH_HVD_BACKEND": "torch"}),
        "torchrun + DDP (gloo)": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   f"--nproc-per-node={ranks}", PAYLOAD], {"RUNTIME": "ddp"}),
    }
    if horovod_installed():
        horovodrun = shutil.which("horovodrun", path=str(Path(sys.executable).parent)) or "horovodrun"
        table.update({
            "horovodrun --gloo + Horovod": ([horovodrun, "--gloo", "-np", str(ranks), "-H", f"localhost:{ranks}",
                                             sys.executable, PAYLOAD], {"DISTLAUNCH_HVD_BACKEND": "horovod"}),
            "distlaunch + Horovod (MPI ops)": (distlaunch, {"DISTLAUNCH_HVD_BACKEND": "horovod",
                                                            "DISTLAUNCH_HVD_OPS": "mpi"}),
            "distlaunch + Horovod (Gloo ops)": (distlaunch, {"DISTLAUNCH_HVD_BACKEND": "horovod",
                                                             "DISTLAUNCH_HVD_OPS": "gloo"}),
            "mpirun + Horovod": ([find_mpirun(), "-n", str(ranks), "--bind-to", "none", *root, "-x",
                                  "OMP_NUM_THREADS", "-x", "DISTLAUNCH_HVD_BACKEND", "-x", "MODEL", sys.executable,
                                  PAYLOAD], {"DISTLAUNCH_HVD_BACKEND": "horovod"}),
        })
    return table


def run_row(argv: list[str], env: dict[str, str], model: str) -> list[float]:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "MODEL": model, "RUNTIME": "hvd", **env}
    proc = subprocess.run(argv, env=full, capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if "RESULT " in line:
            return [float(r) for r in json.loads(line.split("RESULT ", 1)[1])["rates"]]
    raise RuntimeError(f"{argv[:4]} failed (exit {proc.returncode}):\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")


def plot(results: dict[str, list[float]], unit: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    medians = [statistics.median(results[n]) for n in names]
    low = [m - min(results[n]) for m, n in zip(medians, names)]
    high = [max(results[n]) - m for m, n in zip(medians, names)]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(names) + 1.5))
    ax.barh(names, medians, xerr=[low, high], color="#4C72B0", capsize=4)
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit}/s (median, bars: min–max)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--model", choices=["resnet18", "transformer"], default="resnet18")
    parser.add_argument("--rounds", type=int, default=2, help="times each row runs, interleaved")
    parser.add_argument("--only", default="", help="comma-separated substrings: run the matching rows only")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    unit = "img" if args.model == "resnet18" else "seq"
    with tempfile.TemporaryDirectory(prefix="distlaunch-train-bench-") as runs:
        table = rows(args.ranks, runs)
        if args.only:
            table = {k: v for k, v in table.items() if any(s.strip() in k for s in args.only.split(","))}
        results: dict[str, list[float]] = {name: [] for name in table}
        for round_ in range(args.rounds):
            for name, (argv, env) in table.items():
                print(f"round {round_ + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                results[name] += run_row(argv, env, args.model)
    base = statistics.median(results.get("torchrun + DDP (gloo)", [float("nan")]))
    print(f"{args.model}, {args.ranks} ranks, OMP_NUM_THREADS=1, {args.rounds} rounds")
    print(f"{'launcher + runtime':36s} {unit + '/s':>8s} {'min':>8s} {'max':>8s} {'× DDP':>7s}")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"{name:36s} {med:8.1f} {min(values):8.1f} {max(values):8.1f} {med / base:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "ranks": args.ranks, "unit": unit,
                                               "results": results}, indent=1))
    if args.plot:
        plot(results, unit, args.plot)


if __name__ == "__main__":
    main()
