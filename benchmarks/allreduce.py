"""Allreduce sweep per backend, repeated, with each backend's time as a ratio to raw mpi4py.

Runs ``distlaunch bench allreduce`` --repeats times (each run times every backend on the
same buffers); for every size and backend takes the median over the repeats of the
per-repeat ratio time(backend) / time(mpi4py) (< 1 means faster than MPI) with its
range, and the median busbw and its fraction of the same-run one-core memcpy rate. A
run's time per size is the median of its iterations; the plot's band spans the runs'
fastest and slowest. Writes JSON and the busbw-vs-size plot with a latency panel.

    python benchmarks/allreduce.py --ranks 2 --repeats 5 --sizes 8B:256MiB --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(ranks: int, sizes: str, iters: int, out: Path) -> dict:
    env = {**os.environ, "OMPI_MCA_osc": "^ucx"}
    proc = subprocess.run([sys.executable, "-m", "distlaunch", "bench", "allreduce", "--ppn", str(ranks),
                           "--backend", "all", "--sizes", sizes, "--iters", str(iters), "--warmup", "3",
                           "--json", str(out), "--run-dir", str(out.parent / "runs")],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return dict(json.loads(out.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="8B:256MiB")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            results.append(run_once(args.ranks, args.sizes, args.iters, Path(tmp) / f"r{i}.json"))
            print(f"repeat {i + 1}/{args.repeats} done", file=sys.stderr)
    backends = list(dict.fromkeys(r["backend"] for r in results[0]["rows"]))
    sizes = sorted({r["size"] for r in results[0]["rows"]})

    def time_of(result: dict, backend: str, size: int) -> float:
        return next(r["time_us"] for r in result["rows"] if r["backend"] == backend and r["size"] == size)

    ceiling = statistics.median(r["memcpy_one_core_GBps"] for r in results)
    summary = []
    for size in sizes:
        base = [time_of(r, "mpi4py", size) for r in results]
        for backend in backends:
            times = [time_of(r, backend, size) for r in results]
            busbw = size / (statistics.median(times) * 1e-6) * 2 * (args.ranks - 1) / args.ranks / 1e9
            ratios = [t / b for t, b in zip(times, base)]
            summary.append({"size": size, "backend": backend, "median_time_us": statistics.median(times),
                            "min_time_us": min(times), "max_time_us": max(times),
                            "ratio_to_mpi4py": statistics.median(ratios), "ratio_min": min(ratios),
                            "ratio_max": max(ratios), "busbw_GBps": busbw, "busbw_fraction_of_memcpy": busbw / ceiling})
    print(f"{args.ranks} ranks, {args.repeats} repeats; memcpy one core (median) {ceiling:.2f} GB/s")
    print(f"{'size':>10} " + " ".join(f"{b + ' us':>12} {'x mpi':>6}" for b in backends))
    from distlaunch.plan.units import format_size

    for size in sizes:
        cells = [next(s for s in summary if s["size"] == size and s["backend"] == b) for b in backends]
        print(f"{format_size(size):>10} " + " ".join(f"{c['median_time_us']:>12.1f} {c['ratio_to_mpi4py']:>6.2f}"
                                                  for c in cells))
    name = f"allreduce-{args.ranks}ranks"
    (args.out / f"{name}.json").write_text(json.dumps({"ranks": args.ranks, "repeats": args.repeats,
                                                       "memcpy_one_core_GBps": ceiling, "summary": summary,
                                                       "runs": results}, indent=1))
    from distlaunch.cli.bench import plot_busbw

    rows = [{"backend": s["backend"], "size": s["size"], "busbw_GBps": s["busbw_GBps"], "time_us": s["median_time_us"],
             "min_us": s["min_time_us"], "max_us": s["max_time_us"]} for s in summary]
    plot_busbw(rows, ceiling, f"allreduce float32 sum, {args.ranks} ranks, one node, {args.repeats} runs",
               str(args.out / f"{name}.png"))
    print(f"wrote {args.out / name}.json and .png")


if __name__ == "__main__":
    main()
