"""Horovod's ``horovod.torch`` API implemented on ``torch.distributed``.

Used by ``distlaunch.hvd`` when real Horovod is not installed (or
``DISTLAUNCH_HVD_BACKEND=torch``). Same names, arguments, defaults and results as
horovod.torch 0.28: allreduce averages by default, integer averages round toward zero,
allgather takes uneven first dimensions, async calls return integer handles.
Backend: nccl when CUDA is available, gloo otherwise; CPU allreduces go through
distlaunch's shared-memory allreduce instead of gloo (``DISTLAUNCH_HVD_ALLREDUCE=
gloo|shm|auto``): inside a node through shared memory, across nodes hierarchically
(MPI between nodes), when every node has the same number of ranks and the world is
MPI's (not under torchrun or an srun step without a PMI: gloo there).
"""
from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..rank.rankinfo import MPI_SOURCES, from_environ
from .compression import Compression
from .core import (
    OP_NAMES,
    SHM_OPS,
    Adasum,
    Average,
    HorovodInternalError,
    Max,
    Min,
    Product,
    Sum,
    check_name,
    finish_average,
    register,
    resolve_op,
    scale,
    state,
    topo,
    torch_op,
)
from .rendezvous import group_topology, join, mpi_topology, single_topology

SHM_MIN_BYTES = 0  # auto mode: shared memory from this size up (it beat gloo at every size measured)


# ---------------------------------------------------------------- set-up and topology
def init(comm: Any = None, process_sets: Any = None) -> None:
    """Join the job (idempotent). Pins this rank's GPU when CUDA is available. A default
    process group the script (or a library) made already is used as it is."""
    if state.topology is not None:
        return
    info = from_environ()
    if dist.is_initialized():
        if dist.get_world_size() == 1:
            topo = single_topology()
        elif info.source in MPI_SOURCES or info.pmi:
            topo = mpi_topology(info)[1]
        else:
            topo = group_topology(info)
        state.topology, state.owns_group = topo, False
    else:
        backend = "gloo"
        if torch.cuda.is_available():
            backend = "nccl"
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            narrowed = visible != "" and "," not in visible
            torch.cuda.set_device(0 if narrowed else info.local_rank % torch.cuda.device_count())
        topo = join(backend, info)
        state.topology, state.owns_group = topo, True
        atexit.register(shutdown)  # as Horovod does: gloo's threads gone before the interpreter is
    # the shared-memory allreduce meets through MPI: only where the world is MPI's
    state.shm_unavailable = not (info.source in MPI_SOURCES or info.pmi)
    if topo.size > 1:
        _abort_on_uncaught_exception()


