"""How the ranks agree before each collective, as Horovod's controller does.

Every collective opens with one round in which each rank shows a fixed-size header:
what it is about to do (kind, op, dtype, shape, root, scale factors), or that it has
joined (``hvd.join``) and stands by. All ranks see all headers, so they reach the same
verdict: go on, go on with zeros for the joined ranks, or raise the same
``HorovodInternalError`` on every rank, before any data moves (never a hang, never a
crash in gloo). The round goes through the shared segment on one node (for an
allreduce it rides on the data's own first barrier: no extra cost), else through a gloo
all_gather of the headers.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import torch

from .core import HorovodInternalError

HEADER = struct.Struct("<16q2d")  # kind joined op dtype root join_round ndim numel dims*8 | pre post
MAX_DIMS = 8
ALLREDUCE, ALLGATHER, BROADCAST, ALLTOALL, REDUCESCATTER, BARRIER, JOINED = range(1, 8)
KIND_NAMES = {ALLREDUCE: "ALLREDUCE", ALLGATHER: "ALLGATHER", BROADCAST: "BROADCAST", ALLTOALL: "ALLTOALL",
              REDUCESCATTER: "REDUCESCATTER", BARRIER: "BARRIER", JOINED: "JOIN"}
JOIN_SUPPORTED = (ALLREDUCE, BARRIER)  # what the joined ranks stand in for (Horovod: allreduce)
_DTYPE_NAMES = ("uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64", "bool",
                "bfloat16")
DTYPES = tuple(getattr(torch, name) for name in _DTYPE_NAMES if hasattr(torch, name))  # uint16: torch >= 2.3
DTYPE_NAMES = tuple(str(dtype).replace("torch.", "") for dtype in DTYPES)
DTYPE_CODES = {dtype: code for code, dtype in enumerate(DTYPES)}
UNKNOWN = 99  # a dtype outside DTYPES (complex, ...): agreed on by code, never stood in for
CUDA = 1000  # added to the dtype code of a tensor on a GPU: the device is part of the agreement
PADS = tuple((-1,) * k for k in range(MAX_DIMS + 1))


def header(kind: int, tensor: torch.Tensor | None = None, op: int = 0, root: int = 0, pre: float = 1.0,
           post: float = 1.0, joined: int = 0, join_round: int = 0) -> bytes:
    """This rank's header for the next round."""
    if tensor is None:
        return HEADER.pack(kind, joined, op, -1, root, join_round, 0, 0, *PADS[MAX_DIMS], pre, post)
    shape = tensor.shape
    ndim = len(shape)
    dims = (*shape[:MAX_DIMS], *PADS[MAX_DIMS - min(ndim, MAX_DIMS)])
    code = DTYPE_CODES.get(tensor.dtype, UNKNOWN) + (CUDA if tensor.is_cuda else 0)
    return HEADER.pack(kind, joined, op, code, root, join_round, ndim, tensor.numel(), *dims, pre, post)


@dataclass(frozen=True)
class Row:
    """One rank's header, read back."""

    kind: int
    joined: int
    op: int
    dtype: int
    root: int
    join_round: int
    ndim: int
    numel: int
    dims: tuple[int, ...]
    pre: float
    post: float

    @property
    def shape(self) -> tuple[int, ...]:
        return self.dims[: min(self.ndim, MAX_DIMS)]

    @property
    def cuda(self) -> bool:
        return self.dtype >= CUDA

    @property
    def known(self) -> bool:
        return 0 <= self.dtype % CUDA < len(DTYPES)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype % CUDA]

    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype % CUDA] if self.known else "other"


def rows(blob: bytes, count: int) -> list[Row]:
    out = []
    for i in range(count):
        v = HEADER.unpack_from(blob, i * HEADER.size)
        out.append(Row(*v[:8], tuple(v[8:16]), v[16], v[17]))  # type: ignore[arg-type]
    return out


