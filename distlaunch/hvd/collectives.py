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

from .compression import Compression
from .core import (
    Average,
    HorovodInternalError,
    Sum,
    check_name,
    finish_average,
    register,
    scale,
    topo,
    torch_op,
    widened,
)
from .torchdist import allreduce, rank, size, synchronize

# ---------------------------------------------------------------- agreeing before a collective
MAX_DIMS = 8
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool)


def _describe(tensor: torch.Tensor, *extra: int) -> list[int]:
    """A fixed-size description of a tensor for the ranks to compare: extra values, the
    dtype, the number of dimensions and the dimensions."""
    code = DTYPES.index(tensor.dtype) if tensor.dtype in DTYPES else 99
    dims = list(tensor.shape)[:MAX_DIMS]
    return [*extra, code, tensor.dim(), *dims, *[-1] * (MAX_DIMS - len(dims))]


def _agree(mine: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's description (one small all_gather; the collective after it needs one
    of its own anyway: the first dimensions, the splits)."""
    local = torch.tensor(mine, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(local) for _ in range(size())]
    dist.all_gather(everyone, local)
    return [row.tolist() for row in everyone]


def _mismatch(op: str, rows: list[list[int]], extras: int, what: str,
              same: Callable[[list[int]], list[int]] | None = None) -> None:
    """HorovodInternalError on every rank alike when the ranks' tensors do not fit together.
    Rows are ``_describe`` lists with ``extras`` leading values; ``same`` picks what must
    be equal (default: all but the extras). Every rank sees every row, so all raise."""
    pick = same or (lambda row: row[extras:])

    def show(row: list[int]) -> str:
        code, ndim = row[extras], row[extras + 1]
        dtype = str(DTYPES[code]).replace("torch.", "") if code < len(DTYPES) else "other"
        return f"{dtype} {tuple(row[extras + 2: extras + 2 + ndim])}"

    for index, row in enumerate(rows[1:], start=1):
        if pick(row) != pick(rows[0]):
            raise HorovodInternalError(f"Mismatched {op}: rank 0 sent {show(rows[0])}, rank {index} sent {show(row)}; "
                                       f"every rank must send the same dtype and {what}")


# ---------------------------------------------------------------- allgather
def _allgather(tensor: torch.Tensor) -> torch.Tensor:
    topo()
    tensor = tensor.detach().contiguous()
    shaped = widened(tensor if tensor.dim() else tensor.reshape(1))
    rows = _agree(_describe(shaped.to(tensor.dtype) if not tensor.dim() else tensor), tensor.device)
    # the first dimension may differ; the dtype and the other dimensions may not
    _mismatch("allgather", rows, 0, "dimensions after the first", lambda row: [row[0], row[1], *row[3:]])
    counts = [row[2] for row in rows]
    padded = shaped.new_zeros((max(counts), *shaped.shape[1:]))
    padded[: shaped.shape[0]] = shaped
    parts = [torch.empty_like(padded) for _ in range(size())]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)]).to(tensor.dtype)


class _AllgatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.dim = tensor.shape[0]
        return _allgather(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        reduced = allreduce(grad, op=Average)
        dims = _allgather(torch.tensor([ctx.dim], dtype=torch.int64))
        offset = int(dims[: rank()].sum().item())
        return reduced.narrow(0, offset, ctx.dim)


def allgather(tensor: torch.Tensor, name: str | None = None, process_set: Any = None) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 (first dimensions may differ)."""
    return _AllgatherFn.apply(tensor)


def allgather_async(tensor: torch.Tensor, name: str | None = None, process_set: Any = None) -> int:
    output = _allgather(tensor)
    return register(None, output, lambda: output)


def grouped_allgather(tensors: Sequence[torch.Tensor], name: str | None = None,
                      process_set: Any = None) -> list[torch.Tensor]:
    return [allgather(t) for t in tensors]


def allgather_object(obj: Any, name: str | None = None, process_set: Any = None) -> list[Any]:
    topo()
    gathered: list[Any] = [None] * size()
    dist.all_gather_object(gathered, obj)
    return gathered


