"""The launch pipeline end to end: JobSpec → hosts → slots → plan → supervise → run record.

``prepare`` does everything short of creating files or processes (it is what
``--dry-run`` and ``distlaunch hosts`` show); ``launch`` carries the job out and keeps
``run.json`` up to date at every step. The CLI and the Python API both come through here.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import __version__
from .doctor import preflight
from .envpolicy import redact
from .errors import DistlaunchError, HostError, RunDirError, SpecError
from .hosts import RankSlot, is_local, placement
from .metrics import write_tensorboard
from .mpi import MPIInstall, detect, find_mpirun
from .mpirun import LaunchContext, LaunchPlan, plan
from .pipinstall import ensure_packages
from .placement import Placement, place
from .records import RunPaths, Status, allocate, write_json
from .spec import JobSpec
from .ssh import agent_call
from .supervise import Outcome, Supervisor, dump_stacks
from .treesync import RemoteLayout, collect, sync

log = logging.getLogger(__name__)


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

    @property
    def hosts(self) -> list[str]:
        return [host for host, _ in placement(self.placed.slots)]

    @property
    def multi_node(self) -> bool:
        return any(not is_local(host) for host in self.hosts)

    def remote_layout(self, run_id: str) -> RemoteLayout | None:
        """Where the code goes on the nodes; None when nothing is synced."""
        if not (self.multi_node and self.spec.sync):
            return None
        return RemoteLayout.for_source(self.spec.remote_root, self.spec.source, run_id)

    def plan(self, run_id: str, run_dir: str, host_cores: dict[str, int] | None = None) -> LaunchPlan:
        context = dataclasses.replace(self.context, host_cores=host_cores) if host_cores else self.context
        return plan(self.spec, self.placed, self.mpi, run_id, run_dir, context, self.remote_layout(run_id))


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


def on_nodes(hosts: list[str], spec: JobSpec, *command: str) -> list[dict[str, Any]]:
    """Run a remote_agent command on every host in parallel; the JSON answers that came back."""
    if not hosts:
        return []

    def one(host: str) -> dict[str, Any]:
        answer, proc = agent_call(host, spec.ssh, spec.python, *command, timeout=60)
        if answer is None:
            log.warning("%s on %s failed: %s", command[0], host, proc.stderr.strip()[-200:])
        return answer or {}

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return list(pool.map(one, hosts))


def shared_source_check(prepared: Prepared, progress: Callable[[str], None]) -> Prepared:
    """When --remote-dir holds the source dir itself, copying makes no sense: if every node
    sees the source (a shared filesystem), say so and skip the sync; else refuse."""
    spec = prepared.spec
    root = Path(spec.remote_root).resolve()
    if not (prepared.multi_node and spec.sync and spec.source.is_relative_to(root)):
        return prepared
    marker = spec.source / f".distlaunch-shared-check-{os.getpid()}"
    marker.write_text("distlaunch checks whether the nodes share this directory\n", encoding="utf-8")
    try:
        remote_hosts = [host for host in prepared.hosts if not is_local(host)]
        answers = on_nodes(remote_hosts, spec, "sees", str(marker))
    finally:
        marker.unlink(missing_ok=True)
    if len(answers) == len(remote_hosts) and all(answer.get("exists") for answer in answers):
        progress(f"{spec.source} is on a filesystem the nodes share: running there, not syncing")
        return dataclasses.replace(prepared, spec=dataclasses.replace(spec, sync=False))
    raise SpecError(f"--remote-dir {spec.remote_root} contains the source dir {spec.source}, but not every node "
                    "sees it: choose a node-local --remote-dir, or pass --no-sync on a shared filesystem")


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
    progress: Callable[[str], None] = log.info,
) -> tuple[RunPaths, Outcome]:
    """Run the job to its end; the run folder records every step. ``on_ready`` is called
    once the run folder exists, just before mpirun starts."""
    prepared = shared_source_check(prepared, progress)
    spec = prepared.spec
    host_cores = None
    if prepared.multi_node and not spec.skip_checks:
        progress(f"checking {len(prepared.hosts)} node(s)")
        host_cores = preflight(prepared.hosts, spec.ssh, spec.python, spec.remote_root, need_rsync=spec.sync)
    paths = allocate(spec.runs_root)
    the_plan = prepared.plan(paths.run_id, str(paths.root), host_cores)
    record = initial_record(prepared, the_plan, paths)
    try:
        write_json(paths.record, record)
    except RunDirError:
        shutil.rmtree(paths.root, ignore_errors=True)  # nothing worth keeping yet
        raise
    if on_ready is not None:
        on_ready(paths)
    remote = prepared.remote_layout(paths.run_id)
    if remote is not None:
        try:
            synced = sync(prepared.hosts, spec.source, remote, spec.ssh, spec.python, progress)
        except DistlaunchError as exc:
            record.update(status=Status.FAILED.value, ended=time.time(), error=str(exc))
            write_json(paths.record, record)
            raise
        record["sync"] = {"remote_dir": remote.workdir,
                          "nodes": [dataclasses.asdict(result) for result in synced]}
        write_json(paths.record, record)
    if spec.pip_packages or spec.requirements:
        requirements = Path(spec.requirements).read_text(encoding="utf-8") if spec.requirements else ""
        try:
            ensure_packages(prepared.hosts, spec.pip_packages, requirements, spec.python, spec.ssh,
                            paths.logs / "pip.log", progress)
        except DistlaunchError as exc:
            record.update(status=Status.FAILED.value, ended=time.time(), error=str(exc))
            write_json(paths.record, record)
            raise
    after_exit = None
    dump = None
    if prepared.multi_node:
        remote_hosts = [host for host in prepared.hosts if not is_local(host)]

        def after_exit() -> None:
            on_nodes(remote_hosts, spec, "cleanup", paths.run_id)
            if remote is not None:
                missing = collect(prepared.hosts, prepared.slots[0].host, remote, paths.root, spec.ssh,
                                  spec.collect_all_ranks)
                record["collect_missing"] = missing

        def dump(run_id: str) -> int:
            answers = on_nodes(remote_hosts, spec, "dump", run_id)
            return dump_stacks(run_id) + sum(answer.get("dumped", 0) for answer in answers)

    def started(pid: int) -> None:
        record.update(status=Status.RUNNING.value, started=time.time(), mpirun_pid=pid)
        write_json(paths.record, record)

    supervisor = Supervisor(the_plan, paths, paths.run_id, out, err, watch.kill_grace, on_start=started,
                            timeout=watch.timeout, hang_timeout=watch.hang_timeout, after_exit=after_exit,
                            dump=dump)
    try:
        outcome = supervisor.run()
    except BaseException:
        record.update(status=Status.FAILED.value, ended=time.time(), error="launcher crashed")
        write_json(paths.record, record)
        raise
    record.update(outcome_fields(outcome))
    try:
        events = write_tensorboard(paths.root)
    except Exception as exc:  # noqa: BLE001 - metrics stay in JSON lines; the run is done
        log.warning("could not write TensorBoard events: %s", exc)
        events = None
    if events is not None:
        record["tensorboard"] = str(events)
    write_json(paths.record, record)
    return paths, outcome
