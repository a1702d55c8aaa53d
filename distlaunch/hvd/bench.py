"""Allreduce benchmark, run on every rank: ``python -m distlaunch.hvd.bench allreduce ...``.

``distlaunch bench allreduce`` launches this through the normal run path. For each size
the send and receive buffers are allocated once and every backend uses the SAME
buffers. Each timed iteration starts after a barrier and counts as the slowest rank's
time; a row's time is the median of its iterations (min, max and mean beside it);
warm-up iterations are not timed. After timing, the result is checked element
by element (``#wrong``, as in nccl-tests). Figures are nccl-tests' algbw = bytes/time
and busbw = algbw · 2(n−1)/n. The same run measures memcpy on one core and on all
ranks at once, the ceiling busbw is compared with. Rank 0 writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..plan.units import format_size, parse_size
from ..protocol import OUTPUT_DIR
from .shm_allreduce import MPI_OPS

BACKENDS = ("mpi4py", "shm", "torch", "horovod")
LARGE = 64 << 20  # from this size up a row times fewer iterations than asked (see timed_iters)
MIN_LARGE_ITERS = 5  # a median of 3 moves when 2 of them hit a slow spell; one of 5 needs 3
QUIET_BACKENDS = ("mpi4py", "shm")  # no thread of their own: they may take turns size by size


def sizes_from(text: str, factor: int) -> list[int]:
    """``8B:256MiB`` → 8, 16, ..., 256 MiB (multiplying by factor); ``1MiB`` → [1 MiB]."""
    low, _, high = text.partition(":")
    start, stop = parse_size(low, "--sizes"), parse_size(high or low, "--sizes")
    sizes = []
    while start <= stop:
        sizes.append(start)
        start *= factor
    return sizes


def _base(count: int) -> np.ndarray:
    """Pseudo-random whole numbers 0..6, the same on every rank (no period to hide behind)."""
    return np.random.default_rng(20261123).integers(0, 7, count).astype(np.float64)


def pattern(count: int, rank: int, dtype: np.dtype) -> np.ndarray:
    """Rank r's input: base·(r+1) + r. Whole numbers, so sums are exact even in float16."""
    return (_base(count) * (rank + 1) + rank).astype(dtype)


def expected(count: int, size: int, op: str, dtype: np.dtype) -> np.ndarray:
    """The reduction of every rank's ``pattern``, computed independently of any backend."""
    base = _base(count)
    if op == "sum":
        return (base * size * (size + 1) / 2 + size * (size - 1) / 2).astype(dtype)
    if op == "min":  # base >= 0, so rank 0's value is the smallest
        return base.astype(dtype)
    if op == "max":
        return (base * size + size - 1).astype(dtype)
    product = np.ones(count)
    for rank in range(size):
        product *= base * (rank + 1) + rank
    return product.astype(dtype)


def count_wrong(got: np.ndarray, want: np.ndarray, op: str) -> int:
    """Elements that differ (nccl-tests' #wrong). Products of floats are compared to 1%,
    since their rounding depends on the order of the multiplications; all else exactly."""
    if op == "prod" and got.dtype.kind == "f":
        return int(np.count_nonzero(~np.isclose(got, want, rtol=1e-2, equal_nan=True)))
    return int(np.count_nonzero(got != want))


