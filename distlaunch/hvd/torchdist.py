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
from . import adasum, world
from .compression import Compression
from .core import (
    OP_NAMES,
    Adasum,
    Average,
    HorovodInternalError,
    Max,
    Min,
    Product,
    Sum,
    check_name,
    finish_average,
    resolve_op,
    scale,
    state,
    submit,
    topo,
    torch_op,
    widened,
)
from .engine import Engine
from .negotiate import ALLREDUCE, BARRIER, header
from .process_sets import ProcessSet, add_process_set, global_process_set, remove_process_set, setup
from .process_sets import resolve as resolve_set
from .rendezvous import group_topology, join, mpi_topology, single_topology
from .timeline import from_environment, start_timeline, stop_timeline


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
    state.mpi_world = info.source in MPI_SOURCES or info.pmi
    state.shm_unavailable = not state.mpi_world
    state.engine = Engine()
    world.settings()
    world.channel()  # how rounds go, settled while every rank is here (it may make the shared segment)
    setup(process_sets)
    from_environment()
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


SHUTDOWN_WAIT_S = 60.0  # how long shutdown waits for the peers of a torchrun or srun world


def shutdown() -> None:
    """Leave the job. In a world without MPI (torchrun, srun without a PMI) the ranks
    first meet in one barrier (at most SHUTDOWN_WAIT_S): a rank that tears gloo down while
    a peer is still running can abort ("terminate called without an active exception")."""
    owned = state.topology is not None and state.owns_group
    if owned and state.engine is not None and not state.mpi_world and state.topology.size > 1:  # type: ignore[union-attr]
        try:
            state.engine.submit(lambda: world.negotiate(header(BARRIER), "barrier")).result(SHUTDOWN_WAIT_S)
        except Exception:  # noqa: BLE001 - a peer gone or still busy: leave anyway
            pass
    idle = state.engine is None or state.engine.drain(timeout=10.0)
    if idle:  # in every world: process sets' rounds go over gloo in MPI worlds too
        world.settle(timeout=5.0)
    state.reset()
    if owned and idle and dist.is_initialized():
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
    """True once the operation behind ``handle`` has finished (its peers included)."""
    if handle not in state.handles:
        raise ValueError(f"Handle {handle} was not created or has been cleared.")
    return bool(state.handles[handle].done())


def synchronize(handle: int) -> Any:
    """Wait for ``handle``'s operation; its result (a failure: HorovodInternalError)."""
    if handle not in state.handles:
        return None
    future = state.handles.pop(handle)
    state.names.pop(handle, None)
    try:
        return future.result()
    except (HorovodInternalError, ValueError):
        raise
    except RuntimeError as exc:
        raise HorovodInternalError(str(exc)) from exc


# ---------------------------------------------------------------- allreduce
def reduce_plain(output: torch.Tensor, op: int, ps: Any = None) -> None:
    """``output`` reduced in place over the set's members, no round (it was had)."""
    if ps is None and world.use_shm(output, op):
        world.shm_allreduce(output, op)
        return
    wide = widened(output)
    dist.all_reduce(wide, op=torch_op(op), group=ps.group if ps is not None else None)
    if wide is not output:
        output.copy_(wide)


def _allreduce_task(tensor: torch.Tensor, output: torch.Tensor, op: int, pre: float, post: float,
                    ps: Any) -> Any:
    def task() -> torch.Tensor:
        if output is not tensor:
            output.copy_(tensor)
        if pre != 1.0:
            scale(output, pre)
        head = header(ALLREDUCE, output, op, 0, pre, post)
        if ps is None and op != Adasum and state.channel == "shm" and world.use_shm(output, op):
            if world.shm_allreduce(output, op, head):  # e.g. some ranks joined: reduce again, with their zeros
                world.shm_allreduce(output, op)
            return finish_average(output, op, post, state.topology.size)  # type: ignore[union-attr]
        _group, size, _me = world.members(ps)
        if op == Adasum:
            world.negotiate(head, "allreduce", ps)
            output.copy_(adasum.reduce(output, ps))
            if post != 1.0:
                scale(output, post)
            return output
        if size > 1 and (ps is not None or state.channel != "shm") and world.inlines(output, op):
            world.inline_allreduce(output, op, head, ps)  # small: the data rides in the round itself
        else:
            world.negotiate(head, "allreduce", ps)
            reduce_plain(output, op, ps)
        return finish_average(output, op, post, size)

    return task


