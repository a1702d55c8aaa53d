"""Where a collective of the torch backend runs and how its ranks agree first: the
process group of its process set, the negotiation round (``negotiate``), and the
node's shared-memory segment (made on first use by every rank at once).

Only code running inside the engine (``core.run``/``core.submit``) calls these: they
are collectives themselves, and the engine keeps every rank's order the same.
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .core import SHM_OPS, byte_tensor, state, topo
from .negotiate import DTYPES, HEADER, Disagreement, Row, check, expecting, rows
from .shm_allreduce import UFUNCS


def members(ps: Any) -> tuple[Any, int, int]:
    """(torch group, size, this rank's index) of a resolved process set (None: global)."""
    if ps is None:
        t = topo()
        return None, t.size, t.rank
    return ps.group, len(ps.ranks), ps.ranks.index(topo().rank)


# ---------------------------------------------------------------- the shared segment
def shm_segment() -> Any:
    """The shared segment, made on first use by every rank at once; None (and gloo from
    then on) when the nodes hold different numbers of ranks, which every rank learns alike."""
    if state.shm is None and not state.shm_unavailable:
        from mpi4py import MPI

        from .shm_allreduce import ShmAllreduce

        try:
            state.shm = ShmAllreduce(MPI.COMM_WORLD)
        except ValueError as exc:
            if state.shm_mode == "shm" and topo().rank == 0:
                print(f"distlaunch.hvd: {exc}; allreduce goes through gloo", file=sys.stderr)
            state.shm_unavailable = True
    return state.shm


NO_SHM_DTYPES = (torch.bfloat16, torch.bool, torch.complex64, torch.complex128)


def settings() -> None:
    """Read the allreduce path's settings once (at init): DISTLAUNCH_HVD_ALLREDUCE=gloo|shm|auto
    and, for auto, DISTLAUNCH_HVD_SHM_MIN_BYTES."""
    mode = os.environ.get("DISTLAUNCH_HVD_ALLREDUCE", "auto")
    state.shm_mode = mode
    state.shm_min_bytes = 0 if mode == "shm" else int(os.environ.get("DISTLAUNCH_HVD_SHM_MIN_BYTES", "0"))
    # rounds carry small allreduces' data: MPI's always, gloo's when gloo is the backend (not nccl)
    state.inline_ok = state.mpi_world or (dist.is_initialized() and dist.get_backend() == "gloo")


def use_shm(tensor: torch.Tensor, op: int) -> bool:
    """Shared-memory allreduce (DISTLAUNCH_HVD_ALLREDUCE=shm, or auto from
    DISTLAUNCH_HVD_SHM_MIN_BYTES up): CPU tensors numpy can add, global set only. What
    decides is in the negotiated header (dtype, size, op), so all ranks choose alike."""
    if state.shm_mode == "gloo" or state.shm_unavailable or op not in SHM_OPS or not tensor.is_cpu:
        return False
    if tensor.dtype in NO_SHM_DTYPES or state.topology.size == 1:
        return False
    if state.shm_min_bytes and tensor.numel() * tensor.element_size() < state.shm_min_bytes:
        return False
    return state.shm is not None or shm_segment() is not None


def channel() -> str:
    """How rounds go, decided once and alike on every rank: 'shm' through this node's
    segment (one node, MPI world), 'mpi' through an MPI allgather (an MPI world on several
    nodes, or with DISTLAUNCH_HVD_ALLREDUCE=gloo), else 'gloo' (torchrun, srun steps
    without a PMI)."""
    if state.channel is None:
        shm = None
        if state.shm_mode != "gloo" and topo().size > 1:
            shm = shm_segment()
        if shm is not None and shm.cross is None:
            state.channel = "shm"
        else:
            state.channel = "mpi" if state.mpi_world else "gloo"
    return state.channel


# ---------------------------------------------------------------- rounds
INLINE = 256  # bytes of data an MPI or gloo round carries after the header: small allreduces ride in it
INLINE_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
                 torch.float64}


# The tensors of the last gloo rounds, kept by Python until gloo's worker threads have
# let go of them (settle). A tensor Python drops while gloo still holds it gets its
# Python object back from torch, and gloo's thread releases that object later, taking
# the GIL: if that happens while the interpreter exits, the process aborts ("terminate
# called without an active exception"). Every collective opens with a round and the
# last one at shutdown is the barrier's, so the recent rounds are what gloo can still
# hold; measured: 2 aborts in 30 torchrun jobs without settle, none in 40 with it.
# A settle that times out leaves them here on purpose (alive until the process ends).
_recent: deque[list[torch.Tensor]] = deque(maxlen=8)


def settle(timeout: float) -> bool:
    """Wait (at most ``timeout`` s) until gloo holds none of the recent rounds' tensors.
    Without ``Tensor._use_count`` (torch < 2.3) it cannot tell, and waits a fixed 0.2 s."""
    use_count = getattr(torch.Tensor, "_use_count", None)
    if use_count is None:
        time.sleep(min(timeout, 0.2) if _recent else 0.0)
        _recent.clear()
        return True
    deadline = time.monotonic() + timeout
    while any(use_count(t) > 1 for tensors in _recent for t in tensors):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    _recent.clear()
    return True


