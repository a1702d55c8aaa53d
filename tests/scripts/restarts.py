"""Test payload for --max-restarts: attempt K sees $DISTLAUNCH_RESTART_COUNT = K - 1.

While the restart count is below FAIL_UNTIL (default 1), rank FAULT_RANK (default 1)
fails as FAULT says: 'exit3' (os._exit(3)) or 'sigkill' (kills itself with SIGKILL),
while the other ranks wait in an MPI barrier that never completes; or, with 'hang',
every rank sleeps (for --timeout). Once the count reaches FAIL_UNTIL every rank prints
'done' and exits 0. Every rank appends '<count> <rank> <host>' to OUT_DIR/starts.
"""
import os
import signal
import socket
import time

from mpi4py import MPI

count = int(os.environ["DISTLAUNCH_RESTART_COUNT"])
comm = MPI.COMM_WORLD
with open(os.path.join(os.environ["OUT_DIR"], "starts"), "a") as handle:
    handle.write(f"{count} {comm.rank} {socket.gethostname()}\n")
print(f"attempt {count + 1}: rank {comm.rank} of {comm.size} up", flush=True)
comm.Barrier()
if count < int(os.environ.get("FAIL_UNTIL", "1")):
    if os.environ.get("FAULT") == "hang":
        time.sleep(600)
    if comm.rank == int(os.environ.get("FAULT_RANK", "1")):
        time.sleep(0.3)
        if os.environ.get("FAULT", "exit3") == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.05)
print("done", flush=True)
