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
    handles: dict[int, tuple[Any, torch.Tensor, Callable[[], Any]]] = field(default_factory=dict)
    next_handle: Any = field(default_factory=itertools.count)
    names: dict[int, str] = field(default_factory=dict)  # handle -> the name it was given, while in flight

    def reset(self) -> None:
        if self.shm is not None:
            self.shm.close()
        self.topology, self.shm, self.shm_unavailable, self.owns_group = None, None, False, True
        self.handles.clear()
        self.names.clear()


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
        raise NotImplementedError(
            "Adasum is not available in distlaunch's torch.distributed backend: "
            "use op=hvd.Average or hvd.Sum, or install Horovod (distlaunch install-horovod)"
        )
    return {Average: dist.ReduceOp.SUM, Sum: dist.ReduceOp.SUM, Min: dist.ReduceOp.MIN,
            Max: dist.ReduceOp.MAX, Product: dist.ReduceOp.PRODUCT}[op]


def scale(tensor: torch.Tensor, factor: float) -> None:
    if factor != 1.0:
        if tensor.dtype.is_floating_point or tensor.is_complex():
            tensor.mul_(factor)
        else:
            tensor.copy_((tensor.double() * factor).to(tensor.dtype))


def finish_average(tensor: torch.Tensor, op: int, postscale: float) -> torch.Tensor:
    if op == Average:
        if tensor.dtype.is_floating_point or tensor.is_complex():
            tensor.div_(topo().size)
        else:  # as Horovod: integer averages round toward zero
            tensor.copy_(torch.div(tensor, topo().size, rounding_mode="trunc"))
    scale(tensor, postscale)
    return tensor


DUPLICATE_NAME = ("Requested to allreduce, allgather, or broadcast a tensor with the same name as another tensor "
                  "that is currently being processed.  If you want to request another tensor, use a different "
                  "tensor name.")


def check_name(name: str | None) -> None:
    """Horovod's rule: no two operations in flight under one name (ValueError at submission)."""
    if name is not None and name in state.names.values():
        raise ValueError(DUPLICATE_NAME)


def register(work: Any, output: torch.Tensor, finish: Callable[[], Any], name: str | None = None) -> int:
    """A Horovod-style integer handle for an operation in flight (``work`` None: done)."""
    check_name(name)
    handle = next(state.next_handle)
    state.handles[handle] = (work, output, finish)
    if name is not None:
        state.names[handle] = name
    return handle


GLOO_WIDENED = {torch.int16: torch.int32, torch.bool: torch.uint8}  # dtypes gloo cannot move as they are


def widened(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in a dtype gloo moves (int16 as int32): every dtype works, as with Horovod."""
    wide = GLOO_WIDENED.get(tensor.dtype)
    return tensor if wide is None or tensor.is_cuda else tensor.to(wide)