class Backends:
    """Each backend as ``fn(send, recv)`` on numpy buffers, set up on first use (so that
    Horovod's background thread, say, does not run while another backend is timed)."""

    def __init__(self, comm: Any, names: list[str], op: str) -> None:
        for name in names:
            if name not in BACKENDS:
                raise SystemExit(f"unknown backend {name!r}: choose from {', '.join(BACKENDS)}")
        self.comm, self.op, self.names = comm, op, names
        self._fns: dict[str, Callable[[np.ndarray, np.ndarray], None]] = {}
        self.closers: list[Callable[[], None]] = []

    def fn(self, name: str) -> Callable[[np.ndarray, np.ndarray], None]:
        if name not in self._fns:
            self._fns[name] = getattr(self, f"_{name}")()
        return self._fns[name]

    def _mpi4py(self) -> Callable[[np.ndarray, np.ndarray], None]:
        from mpi4py import MPI

        mpi_op, comm = getattr(MPI, MPI_OPS[self.op]), self.comm
        return lambda s, r: comm.Allreduce(s, r, op=mpi_op)

    def _shm(self) -> Callable[[np.ndarray, np.ndarray], None]:
        from .shm_allreduce import ShmAllreduce

        shm, op = ShmAllreduce(self.comm), self.op
        self.closers.append(shm.close)
        return lambda s, r: shm.allreduce(s, r, op)

    def _torch(self) -> Callable[[np.ndarray, np.ndarray], None]:
        import torch
        import torch.distributed as dist

        from .rendezvous import join

        if not dist.is_initialized():
            join("gloo")
            # gloo's threads must be gone before the interpreter is: else a crash at exit
            self.closers.append(dist.destroy_process_group)
        red = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX,
               "prod": dist.ReduceOp.PRODUCT}[self.op]

        def run(send: np.ndarray, recv: np.ndarray) -> None:
            out = torch.from_numpy(recv)
            out.copy_(torch.from_numpy(send))
            dist.all_reduce(out, op=red)

        return run

    def _horovod(self) -> Callable[[np.ndarray, np.ndarray], None]:
        import horovod.torch as real
        import torch

        real.init()
        self.closers.append(real.shutdown)
        red = {"sum": real.Sum, "min": real.Min, "max": real.Max, "prod": real.Product}[self.op]

        def run(send: np.ndarray, recv: np.ndarray) -> None:
            out = torch.from_numpy(recv)
            out.copy_(torch.from_numpy(send))
            real.allreduce_(out, op=red)

        return run

    def close(self) -> None:
        for close in self.closers:
            close()


def memcpy_rate(comm: Any, nbytes: int = 64 << 20, repeats: int = 5) -> tuple[float, float]:
    """(one core alone, per core with every rank copying at once), bytes per second."""
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    np.copyto(dst, src)

    def best() -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            np.copyto(dst, src)
            times.append(time.perf_counter() - start)
        return nbytes / min(times)

    alone = 0.0
    for rank in range(comm.size):  # one at a time
        comm.Barrier()
        if comm.rank == rank:
            alone = best()
    comm.Barrier()
    together = best()
    return comm.allreduce(alone, op=_max()), comm.allreduce(together, op=_min())


def _max() -> Any:
    from mpi4py import MPI

    return MPI.MAX


def _min() -> Any:
    from mpi4py import MPI

    return MPI.MIN


