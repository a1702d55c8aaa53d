"""Test payload for distlaunch.checkpoint through hvd.elastic: a tiny model trained with
hvd.DistributedOptimizer (SGD with momentum) for --epochs epochs, committed after each.

Each rank starts from its own random weights (hvd.elastic.run's sync must make them rank
0's) and its own data, the same for a given (rank, epoch) in every run. With
--crash-after K, rank 1 exits with code 3 right after committing epoch K, on a job's
first attempt only ($DISTLAUNCH_RESTART_COUNT 0). Every rank prints (exact float reprs):
  start epoch E restart R params P momentum M    (after resume and sync)
  committed epoch E params P momentum M
  final epoch E params P momentum M
"""
import argparse
import os

import torch

import distlaunch.hvd as hvd

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--crash-after", type=int, default=None)
args = parser.parse_args()

hvd.init()
restart = int(os.environ.get("DISTLAUNCH_RESTART_COUNT", "0"))
torch.manual_seed(100 + hvd.rank())
model = torch.nn.Linear(4, 1)
optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                     named_parameters=model.named_parameters())
target = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def sums() -> str:
    params = sum(float(p.detach().double().sum()) for p in model.parameters())
    momentum = sum(float(value.double().sum()) for per_param in optimizer.state.values()
                   for value in per_param.values() if torch.is_tensor(value))
    return f"params {params!r} momentum {momentum!r}"


state = hvd.elastic.TorchState(model, optimizer, epoch=0)


@hvd.elastic.run
def train(state: hvd.elastic.TorchState) -> None:
    print(f"start epoch {state.epoch} restart {restart} {sums()}", flush=True)
    while state.epoch < args.epochs:
        epoch = state.epoch
        data = torch.Generator().manual_seed(1000 * epoch + hvd.rank())
        for _batch in range(3):
            x = torch.randn(8, 4, generator=data)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), x @ target).backward()
            optimizer.step()
        state.epoch = epoch + 1
        state.commit()
        print(f"committed epoch {epoch} {sums()}", flush=True)
        if args.crash_after == epoch and restart == 0 and hvd.rank() == 1:
            os._exit(3)
    print(f"final epoch {state.epoch} {sums()}", flush=True)


train(state)
hvd.shutdown()
