"""``hvd.SyncBatchNorm``: batch normalisation whose statistics are those of the whole
batch across ranks (or a process set's ranks), as Horovod's is.

In training, each rank's per-channel sum, sum of squares and count are summed over the
ranks by one differentiable allreduce, so the backward pass sums the statistics'
gradients over the ranks as well: every rank's input gradient equals that slice of the
gradient one process would compute on the concatenated batch. Running statistics use
the global mean and unbiased variance. In eval mode it is plain batch norm.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .core import Sum
from .process_sets import resolve as resolve_set
from .torchdist import allreduce
from .world import members


class SyncBatchNorm(_BatchNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_set: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_set = process_set

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _factor(self) -> float:
        """torch's BatchNorm rule for the running statistics' update weight."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or members(resolve_set(self.process_set))[1] == 1:
            return super().forward(input)
        factor = self._factor()
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        count = torch.tensor([input.numel() / channels], dtype=input.dtype, device=input.device)
        local = torch.cat([input.sum(dims), (input * input).sum(dims), count])
        total = allreduce(local, op=Sum, process_set=self.process_set, name=None)
        n = total[-1]
        mean = total[:channels] / n
        var = total[channels: 2 * channels] / n - mean * mean
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * (n.detach() / (n.detach() - 1)) if float(n) > 1 else var.detach()
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        view = [1, channels] + [1] * (input.dim() - 2)
        out = (input - mean.view(view)) * torch.rsqrt(var.view(view) + self.eps)
        if self.affine:
            out = out * self.weight.view(view) + self.bias.view(view)
        return out