def _abort_on_uncaught_exception() -> None:
    """An uncaught exception ends this rank at once (exit 1), whatever launched it:
    waiting in exit handlers (MPI finalize) would leave peers hanging in a collective."""
    previous = sys.excepthook

    def hook(kind: Any, value: Any, tb: Any) -> None:
        previous(kind, value, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = hook


def shutdown() -> None:
    owned = state.topology is not None and state.owns_group
    state.reset()
    if owned and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return state.topology is not None


def rank() -> int:
    return topo().rank


def size() -> int:
    return topo().size


def local_rank() -> int:
    return topo().local_rank


def local_size() -> int:
    return topo().local_size


def cross_rank() -> int:
    return topo().cross_rank


def cross_size() -> int:
    return topo().cross_size


def is_homogeneous() -> bool:
    return size() == local_size() * cross_size()


def mpi_threads_supported() -> bool:
    return False


def mpi_enabled() -> bool:
    return False


def mpi_built() -> bool:
    return False


def gloo_enabled() -> bool:
    return dist.is_initialized() and dist.get_backend() == "gloo"


def gloo_built() -> bool:
    return dist.is_gloo_available()


def nccl_built() -> int:
    return int(dist.is_nccl_available())


def cuda_built() -> bool:
    return torch.cuda.is_available()


def rocm_built() -> bool:
    return False


def ccl_built() -> bool:
    return False


def ddl_built() -> bool:
    return False


# ---------------------------------------------------------------- handles
def poll(handle: int) -> bool:
    work = state.handles[handle][0]
    return work is None or bool(work.is_completed())


def synchronize(handle: int) -> torch.Tensor | None:
    if handle not in state.handles:
        return None
    work, _output, finish = state.handles.pop(handle)
    state.names.pop(handle, None)
    try:
        if work is not None:
            work.wait()
    except RuntimeError as exc:
        raise HorovodInternalError(str(exc)) from exc
    return finish()


# ---------------------------------------------------------------- allreduce
def _use_shm(tensor: torch.Tensor, op: int) -> bool:
    """Shared-memory allreduce (DISTLAUNCH_HVD_ALLREDUCE=shm, or auto from
    DISTLAUNCH_HVD_SHM_MIN_BYTES up): CPU tensors numpy can add. The inputs of the choice
    are the same on every rank, so all ranks choose alike; the node layout is checked
    collectively when the segment is made (see ``_shm_segment``)."""
    mode = os.environ.get("DISTLAUNCH_HVD_ALLREDUCE", "auto")
    if mode == "gloo" or state.shm_unavailable or topo().size == 1 or op not in SHM_OPS:
        return False
    if tensor.device.type != "cpu" or tensor.dtype in (torch.bfloat16, torch.bool) or tensor.is_complex():
        return False
    if mode != "shm":
        threshold = int(os.environ.get("DISTLAUNCH_HVD_SHM_MIN_BYTES", SHM_MIN_BYTES))
        if tensor.numel() * tensor.element_size() < threshold:
            return False
    return _shm_segment() is not None


def _shm_segment() -> Any:
    """The shared segment, made on first use by every rank at once; None (and gloo from
    then on) when the nodes hold different numbers of ranks, which every rank learns alike."""
    if state.shm is None and not state.shm_unavailable:
        from mpi4py import MPI

        from .shm_allreduce import ShmAllreduce

        try:
            state.shm = ShmAllreduce(MPI.COMM_WORLD)
        except ValueError as exc:
            if os.environ.get("DISTLAUNCH_HVD_ALLREDUCE") == "shm" and topo().rank == 0:
                print(f"distlaunch.hvd: {exc}; allreduce goes through gloo", file=sys.stderr)
            state.shm_unavailable = True
    return state.shm


def _shm_allreduce(output: torch.Tensor, op: int) -> None:
    flat = output if output.is_contiguous() else output.contiguous()
    array = flat.numpy()
    _shm_segment().allreduce(array, array, SHM_OPS[op])
    if flat is not output:
        output.copy_(flat)


def _allreduce_async(tensor: torch.Tensor, output: torch.Tensor, op: int,
                     prescale_factor: float, postscale_factor: float, name: str | None = None) -> int:
    topo()
    check_name(name)
    if output is not tensor:
        output.copy_(tensor)
    scale(output, prescale_factor)
    if _use_shm(output, op):
        _shm_allreduce(output, op)
        work = None
    else:
        work = dist.all_reduce(output, op=torch_op(op), async_op=True)
    return register(work, output, lambda: finish_average(output, op, postscale_factor), name)


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                    op: int | None = None, prescale_factor: float = 1.0,
                    postscale_factor: float = 1.0, process_set: Any = None) -> int:
    output = torch.empty_like(tensor.detach(), memory_format=torch.contiguous_format)
    return _allreduce_async(tensor.detach(), output, resolve_op(op, average), prescale_factor, postscale_factor,
                            name)


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                     op: int | None = None, prescale_factor: float = 1.0,
                     postscale_factor: float = 1.0, process_set: Any = None) -> int:
    return _allreduce_async(tensor, tensor, resolve_op(op, average), prescale_factor, postscale_factor, name)


class _AllreduceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, op: int, pre: float, post: float) -> torch.Tensor:  # type: ignore[override]
        ctx.op, ctx.pre, ctx.post = op, pre, post
        result = synchronize(allreduce_async(tensor, op=op, prescale_factor=pre, postscale_factor=post))
        assert result is not None
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return allreduce(grad, op=ctx.op, prescale_factor=ctx.pre, postscale_factor=ctx.post), None, None, None


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
              compression: Any = Compression.none, op: int | None = None,
              prescale_factor: float = 1.0, postscale_factor: float = 1.0,
              process_set: Any = None) -> torch.Tensor:
    """Reduce ``tensor`` over all ranks (Average by default); the input is not modified."""
    op = resolve_op(op, average)
    compressed, cctx = compression.compress(tensor)
    reduced = _AllreduceFn.apply(compressed, op, prescale_factor, postscale_factor)
    return compression.decompress(reduced, cctx)


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
               op: int | None = None, prescale_factor: float = 1.0,
               postscale_factor: float = 1.0, process_set: Any = None) -> torch.Tensor:
    result = synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor))
    assert result is not None
    return result


def grouped_allreduce(tensors: Sequence[torch.Tensor], average: bool | None = None,
                      name: str | None = None, compression: Any = Compression.none,
                      op: int | None = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0, process_set: Any = None) -> list[torch.Tensor]:
    return [allreduce(t, average, None, compression, op, prescale_factor, postscale_factor) for t in tensors]


def grouped_allreduce_(tensors: Sequence[torch.Tensor], average: bool | None = None,
                       name: str | None = None, op: int | None = None, prescale_factor: float = 1.0,
                       postscale_factor: float = 1.0, process_set: Any = None) -> list[torch.Tensor]:
    handles = [allreduce_async_(t, average, None, op, prescale_factor, postscale_factor) for t in tensors]
    return [synchronize(h) for h in handles]  # type: ignore[misc]


def op_name(op: int) -> str:
    return OP_NAMES[op]


__all__ = [
    "Average", "Sum", "Adasum", "Min", "Max", "Product", "HorovodInternalError",
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size",
    "cross_rank", "cross_size", "is_homogeneous", "mpi_threads_supported", "mpi_enabled",
    "mpi_built", "gloo_enabled", "gloo_built", "nccl_built", "cuda_built", "rocm_built", "ccl_built", "ddl_built",
    "poll", "synchronize", "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
    "grouped_allreduce", "grouped_allreduce_",
]
