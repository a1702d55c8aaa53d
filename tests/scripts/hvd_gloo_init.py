"""Real Horovod's operations as distlaunch.hvd chooses them at each hvd.init: ``reinit``
inits, allreduces and shuts down twice (each init serves a fresh rendezvous); ``comm``
inits with MPI's world as a communicator (which needs MPI's operations)."""
import os
import sys
import threading

import torch

import distlaunch.hvd as hvd

if sys.argv[1] == "comm":
    from mpi4py import MPI

    rounds, comm = 1, MPI.COMM_WORLD
else:
    rounds, comm = 2, None
for i in range(rounds):
    hvd.init(comm=comm)
    total = hvd.allreduce(torch.full((3,), float(hvd.rank() + 1)), op=hvd.Sum, name=f"round{i}")
    port = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT")
    print(f"round {i}: gloo={hvd.gloo_enabled()} port={port} sum={total.tolist()}", flush=True)
    hvd.shutdown()
print("left", "port" if "HOROVOD_GLOO_RENDEZVOUS_PORT" in os.environ else "nothing", flush=True)
for thread in threading.enumerate():  # rank 0's rendezvous servers stop (in the background)
    if thread.name.startswith("horovod-rendezvous"):
        thread.join(5)
serving = [t.name for t in threading.enumerate() if t.name.startswith("horovod-rendezvous")]
print("servers", "running" if serving else "stopped", flush=True)