# ---------------------------------------------------------------- broadcast
def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                     process_set: Any = None) -> int:
    topo()
    check_name(name)
    rows = _agree(_describe(tensor.data, root_rank), tensor.device)
    roots = [row[0] for row in rows]
    if len(set(roots)) > 1:
        raise HorovodInternalError(f"Mismatched broadcast root ranks: the ranks named {roots} as root; every rank "
                                   "must pass the same root_rank")
    _mismatch("broadcast", rows, 1, "shape")
    wide = widened(tensor.data)
    work = dist.broadcast(wide, src=root_rank, async_op=True)

    def finish() -> torch.Tensor:
        if wide is not tensor.data:
            tensor.data.copy_(wide)
        return tensor

    return register(work, tensor, finish, name)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                    process_set: Any = None) -> int:
    return broadcast_async_(tensor.detach().clone(), root_rank)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set: Any = None) -> torch.Tensor:
    synchronize(broadcast_async_(tensor, root_rank))
    return tensor


class _BroadcastFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, root_rank: int) -> torch.Tensor:  # type: ignore[override]
        ctx.root_rank = root_rank
        return broadcast_(tensor.detach().clone(), root_rank)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        reduced = allreduce(grad, op=Average)  # Horovod's rule: the root gets the average
        if rank() != ctx.root_rank:
            reduced = reduced * 0
        return reduced, None


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None,
              process_set: Any = None) -> torch.Tensor:
    """``root_rank``'s tensor on every rank; the input is not modified."""
    return _BroadcastFn.apply(tensor, root_rank)


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None, process_set: Any = None) -> Any:
    topo()
    box = [obj if rank() == root_rank else None]
    dist.broadcast_object_list(box, src=root_rank)
    return box[0]


def broadcast_parameters(params: Any, root_rank: int) -> None:
    """Make every rank's parameters equal to ``root_rank``'s (state_dict or named list)."""
    if isinstance(params, dict):
        items: Iterable[tuple[str, Any]] = sorted(params.items())
    elif isinstance(params, list):
        items = params
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
def _alltoall(tensor: torch.Tensor, splits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    topo()
    n = size()
    tensor = tensor.detach().contiguous()
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
    rows = _agree(_describe(tensor, *send), tensor.device)  # every rank's splits, dtype and shape
    # the first dimension may differ; the dtype and the other dimensions may not
    _mismatch("alltoall", rows, n, "dimensions after the first", lambda row: [row[n], row[n + 1], *row[n + 3:]])
    me = rank()
    recv = [row[me] for row in rows]
    recv_t = torch.tensor(recv, dtype=torch.int64)
    wide = widened(tensor)
    output = wide.new_empty((sum(recv), *tensor.shape[1:]))
    dist.all_to_all_single(output, wide, recv, send)
    return output.to(tensor.dtype), recv_t.to(torch.int32)


class _AlltoallFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, splits: torch.Tensor | None) -> Any:  # type: ignore[override]
        output, received = _alltoall(tensor, splits)
        ctx.received = received
        if splits is None:
            return output
        ctx.mark_non_differentiable(received)
        return output, received

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_ignored: Any) -> tuple[Any, ...]:  # type: ignore[override]
        back, _ = _alltoall(grad, ctx.received)
        return back, None


def alltoall(tensor: torch.Tensor, splits: torch.Tensor | None = None, name: str | None = None,
             process_set: Any = None) -> Any:
    """Send slice i of dim 0 to rank i; returns the gathered slices (and received splits
    when ``splits`` was given)."""
    return _AlltoallFn.apply(tensor, splits)


def alltoall_async(tensor: torch.Tensor, splits: torch.Tensor | None = None, name: str | None = None,
                   process_set: Any = None) -> int:
    output, received = _alltoall(tensor, splits)
    return register(None, output, lambda: (output, received))


# ---------------------------------------------------------------- reducescatter
def _rows(total: int, n: int) -> list[int]:
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def _reducescatter(tensor: torch.Tensor, op: int, pre: float, post: float) -> torch.Tensor:
    topo()
    if tensor.dim() == 0:
        raise ValueError("reducescatter needs a tensor with at least one dimension")
    work = tensor.detach().clone().contiguous()
    scale(work, pre)
    dist.all_reduce(work, op=torch_op(op))
    rows = _rows(work.shape[0], size())
    start = sum(rows[: rank()])
    mine = work.narrow(0, start, rows[rank()]).clone()
    return finish_average(mine, op, post)