def _round(head: bytes, ps: Any, inline: bytes = b"") -> list[bytes]:
    """Every member's header + inline bytes (always the same length, whatever each sends:
    ranks that disagree still meet in one well-formed allgather): MPI's for the global
    set of an MPI world, else gloo's."""
    group, size, _me = members(ps)
    length = HEADER.size + INLINE
    buffer = bytearray(length)
    buffer[: len(head)] = head
    buffer[HEADER.size: HEADER.size + len(inline)] = inline
    if ps is None and channel() == "mpi":
        from mpi4py import MPI

        received = np.empty(size * length, dtype=np.uint8)
        MPI.COMM_WORLD.Allgather(np.frombuffer(buffer, dtype=np.uint8), received)
        raw = received.tobytes()
        return [raw[i * length: (i + 1) * length] for i in range(size)]
    if state.device is None:
        cuda = dist.get_backend() == "nccl"
        state.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mine = byte_tensor(buffer).to(state.device)
    everyone = [torch.empty_like(mine) for _ in range(size)]
    _recent.append([mine, *everyone])
    dist.all_gather(everyone, mine, group=group)
    return [bytes(t.cpu().numpy()) for t in everyone]


def exchange(head: bytes, ps: Any = None) -> bytes:
    """Every member's header, in rank order (one round)."""
    if ps is None:
        state.rounds += 1  # global rounds only: join() compares them across every rank
    if members(ps)[1] == 1:
        return head
    if ps is None and channel() == "shm":
        return state.shm.exchange(head)  # type: ignore[no-any-return]
    return b"".join(part[: HEADER.size] for part in _round(head, ps))


def inlined(row: Row) -> bool:
    """Whether an allreduce travels inside its round (decided from the header alone,
    so that joined ranks standing by decide alike)."""
    return (state.inline_ok and row.op in SHM_OPS and 0 <= row.dtype < len(DTYPES)
            and DTYPES[row.dtype] in INLINE_DTYPES and row.numel * DTYPES[row.dtype].itemsize <= INLINE)


def inlines(tensor: torch.Tensor, op: int) -> bool:
    """The same rule, from the tensor (the caller's side)."""
    return (state.inline_ok and op in SHM_OPS and tensor.dtype in INLINE_DTYPES
            and tensor.numel() * tensor.element_size() <= INLINE)


def inline_allreduce(output: torch.Tensor, op: int, head: bytes, ps: Any) -> None:
    """A small allreduce in one MPI or gloo round: every rank's data arrives with the headers and
    each rank reduces it itself, in rank order (the same bits everywhere)."""
    if ps is None:
        state.rounds += 1
    _group, size, me = members(ps)
    flat = output.detach().contiguous().cpu()
    parts = _round(head, ps, flat.numpy().tobytes())
    blob = b"".join(part[: HEADER.size] for part in parts)
    joined: list[int] = []
    if blob != head * size:
        everyone = rows(blob, size)
        joined = check(everyone[me], everyone, "allreduce")
    nbytes = flat.numel() * flat.element_size()
    dtype = flat.numpy().dtype
    arrays = [np.zeros(flat.numel(), dtype) if i in joined else
              np.frombuffer(part[HEADER.size: HEADER.size + nbytes], dtype=dtype) for i, part in enumerate(parts)]
    result = arrays[0].copy()
    ufunc = UFUNCS[SHM_OPS[op]]
    for other in arrays[1:]:
        ufunc(result, other, out=result)
    output.copy_(torch.from_numpy(result).reshape(output.shape))


def negotiate(head: bytes, op_name: str, ps: Any = None) -> tuple[list[Row] | None, list[int]]:
    """One round: (every member's header, or None when all equal mine; the members that
    have joined). Raises HorovodInternalError on every member alike when they disagree."""
    _group, size, me = members(ps)
    blob = exchange(head, ps)
    if blob == head * size:
        return None, []
    everyone = rows(blob, size)
    return everyone, check(everyone[me], everyone, op_name)


def shm_allreduce(output: torch.Tensor, op: int, head: bytes | None = None) -> bool:
    """``output`` reduced in place through the segment; with ``head``, negotiated in the
    same round. True when the headers differed but agree (ranks that joined, or equal
    values written differently): nothing was reduced, and the caller reduces again."""
    flat = output if output.is_contiguous() else output.contiguous()
    array = flat.numpy()
    shm = state.shm
    if head is None:
        shm.allreduce(array, array, SHM_OPS[op])
    else:
        state.rounds += 1
        try:
            shm.allreduce(array, array, SHM_OPS[op], head, expecting(head, shm.size))
        except Disagreement as disagreement:
            everyone = rows(disagreement.blob, shm.size)
            check(everyone[shm.rank], everyone, "allreduce")  # raises on every rank, or lets all go on
            return True
    if flat is not output:
        output.copy_(flat)
    return False
