"""Allreduce through one shared-memory segment, for ranks on the same node.

The ranks of a node map one MPI shared window (``Win.Allocate_shared``). The data goes
through in steps of at most ``CHUNK`` bytes; a step's elements are cut into n slices,
slice r being rank r's to reduce. Every step ends at a barrier, where each rank waits for
the slowest, so fewer, larger steps cost less than steps sized to stay in a core's cache
(measured: ``benchmarks/shm_chunk.py``). The segment holds three steps for every rank, so
the step shrinks with many ranks on a node, and it is over 1 MiB only where those slots
fit in 1/8 of the shared-memory filesystem (where Open MPI backs the window: /dev/shm by
default; a container's 64 MiB one gives 1.33 MiB steps at 2 ranks, 1 MiB from 3 ranks
up). A step has three stages:

1. copy-in: rank j copies its inputs for the other ranks' slices into its slot j (its
   own slice it never copies: it reads that straight from its send buffer);
2. reduce: rank r combines slice r over all ranks, in rank order (so every rank gets
   bitwise the same result), into slot r at slice r, and copies it to its recv buffer;
3. copy-out: every rank copies the other ranks' reduced slices into its recv buffer.

Steps are pipelined with ONE barrier each: between two barriers a rank copies out step
k-2, reduces step k-1 and copies in step k. Three slot sets rotate, so the three stages
in flight never touch the same memory, and a set is written again only after every rank
has passed the barrier that follows its last reads. The rotation carries on across
calls, so a call needs no opening or closing barrier of its own. Small buffers (all
ranks' inputs together at most ``SMALL`` bytes) take a one-barrier path instead: every
rank copies all of its input in, then reduces the whole buffer itself.

Per byte of the buffer a rank copies (n-1)/n in, reads 1 and writes 2/n to reduce, and
copies (n-1)/n out, where staging everything would copy it all in and all out.

Across nodes it is hierarchical: the node-local reduction of slice r is allreduced by
MPI among the ranks that hold slice r on every node (one communicator per local rank,
so all of a node's ranks talk to the other nodes at once, each for 1/n of the data),
then copied out inside the node as above. That needs the same rank count on every node.
Small buffers there are reduced in the node by every rank and then allreduced across by
every rank too (latency over bandwidth), so the small path stops at ``SMALL_ACROSS``.

Negotiation rides on the first barrier of a call: with ``header=``, each rank also
writes a fixed-size description of its call into its header slot of the step's set,
and after the first barrier ``check`` sees every rank's header before anything is
reduced; if it raises, every rank raises alike at the same point (each has consumed one
set), so the segment stays in step. ``exchange`` is the same round with no data: a
collective that is not a shared-memory allreduce agrees through it.

Works for numpy arrays of any numeric dtype numpy can add (and torch CPU tensors via
``numpy()``); ops: sum, min, max, prod.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

CHUNK = 4 << 20  # bytes of the user's buffer per pipelined step (measured at 2 ranks, bench allreduce: against
# 1 MiB steps, 1.1-1.3x faster from 4 MiB buffers up, alike below; 8 MiB steps gain no more for twice the memory)
SEGMENT = 64 << 20  # at most this much shared memory per communicator
SHM_SHARE = 8  # steps over STEP_MIN only where their segment takes at most this fraction of the filesystem that
# backs it: MPI's own segments, other jobs' and the program's live there too, and MPI checks the free space only
# as it makes the window (what is taken after that is a SIGBUS on the page touched, not an error)
STEP_MIN = 1 << 20  # where it does not fit: the step every size had before 4 MiB steps were measured faster
SHM_DIR = "/dev/shm"  # Open MPI's default for the window's backing file (osc_sm_backing_directory)
SMALL = 256 << 10  # buffers up to this many bytes, all ranks together, take the one-barrier path (measured:
# at 2 ranks it wins up to 128 KiB a rank, the pipelined path from 256 KiB)
SMALL_ACROSS = 64 << 10  # the same, with several nodes
SETS = 3  # slot sets in rotation: copy-in, reduce and copy-out of three steps at once
HEADER = 144  # bytes of a rank's header slot (negotiate.HEADER's size)
UFUNCS = {"sum": np.add, "min": np.minimum, "max": np.maximum, "prod": np.multiply}
MPI_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX", "prod": "PROD"}


def shm_bytes() -> int | None:
    """The size of the filesystem that backs the window (Open MPI's
    ``osc_sm_backing_directory``, /dev/shm by default): not what is free, which changes
    from one rank's look to the next. None where there is none to read. Read from the
    environment, where mpirun's ``--mca`` puts it: a folder named in an MCA parameter
    file, or Open MPI's fallback to its session folder, is not seen (/dev/shm's size
    stands in)."""
    try:
        fs = os.statvfs(os.environ.get("OMPI_MCA_osc_sm_backing_directory") or SHM_DIR)
    except OSError:
        return None
    return fs.f_frsize * fs.f_blocks or None


def step_bytes(chunk: int, ranks: int, shm: int | None) -> int:
    """The step for ``ranks`` ranks on a node: ``chunk``, less where the segment's slots
    (three sets of one per rank; its headers come on top) would outgrow ``SEGMENT``, or,
    for a step over ``STEP_MIN``, 1/``SHM_SHARE`` of ``shm`` bytes of shared memory; at
    least 4 KiB, in whole 64-byte lines (whole elements of every dtype)."""
    slots = SETS * ranks
    limit = SEGMENT // slots
    if shm is not None:
        limit = min(limit, max(shm // SHM_SHARE // slots, STEP_MIN))
    return max(min(chunk, limit), 4096) // 64 * 64


class ShmAllreduce:
    """A reusable shared segment for the ranks of ``comm`` on this node (collective over
    ``comm``); with ranks on several nodes, also one cross-node communicator per local rank."""

    def __init__(self, comm: Any, chunk: int = CHUNK) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
        self.cross = None
        if self.comm.size != comm.size:
            per_node = comm.allgather(self.comm.size)
            if len(set(per_node)) != 1:
                self.comm.Free()
                raise ValueError(f"shared-memory allreduce across nodes needs the same number of ranks on every "
                                 f"node; these nodes have {sorted(set(per_node))}")
            self.cross = comm.Split(color=self.comm.rank, key=comm.rank)
        self.rank, self.size = self.comm.rank, self.comm.size
        # many ranks per node, or a small /dev/shm: smaller steps; the least of all ranks', so that
        # every rank, on every node (their slices are reduced across nodes step by step), cuts alike
        self.chunk = comm.allreduce(step_bytes(chunk, self.size, shm_bytes()), op=MPI.MIN)
        small = SMALL if self.cross is None else SMALL_ACROSS
        self.small = min(small // self.size, self.chunk)  # the one-barrier path reads n times the buffer
        self._views: dict[tuple[int, np.dtype], list[np.ndarray]] = {}
        # one slot per rank and set; a slot holds a whole step (the small path needs that)
        self.headers_at = SETS * self.size * self.chunk
        nbytes = self.headers_at + SETS * self.size * HEADER if self.rank == 0 else 0
        self.win = MPI.Win.Allocate_shared(nbytes, 1, comm=self.comm)
        buf, _itemsize = self.win.Shared_query(0)
        self.memory = np.frombuffer(buf, dtype=np.uint8)
        self.raw = memoryview(self.memory)
        self.steps = 0  # steps done so far, over all calls: picks the slot set
        self.comm.Barrier()

    def close(self) -> None:
        self.comm.Barrier()
        self.win.Free()
        self.comm.Free()
        if self.cross is not None:
            self.cross.Free()

    def _across(self, buf: np.ndarray, op: str) -> None:
        """Allreduce buf in place with the same local rank on the other nodes (if any)."""
        if self.cross is not None and buf.size:
            self.cross.Allreduce(self._mpi.IN_PLACE, buf, op=getattr(self._mpi, MPI_OPS[op]))

    def _write_header(self, header: bytes) -> int:
        """Put this rank's header in the next step's set; returns where that set's headers start."""
        start = self.headers_at + (self.steps % SETS) * self.size * HEADER
        mine = start + self.rank * HEADER
        self.raw[mine:mine + len(header)] = header
        return start

    def _headers(self, start: int) -> bytes:
        return self.raw[start:start + self.size * HEADER].tobytes()

    def exchange(self, header: bytes) -> bytes:
        """Every local rank's header, concatenated in rank order (one barrier; one set)."""
        start = self._write_header(header)
        self.steps += 1
        self.comm.Barrier()
        return self._headers(start)

    def _slots(self, dtype: np.dtype, count: int) -> list[np.ndarray]:
        """The next step's slots (one per rank) as ``count`` elements of ``dtype``."""
        key = (self.steps % SETS, dtype)
        self.steps += 1
        whole = self._views.get(key)
        if whole is None:
            base = key[0] * self.size * self.chunk
            whole = self._views[key] = [self.memory[base + i * self.chunk: base + (i + 1) * self.chunk].view(dtype)
                                        for i in range(self.size)]
        return [slot[:count] for slot in whole]

    def allreduce(self, send: np.ndarray, recv: np.ndarray, op: str = "sum", header: bytes | None = None,
                  check: Callable[[bytes], None] | None = None) -> np.ndarray:
        """recv = op over all ranks of send (same shape and dtype everywhere); recv may be send.
        With ``header``, ``check(all headers)`` runs after the first barrier, before any
        rank reads another's data (only on one node: ``cross`` must be None)."""
        self._header, self._check = header, check
        ufunc = UFUNCS[op]
        if not (send.flags.c_contiguous and recv.flags.c_contiguous) or send.shape != recv.shape:
            raise ValueError("shared-memory allreduce needs contiguous send and recv of the same shape")
        flat_in, flat_out = send.reshape(-1), recv.reshape(-1)
        if self.size == 1:
            flat_out[:] = flat_in
            self._across(flat_out, op)
        elif flat_in.nbytes <= self.small:
            self._small(flat_in, flat_out, ufunc, op)
        else:
            self._pipelined(flat_in, flat_out, ufunc, op)
        return recv

    def _small(self, flat_in: np.ndarray, flat_out: np.ndarray, ufunc: Any, op: str) -> None:
        start = self._write_header(self._header) if self._header is not None else 0
        slots = self._slots(flat_in.dtype, flat_in.size)
        slots[self.rank][:] = flat_in
        self.comm.Barrier()
        if self._header is not None:
            self._check(self._headers(start))
        ufunc(slots[0], slots[1], out=flat_out)
        for other in slots[2:]:
            ufunc(flat_out, other, out=flat_out)
        self._across(flat_out, op)  # every local rank redundantly: a small buffer costs latency only

    def _pipelined(self, flat_in: np.ndarray, flat_out: np.ndarray, ufunc: Any, op: str) -> None:
        n, me, total = self.size, self.rank, flat_in.size
        per_step = max(1, self.chunk // flat_in.dtype.itemsize)
        steps = [(start, min(per_step, total - start)) for start in range(0, total, per_step)]
        cuts = {count: [(count * r // n, count * (r + 1) // n) for r in range(n)] for _, count in steps}
        slots: list[list[np.ndarray]] = []
        for k in range(len(steps) + 2):
            if k >= 2:  # copy out step k-2: the other ranks' slices
                start, count = steps[k - 2]
                for r, (lo, hi) in enumerate(cuts[count]):
                    if r != me:
                        flat_out[start + lo:start + hi] = slots[k - 2][r][lo:hi]
            if 1 <= k <= len(steps):  # reduce step k-1, my slice, in rank order
                start, count = steps[k - 1]
                lo, hi = cuts[count][me]
                if hi > lo:
                    parts = [flat_in[start + lo:start + hi] if r == me else slots[k - 1][r][lo:hi] for r in range(n)]
                    acc = slots[k - 1][me][lo:hi]  # never aliases flat_in, even when recv is send
                    ufunc(parts[0], parts[1], out=acc)
                    for part in parts[2:]:
                        ufunc(acc, part, out=acc)
                    self._across(acc, op)
                    flat_out[start + lo:start + hi] = acc
            if k < len(steps):  # copy in step k: my inputs for the other ranks' slices
                if k == 0 and self._header is not None:
                    headers_at = self._write_header(self._header)
                start, count = steps[k]
                slots.append(self._slots(flat_in.dtype, count))
                for r, (lo, hi) in enumerate(cuts[count]):
                    if r != me:
                        slots[k][me][lo:hi] = flat_in[start + lo:start + hi]
            if k <= len(steps):
                self.comm.Barrier()
                if k == 0 and self._header is not None:
                    self._check(self._headers(headers_at))
