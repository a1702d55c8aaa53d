"""What the torch backend's agreement round costs on a small allreduce, side by side.

Run under a launcher with the torch backend, e.g.

    DISTLAUNCH_HVD_BACKEND=torch distlaunch run --ppn 2 benchmarks/negotiation.py [--bytes 4]

Times, per call, interleaved in rounds so that noise hits all alike (median and spread
over the rounds): the shared-memory allreduce alone (no header), the same allreduce
with the header written and every rank's header compared after its first barrier (the
negotiation as ``hvd.allreduce_`` does it), and ``hvd.allreduce_`` itself (negotiation,
the engine, Horovod's argument handling). Rank 0 prints the table and the ratios.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import distlaunch.hvd as hvd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=4, help="allreduce size (float32 elements × 4)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed batch")
    parser.add_argument("--rounds", type=int, default=9, help="batches per variant, interleaved")
    args = parser.parse_args()
    if hvd.backend() != "torch":
        raise SystemExit("run it with DISTLAUNCH_HVD_BACKEND=torch: it measures that backend's negotiation")
    hvd.init()
    from distlaunch.hvd.core import Sum, state
    from distlaunch.hvd.negotiate import ALLREDUCE, expecting, header

    tensor = torch.zeros(max(1, args.bytes // 4))
    hvd.allreduce_(tensor, op=Sum)  # makes the segment
    if state.channel != "shm":
        raise SystemExit("no shared-memory channel here (several nodes, or DISTLAUNCH_HVD_ALLREDUCE=gloo)")
    shm, array = state.shm, tensor.numpy()
    head = header(ALLREDUCE, tensor, Sum)

    def plain() -> None:
        shm.allreduce(array, array, "sum")

    def negotiated() -> None:
        shm.allreduce(array, array, "sum", head, expecting(head, shm.size))

    def full() -> None:
        hvd.allreduce_(tensor, op=Sum)

    variants = {"shm allreduce, no header": plain, "shm allreduce + negotiation": negotiated,
                "hvd.allreduce_": full}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, call in variants.items():
            for _ in range(50):
                call()
            hvd.barrier()
            start = time.perf_counter()
            for _ in range(args.calls):
                call()
            times[name].append((time.perf_counter() - start) / args.calls * 1e6)
    if hvd.rank() == 0:
        base = statistics.median(times["shm allreduce, no header"])
        print(f"{args.bytes}-byte allreduce, {hvd.size()} ranks, {args.rounds} rounds of {args.calls} calls")
        for name, values in times.items():
            med = statistics.median(values)
            print(f"  {name:30s} {med:8.2f} µs/call (min {min(values):.2f}, max {max(values):.2f})  "
                  f"{med / base:5.2f}× the plain allreduce")


if __name__ == "__main__":
    main()
