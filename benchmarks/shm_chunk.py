"""Shared-memory allreduce against MPI's, per chunk size, side by side in one job.

Run under MPI on one node; alternates shm and MPI Allreduce on the same buffers, each
time the slowest rank's, and prints medians (warm-up dropped) and shm/MPI ratios.

    mpirun -n 2 python benchmarks/shm_chunk.py       (or: distlaunch run --ppn 2 benchmarks/shm_chunk.py)
"""
from __future__ import annotations

import statistics
import time

import numpy as np
from mpi4py import MPI

from distlaunch.hvd.shm_allreduce import ShmAllreduce

CHUNKS = (64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20)
SIZES = (1 << 20, 2 << 20, 4 << 20, 8 << 20, 16 << 20, 64 << 20)
ITERS, WARMUP = 15, 3


def slowest(comm: MPI.Comm, fn) -> float:
    comm.Barrier()
    start = time.perf_counter()
    fn()
    return comm.allreduce(time.perf_counter() - start, op=MPI.MAX)


def main() -> None:
    comm = MPI.COMM_WORLD
    for chunk in CHUNKS:
        shm = ShmAllreduce(comm, chunk)
        for size in SIZES:
            send = np.ones(size // 4, np.float32)
            recv = np.empty_like(send)
            shm_times, mpi_times = [], []
            for _ in range(ITERS):
                shm_times.append(slowest(comm, lambda s=shm, x=send, y=recv: s.allreduce(x, y)))
                mpi_times.append(slowest(comm, lambda x=send, y=recv: comm.Allreduce(x, y)))
            a, b = statistics.median(shm_times[WARMUP:]), statistics.median(mpi_times[WARMUP:])
            if comm.rank == 0:
                print(f"chunk {chunk >> 10:5d} KiB  size {size >> 20:3d} MiB  shm {a * 1e6:9.0f} us  "
                      f"MPI {b * 1e6:9.0f} us  shm/MPI {a / b:.2f}", flush=True)
        shm.close()


if __name__ == "__main__":
    main()
