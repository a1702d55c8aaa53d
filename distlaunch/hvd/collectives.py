"""Horovod's gather, broadcast, alltoall, reducescatter, join and object collectives on
torch.distributed, with the same results, shapes and gradients as horovod.torch 0.28.

Semantics kept from Horovod: allgather concatenates along dim 0 and allows different
first dimensions; alltoall splits dim 0 (``splits`` must be int32) and returns
``(output, received_splits)`` when splits were given; reducescatter gives lower ranks
one extra row when dim 0 does not divide evenly; gradients flow as Horovod's do.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from . import adasum
from .compression import Compression
from .core import (
    Adasum,
    Average,
    HorovodInternalError,
    Sum,
    byte_tensor,
    check_name,
    finish_average,
    run,
    scale,
    state,
    submit,
    topo,
    widened,
)
from .negotiate import (
    ALLGATHER,
    ALLREDUCE,
    ALLTOALL,
    BARRIER,
    BROADCAST,
    JOINED,
    KIND_NAMES,
    REDUCESCATTER,
    Row,
    check,
    header,
    rows,
)
from .process_sets import resolve as resolve_set
from .torchdist import allreduce, rank, reduce_plain, size, synchronize
from .world import exchange, inlined, members, negotiate


def _start(task: Callable[[], Any], name: str | None, blocking: bool) -> Any:
    if blocking:
        check_name(name)
        return run(task, name)
    return submit(task, name)


# ---------------------------------------------------------------- allgather
def _gather_rows(wide: torch.Tensor, counts: list[int], ps: Any) -> torch.Tensor:
    """Every member's rows (``counts[i]`` from member i), concatenated."""
    group, n, _me = members(ps)
    padded = wide.new_zeros((max(counts), *wide.shape[1:]))
    padded[: wide.shape[0]] = wide
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def _counts(everyone: list[Row] | None, mine: int, n: int) -> list[int]:
    return [mine] * n if everyone is None else [row.dims[0] for row in everyone]


def _allgather_task(tensor: torch.Tensor, ps: Any) -> Callable[[], tuple[torch.Tensor, list[int]]]:
    def task() -> tuple[torch.Tensor, list[int]]:
        flat = tensor.detach().contiguous()
        shaped = flat if flat.dim() else flat.reshape(1)
        everyone, _joined = negotiate(header(ALLGATHER, shaped), "allgather", ps)
        counts = _counts(everyone, shaped.shape[0], members(ps)[1])
        return _gather_rows(widened(shaped), counts, ps).to(flat.dtype), counts

    return task


class _AllgatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, name: str | None, process_set: Any) -> torch.Tensor:  # type: ignore[override]
        ps = resolve_set(process_set, "Allgather")
        output, counts = _start(_allgather_task(tensor, ps), name, True)
        ctx.process_set, ctx.counts, ctx.me = process_set, counts, members(ps)[2]
        return output  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        reduced = allreduce(grad, op=Average, process_set=ctx.process_set)
        offset = sum(ctx.counts[: ctx.me])
        return reduced.narrow(0, offset, ctx.counts[ctx.me]), None, None


def allgather(tensor: torch.Tensor, name: str | None = None, process_set: Any = None) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 (first dimensions may differ)."""
    return _AllgatherFn.apply(tensor, name, process_set)


def allgather_async(tensor: torch.Tensor, name: str | None = None, process_set: Any = None) -> int:
    task = _allgather_task(tensor, resolve_set(process_set, "Allgather"))
    return submit(lambda: task()[0], name)


def grouped_allgather(tensors: Sequence[torch.Tensor], name: str | None = None,
                      process_set: Any = None) -> list[torch.Tensor]:
    return [allgather(t, process_set=process_set) for t in tensors]


def grouped_allgather_async(tensors: Sequence[torch.Tensor], name: str | None = None,
                            process_set: Any = None) -> int:
    tasks = [_allgather_task(t, resolve_set(process_set, "Allgather")) for t in tensors]
    return submit(lambda: [task()[0] for task in tasks], name)


def _pickler() -> Any:
    try:
        import cloudpickle  # what Horovod uses: lambdas and local classes too

        return cloudpickle
    except ImportError:
        import pickle

        return pickle


def allgather_object(obj: Any, name: str | None = None, process_set: Any = None) -> list[Any]:
    """Every rank's picklable object, in rank order."""
    topo()
    pickler = _pickler()
    data = byte_tensor(pickler.dumps(obj))
    gathered, counts = _start(_allgather_task(data, resolve_set(process_set, "Allgather")), name, True)
    out, offset = [], 0
    for count in counts:
        out.append(pickler.loads(gathered[offset: offset + count].numpy().tobytes()))
        offset += count
    return out


