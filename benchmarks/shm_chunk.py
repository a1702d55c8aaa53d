"""Shared-memory allreduce against MPI's, per chunk size, beside its own traffic floor.

Run under MPI on one node. For every chunk size and buffer size it times, taking turns
on the same buffers (each time the slowest rank's):

- ``shm``: ``ShmAllreduce.allreduce`` with that chunk;
- ``MPI``: ``MPI_Allreduce``;
- ``floor``: the same copies and reductions the pipelined path makes at that chunk (copy
  in, reduce this rank's slice, copy it to recv, copy the other slices out), the same
  slices in the same order, but on memory private to the rank: no barrier, and no data
  that another core has just written. It is what this scheme costs when nothing waits
  for anything, so ``MPI/floor`` is about the most that staging the data this way, at
  that chunk, could gain over MPI. Measured, not proven: each rank's private slots take
  n times the segment's memory, and where its reads of them are served from may differ
  from where shm finds another core's fresh data; at 1 MiB the floor has come out slower
  than shm itself.
  Other schemes, such as reading a peer's buffer directly (CMA, XPMEM), are not bounded
  by it.

It prints medians (warm-up calls not counted) of each, and the ratios MPI/shm (> 1: shm is faster)
and MPI/floor; ``--json`` writes them too (``perf_table.py`` reads it).

    mpirun -n 2 python benchmarks/shm_chunk.py       (or: distlaunch run --ppn 2 benchmarks/shm_chunk.py)
    mpirun -n 2 python benchmarks/shm_chunk.py --chunks 1MiB,4MiB --sizes 1MiB,16MiB
    mpirun -n 2 python benchmarks/shm_chunk.py --chunks 4MiB --sizes 1MiB:256MiB --json floor.json
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

from distlaunch.errors import DistlaunchError  # noqa: E402
from distlaunch.hvd.bench import sizes_from  # noqa: E402
from distlaunch.hvd.shm_allreduce import SETS, ShmAllreduce  # noqa: E402
from distlaunch.plan.units import format_size, parse_size  # noqa: E402

CHUNKS = "256KiB,1MiB,2MiB,4MiB,8MiB"
SIZES = "1MiB,2MiB,4MiB,8MiB,16MiB,64MiB"


def slowest(comm: MPI.Comm, fn) -> float:
    comm.Barrier()
    start = time.perf_counter()
    fn()
    return comm.allreduce(time.perf_counter() - start, op=MPI.MAX)


class _NoBarrier:
    """Stands in for the node communicator: the floor waits for nobody."""

    def Barrier(self) -> None:  # noqa: N802 - mpi4py's name
        pass


class Floor(ShmAllreduce):
    """``ShmAllreduce._pipelined`` itself (the same steps, slices, slot sets and order), on
    memory private to the rank laid out like the segment, with no barrier and no rank
    across nodes: its memory traffic alone."""

    def __init__(self, shm: ShmAllreduce) -> None:  # no super(): no segment, no communicator
        self.size, self.rank, self.chunk = shm.size, shm.rank, shm.chunk
        self.comm, self.cross = _NoBarrier(), None
        # written in full at the start, so every page is the rank's own (untouched zeros would
        # all read one shared zero page, always in cache); 0x3f bytes are ordinary numbers in
        # any float type
        self.memory = np.full(SETS * self.size * self.chunk, 0x3F, np.uint8)
        self.steps = 0
        self._views = {}
        self._header = None

    def allreduce(self, send: np.ndarray, recv: np.ndarray) -> None:  # type: ignore[override]
        self._pipelined(send.reshape(-1), recv.reshape(-1), np.add, "sum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default=CHUNKS, help=f"chunk sizes, comma-separated (default {CHUNKS})")
    parser.add_argument("--sizes", default=SIZES, help=f"buffer sizes, comma-separated, or LOW:HIGH doubling "
                        f"(default {SIZES})")
    parser.add_argument("--iters", type=int, default=12, help="timed calls per backend and size, taking turns")
    parser.add_argument("--warmup", type=int, default=3, help="calls before those, per backend, not timed")
    parser.add_argument("--json", default=None, help="rank 0 writes every row here")
    comm = MPI.COMM_WORLD
    if comm.rank:  # one usage line, from rank 0; every rank parses the same argv and leaves alike
        parser.error = lambda message: sys.exit(2)  # type: ignore[method-assign]
    args = parser.parse_args()
    try:
        chunks = [parse_size(c, "--chunks") for c in args.chunks.split(",")]
        sizes = [size for part in args.sizes.split(",") for size in sizes_from(part, 2)]
        if args.iters < 1 or args.warmup < 0:
            raise ValueError("--iters must be at least 1 and --warmup at least 0")
        if not sizes or not chunks:
            raise ValueError("no size to time: --sizes LOW:HIGH needs LOW <= HIGH")
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local = node.size
        node.Free()
        if comm.size < 2 or local != comm.size:
            raise ValueError(f"needs 2 or more ranks, all on one node (here {comm.size}, {local} on this node): "
                             f"mpirun -n 2 python {sys.argv[0]}")
    except (DistlaunchError, ValueError) as exc:
        if comm.rank == 0:
            parser.error(str(exc))
        sys.exit(2)
    rows = []
    for chunk in chunks:
        shm = ShmAllreduce(comm, chunk)
        floor = Floor(shm)
        for size in sizes:
            send = np.ones(size // 4, np.float32)
            recv = np.empty_like(send)
            if send.nbytes <= shm.small:
                if comm.rank == 0:
                    print(f"chunk {format_size(shm.chunk):>7}  size {format_size(send.nbytes):>7}  "
                          "the one-barrier path: skipped")
                continue
            calls = {"shm": functools.partial(shm.allreduce, send, recv),
                     "MPI": functools.partial(comm.Allreduce, send, recv),
                     "floor": functools.partial(floor.allreduce, send, recv)}
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.warmup + args.iters):
                for name, call in calls.items():
                    times[name].append(slowest(comm, call))
            a, b, f = (statistics.median(times[k][args.warmup:]) for k in ("shm", "MPI", "floor"))
            rows.append({"chunk": shm.chunk, "size": send.nbytes, "shm_us": a * 1e6, "mpi_us": b * 1e6,
                         "floor_us": f * 1e6})
            if comm.rank == 0:
                print(f"chunk {format_size(shm.chunk):>7}  size {format_size(send.nbytes):>7}  shm {a * 1e6:8.0f} us  "
                      f"MPI {b * 1e6:8.0f} us  floor {f * 1e6:8.0f} us  MPI/shm {b / a:5.2f}  MPI/floor {b / f:5.2f}",
                      flush=True)
        shm.close()
    if args.json and comm.rank == 0:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"ranks": comm.size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
