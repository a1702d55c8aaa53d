"""Internal to the torch.distributed backend: its state in one object, and the helpers
``torchdist`` and ``collectives`` share (op codes, scaling, handles).

Not part of the public API: ``distlaunch.hvd`` re-exports what Horovod has.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .rendezvous import Topology

Average, Sum, Adasum, Min, Max, Product = 0, 1, 2, 3, 4, 5
OP_NAMES = {Average: "Average", Sum: "Sum", Adasum: "Adasum", Min: "Min", Max: "Max", Product: "Product"}
SHM_OPS = {Average: "sum", Sum: "sum", Min: "min", Max: "max", Product: "prod"}  # shm_allreduce's names


class HorovodInternalError(RuntimeError):
    """Same name as Horovod's: a collective failed."""


@dataclass
class State:
    """Everything the backend remembers between calls (one per process)."""

    topology: Topology | None = None
    owns_group: bool = True  # hvd.init made the default process group (shutdown destroys it)
    shm: Any = None  # the ShmAllreduce segment, once made
    shm_unavailable: bool = False  # the nodes hold different rank counts: gloo it is
    handles: dict[int, Any] = field(default_factory=dict)  # handle -> its Future, until synchronized
    next_handle: Any = field(default_factory=itertools.count)
    names: dict[int, str] = field(default_factory=dict)  # handle -> the name it was given, while in flight
    engine: Any = None  # engine.Engine: runs the collectives in order
    channel: str | None = None  # how rounds go: "shm" (one node's segment) or "gloo"; fixed at first use
    rounds: int = 0  # negotiation rounds so far (the same count on every rank)
    device: Any = None  # where headers travel (cuda with nccl)
    process_sets: dict[int, Any] = field(default_factory=dict)  # id -> ProcessSet, the global one is 0
    timeline: Any = None  # timeline.Timeline while hvd.start_timeline records
    dynamic_sets: bool = False  # process sets may be added after init
    mpi_world: bool = False  # MPI launched the ranks: rounds may go through MPI
    inline_ok: bool = False  # small allreduces may ride in a gloo round (gloo backend)
    shm_mode: str = "auto"  # DISTLAUNCH_HVD_ALLREDUCE, read at init
    shm_min_bytes: int = 0  # DISTLAUNCH_HVD_SHM_MIN_BYTES, read at init

    def reset(self) -> None:
        idle = self.engine is None or self.engine.drain(timeout=10.0)
        if self.timeline is not None:
            self.timeline.close()
        if self.shm is not None and idle:  # (a collective still running keeps the segment: we are exiting)
            self.shm.close()
        self.topology, self.shm, self.shm_unavailable, self.owns_group = None, None, False, True
        self.channel, self.rounds, self.engine, self.timeline = None, 0, None, None
        self.handles.clear()
        self.names.clear()
        self.process_sets.clear()


state = State()


def topo() -> Topology:
    if state.topology is None:
        raise ValueError("Horovod has not been initialized; use hvd.init().")
    return state.topology


def resolve_op(op: int | None, average: bool | None) -> int:
    if op is not None and average is not None:
        raise ValueError("The op parameter supersedes average. Please provide only one of them.")
    if average is not None:
        return Average if average else Sum
    return Average if op is None else op


def torch_op(op: int) -> Any:
    if op == Adasum:
        raise NotImplementedError("Adasum combines allreduces only (as in Horovod): use op=hvd.Average or "
                                  "hvd.Sum with this collective")
    return {Average: dist.ReduceOp.SUM, Sum: dist.ReduceOp.SUM, Min: dist.ReduceOp.MIN,
            Max: dist.ReduceOp.MAX, Product: dist.ReduceOp.PRODUCT}[op]


def scale(tensor: torch.Tensor, factor: float) -> None:
    if factor != 1.0:
        if tensor.dtype.is_floating_point or tensor.is_complex():
            tensor.mul_(factor)
        else:
            tensor.copy_((tensor.double() * factor).to(tensor.dtype))


def finish_average(tensor: torch.Tensor, op: int, postscale: float, divisor: int | None = None) -> torch.Tensor:
    if op == Average:
        divisor = topo().size if divisor is None else divisor
        if tensor.dtype.is_floating_point or tensor.is_complex():
            tensor.div_(divisor)
        else:  # as Horovod: integer averages round toward zero
            tensor.copy_(torch.div(tensor, divisor, rounding_mode="trunc"))
    scale(tensor, postscale)
    return tensor


DUPLICATE_NAME = ("Requested to allreduce, allgather, or broadcast a tensor with the same name as another tensor "
                  "that is currently being processed.  If you want to request another tensor, use a different "
                  "tensor name.")


def check_name(name: str | None) -> None:
    """Horovod's rule: no two operations in flight under one name (ValueError at submission)."""
    if name is not None and name in state.names.values():
        raise ValueError(DUPLICATE_NAME)


def run(task: Callable[[], Any], name: str | None = None) -> Any:
    """Run a collective now, in order behind any still in flight (see engine)."""
    if state.engine is None:
        topo()  # Horovod's "not initialized" error
    return state.engine.run(task, name)


def submit(task: Callable[[], Any], name: str | None = None) -> int:
    """Queue a collective; a Horovod-style integer handle for it (name checked first)."""
    if state.engine is None:
        topo()
    check_name(name)
    handle = next(state.next_handle)
    state.handles[handle] = state.engine.submit(task, name)
    if name is not None:
        state.names[handle] = name
    return handle


GLOO_WIDENED = {torch.int16: torch.int32, torch.bool: torch.uint8}  # dtypes gloo cannot move as they are


def widened(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in a dtype gloo moves (int16 as int32): every dtype works, as with Horovod."""
    wide = GLOO_WIDENED.get(tensor.dtype)
    return tensor if wide is None or tensor.is_cuda else tensor.to(wide)


def byte_tensor(data: bytes | bytearray) -> torch.Tensor:
    """``data`` as a uint8 tensor that owns its memory. Never hand torch.distributed a
    ``torch.frombuffer`` tensor: its storage keeps the Python buffer alive through a
    deleter that takes the GIL, and when gloo's worker thread drops the last reference
    while the interpreter shuts down, taking the GIL ends that thread by unwinding, which
    aborts the process ("terminate called without an active exception")."""
    out = torch.empty(len(data), dtype=torch.uint8)
    if len(data):
        out.numpy()[:] = memoryview(data).cast("B")
    return out