# ---------------------------------------------------------------- broadcast
def _broadcast_task(tensor: torch.Tensor, root_rank: int, ps: Any) -> Callable[[], torch.Tensor]:
    _check_root(root_rank, ps)

    def task() -> torch.Tensor:
        negotiate(header(BROADCAST, tensor.data, root=root_rank), "broadcast", ps)
        _send_or_receive(tensor.data, root_rank, ps)
        return tensor

    return task


def _check_root(root_rank: int, ps: Any) -> None:
    """Horovod's rule: root_rank is a global rank, and a member of the set."""
    if root_rank not in (ps.ranks if ps is not None else range(size())):
        raise ValueError(f"broadcast received invalid root rank {root_rank} for provided process set")


def _send_or_receive(tensor: torch.Tensor, root_rank: int, ps: Any) -> None:
    group, _n, _me = members(ps)
    wide = widened(tensor)
    dist.broadcast(wide, src=root_rank, group=group)
    if wide is not tensor:
        tensor.copy_(wide)


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                     process_set: Any = None) -> int:
    return submit(_broadcast_task(tensor, root_rank, resolve_set(process_set, "Broadcast")), name)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                    process_set: Any = None) -> int:
    return broadcast_async_(tensor.detach().clone(), root_rank, name, process_set)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set: Any = None) -> torch.Tensor:
    return _start(_broadcast_task(tensor, root_rank, resolve_set(process_set, "Broadcast")), name, True)  # type: ignore[no-any-return]


class _BroadcastFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, root_rank: int, name: str | None,  # type: ignore[override]
                process_set: Any) -> torch.Tensor:
        ctx.root_rank, ctx.process_set = root_rank, process_set
        return broadcast_(tensor.detach().clone(), root_rank, name, process_set)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        reduced = allreduce(grad, op=Average, process_set=ctx.process_set)  # Horovod's rule: the root gets the average
        if rank() != ctx.root_rank:
            reduced = reduced * 0
        return reduced, None, None, None


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None,
              process_set: Any = None) -> torch.Tensor:
    """``root_rank``'s tensor on every rank; the input is not modified."""
    return _BroadcastFn.apply(tensor, root_rank, name, process_set)


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None, process_set: Any = None) -> Any:
    """``root_rank``'s picklable object on every rank."""
    topo()
    pickler = _pickler()
    ps = resolve_set(process_set, "Broadcast")
    mine = rank() == root_rank
    data = byte_tensor(pickler.dumps(obj)) if mine else None
    count = torch.tensor([data.numel() if data is not None else 0], dtype=torch.int64)
    _start(_broadcast_task(count, root_rank, ps), None, True)
    if data is None:
        data = torch.empty(int(count.item()), dtype=torch.uint8)
    _start(_broadcast_task(data, root_rank, ps), None, True)
    return pickler.loads(data.numpy().tobytes())


