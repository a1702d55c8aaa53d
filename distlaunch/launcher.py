"""The launch pipeline end to end: JobSpec → hosts → slots → plan → supervise → run record.

``prepare`` does everything short of creating files or processes (it is what
``--dry-run`` and ``distlaunch hosts`` show); ``launch`` carries the job out and keeps
``run.json`` up to date at every step. The CLI and the Python API both come through here.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from . import __version__
from .envpolicy import redact
from .errors import HostError, RunDirError
from .hosts import RankSlot, is_local, placement
from .mpi import MPIInstall, detect, find_mpirun
from .mpirun import LaunchContext, LaunchPlan, plan
from .placement import Placement, place
from .records import RunPaths, Status, allocate, write_json
from .spec import JobSpec
from .supervise import Outcome, Supervisor


@dataclass(frozen=True)
class Prepared:
    """A job resolved against this machine: hosts, placement and the MPI to use."""

    spec: JobSpec
    placed: Placement
    mpi: MPIInstall
    context: LaunchContext

    @property
    def slots(self) -> tuple[RankSlot, ...]:
        return self.placed.slots

    def plan(self, run_id: str, run_dir: str) -> LaunchPlan:
        return plan(self.spec, self.placed, self.mpi, run_id, run_dir, self.context)


def local_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


RESOLVE_LIMIT = 1024  # more hosts than this are not looked up before launch


def check_resolvable(names: list[str]) -> None:
    """HostError naming the first host that does not resolve (looked up in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    remote = [name for name in names if not is_local(name)]
    if not remote or len(remote) > RESOLVE_LIMIT:
        return

    def resolves(name: str) -> bool:
        try:
            socket.getaddrinfo(name, None)
            return True
        except (OSError, UnicodeError):
            return False

    with ThreadPoolExecutor(max_workers=min(32, len(remote))) as pool:
        for name, ok in zip(remote, pool.map(resolves, remote)):
            if not ok:
                raise HostError(f"cannot resolve host {name!r}: check its name, DNS or /etc/hosts")


def prepare(spec: JobSpec) -> Prepared:
    placed = place(spec.target)
    check_resolvable([host for host, _ in placement(placed.slots)])
    mpi = detect(find_mpirun(spec.mpirun))
    context = LaunchContext(
        is_root=os.geteuid() == 0, local_cores=local_cores(), ambient_env=frozenset(os.environ)
    )
    return Prepared(spec, placed, mpi, context)


def versions(mpi: MPIInstall) -> dict[str, str]:
    return {
        "distlaunch": __version__,
        "python": platform.python_version(),
        "mpi": mpi.label,
        "platform": platform.platform(),
    }


def initial_record(prepared: Prepared, the_plan: LaunchPlan, paths: RunPaths) -> dict[str, Any]:
    spec = prepared.spec
    return {
        "id": paths.run_id,
        "status": Status.QUEUED.value,
        "created": time.time(),
        "spec": dataclasses.asdict(spec),
        "script": spec.script,
        "nodes": len({slot.host for slot in prepared.slots}),
        "ranks": len(prepared.slots),
        "host_source": prepared.placed.source.origin,
        "gpu_mode": prepared.placed.gpu_mode,
        "slots": [dataclasses.asdict(slot) for slot in prepared.slots],
        "argv": list(the_plan.argv),
        "env_added": redact(the_plan.env),
        "hostfile": the_plan.hostfile_text,
        "launcher": {"host": socket.gethostname(), "pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv},
        "versions": versions(prepared.mpi),
    }


def outcome_fields(outcome: Outcome) -> dict[str, Any]:
    return {
        "status": outcome.status.value,
        "exit_code": outcome.exit_code,
        "mpirun_exit_code": outcome.mpirun_exit_code,
        "started": outcome.started,
        "ended": outcome.ended,
        "duration_s": round(outcome.duration, 3),
        "first_failure": dataclasses.asdict(outcome.failure) if outcome.failure else None,
        "rank_exits": {str(rank): rec for rank, rec in sorted(outcome.ranks.items())},
        "leftovers_killed": outcome.leftovers_killed,
        "reason": outcome.reason,
    }


@dataclass(frozen=True)
class Watch:
    """How the launcher watches a running job."""

    kill_grace: float = 5.0
    timeout: float | None = None
    hang_timeout: float | None = None


def launch(
    prepared: Prepared,
    out: IO[bytes] | None = None,
    err: IO[bytes] | None = None,
    watch: Watch = Watch(),
    on_ready: Callable[[RunPaths], None] | None = None,
) -> tuple[RunPaths, Outcome]:
    """Run the job to its end; the run folder records every step. ``on_ready`` is called
    once the run folder exists, just before mpirun starts."""
    paths = allocate(prepared.spec.runs_root)
    the_plan = prepared.plan(paths.run_id, str(paths.root))
    record = initial_record(prepared, the_plan, paths)
    try:
        write_json(paths.record, record)
    except RunDirError:
        shutil.rmtree(paths.root, ignore_errors=True)  # nothing worth keeping yet
        raise
    if on_ready is not None:
        on_ready(paths)

    def started(pid: int) -> None:
        record.update(status=Status.RUNNING.value, started=time.time(), mpirun_pid=pid)
        write_json(paths.record, record)

    supervisor = Supervisor(the_plan, paths, paths.run_id, out, err, watch.kill_grace, on_start=started,
                            timeout=watch.timeout, hang_timeout=watch.hang_timeout)
    try:
        outcome = supervisor.run()
    except BaseException:
        record.update(status=Status.FAILED.value, ended=time.time(), error="launcher crashed")
        write_json(paths.record, record)
        raise
    record.update(outcome_fields(outcome))
    write_json(paths.record, record)
    return paths, outcome
