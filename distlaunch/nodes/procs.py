"""Find and end the processes of a run on this machine: the one leftover scan.

A run's processes are found by what distlaunch gave them, never by name: they carry
``DISTLAUNCH_RUN_ID`` in their environment, and on the launching machine they also
live in mpirun's session. Only processes in this machine's own PID namespace count
(a container or a simulated node beside us is another machine), and only those this
user may signal. Used by the launcher after mpirun ends and by the node agent.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from ..protocol import RUN_ID


def death_signal() -> Callable[[], None] | None:
    """For ``Popen(preexec_fn=...)``: the child gets SIGTERM when the thread that started it
    ends, whatever ends it (a SIGKILL too), and leaves at once if its parent is already
    gone. So the processes a launcher starts (mpirun, the ssh masters) end their own
    work when the launcher cannot: the thread must live as long as the child is wanted.
    Looked up here, in the parent: the child of a threaded process should do as little
    as possible between fork and exec. None where there is no ``prctl`` (not Linux)."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_up() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return set_up


def _pid_namespace(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rpartition(b")")[2].split()[0] == b"Z"
    except (OSError, IndexError):
        return True  # gone


def _candidate_pids(run_id: str, session: int | None, any_namespace: bool) -> list[int] | None:
    """Pids that may belong to run ``run_id``: in mpirun's ``session``, or with the run's id
    in their environment, read straight from ``/proc`` (one read per process, no process
    objects; most of the machine is not ours to read and is skipped at once). None where
    there is no ``/proc``."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    tag = f"\0{RUN_ID}={run_id}\0".encode()
    me = os.getpid()
    mine = None if any_namespace else _pid_namespace("self")
    found = []
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        if mine is not None and _pid_namespace(pid) not in (mine, None):
            continue
        try:
            if session is not None and os.getsid(pid) == session:
                if not _is_zombie(pid):  # mpirun itself, not yet reaped, is one
                    found.append(pid)
                continue
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if tag in b"\0" + handle.read() + b"\0":
                    found.append(pid)
        except OSError:  # gone, or another user's
            continue
    return found


def _module(argv: list[str]) -> str | None:
    """The module a ``python ... -m MODULE ...`` command line runs."""
    return argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None


def python_rank(proc: Any) -> bool:
    """Whether ``proc`` runs a rank's Python program: the bootstrap in an interpreter of its
    own, or a worker's fork running it (a ``.py``, ``-c`` or ``-m`` rank: the worker's
    command line, and a worker as parent; a worker itself has mpirun's daemon or srun
    above it, and forks for nothing else)."""
    argv = proc.cmdline()
    if _module(argv) == "distlaunch.rank.bootstrap":
        return True
    if _module(argv) != "distlaunch.rank.worker":
        return False
    parent = proc.parent()
    return parent is not None and parent.cmdline() == argv


def run_processes(run_id: str, session: int | None = None, python_ranks_only: bool = False,
                  any_namespace: bool = False) -> list[Any]:
    """Live processes of run ``run_id`` here: tagged with its id in their environment, or
    in mpirun's ``session``. Zombies are dead and left out, and so is this process.
    ``any_namespace``: also those in other PID namespaces (a test's view of every node)."""
    pids = _candidate_pids(run_id, session, any_namespace)
    if pids == []:
        return []  # the usual end of a run: nothing left, and psutil not even imported
    import psutil

    if pids is None:  # no /proc: ask psutil about every process
        mine = None if any_namespace else _pid_namespace("self")
        pids = [pid for pid in psutil.pids()
                if pid != os.getpid() and (mine is None or _pid_namespace(pid) in (mine, None))]
    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            in_session = session is not None and os.getsid(pid) == session
            env = proc.environ() if not in_session else {}
            if not (in_session or env.get(RUN_ID) == run_id):
                continue
            if python_ranks_only and not python_rank(proc):
                continue
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def wait_gone(procs: list[Any], timeout: float) -> list[Any]:
    """Poll until every process has exited (or is a zombie); return those still alive."""
    if not procs:
        return []
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def signal_all(procs: list[Any], signum: int) -> int:
    """Send ``signum`` to each process; how many it reached."""
    import psutil

    sent = 0
    for proc in procs:
        try:
            proc.send_signal(signum)
            sent += 1
        except psutil.Error:
            pass
    return sent


def kill_run(run_id: str, session: int | None = None, grace: float = 0.0, rounds: int = 5) -> int:
    """End what is left of the run here: ``grace`` seconds to finish (a rank writing its
    exit record), then SIGKILL, and again for whatever was started meanwhile (a respawned
    worker, a child forked at exit) until a scan finds nothing. How many were killed."""
    killed = 0
    alive = wait_gone(run_processes(run_id, session), grace)
    for _ in range(rounds):
        if not alive:
            break
        killed += signal_all(alive, signal.SIGKILL)
        wait_gone(alive, 5.0)
        alive = run_processes(run_id, session)
    return killed


def dump_stacks(run_id: str) -> int:
    """Ask this machine's Python ranks of the run to print their threads' stacks."""
    from ..protocol import dump_signal

    return signal_all(run_processes(run_id, python_ranks_only=True), dump_signal())