def broadcast_parameters(params: Any, root_rank: int) -> None:
    """Make every rank's parameters equal to ``root_rank``'s (state_dict or named list)."""
    if isinstance(params, dict):
        items: Iterable[tuple[str, Any]] = sorted(params.items())
    elif isinstance(params, list):  # (name, tensor) pairs, or bare tensors as Horovod also takes
        items = [item if isinstance(item, tuple) else (None, item) for item in params]
    else:
        raise ValueError(f"invalid params of type: {type(params)}")
    handles = [broadcast_async_(value, root_rank) for _name, value in items if isinstance(value, torch.Tensor)]
    for handle in handles:
        synchronize(handle)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int, model: Any = None) -> None:
    """Make every rank's optimizer state (moments, step counts, hyper-parameters) root's.
    A fresh optimizer (no state yet) first takes one step on zero gradients, as with
    Horovod, so that the state exists and matches everywhere."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("cannot broadcast torch.optim.LBFGS state")
    if not optimizer.state_dict()["state"]:
        sparse = {id(p) for m in (model.modules() if model is not None else ())
                  if isinstance(m, torch.nn.Embedding) and m.sparse for p in m.parameters()}
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad:
                    param.grad = param.data.new(param.size()).zero_()
                    if isinstance(optimizer, torch.optim.SparseAdam) or id(param) in sparse:
                        param.grad = param.grad.to_sparse()
        _base_step(optimizer)
        if not optimizer.state_dict()["state"]:
            return  # a stateless optimizer: nothing to send
    state = broadcast_object(optimizer.state_dict() if rank() == root_rank else None, root_rank)
    if rank() != root_rank:
        optimizer.load_state_dict(state)


def _base_step(optimizer: torch.optim.Optimizer) -> None:
    """The wrapped torch optimizer's own step (a DistributedOptimizer's step would reduce)."""
    from .optimizer import _DistributedMixin

    if isinstance(optimizer, _DistributedMixin):
        base = next(c for c in type(optimizer).__mro__[1:]
                    if issubclass(c, torch.optim.Optimizer) and not issubclass(c, _DistributedMixin))
        base.step(optimizer)
    else:
        optimizer.step()


# ---------------------------------------------------------------- alltoall
def _alltoall_task(tensor: torch.Tensor, splits: torch.Tensor | None,
                   ps: Any) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    group, n, me = members(ps)
    if splits is None:
        if tensor.shape[0] % n:
            raise ValueError(f"alltoall: the first dimension ({tensor.shape[0]}) cannot be split evenly "
                             f"over {n} ranks; pass splits")
        send = [tensor.shape[0] // n] * n
    else:
        if splits.dtype != torch.int32:
            raise ValueError("alltoall expects splits to contain 32-bit integer elements.")
        send = [int(v) for v in splits.tolist()]
        if len(send) != n or sum(send) != tensor.shape[0] or min(send) < 0:
            raise ValueError(f"alltoall: splits {send} must have {n} non-negative entries summing to "
                             f"the first dimension ({tensor.shape[0]})")

    def task() -> tuple[torch.Tensor, torch.Tensor]:
        flat = tensor.detach().contiguous()
        negotiate(header(ALLTOALL, flat), "alltoall", ps)
        mine = torch.tensor(send, dtype=torch.int64)
        everyone = [torch.empty_like(mine) for _ in range(n)]
        dist.all_gather(everyone, mine, group=group)
        recv = [int(row[me]) for row in everyone]
        wide = widened(flat)
        output = wide.new_empty((sum(recv), *flat.shape[1:]))
        dist.all_to_all_single(output, wide, recv, send, group=group)
        return output.to(flat.dtype), torch.tensor(recv, dtype=torch.int32)

    return task


class _AlltoallFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, splits: torch.Tensor | None, name: str | None,  # type: ignore[override]
                process_set: Any) -> Any:
        output, received = _start(_alltoall_task(tensor, splits, resolve_set(process_set, "Alltoall")), name, True)
        ctx.received, ctx.process_set = received, process_set
        if splits is None:
            return output
        ctx.mark_non_differentiable(received)
        return output, received

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_ignored: Any) -> tuple[Any, ...]:  # type: ignore[override]
        back, _ = run(_alltoall_task(grad, ctx.received, resolve_set(ctx.process_set)))
        return back, None, None, None


def alltoall(tensor: torch.Tensor, splits: torch.Tensor | None = None, name: str | None = None,
             process_set: Any = None) -> Any:
    """Send slice i of dim 0 to rank i; returns the gathered slices (and received splits
    when ``splits`` was given)."""
    return _AlltoallFn.apply(tensor, splits, name, process_set)


def alltoall_async(tensor: torch.Tensor, splits: torch.Tensor | None = None, name: str | None = None,
                   process_set: Any = None) -> int:
    return submit(_alltoall_task(tensor, splits, resolve_set(process_set, "Alltoall")), name)


# ---------------------------------------------------------------- reducescatter
def _rows(total: int, n: int) -> list[int]:
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def _reducescatter_task(tensor: torch.Tensor, op: int, pre: float, post: float,
                        ps: Any) -> Callable[[], torch.Tensor]:
    if tensor.dim() == 0:
        raise ValueError("reducescatter needs a tensor with at least one dimension")

    def task() -> torch.Tensor:
        _group, n, me = members(ps)
        work = tensor.detach().clone().contiguous()
        scale(work, pre)
        negotiate(header(REDUCESCATTER, work, op, 0, pre, post), "reducescatter", ps)
        reduce_plain(work, op, ps)
        rows = _rows(work.shape[0], n)
        mine = work.narrow(0, sum(rows[:me]), rows[me]).clone()
        return finish_average(mine, op, post, n)

    return task


class _ReducescatterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, op: int, pre: float, post: float, name: str | None,  # type: ignore[override]
                process_set: Any) -> torch.Tensor:
        ctx.op, ctx.pre, ctx.post, ctx.process_set = op, pre, post, process_set
        return _start(_reducescatter_task(tensor, op, pre, post, resolve_set(process_set, "Reducescatter")),  # type: ignore[no-any-return]
                      name, True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        if ctx.op == Sum:
            grad = grad * members(resolve_set(ctx.process_set))[1]
        grad = grad * ctx.pre * ctx.post
        return allgather(grad, process_set=ctx.process_set), None, None, None, None, None


def reducescatter(tensor: torch.Tensor, name: str | None = None, compression: Any = Compression.none,
                  op: int = Average, process_set: Any = None, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """Reduce over all ranks, then give rank i its block of rows (lower ranks get the extra)."""
    compressed, cctx = compression.compress(tensor)
    reduced = _ReducescatterFn.apply(compressed, op, prescale_factor, postscale_factor, name, process_set)
    return compression.decompress(reduced, cctx)


def reducescatter_async(tensor: torch.Tensor, name: str | None = None, op: int = Average,
                        process_set: Any = None, prescale_factor: float = 1.0,
                        postscale_factor: float = 1.0) -> int:
    ps = resolve_set(process_set, "Reducescatter")
    return submit(_reducescatter_task(tensor, op, prescale_factor, postscale_factor, ps), name)


def grouped_reducescatter(tensors: Sequence[torch.Tensor], name: str | None = None,
                          compression: Any = Compression.none, op: int = Average, process_set: Any = None,
                          prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> list[torch.Tensor]:
    """``reducescatter`` of each tensor, in order."""
    return [reducescatter(t, None, compression, op, process_set, prescale_factor, postscale_factor)
            for t in tensors]


def grouped_reducescatter_async(tensors: Sequence[torch.Tensor], name: str | None = None, op: int = Average,
                                process_set: Any = None, prescale_factor: float = 1.0,
                                postscale_factor: float = 1.0) -> int:
    tasks = [_reducescatter_task(t, op, prescale_factor, postscale_factor, resolve_set(process_set, "Reducescatter"))
             for t in tensors]
    return submit(lambda: [task() for task in tasks], name)


# ---------------------------------------------------------------- sparse
def sparse_allreduce_async(tensor: torch.Tensor, name: str, op: int, process_set: Any = None) -> Any:
    """Horovod's sparse reduction: every rank's indices and values gathered (a sparse
    tensor of the sum, or average); returns a function that waits and gives the result."""
    sparse = tensor.coalesce() if not tensor.is_coalesced() else tensor
    indices_handle = allgather_async(sparse.indices().transpose(0, 1).contiguous(), name=f"{name}.indices",
                                     process_set=process_set)
    values_handle = allgather_async(sparse.values(), name=f"{name}.values", process_set=process_set)
    n = members(resolve_set(process_set, "Allgather"))[1]

    def handle() -> torch.Tensor:
        values = synchronize(values_handle)
        indices = synchronize(indices_handle)
        if op == Average:
            values = values / n
        if indices.dim() == 0 or values.dim() == 0:
            return tensor.new().resize_as_(tensor)
        return torch.sparse_coo_tensor(indices.transpose(0, 1), values, tensor.size())

    return handle


# ---------------------------------------------------------------- barrier / join
def barrier(process_set: Any = None) -> None:
    """Return once every member has called barrier (the round itself is the meeting)."""
    ps = resolve_set(process_set, "Barrier")
    run(lambda: negotiate(header(BARRIER), "barrier", ps))


def join(device: int = -1) -> int:
    """This rank has run out of work: until every rank has joined, stand in for it with
    zeros in the others' allreduces (their Average still divides by every rank), as
    Horovod does; other collectives fail on the active ranks meanwhile. Returns the rank
    that joined last."""
    topo()
    return run(lambda: _join_loop(device))  # type: ignore[no-any-return]


def _join_loop(device: int) -> int:
    n = size()
    mine = header(JOINED, joined=1, join_round=state.rounds)
    while True:
        everyone = rows(exchange(mine), n)
        if all(row.joined for row in everyone):
            return max(range(n), key=lambda i: (everyone[i].join_round, i))
        active = next(row for row in everyone if not row.joined)
        try:
            check(everyone[rank()], everyone, KIND_NAMES.get(active.kind, "collective"))
        except HorovodInternalError:
            continue  # the active ranks raise it; this one keeps standing by
        if active.kind == ALLREDUCE and not (state.channel != "shm" and inlined(active)):
            on = torch.device("cuda", device if device >= 0 else torch.cuda.current_device()) if active.cuda \
                else torch.device("cpu")
            zeros = torch.zeros(active.numel, dtype=active.torch_dtype, device=on)
            if active.op == Adasum:  # a zero vector changes nothing
                adasum.reduce(zeros)
            else:
                reduce_plain(zeros, active.op)
        # BARRIER: the round was all of it


__all__ = [
    "allgather", "allgather_async", "grouped_allgather", "grouped_allgather_async", "allgather_object",
    "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "broadcast_object", "broadcast_parameters",
    "broadcast_optimizer_state", "alltoall", "alltoall_async", "reducescatter", "reducescatter_async",
    "grouped_reducescatter", "grouped_reducescatter_async", "sparse_allreduce_async", "barrier", "join",
]
