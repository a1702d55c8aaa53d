"""``DistributedOptimizer`` for the torch.distributed backend, with tensor fusion.

Gradients are reduced in fusion buckets while backward still runs: a hook on each
parameter marks its gradient ready, and a bucket is sent as soon as it and every
bucket before it are ready. Buckets are fixed up front (parameters in reverse order,
grouped by dtype, up to ``HOROVOD_FUSION_THRESHOLD`` bytes, 128 MiB by default, 0 for
no fusion), so every rank issues the same collectives in the same order.
``step()`` waits for the buckets, copies the results back and then steps.

Sparse gradients (``nn.Embedding(sparse=True)``) are densified into their bucket with
``sparse_as_dense=True``; otherwise each is reduced on its own as Horovod does (every
rank's indices and values gathered). With ``op=hvd.Adasum`` the optimizer is Horovod's
delta optimizer: each rank steps on its own gradients, and the parameter changes are
combined by Adasum.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from . import torchdist as ops
from .collectives import sparse_allreduce_async
from .compression import Compression
from .process_sets import resolve as resolve_set
from .world import members

DEFAULT_FUSION_THRESHOLD = 128 * 1024 * 1024


def fusion_threshold() -> int:
    return int(os.environ.get("HOROVOD_FUSION_THRESHOLD", DEFAULT_FUSION_THRESHOLD))


def make_buckets(params: Sequence[torch.Tensor], threshold: int) -> list[list[torch.Tensor]]:
    """Group parameters (already in launch order) into same-dtype buckets of ≤ threshold bytes."""
    buckets: list[list[torch.Tensor]] = []
    open_by_dtype: dict[torch.dtype, tuple[list[torch.Tensor], int]] = {}
    for param in params:
        nbytes = param.numel() * param.element_size()
        current, used = open_by_dtype.get(param.dtype, (None, 0))
        if current is None or threshold <= 0 or used + nbytes > threshold:
            current, used = [], 0
            buckets.append(current)
        current.append(param)
        open_by_dtype[param.dtype] = (current, used + nbytes)
    return buckets


class _Bucket:
    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.ready: set[int] = set()
        self.handle: int | None = None
        self.flat: torch.Tensor | None = None
        self.ctx: Any = None


class _DistributedMixin:
    """Mixed into the user's optimizer class; see ``DistributedOptimizer``."""

    def __init__(self, params: Any, named_parameters: Any, compression: Any,
                 backward_passes_per_step: int, op: int, gradient_predivide_factor: float,
                 sparse_as_dense: bool = False, process_set: Any = None) -> None:
        super().__init__(params)  # type: ignore[call-arg]
        self._sparse_as_dense = sparse_as_dense
        self._process_set = process_set
        self._sparse: dict[int, Any] = {}  # id(param) -> the function giving its reduced sparse gradient
        if op != ops.Average and gradient_predivide_factor != 1.0:
            raise ValueError("gradient_predivide_factor not supported with op != Average")
        self._compression = compression
        self._passes = backward_passes_per_step
        self._op = op
        self._pre = 1.0 / gradient_predivide_factor
        self._post = gradient_predivide_factor
        ordered = [p for group in self.param_groups for p in group["params"] if p.requires_grad]  # type: ignore[attr-defined]
        self._names = _check_names(named_parameters, ordered)
        self._buckets = [_Bucket(b) for b in make_buckets(ordered[::-1], fusion_threshold())]
        self._bucket_of = {id(p): (i, b) for i, b in enumerate(self._buckets) for p in b.params}
        self._counts: dict[int, int] = {id(p): 0 for p in ordered}
        self._next_launch = 0
        self._synchronized = False
        self._should_sync = True
        self._ordered = ordered
        outside = process_set is not None and not process_set.included()
        self._size = 1 if outside else members(resolve_set(process_set))[1]  # outside the set: a plain optimizer
        if self._size > 1 and op != ops.Adasum:
            for param in ordered:
                param.register_post_accumulate_grad_hook(self._grad_ready)

    # -- hooks and buckets
    def _grad_ready(self, param: torch.Tensor) -> None:
        key = id(param)
        self._counts[key] += 1
        if self._counts[key] < self._passes:
            return
        _index, bucket = self._bucket_of[key]
        bucket.ready.add(key)
        self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        while self._next_launch < len(self._buckets):
            bucket = self._buckets[self._next_launch]
            if not force and len(bucket.ready) < len(bucket.params):
                return
            self._launch(bucket)
            self._next_launch += 1

    def _launch(self, bucket: _Bucket) -> None:
        grads = []
        for param in bucket.params:
            if param.grad is None:  # unused this step: reduce zeros so all ranks agree
                param.grad = torch.zeros_like(param)
            if param.grad.is_sparse:
                if not self._sparse_as_dense:
                    self._sparse[id(param)] = sparse_allreduce_async(
                        param.grad, self._names[id(param)], self._op, self._process_set)
                    grads.append(torch.zeros(param.numel(), dtype=param.dtype, device=param.device))  # its place
                    continue
                param.grad = param.grad.to_dense()
            grads.append(param.grad.reshape(-1))
        flat = torch.cat(grads) if len(grads) > 1 else grads[0].clone()
        bucket.flat, bucket.ctx = self._compression.compress(flat)
        bucket.handle = ops.allreduce_async_(
            bucket.flat, op=self._op, prescale_factor=self._pre,
            postscale_factor=self._post if self._op == ops.Average else 1.0, process_set=self._process_set,
        )

    def synchronize(self) -> None:
        """Finish reducing every gradient (called by ``step`` unless done already)."""
        if self._size > 1 and self._op == ops.Adasum:
            return  # the delta optimizer reduces in step()
        if self._size > 1:
            self._launch_ready(force=True)
            for bucket in self._buckets:
                assert bucket.handle is not None
                reduced = self._compression.decompress(ops.synchronize(bucket.handle), bucket.ctx)
                offset = 0
                for param in bucket.params:
                    assert param.grad is not None
                    count = param.numel()
                    sparse = self._sparse.pop(id(param), None)
                    if sparse is not None:
                        param.grad = sparse()
                    else:
                        param.grad.copy_(reduced[offset : offset + count].view_as(param.grad))
                    offset += count
                bucket.ready.clear()
                bucket.handle = bucket.flat = None
        self._next_launch = 0
        self._counts = dict.fromkeys(self._counts, 0)
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Use after an explicit ``synchronize()`` so that ``step()`` does not reduce again."""
        self._should_sync = False
        try:
            yield
        finally:
            self._should_sync = True

    def _adasum_step(self, closure: Any) -> Any:
        """Horovod's delta optimizer: step locally, then combine the changes by Adasum."""
        starts = [param.detach().clone() for param in self._ordered]
        loss = super().step(closure)  # type: ignore[misc]
        handles = []
        for param, start in zip(self._ordered, starts):
            delta = (param.detach() - start).contiguous()
            compressed, ctx = self._compression.compress(delta)
            handles.append((ops.allreduce_async_(compressed, op=ops.Adasum, process_set=self._process_set), ctx))
        for param, start, (handle, ctx) in zip(self._ordered, starts, handles):
            delta = self._compression.decompress(ops.synchronize(handle), ctx)
            param.data.copy_(start + delta)
        return loss

    def step(self, closure: Any = None) -> Any:
        if self._op == ops.Adasum and self._size > 1:
            return self._adasum_step(closure)
        if self._should_sync:
            if self._synchronized:  # as Horovod: reduce again, and say why that is slow
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                              "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in "
                              "your code.", stacklevel=2)
            self.synchronize()
        self._synchronized = False
        return super().step(closure)  # type: ignore[misc]

    def zero_grad(self, set_to_none: bool = True) -> None:
        if any(b.handle is not None for b in self._buckets):
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() "
                                 "but before optimizer.step() or optimizer.synchronize().")
        super().zero_grad(set_to_none=set_to_none)  # type: ignore[misc]


