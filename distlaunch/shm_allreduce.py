"""Allreduce through one shared-memory segment, for ranks on the same node.

The ranks of a node map one MPI shared window (``Win.Allocate_shared``) holding one
staging slot per rank. The data goes through in chunks of at most ``CHUNK`` bytes per
rank so that it stays in cache: every rank copies its chunk into its slot; after a
barrier each rank reduces its 1/n share of the chunk over all slots with numpy,
writing the result into slot 0; after a second barrier every rank copies the whole
reduced chunk out. Two slot sets alternate, so the barrier that ends one chunk's
copy-out is also the one that lets the next chunk's copy-in begin (the alternation
carries on across calls, so a call needs no closing barrier).

Works for numpy arrays of any numeric dtype numpy can add (and torch CPU tensors via
``numpy()``); ops: sum, min, max, prod. Ranks must all be on one node.
"""
from __future__ import annotations

from typing import Any

import numpy as np

CHUNK = 1 << 20  # bytes per rank per step
UFUNCS = {"sum": np.add, "min": np.minimum, "max": np.maximum, "prod": np.multiply}


class ShmAllreduce:
    """A reusable shared segment for one node-local communicator."""

    def __init__(self, comm: Any, chunk: int = CHUNK) -> None:
        from mpi4py import MPI

        self.comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
        if self.comm.size != comm.size:
            self.comm.Free()
            raise ValueError("shared-memory allreduce needs every rank on one node")
        self.rank, self.size, self.chunk = self.comm.rank, self.comm.size, chunk
        nbytes = 2 * self.size * chunk if self.rank == 0 else 0  # two slot sets
        self.win = MPI.Win.Allocate_shared(nbytes, 1, comm=self.comm)
        buf, _itemsize = self.win.Shared_query(0)
        self.memory = np.frombuffer(buf, dtype=np.uint8)
        self.steps = 0  # chunks done so far, over all calls: picks the slot set
        self.comm.Barrier()

    def close(self) -> None:
        self.comm.Barrier()
        self.win.Free()
        self.comm.Free()

    def _slots(self, parity: int, dtype: np.dtype, count: int) -> list[np.ndarray]:
        base = parity * self.size * self.chunk
        return [self.memory[base + i * self.chunk: base + i * self.chunk + count * dtype.itemsize].view(dtype)
                for i in range(self.size)]

    def allreduce(self, send: np.ndarray, recv: np.ndarray, op: str = "sum") -> np.ndarray:
        """recv = op over all ranks of send (same shape and dtype everywhere); recv may be send."""
        ufunc = UFUNCS[op]
        if not (send.flags.c_contiguous and recv.flags.c_contiguous) or send.shape != recv.shape:
            raise ValueError("shared-memory allreduce needs contiguous send and recv of the same shape")
        flat_in, flat_out = send.reshape(-1), recv.reshape(-1)
        dtype = flat_in.dtype
        per_step = max(1, self.chunk // dtype.itemsize)
        total = flat_in.size
        for start in range(0, total, per_step):
            count = min(per_step, total - start)
            slots = self._slots(self.steps % 2, dtype, count)
            self.steps += 1
            slots[self.rank][:] = flat_in[start:start + count]
            self.comm.Barrier()
            lo, hi = count * self.rank // self.size, count * (self.rank + 1) // self.size
            if hi > lo:
                mine = slots[0][lo:hi]
                for other in slots[1:]:
                    ufunc(mine, other[lo:hi], out=mine)
            self.comm.Barrier()
            flat_out[start:start + count] = slots[0]
        return recv
