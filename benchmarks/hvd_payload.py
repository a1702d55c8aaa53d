"""Per-rank payload for benchmarks/fusion.py: times distlaunch.hvd collectives.

Measures, with the backend and fusion threshold of the environment: allreduce of 1 MiB
and 64 MiB float32 tensors, and one DistributedOptimizer gradient exchange for 100
parameters of 4 KiB each (1024 float32). Warm-up iterations are not timed. Rank 0
prints one JSON line.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch

import distlaunch.hvd as hvd
from distlaunch.hvd.bench import timed_iters


def time_allreduce(nbytes: int, iters: int, warmup: int) -> float:
    tensor = torch.ones(nbytes // 4, dtype=torch.float32)
    times = []
    for i in range(warmup + iters):
        hvd.barrier()
        start = time.perf_counter()
        hvd.allreduce_(tensor, op=hvd.Sum, name=f"ar{nbytes}")
        elapsed = torch.tensor([time.perf_counter() - start])
        slowest = hvd.allreduce(elapsed, op=hvd.Max, name="t").item()
        if i >= warmup:
            times.append(slowest)
    return statistics.median(times)


def time_small_gradients(count: int, iters: int, warmup: int) -> float:
    params = [torch.nn.Parameter(torch.zeros(1024)) for _ in range(count)]
    opt = hvd.DistributedOptimizer(torch.optim.SGD(params, lr=0.0),
                                   named_parameters=[(f"p{i}", p) for i, p in enumerate(params)])
    times = []
    for i in range(warmup + iters):
        opt.zero_grad()
        hvd.barrier()
        start = time.perf_counter()
        loss = sum((p * (k + 1)).sum() for k, p in enumerate(params))
        loss.backward()
        opt.synchronize()
        elapsed = torch.tensor([time.perf_counter() - start])
        with opt.skip_synchronize():
            opt.step()
        slowest = hvd.allreduce(elapsed, op=hvd.Max, name="t").item()
        if i >= warmup:
            times.append(slowest)
    return statistics.median(times)


def main() -> None:
    hvd.init()
    iters, warmup = int(os.environ.get("BENCH_ITERS", "20")), int(os.environ.get("BENCH_WARMUP", "3"))
    row = {
        "backend": hvd.backend(),
        "ranks": hvd.size(),
        "fusion_threshold": os.environ.get("HOROVOD_FUSION_THRESHOLD", "default"),
        "allreduce_1MiB_us": time_allreduce(1 << 20, iters, warmup) * 1e6,
        "allreduce_64MiB_us": time_allreduce(64 << 20, timed_iters(iters, 64 << 20), 1) * 1e6,
        "grads_100x4KiB_us": time_small_gradients(100, iters, warmup) * 1e6,
    }
    if hvd.rank() == 0:
        print("RESULT " + json.dumps(row), flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    main()
