"""Per-rank loop of ``distlaunch bench train``: Horovod's synthetic benchmark
(``pytorch_synthetic_benchmark.py``'s shape: DistributedOptimizer, parameters and
optimizer state broadcast from rank 0, timed iterations of forward, backward and step on
random data) on a CIFAR-size ResNet-18 (no torchvision needed) or a small transformer.

    python -m distlaunch.bench.train, with the environment:
    RUNTIME=hvd  MODEL=resnet18|transformer  (under distlaunch run, mpirun or horovodrun)
    RUNTIME=ddp  (under torchrun: torch DistributedDataParallel, gloo)
    RUNTIME=none (under distlaunch run or mpirun: every rank trains alone, no
                  communication after the start barrier; the ceiling any runtime can
                  reach with this many ranks on this host)

BATCH (32), ITERS (5 per timed batch), BATCHES (4 timed batches). Every runtime's
ranks meet in a barrier after the warm-up step, so timing starts together. Rank 0
prints ``RESULT {json}`` with samples/s per timed batch of iterations.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet18(nn.Module):
    """The CIFAR variant (3×3 stem, no max-pool): 11.2 M parameters."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


class Transformer(nn.Module):
    """Four pre-norm encoder blocks, width 256, 4 heads, on 128 tokens (3.67 M parameters)."""

    def __init__(self, vocab: int = 1000, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens)))


def main() -> None:
    runtime, model_name = os.environ.get("RUNTIME", "hvd"), os.environ.get("MODEL", "resnet18")
    batch, iters, batches = (int(os.environ.get(k, d)) for k, d in (("BATCH", "32"), ("ITERS", "5"),
                                                                      ("BATCHES", "4")))
    torch.manual_seed(0)
    model: nn.Module = ResNet18() if model_name == "resnet18" else Transformer()
    if model_name == "resnet18":
        data, target = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    else:
        data, target = torch.randint(0, 1000, (batch, 128)), torch.randint(0, 1000, (batch, 128))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    barrier: Callable[[], object]
    if runtime == "none":
        from mpi4py import MPI  # only for the start barrier

        from ..rank.rankinfo import from_environ

        info = from_environ()
        rank, size, what, barrier = info.rank, info.size, "no communication", MPI.COMM_WORLD.Barrier
    elif runtime == "ddp":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, size, what, barrier = dist.get_rank(), dist.get_world_size(), "torch DDP (gloo)", dist.barrier
        model = nn.parallel.DistributedDataParallel(model)
    else:
        import distlaunch.hvd as hvd

        hvd.init()
        rank, size, barrier = hvd.rank(), hvd.size(), hvd.barrier
        what = f"distlaunch.hvd, {hvd.backend()} backend"
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def step() -> None:
        optimizer.zero_grad()
        output = model(data)
        loss = F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
        loss.backward()
        optimizer.step()

    step()  # warm-up
    barrier()
    rates = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(iters):
            step()
        rates.append(batch * iters * size / (time.perf_counter() - start))
    if rank == 0:
        print("RESULT " + json.dumps({"runtime": what, "model": model_name, "ranks": size, "rates": rates}),
              flush=True)


if __name__ == "__main__":
    main()
