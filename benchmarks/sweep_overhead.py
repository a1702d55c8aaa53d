"""What a sweep costs per trial over plain runs of the same job, side by side.

Times a sweep of N trials (a grid of N values, one trial at a time) and N plain
``distlaunch run`` of the same script with the same values, one after the other,
interleaved over --repeats (sweep, plain, sweep, plain, ...) so that machine noise hits
both alike. The payload logs its metric every step with ``distlaunch.log_metric`` and
sleeps --step-time per step, as a small training script would. Prints the median
seconds per trial of each, their ratio and difference, and writes the raw times as JSON.

    python benchmarks/sweep_overhead.py --trials 6 --repeats 3 --ranks 2
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

PAYLOAD = """\
import argparse, time
import distlaunch
parser = argparse.ArgumentParser()
parser.add_argument("--x", type=float)
parser.add_argument("--steps", type=int)
parser.add_argument("--step-time", type=float)
args = parser.parse_args()
for step in range(args.steps):
    time.sleep(args.step_time)
    distlaunch.log_metric("loss", (args.x - 0.3) ** 2 + 1 / (step + 1), step=step)
"""


def timed(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:5])} ... failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2, help="ranks per trial, on this machine")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--step-time", type=float, default=0.2)
    parser.add_argument("--json", type=Path, help="write the raw times here")
    opts = parser.parse_args()
    values = [f"{index / max(opts.trials - 1, 1):.3f}" for index in range(opts.trials)]
    fixed = ["--steps", str(opts.steps), "--step-time", str(opts.step_time)]
    launch = [sys.executable, "-m", "distlaunch"]
    times: dict[str, list[float]] = {"sweep": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as folder:
        work = Path(folder)
        (work / "payload.py").write_text(PAYLOAD)
        timed([*launch, "run", "--ppn", str(opts.ranks), "payload.py", "--x", "0", *fixed], work)  # warm caches
        for repeat in range(opts.repeats):
            sweep = [*launch, "sweep", "run", "--name", f"overhead-{repeat}", "--sampler", "grid", "--param",
                     f"x=choice({', '.join(values)})", "--metric", "loss", "--ppn", str(opts.ranks), "payload.py",
                     *fixed]
            times["sweep"].append(timed(sweep, work) / opts.trials)
            start = time.perf_counter()
            for value in values:
                timed([*launch, "run", "--ppn", str(opts.ranks), "payload.py", "--x", value, *fixed], work)
            times["plain"].append((time.perf_counter() - start) / opts.trials)
            print(f"repeat {repeat + 1}/{opts.repeats}: sweep {times['sweep'][-1]:.2f} s/trial, "
                  f"plain {times['plain'][-1]:.2f} s/run", file=sys.stderr, flush=True)
    sweep_s, plain_s = statistics.median(times["sweep"]), statistics.median(times["plain"])
    payload_s = opts.steps * opts.step_time
    print(f"{opts.trials} trials x {opts.ranks} rank(s), {opts.steps} steps of {opts.step_time} s "
          f"({payload_s:.1f} s of work each), median of {opts.repeats}:")
    print(f"  sweep trial   {sweep_s:6.2f} s")
    print(f"  plain run     {plain_s:6.2f} s")
    print(f"  ratio         {sweep_s / plain_s:6.3f}   (sweep over plain)")
    print(f"  overhead      {sweep_s - plain_s:+6.2f} s per trial")
    if opts.json:
        opts.json.write_text(json.dumps({"options": vars(opts) | {"json": str(opts.json)}, "times": times,
                                         "cpu_count": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