class _ReducescatterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, op: int, pre: float, post: float) -> torch.Tensor:  # type: ignore[override]
        ctx.op, ctx.pre, ctx.post = op, pre, post
        return _reducescatter(tensor, op, pre, post)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        if ctx.op == Sum:
            grad = grad * size()
        grad = grad * ctx.pre * ctx.post
        return allgather(grad), None, None, None


def reducescatter(tensor: torch.Tensor, name: str | None = None, compression: Any = Compression.none,
                  op: int = Average, process_set: Any = None, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """Reduce over all ranks, then give rank i its block of rows (lower ranks get the extra)."""
    compressed, cctx = compression.compress(tensor)
    reduced = _ReducescatterFn.apply(compressed, op, prescale_factor, postscale_factor)
    return compression.decompress(reduced, cctx)


def reducescatter_async(tensor: torch.Tensor, name: str | None = None, op: int = Average,
                        process_set: Any = None, prescale_factor: float = 1.0,
                        postscale_factor: float = 1.0) -> int:
    output = _reducescatter(tensor, op, prescale_factor, postscale_factor)
    return register(None, output, lambda: output)


def grouped_reducescatter(tensors: Sequence[torch.Tensor], name: str | None = None,
                          compression: Any = Compression.none, op: int = Average, process_set: Any = None,
                          prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> list[torch.Tensor]:
    """``reducescatter`` of each tensor, in order."""
    return [reducescatter(t, None, compression, op, process_set, prescale_factor, postscale_factor)
            for t in tensors]


def grouped_reducescatter_async(tensors: Sequence[torch.Tensor], name: str | None = None, op: int = Average,
                                process_set: Any = None, prescale_factor: float = 1.0,
                                postscale_factor: float = 1.0) -> int:
    outputs = [_reducescatter(t, op, prescale_factor, postscale_factor) for t in tensors]
    return register(None, outputs[0] if outputs else torch.empty(0), lambda: outputs, name)


# ---------------------------------------------------------------- sparse
def sparse_allreduce_async(tensor: torch.Tensor, name: str, op: int, process_set: Any = None) -> Any:
    """Horovod's sparse reduction: every rank's indices and values gathered (a sparse
    tensor of the sum, or average); returns a function that gives the result."""
    sparse = tensor.coalesce() if not tensor.is_coalesced() else tensor
    indices = allgather(sparse.indices().transpose(0, 1).contiguous())
    values = allgather(sparse.values())

    def handle() -> torch.Tensor:
        reduced = values / size() if op == Average else values
        if indices.dim() == 0 or reduced.dim() == 0:
            return tensor.new().resize_as_(tensor)
        return torch.sparse_coo_tensor(indices.transpose(0, 1), reduced, tensor.size())

    return handle


# ---------------------------------------------------------------- barrier / join
def barrier(process_set: Any = None) -> None:
    topo()
    dist.barrier()


def join(device: int = -1) -> int:
    """Wait until every rank has joined; return the rank that joined last.

    Unlike Horovod, ranks that joined early do not stand in (with zeros) for collectives
    the others still issue: every rank must have issued the same collectives before
    calling join() (true for equal-sized shards). For uneven data, use real Horovod.
    """
    import time

    topo()
    stamp = torch.tensor([time.time()], dtype=torch.float64)
    stamps = [torch.empty_like(stamp) for _ in range(size())]
    dist.all_gather(stamps, stamp)
    return int(torch.stack(stamps).argmax().item())


__all__ = [
    "allgather", "allgather_async", "grouped_allgather", "allgather_object", "broadcast", "broadcast_",
    "broadcast_async", "broadcast_async_", "broadcast_object", "broadcast_parameters",
    "broadcast_optimizer_state", "alltoall", "alltoall_async", "reducescatter", "reducescatter_async",
    "grouped_reducescatter", "grouped_reducescatter_async", "sparse_allreduce_async", "barrier", "join",
]
