"""Training loop in which CRASH_RANK raises at CRASH_STEP while the others are in allreduce."""
import os
import time

import torch

import distlaunch.hvd as hvd

hvd.init()
crash_rank, crash_step = int(os.environ.get("CRASH_RANK", "1")), int(os.environ.get("CRASH_STEP", "3"))
for step in range(1000):
    if hvd.rank() == crash_rank and step == crash_step:
        with open(os.path.join(os.environ["OUT_DIR"], "crash-time"), "w") as handle:
            handle.write(repr(time.time()))
        raise RuntimeError(f"crash in rank {hvd.rank()} at step {step}")
    hvd.allreduce(torch.ones(1000), name=f"step.{step}")
    time.sleep(0.05)
print("not reached: the crash must end the job", flush=True)
