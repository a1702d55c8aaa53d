"""Shared-memory allreduce against MPI's, per chunk size, beside its own traffic floor.

Run under MPI on one node. For every chunk size and buffer size it times, taking turns
on the same buffers (each time the slowest rank's):

- ``shm``: ``ShmAllreduce.allreduce`` with that chunk;
- ``MPI``: ``MPI_Allreduce``;
- ``floor``: the same copies and reductions the pipelined path makes at that chunk (copy
  in, reduce this rank's slice, copy it to recv, copy the other slices out), step by
  step, but on memory private to the rank, with no barrier and no data from another
  core. No shared-memory allreduce that stages its data this way can be faster, so
  ``MPI/floor`` is the most it could gain over MPI at that chunk.

It prints medians (warm-up dropped) of each, and the ratios MPI/shm (> 1: shm is faster)
and MPI/floor; ``--json`` writes them too (``perf_table.py`` reads it).

    mpirun -n 2 python benchmarks/shm_chunk.py       (or: distlaunch run --ppn 2 benchmarks/shm_chunk.py)
    mpirun -n 2 python benchmarks/shm_chunk.py --chunks 128KiB,1MiB --sizes 1MiB,16MiB
    mpirun -n 2 python benchmarks/shm_chunk.py --chunks 1MiB --sizes 1MiB:256MiB --json floor.json
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distlaunch.hvd.bench import sizes_from  # noqa: E402
from distlaunch.hvd.shm_allreduce import SETS, ShmAllreduce  # noqa: E402
from distlaunch.plan.units import format_size, parse_size  # noqa: E402

CHUNKS = "64KiB,128KiB,256KiB,512KiB,1MiB"
SIZES = "1MiB,2MiB,4MiB,8MiB,16MiB,64MiB"


def slowest(comm: MPI.Comm, fn) -> float:
    comm.Barrier()
    start = time.perf_counter()
    fn()
    return comm.allreduce(time.perf_counter() - start, op=MPI.MAX)


class Floor:
    """The pipelined path's memory traffic for one rank, on private memory laid out like
    the segment (``SETS`` sets of one slot per rank), without any synchronisation."""

    def __init__(self, shm: ShmAllreduce) -> None:
        self.n, self.me, self.chunk = shm.size, shm.rank, shm.chunk
        self.memory = np.ones(SETS * self.n * self.chunk, np.uint8)
        self.steps = 0
        self.views: dict[tuple[int, np.dtype], list[np.ndarray]] = {}  # as the segment's, made once

    def _slots(self, dtype: np.dtype, count: int) -> list[np.ndarray]:
        key = (self.steps % SETS, dtype)
        self.steps += 1
        whole = self.views.get(key)
        if whole is None:
            base = key[0] * self.n * self.chunk
            whole = self.views[key] = [self.memory[base + r * self.chunk: base + (r + 1) * self.chunk].view(dtype)
                                       for r in range(self.n)]
        return [slot[:count] for slot in whole]

    def allreduce(self, send: np.ndarray, recv: np.ndarray) -> None:
        n, me, total = self.n, self.me, send.size
        per_step = self.chunk // send.itemsize
        for start in range(0, total, per_step):
            count = min(per_step, total - start)
            slots = self._slots(send.dtype, count)
            cuts = [(count * r // n, count * (r + 1) // n) for r in range(n)]
            for r, (lo, hi) in enumerate(cuts):  # copy in
                if r != me:
                    slots[r][lo:hi] = send[start + lo:start + hi]
            lo, hi = cuts[me]
            acc = slots[me][lo:hi]  # reduce: the other ranks' inputs stand in as slots this rank wrote
            np.add(send[start + lo:start + hi], slots[(me + 1) % n][lo:hi], out=acc)
            for r in range(2, n):
                np.add(acc, slots[(me + r) % n][lo:hi], out=acc)
            recv[start + lo:start + hi] = acc
            for r, (lo, hi) in enumerate(cuts):  # copy out
                if r != me:
                    recv[start + lo:start + hi] = slots[r][lo:hi]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default=CHUNKS, help=f"chunk sizes, comma-separated (default {CHUNKS})")
    parser.add_argument("--sizes", default=SIZES, help=f"buffer sizes, comma-separated, or LOW:HIGH doubling "
                        f"(default {SIZES})")
    parser.add_argument("--iters", type=int, default=15, help="timed calls per backend, taking turns")
    parser.add_argument("--warmup", type=int, default=3, help="calls dropped from each backend's median")
    parser.add_argument("--json", default=None, help="rank 0 writes every row here")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    chunks = [parse_size(c) for c in args.chunks.split(",")]
    sizes = [size for part in args.sizes.split(",") for size in sizes_from(part, 2)]
    if args.iters <= args.warmup:
        raise SystemExit("shm_chunk: --iters must be more than --warmup")
    rows = []
    for chunk in chunks:
        shm = ShmAllreduce(comm, chunk)
        floor = Floor(shm)
        for size in sizes:
            send = np.ones(size // 4, np.float32)
            recv = np.empty_like(send)
            if send.nbytes <= shm.small:
                if comm.rank == 0:
                    print(f"chunk {format_size(chunk):>7}  size {format_size(size):>7}  the one-barrier path: skipped")
                continue
            calls = {"shm": functools.partial(shm.allreduce, send, recv),
                     "MPI": functools.partial(comm.Allreduce, send, recv),
                     "floor": functools.partial(floor.allreduce, send, recv)}
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.iters):
                for name, call in calls.items():
                    times[name].append(slowest(comm, call))
            a, b, f = (statistics.median(times[k][args.warmup:]) for k in ("shm", "MPI", "floor"))
            rows.append({"chunk": shm.chunk, "size": size, "shm_us": a * 1e6, "mpi_us": b * 1e6, "floor_us": f * 1e6})
            if comm.rank == 0:
                print(f"chunk {format_size(shm.chunk):>7}  size {format_size(size):>7}  shm {a * 1e6:8.0f} us  "
                      f"MPI {b * 1e6:8.0f} us  floor {f * 1e6:8.0f} us  MPI/shm {b / a:5.2f}  MPI/floor {b / f:5.2f}",
                      flush=True)
        shm.close()
    if args.json and comm.rank == 0:
        Path(args.json).write_text(json.dumps({"ranks": comm.size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
