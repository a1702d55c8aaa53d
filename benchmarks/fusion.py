"""Tensor fusion and allreduce times of distlaunch.hvd, per backend, measured side by side.

For every backend present (torch.distributed; real Horovod when installed) runs
benchmarks/hvd_payload.py under ``distlaunch run`` twice: fusion off
(HOROVOD_FUSION_THRESHOLD=0) and on (the 128 MiB default). Prints allreduce times for
1 MiB and 64 MiB and the 100 × 4 KiB gradient exchange, with the unfused/fused ratio.

    python benchmarks/fusion.py --ranks 2 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available_backends() -> list[str]:
    ok = subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True).returncode == 0
    return ["torch", "horovod"] if ok else ["torch"]


def run(backend: str, threshold: str, ranks: int, iters: int) -> dict:
    env = {**os.environ, "DISTLAUNCH_HVD_BACKEND": backend, "HOROVOD_FUSION_THRESHOLD": threshold,
           "BENCH_ITERS": str(iters)}
    proc = subprocess.run([sys.executable, "-m", "distlaunch", "run", "--ppn", str(ranks), "--run-dir",
                           "/tmp/distlaunch-bench-runs", str(HERE / "hvd_payload.py")],
                          env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if "RESULT " in line:
            return dict(json.loads(line.split("RESULT ", 1)[1]))
    raise SystemExit(f"{backend} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for backend in available_backends():
        for threshold in ("0", str(128 * 1024 * 1024)):
            rows.append(run(backend, threshold, args.ranks, args.iters))
            print(f"done: {backend}, threshold {threshold}", file=sys.stderr)
    print(f"{'backend':<8} {'fusion':<7} {'1 MiB us':>9} {'64 MiB us':>10} {'100x4KiB us':>12}")
    for row in rows:
        fusion = "off" if row["fusion_threshold"] == "0" else "on"
        print(f"{row['backend']:<8} {fusion:<7} {row['allreduce_1MiB_us']:>9.0f} "
              f"{row['allreduce_64MiB_us']:>10.0f} {row['grads_100x4KiB_us']:>12.0f}")
    for backend in {r["backend"] for r in rows}:
        off, on = (r for r in rows if r["backend"] == backend)
        print(f"{backend}: 100 x 4 KiB unfused / fused = {off['grads_100x4KiB_us'] / on['grads_100x4KiB_us']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
