"""Adasum (Maleki et al., "Scaling Distributed Training with Adaptive Summation"), as
Horovod combines gradients with ``op=hvd.Adasum`` on CPU.

Two vectors combine as ``(1 - a.b / 2|a|^2) a + (1 - a.b / 2|b|^2) b``: parallel parts
are averaged, orthogonal parts added. Ranks combine in Horovod's recursive-halving
order: neighbours first (0+1, 2+3, ...), then pairs of pairs at distance 2, and so on,
so the result is the same on every rank and the same as Horovod's. Sums in float64.
Each tensor is its own vector (a fused buffer is not one: Horovod keeps the boundaries).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .core import HorovodInternalError
from .world import members


def check(tensor: torch.Tensor, ps: Any = None) -> None:
    """Horovod's limits, with its words: global set, power-of-two ranks, floating point."""
    if ps is not None:
        raise NotImplementedError("Adasum does not support non-global process sets yet.")
    size = members(None)[1]
    if size & (size - 1):
        raise NotImplementedError("Running Adasum with non-power of 2 ranks is not supported yet.")
    if not tensor.dtype.is_floating_point:
        raise HorovodInternalError("Unsupported data type")


def combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dot = float(a @ b)
    aa, bb = float(a @ a), float(b @ b)
    ca = 1.0 - dot / (2 * aa) if aa else 1.0
    cb = 1.0 - dot / (2 * bb) if bb else 1.0
    return ca * a + cb * b


def reduce(tensor: torch.Tensor, ps: Any = None) -> torch.Tensor:
    """Every member's ``tensor`` combined by Adasum (same shape and dtype as ``tensor``)."""
    group, size, _me = members(ps)
    flat = tensor.detach().reshape(-1).contiguous()
    parts = [torch.empty_like(flat) for _ in range(size)]
    dist.all_gather(parts, flat, group=group)
    level = [p.double() for p in parts]
    while len(level) > 1:
        level = [combine(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0].to(tensor.dtype).reshape(tensor.shape)
