"""Test payload: join the job through distlaunch.hvd, under whatever launcher started
this process, and print one line: who this rank is, and a sum over all ranks."""
import json

import torch

import distlaunch.hvd as hvd

hvd.init()
total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum).item()
print("WORLD " + json.dumps({"rank": hvd.rank(), "size": hvd.size(), "local_rank": hvd.local_rank(),
                             "local_size": hvd.local_size(), "cross_rank": hvd.cross_rank(),
                             "cross_size": hvd.cross_size(), "sum": total, "launcher": hvd.launcher(),
                             "backend": hvd.backend()}), flush=True)
hvd.shutdown()
