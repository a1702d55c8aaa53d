"""Test payload for the failure matrix. FAULT picks what rank FAULT_RANK does:

exception  raise RuntimeError        exit7   os._exit(7)
alone7     os._exit(7) while the others sleep, with no MPI (a launcher told to keep a job going does)
sigkill    wait to be killed          hang    sleep forever while the others wait in a barrier
sleep      every rank just sleeps (for --timeout, SIGINT, SIGTERM)
stubborn   every rank ignores SIGINT and SIGTERM and sleeps (only SIGKILL ends it)
usr        every rank writes OUT_DIR/<signal>-<rank> when SIGUSR1 or SIGUSR2 arrives, and sleeps
chatty     every rank prints a line every CHATTY_EVERY s (1) for CHATTY_S seconds (6), then exits 0
orphan     every rank starts a detached child (own session, sleeping 10 min) and exits 0

Every rank prints 'ready' and writes OUT_DIR/ready-<rank>. The faults of one rank use MPI
(mpi4py): everyone meets in a barrier first, and the others then wait in an MPI barrier (a
real collective, polled gently) while one rank fails. The others need no MPI library, so
they run with any mpirun. The faulting rank writes OUT_DIR/fault-time.
"""
import os
import signal
import sys
import time

fault, target = os.environ["FAULT"], int(os.environ.get("FAULT_RANK", "-1"))
uses_mpi = fault in ("exception", "exit7", "sigkill", "hang")
if uses_mpi:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
rank = comm.rank if uses_mpi else int(os.environ["RANK"])
out = os.environ["OUT_DIR"]
print(f"ready {rank} pid {os.getpid()}", flush=True)
with open(os.path.join(out, f".ready-{rank}"), "w") as handle:
    handle.write(str(os.getpid()))
os.replace(os.path.join(out, f".ready-{rank}"), os.path.join(out, f"ready-{rank}"))  # seen whole, or not yet
if uses_mpi:
    comm.Barrier()  # everyone is up before the fault


def mark_fault() -> None:
    with open(os.path.join(out, "fault-time"), "w") as handle:
        handle.write(repr(time.time()))


if fault == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(3600)
if fault == "usr":
    def note(signum, _frame):
        with open(os.path.join(out, f"{signal.Signals(signum).name}-{rank}"), "w") as handle:
            handle.write(repr(time.time()))

    signal.signal(signal.SIGUSR1, note)
    signal.signal(signal.SIGUSR2, note)
    while True:
        time.sleep(0.05)
if fault == "orphan":
    import subprocess

    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sys.exit(0)
if fault == "chatty":
    end = time.time() + float(os.environ.get("CHATTY_S", "6"))
    while time.time() < end:
        print(f"rank {rank} still working", flush=True)
        time.sleep(float(os.environ.get("CHATTY_EVERY", "1")))
    sys.exit(0)
if fault == "alone7":
    if rank == target:
        time.sleep(0.5)
        mark_fault()
        os._exit(7)
    time.sleep(3600)
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