def timed_iters(requested: int, nbytes: int) -> int:
    """How many iterations one row times: all that were asked below ``LARGE``; from it up a
    quarter of them, to keep big sizes short, but at least ``MIN_LARGE_ITERS`` (never more
    than asked), so that one slow spell of the machine has to hit three of them to move the
    row's median, not two."""
    if nbytes < LARGE:
        return requested
    return min(requested, max(MIN_LARGE_ITERS, requested // 4))


def time_backend(comm: Any, fn: Callable[[np.ndarray, np.ndarray], None], send: np.ndarray, recv: np.ndarray,
                 iters: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + iters):
        comm.Barrier()
        start = time.perf_counter()
        fn(send, recv)
        elapsed = time.perf_counter() - start
        slowest = comm.allreduce(elapsed, op=_max())
        if i >= warmup:
            times.append(slowest)
    return times


def measure(comm: Any, name: str, fn: Callable[[np.ndarray, np.ndarray], None], send: np.ndarray,
            recv: np.ndarray, want: np.ndarray, op: str, iters: int, warmup: int) -> dict[str, Any]:
    """One row of the table: time ``fn`` on these buffers, then check what it computed."""
    n, count, dtype = comm.size, send.size, send.dtype
    recv.fill(0)
    times = time_backend(comm, fn, send, recv, iters, warmup)
    wrong = comm.allreduce(count_wrong(recv, want, op))
    median = statistics.median(times)  # not the mean: one descheduled iteration would move it
    algbw = count * dtype.itemsize / median
    return {"backend": name, "size": count * dtype.itemsize, "count": count, "type": dtype.name,
            "redop": op, "iters": len(times), "time_us": median * 1e6, "min_us": min(times) * 1e6,
            "max_us": max(times) * 1e6, "mean_us": sum(times) / len(times) * 1e6,
            "algbw_GBps": algbw / 1e9, "busbw_GBps": algbw * 2 * (n - 1) / n / 1e9, "wrong": wrong}


def run_allreduce(args: argparse.Namespace) -> dict[str, Any]:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    dtype = np.dtype(args.dtype)
    names = [b for b in args.backends.split(",") if b]
    backends = Backends(comm, names, args.op)
    one_core, all_cores = memcpy_rate(comm)
    n = comm.size
    counts = [max(1, nbytes // dtype.itemsize) for nbytes in sizes_from(args.sizes, args.factor)]
    # buffers once per size, shared by every backend
    buffers = {count: (pattern(count, comm.rank, dtype), np.empty(count, dtype)) for count in counts}
    checks = {count: expected(count, n, args.op, dtype) for count in counts}
    rows = []

    def one(name: str, count: int) -> None:
        send, recv = buffers[count]
        iters = timed_iters(args.iters, count * dtype.itemsize)
        rows.append(measure(comm, name, backends.fn(name), send, recv, checks[count], args.op, iters, args.warmup))
        if comm.rank == 0:
            print(f"{name:>8} {format_size(count * dtype.itemsize):>8}: {rows[-1]['time_us']:10.1f} us, "
                  f"busbw {rows[-1]['busbw_GBps']:.2f} GB/s", flush=True)

    # backends without threads of their own take turns size by size, so that a slow spell
    # of the machine hits them alike; the others run one after another, never beside them
    quiet = [name for name in names if name in QUIET_BACKENDS]
    for count in counts:
        for name in quiet:
            one(name, count)
    for name in names:
        if name not in QUIET_BACKENDS:
            for count in counts:
                one(name, count)
    backends.close()
    order = {name: index for index, name in enumerate(names)}
    rows.sort(key=lambda row: order[row["backend"]])  # the table reads backend by backend, as asked
    hosts = comm.gather(platform.node())
    return {"ranks": n, "hosts": sorted(set(hosts)) if hosts else [], "dtype": dtype.name, "op": args.op,
            "iters": args.iters, "warmup": args.warmup, "memcpy_one_core_GBps": one_core / 1e9,
            "memcpy_per_core_all_ranks_GBps": all_cores / 1e9, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    try:
        import torch

        torch.set_num_threads(1)  # one core per rank, like the other backends
    except ImportError:
        pass
    parser = argparse.ArgumentParser(prog="python -m distlaunch.hvd.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("allreduce")
    p.add_argument("--backends", default="mpi4py,shm,torch")
    p.add_argument("--sizes", default="8B:64MiB")
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--op", default="sum", choices=sorted(MPI_OPS))
    p.add_argument("--iters", type=int, default=20,
                   help="timed iterations per size and backend; from 64 MiB up a quarter of them, at least 5 "
                        "(or all, if fewer)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON file (rank 0); default $DISTLAUNCH_OUTPUT_DIR/allreduce.json")
    args = parser.parse_args(argv)
    result = run_allreduce(args)
    from mpi4py import MPI

    if MPI.COMM_WORLD.rank == 0:
        out = args.out or os.path.join(os.environ.get(OUTPUT_DIR, "."), "allreduce.json")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
        print(f"wrote {out}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
