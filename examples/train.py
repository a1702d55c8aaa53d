"""A small data-parallel training job, written against Horovod's API.

Runs anywhere: ``distlaunch run --ppn 2 examples/train.py --epochs 2``, plain
``mpirun -n 2 python examples/train.py``, or ``python examples/train.py`` (one process).
The data is synthetic (a noisy non-linear regression), so nothing is downloaded; each
rank trains on its own shard and the loss drops within seconds on a CPU.

Every epoch is checkpointed (``distlaunch.checkpoint``, into the run's outputs). A
restarted job (``distlaunch run --max-restarts 2``) resumes after the newest one, so a
failure costs at most the epoch it happened in; so does a new run given a
``DISTLAUNCH_CHECKPOINT_DIR`` that holds some.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

import distlaunch
import distlaunch.hvd as hvd
from distlaunch import checkpoint


def make_data(samples: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=gen)
    w = torch.randn(features, 1, generator=gen)
    y = torch.sin(x @ w) + 0.5 * (x[:, :1] ** 2) + 0.05 * torch.randn(samples, 1, generator=gen)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate per rank (scaled by size)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=os.environ.get("DISTLAUNCH_OUTPUT_DIR", "outputs"))
    parser.add_argument("--export-onnx", action="store_true", help="also write model.onnx (checked)")
    parser.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                        help="checkpoint every N epochs (0: never); a restart resumes from the newest")
    args = parser.parse_args()

    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    x, y = make_data(args.samples, args.features, args.seed)
    shard = slice(hvd.rank(), None, hvd.size())  # every rank trains on its own samples
    x, y = x[shard], y[shard]

    model = nn.Sequential(nn.Linear(args.features, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr * hvd.size())
    resume = int(os.environ.get("DISTLAUNCH_RESTART_COUNT", "0")) > 0 or "DISTLAUNCH_CHECKPOINT_DIR" in os.environ
    resumed = checkpoint.load_latest(model=model, optimizer=optimizer) if args.checkpoint_every and resume else None
    first_epoch = resumed.step + 1 if resumed else 1
    for group in optimizer.param_groups:  # a restart may run on fewer ranks than the checkpoint's
        group["lr"] = args.lr * hvd.size()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    loss_fn = nn.MSELoss()

    if hvd.rank() == 0:
        ops = "" if hvd.backend() != "horovod" else " (Gloo operations)" if hvd.gloo_enabled() else " (MPI operations)"
        print(f"training on {hvd.size()} rank(s) with the {hvd.backend()} backend{ops}, "
              f"{len(x)} samples per rank", flush=True)
        if resumed:
            print(f"resumed from epoch {resumed.step} ({resumed.path}, restart "
                  f"{os.environ.get('DISTLAUNCH_RESTART_COUNT', '0')})", flush=True)
    with torch.no_grad():
        initial = hvd.allreduce(loss_fn(model(x), y), name="initial_loss").item()
    if hvd.rank() == 0 and not resumed:
        print(f"epoch 0: loss {initial:.4f} (before training)", flush=True)
    start = time.time()
    for epoch in range(first_epoch, args.epochs + 1):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed + epoch))
        total = torch.zeros(())
        for i in range(0, len(x), args.batch_size):
            idx = order[i : i + args.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(idx)
        mean_loss = hvd.allreduce(total / len(x), name="epoch_loss").item()
        if hvd.rank() == 0:
            print(f"epoch {epoch}: loss {mean_loss:.4f} ({time.time() - start:.1f} s)", flush=True)
        distlaunch.log_metric("loss", mean_loss, step=epoch)
        if args.checkpoint_every and epoch % args.checkpoint_every == 0:
            checkpoint.save(epoch, model=model, optimizer=optimizer)

    if hvd.rank() == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, "model.pt")
        torch.save(model.state_dict(), path)
        print(f"saved {path}", flush=True)
    if args.export_onnx:
        onnx_path = distlaunch.export_onnx(model, x[:4], os.path.join(args.output_dir, "model.onnx"))
        if onnx_path is not None:
            print(f"exported {onnx_path}", flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    main()