def _shape(dims: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _factors(row: Row) -> str:
    return f"({row.pre:g}, {row.post:g})"


def check(mine: Row, everyone: list[Row], op_name: str) -> list[int]:
    """The verdict of a round, the same on every rank: the ranks that joined (they take
    part with zeros), or HorovodInternalError (Horovod's words) when the active ranks
    disagree or the collective cannot run while some have joined."""
    joined = [i for i, row in enumerate(everyone) if row.joined]
    active = [row for row in everyone if not row.joined]
    first = active[0]
    name = KIND_NAMES[first.kind]
    for row in active[1:]:
        if row.kind != first.kind:
            raise HorovodInternalError(f"Mismatched MPI operations: One rank did an {name}, "
                                       f"but another rank did an {KIND_NAMES[row.kind]}.")
    for row in active[1:]:
        if row.cuda != first.cuda:
            raise HorovodInternalError(f"Mismatched CPU/GPU device selection: One rank specified device "
                                       f"{'GPU' if first.cuda else 'CPU'}, but another rank specified device "
                                       f"{'GPU' if row.cuda else 'CPU'}.")
    for row in active[1:]:
        if row.dtype != first.dtype:
            raise HorovodInternalError(f"Mismatched data types: One rank had type {first.dtype_name()}, "
                                       f"but another rank had type {row.dtype_name()}.")
    kind = first.kind
    for row in active[1:]:
        if kind == ALLREDUCE and row.op != first.op:
            raise HorovodInternalError(f"Mismatched reduction operation: One rank sent reduction op {first.op}, "
                                       f"but another rank sent reduction op {row.op}.")
        if kind == BROADCAST and row.root != first.root:
            raise HorovodInternalError(f"Mismatched BROADCAST root ranks: One rank specified root rank {first.root}, "
                                       f"but another rank specified root rank {row.root}.")
        if (row.pre, row.post) != (first.pre, first.post):
            raise HorovodInternalError(f"Mismatched prescale and/or postscale factors: One rank sent factors "
                                       f"{_factors(first)}, but another rank sent factors {_factors(row)}.")
        if kind in (ALLREDUCE, BROADCAST, REDUCESCATTER) and (row.ndim, row.numel, row.dims) != \
                (first.ndim, first.numel, first.dims):
            raise HorovodInternalError(f"Mismatched {name} tensor shapes: One rank sent a tensor of shape "
                                       f"{_shape(first.shape)}, but another rank sent a tensor of shape "
                                       f"{_shape(row.shape)}.")
        if kind in (ALLGATHER, ALLTOALL):
            if row.ndim != first.ndim:
                raise HorovodInternalError(f"Mismatched {name} tensor shapes: One rank sent a tensor of rank "
                                           f"{first.ndim}, but another rank sent a tensor of rank {row.ndim}.")
            for dim in range(1, min(row.ndim, MAX_DIMS)):
                if row.dims[dim] != first.dims[dim]:
                    raise HorovodInternalError(
                        f"Mismatched {name} tensor shapes: One rank sent a tensor with dimension {dim} equal to "
                        f"{first.dims[dim]}, but another rank sent a tensor with dimension {dim} equal to "
                        f"{row.dims[dim]}.")
    if joined and kind == ALLREDUCE and not first.known:
        raise HorovodInternalError(f"An allreduce of {first.dtype_name()} data while ranks {joined} have joined: "
                                   "the joined ranks cannot stand in for this dtype")
    if joined and kind not in JOIN_SUPPORTED:
        raise HorovodInternalError(f"{name.capitalize()} is not supported with Join at this time."
                                   + (" Specify sparse_as_dense=True if using DistributedOptimizer"
                                      if kind == ALLGATHER else ""))
    return joined


class Disagreement(Exception):
    """Raised inside the shared-memory round when the headers differ; the caller reads them."""

    def __init__(self, blob: bytes) -> None:
        super().__init__("headers differ")
        self.blob = blob


def expecting(mine: bytes, count: int) -> Any:
    """The shared-memory round's check: every header equal to ``mine`` (the fast path), or
    a Disagreement carrying them all."""
    expected = mine * count

    def same(blob: bytes) -> None:
        if blob != expected:
            raise Disagreement(blob)

    return same
