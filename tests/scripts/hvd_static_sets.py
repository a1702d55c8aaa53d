"""hvd.init(process_sets=[...]): sets fixed at start-up, no dynamic mode needed. Prints
one line per rank with what it saw; run under mpirun by tests/test_hvd.py."""
import torch

import distlaunch.hvd as hvd

low, high = hvd.ProcessSet([0, 1]), hvd.ProcessSet([1, 2])
hvd.init(process_sets=[low, high])
me = hvd.rank()
seen = []
for ps in (low, high):
    if ps.included():
        total = hvd.allreduce(torch.tensor([float(me)]), op=hvd.Sum, name=f"s{ps.process_set_id}", process_set=ps)
        root = hvd.broadcast(torch.tensor([me]), root_rank=ps.ranks[-1], name=f"b{ps.process_set_id}", process_set=ps)
        seen.append(f"set{ps.process_set_id}:{ps.rank()}/{ps.size()}:sum={total.item():g}:root={root.item()}")
try:
    hvd.add_process_set([0, 2])
except ValueError as exc:
    seen.append(f"add:{exc}")
hvd.barrier()
print(f"rank {me}: " + " ".join(seen), flush=True)