def _check_names(named_parameters: Any, ordered: list[torch.Tensor]) -> dict[int, str]:
    if named_parameters is None:
        return {id(p): f"allreduce.noname.{i}" for i, p in enumerate(ordered)}
    named = list(named_parameters)
    if any(not isinstance(item, tuple) for item in named):
        raise ValueError("named_parameters should be a sequence of tuples (name, parameter), "
                         "usually produced by model.named_parameters().")
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise ValueError("Parameter names in named_parameters must be unique.")
    by_id = {id(p): name for name, p in named}
    missing = [p for p in ordered if id(p) not in by_id]
    if missing:
        raise ValueError(f"named_parameters was specified, but {len(missing)} optimizer "
                         "parameters were not named; pass model.named_parameters().")
    return by_id


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Any = None,
                         compression: Any = Compression.none, backward_passes_per_step: int = 1,
                         op: int = ops.Average, gradient_predivide_factor: float = 1.0,
                         num_groups: int = 0, groups: Any = None, sparse_as_dense: bool = False,
                         process_set: Any = None) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` applies gradients averaged over all ranks."""
    cls = type(optimizer.__class__.__name__, (_DistributedMixin, optimizer.__class__), {})
    return cls(optimizer.param_groups, named_parameters, compression,  # type: ignore[call-arg,no-any-return]
               backward_passes_per_step, op, gradient_predivide_factor, sparse_as_dense, process_set)