def _allreduce_async(tensor: torch.Tensor, output: torch.Tensor, op: int, pre: float, post: float,
                     name: str | None, process_set: Any, blocking: bool = False) -> Any:
    if state.topology is None:
        topo()
    ps = None if process_set is None else resolve_set(process_set, "Allreduce")
    if op == Adasum:
        adasum.check(tensor, ps)
    task = _allreduce_task(tensor, output, op, pre, post, ps)
    if blocking:
        if name is not None:
            check_name(name)
        return state.engine.run(task, name)
    return submit(task, name)


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                    op: int | None = None, prescale_factor: float = 1.0,
                    postscale_factor: float = 1.0, process_set: Any = None) -> int:
    output = torch.empty_like(tensor.detach(), memory_format=torch.contiguous_format)
    return _allreduce_async(tensor.detach(), output, resolve_op(op, average), prescale_factor, postscale_factor,
                            name, process_set)  # type: ignore[no-any-return]


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                     op: int | None = None, prescale_factor: float = 1.0,
                     postscale_factor: float = 1.0, process_set: Any = None) -> int:
    return _allreduce_async(tensor, tensor, resolve_op(op, average), prescale_factor,  # type: ignore[no-any-return]
                            postscale_factor, name, process_set)


class _AllreduceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, op: int, pre: float, post: float, name: str | None,  # type: ignore[override]
                process_set: Any) -> torch.Tensor:
        ctx.op, ctx.pre, ctx.post, ctx.process_set = op, pre, post, process_set
        output = torch.empty_like(tensor.detach(), memory_format=torch.contiguous_format)
        return _allreduce_async(tensor.detach(), output, op, pre, post, name,  # type: ignore[no-any-return]
                                process_set, blocking=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return (allreduce(grad, op=ctx.op, prescale_factor=ctx.pre, postscale_factor=ctx.post,
                          process_set=ctx.process_set), None, None, None, None, None)


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
              compression: Any = Compression.none, op: int | None = None,
              prescale_factor: float = 1.0, postscale_factor: float = 1.0,
              process_set: Any = None) -> torch.Tensor:
    """Reduce ``tensor`` over all ranks (Average by default); the input is not modified."""
    op = resolve_op(op, average)
    compressed, cctx = compression.compress(tensor)
    reduced = _AllreduceFn.apply(compressed, op, prescale_factor, postscale_factor, name, process_set)
    return compression.decompress(reduced, cctx)


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
               op: int | None = None, prescale_factor: float = 1.0,
               postscale_factor: float = 1.0, process_set: Any = None) -> torch.Tensor:
    return _allreduce_async(tensor, tensor, resolve_op(op, average), prescale_factor,  # type: ignore[no-any-return]
                            postscale_factor, name, process_set, blocking=True)


def grouped_allreduce(tensors: Sequence[torch.Tensor], average: bool | None = None,
                      name: str | None = None, compression: Any = Compression.none,
                      op: int | None = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0, process_set: Any = None) -> list[torch.Tensor]:
    return [allreduce(t, average, None, compression, op, prescale_factor, postscale_factor, process_set)
            for t in tensors]


def grouped_allreduce_(tensors: Sequence[torch.Tensor], average: bool | None = None,
                       name: str | None = None, op: int | None = None, prescale_factor: float = 1.0,
                       postscale_factor: float = 1.0, process_set: Any = None) -> list[torch.Tensor]:
    handles = [allreduce_async_(t, average, None, op, prescale_factor, postscale_factor, process_set)
               for t in tensors]
    return [synchronize(h) for h in handles]


def grouped_allreduce_async(tensors: Sequence[torch.Tensor], average: bool | None = None,
                            name: str | None = None, op: int | None = None, prescale_factor: float = 1.0,
                            postscale_factor: float = 1.0, process_set: Any = None) -> int:
    outputs = [torch.empty_like(t.detach(), memory_format=torch.contiguous_format) for t in tensors]
    tasks = [_allreduce_task(t.detach(), o, resolve_op(op, average), prescale_factor, postscale_factor,
                             resolve_set(process_set)) for t, o in zip(tensors, outputs)]
    return submit(lambda: [task() for task in tasks], name)


def grouped_allreduce_async_(tensors: Sequence[torch.Tensor], average: bool | None = None,
                             name: str | None = None, op: int | None = None, prescale_factor: float = 1.0,
                             postscale_factor: float = 1.0, process_set: Any = None) -> int:
    tasks = [_allreduce_task(t, t, resolve_op(op, average), prescale_factor, postscale_factor,
                             resolve_set(process_set)) for t in tensors]
    return submit(lambda: [task() for task in tasks], name)


def op_name(op: int) -> str:
    return OP_NAMES[op]


__all__ = [
    "Average", "Sum", "Adasum", "Min", "Max", "Product", "HorovodInternalError",
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size",
    "cross_rank", "cross_size", "is_homogeneous", "mpi_threads_supported", "mpi_enabled",
    "mpi_built", "gloo_enabled", "gloo_built", "nccl_built", "cuda_built", "rocm_built", "ccl_built", "ddl_built",
    "poll", "synchronize", "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
    "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_",
    "ProcessSet", "global_process_set", "add_process_set", "remove_process_set", "start_timeline", "stop_timeline",
]
