"""Test payload for the failure matrix. FAULT picks what rank FAULT_RANK does:

exception  raise RuntimeError        exit7   os._exit(7)
sigkill    wait to be killed          hang    sleep forever while the others wait in a barrier
sleep      every rank just sleeps (for --timeout, SIGINT, SIGTERM)

Every rank prints 'ready', writes OUT_DIR/ready-<rank>, and the others wait in an MPI
barrier (a real collective, polled gently). The faulting rank writes OUT_DIR/fault-time.
"""
import os
import sys
import time

from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, fault, target = comm.rank, os.environ["FAULT"], int(os.environ.get("FAULT_RANK", "-1"))
out = os.environ["OUT_DIR"]
print(f"ready {rank} pid {os.getpid()}", flush=True)
with open(os.path.join(out, f"ready-{rank}"), "w") as handle:
    handle.write(str(os.getpid()))
comm.Barrier()  # everyone is up before the fault


def mark_fault() -> None:
    with open(os.path.join(out, "fault-time"), "w") as handle:
        handle.write(repr(time.time()))


if rank == target or fault == "sleep":
    if fault == "exception":
        time.sleep(0.5)
        mark_fault()
        raise RuntimeError(f"injected failure in rank {rank}")
    if fault == "exit7":
        time.sleep(0.5)
        mark_fault()
        os._exit(7)
    time.sleep(3600)  # sigkill (killed from outside), hang, sleep
    sys.exit(0)
request = comm.Ibarrier()
while not request.Test():
    time.sleep(0.01)
