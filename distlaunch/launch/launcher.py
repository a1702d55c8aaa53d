"""The launch pipeline end to end: JobSpec → hosts → slots → plan → supervise → run record.

``prepare`` resolves the job against this machine (hosts, placement, mpirun, the
user's program, how nodes are reached) without creating files or processes: it is what
``--dry-run`` and ``distlaunch hosts`` show. ``launch`` carries the job out: node
checks, run folder, code sync, packages, mpirun under a ``Supervisor``, cleanup and
collection on the nodes, and the ``RunRecord`` saved at every change of state. The CLI
and the Python API both come through here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import DistlaunchError, ExitCode, HostError, RunDirError, SpecError
from ..nodes.transport import Nodes, SrunTransport, SSHTransport, Transport, for_each
from ..plan.container import Container
from ..plan.envpolicy import redact, redact_argv, redact_pairs
from ..plan.hosts import SLURM_HOSTS, SLURM_JOB, SLURM_STEP, RankSlot, hostname, is_local, placement, this_host_names
from ..plan.layout import RemoteLayout
from ..plan.mpi import MPIInstall, detect, find_mpirun
from ..plan.mpirun import LaunchContext, LaunchPlan, plan
from ..plan.placement import Placement, place
from ..plan.spec import JobSpec, inside, resolve_program, spec_to_dict
from ..plan.ssh import SSHOptions, unshared
from ..records import Attempt, RunPaths, RunRecord, Status, allocate
from .metrics import write_tensorboard
from .supervise import PASS_SIGNALS, STOP_SIGNALS, Console, Outcome, Supervisor, Watch

if TYPE_CHECKING:
    from ..nodes.inputs import ResolvedInput

log = logging.getLogger(__name__)
RESOLVE_LIMIT = 1024
NO_CONSOLE = Console()
DEFAULT_WATCH = Watch()  # more hosts than this are not looked up before launch


@dataclass(frozen=True)
class Prepared:
    """A job resolved against this machine: hosts, placement, the MPI and program to run,
    and the transport that reaches the other nodes."""

    spec: JobSpec
    placed: Placement
    mpi: MPIInstall
    context: LaunchContext
    program: tuple[str, ...]
    transport: Transport
    srun: str | None = None  # with --launcher srun
    inputs: tuple[ResolvedInput, ...] = ()  # --input; nodes.inputs is imported only where there are some

    @property
    def slots(self) -> tuple[RankSlot, ...]:
        return self.placed.slots

    @property
    def container_check(self) -> tuple[str, ...]:
        """RUNTIME EXE IMAGE PYTHON for the nodes' probe, or () without a container."""
        found = self.context.container
        if found is None:
            return ()
        return found.runtime, found.exe, found.image, found.python or self.spec.python

    @property
    def hosts(self) -> list[str]:
        return [host for host, _ in placement(self.placed.slots)]

    @property
    def remote_hosts(self) -> list[str]:
        return [host for host in self.hosts if not is_local(host, self.context.local_names)]

    @property
    def multi_node(self) -> bool:
        return bool(self.remote_hosts)

    @property
    def nodes(self) -> Nodes:
        return Nodes(self.transport, self.spec.python)

    def remote_layout(self, run_id: str, restart: int = 0) -> RemoteLayout | None:
        """Where the code goes on the nodes; None when nothing is synced."""
        if not (self.multi_node and self.spec.sync and not self.spec.runs_in_place):
            return None
        return RemoteLayout.for_source(self.spec.remote_root, self.spec.source, run_id, restart)

    def plan(self, run_id: str, run_dir: str, host_cores: Mapping[str, int] | None = None,
             restart: int = 0) -> LaunchPlan:
        context = dataclasses.replace(self.context, restart=restart)
        if host_cores:
            context = dataclasses.replace(context, host_cores=dict(host_cores))
        layout = self.remote_layout(run_id, restart)
        if self.srun is not None:
            from ..plan.slurm import srun_plan

            return srun_plan(self.spec, self.placed, self.srun, run_id, run_dir, context, self.program, self.mpi,
                             layout)
        return plan(self.spec, self.placed, self.mpi, run_id, run_dir, context, self.program, layout)


def local_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_resolvable(names: list[str], origin: str) -> None:
    """HostError naming the first host that does not resolve (looked up in parallel)."""
    if not names or len(names) > RESOLVE_LIMIT:
        return
    import socket  # only where there are other hosts

    def resolves(name: str) -> bool:
        try:
            socket.getaddrinfo(name, None)
            return True
        except (OSError, UnicodeError):
            return False

    for name, ok in zip(names, for_each(names, resolves)):
        if not ok:
            raise HostError(f"cannot resolve host {name!r} (from {origin}): check its name, DNS or /etc/hosts")


def in_allocation(origin: str) -> bool:
    return origin in (SLURM_STEP, SLURM_JOB, SLURM_HOSTS)


def choose_transport(ssh: SSHOptions, local_names: frozenset[str] | None = None, origin: str = "",
                     env: Mapping[str, str] | None = None) -> Transport:
    """How to reach the other nodes: inside a Slurm allocation whose nodes we run on, a
    step per node (no sshd needed); anywhere else ssh with the user's options."""
    names = this_host_names() if local_names is None else local_names
    env = os.environ if env is None else env
    if in_allocation(origin):
        return SrunTransport(env["SLURM_JOB_ID"], names)
    return SSHTransport(ssh, names)


def _place_healthy(spec: JobSpec, cores: int, progress: Callable[[str], None]) -> Placement:
    """``place`` leaving out the nodes the user's runs found at fault (node health) while
    enough others remain; says which were left out, or used although kept out."""
    placed = place(spec.target, local_cores=cores)
    if len(placed.source.hosts) < 2:
        return placed  # nothing to leave out: the health file is not even read
    from .health import NodeHealth

    try:
        kept_out = NodeHealth().entries()
    except RunDirError as exc:  # a broken health file must not stop a launch
        progress(f"warning: no node is left out: {exc}")
        return placed
    avoid = {host: entry.reason for host, entry in kept_out.items() if host in {h.name for h in placed.source.hosts}}
    if not avoid:
        return placed
    placed = place(spec.target, local_cores=cores, avoid=avoid)
    for host in placed.left_out:
        progress(f"leaving out {host}, kept out for another {kept_out[host].left_s() / 60:.0f} min: "
                 f"{kept_out[host].reason} ('distlaunch nodes clear {host}' takes it back)")
    used = sorted(set(avoid) & {host for host, _ in placement(placed.slots)})
    if used:
        progress(f"warning: running on {', '.join(used)} although kept out after a fault ('distlaunch nodes'): "
                 "too few other hosts")
    return placed


def prepare(spec: JobSpec, progress: Callable[[str], None] = log.info) -> Prepared:
    names = this_host_names()
    cores = local_cores()
    placed = _place_healthy(spec, cores, progress)
    origin = placed.source.origin
    # --hosts naming nodes of the allocation we seem to be in: steps of it, unless ssh
    # options say otherwise or the SLURM_* variables are stale; then plain --hosts
    plain = origin == SLURM_HOSTS and spec.ssh != SSHOptions()
    if in_allocation(origin) and not plain:
        from .slurm import check_allocation

        try:
            check_allocation(os.environ)
        except HostError:
            if origin != SLURM_HOSTS:
                raise
            plain = True
    if plain:
        origin = "--hosts"
        placed = dataclasses.replace(placed, source=dataclasses.replace(placed.source, origin=origin))
    if not in_allocation(origin) and spec.launcher == "srun":
        raise SpecError("--launcher srun starts a step of the Slurm allocation you run in, and there is none: "
                        "run inside salloc/sbatch, or use 'distlaunch submit'")
    check_resolvable([host for host, _ in placement(placed.slots) if not is_local(host, names)], origin)
    mpi = detect(find_mpirun(spec.mpirun))
    srun = None
    if spec.launcher == "srun":
        srun = shutil.which("srun")
        if srun is None:
            raise SpecError("--launcher srun: srun is not on PATH: install slurm-client or use --launcher mpirun")
    resolved: tuple[ResolvedInput, ...] = ()
    if spec.inputs:
        from ..nodes.inputs import resolve as resolve_inputs

        resolved = resolve_inputs(spec.inputs, spec.remote_root, progress)
    container = None
    if spec.container is not None:
        from .container import resolve as resolve_container

        container = resolve_container(spec.container, spec.python)
    context = LaunchContext(is_root=os.geteuid() == 0, local_cores=cores, ambient_env=frozenset(os.environ),
                            local_names=names, input_paths={item.spec.name: item.node_path for item in resolved},
                            container=container, cwd=os.getcwd())
    prepared = Prepared(spec, placed, mpi, context, resolve_program(spec),
                        choose_transport(spec.ssh, names, origin), srun, resolved)
    if prepared.remote_layout("check") is not None:
        prepared.plan("check", "check")  # a script outside --source-dir is an error now, not on the nodes
    return prepared


def versions(mpi: MPIInstall) -> dict[str, str]:
    return {
        "distlaunch": __version__,
        "python": sys.version.split()[0],
        "mpi": mpi.label,
        "platform": "-".join(os.uname()[i] for i in (0, 2, 4)),  # platform.platform() would run `uname -p`
    }


def new_record(prepared: Prepared, the_plan: LaunchPlan, paths: RunPaths) -> RunRecord:
    spec = prepared.spec
    spec_dict = spec_to_dict(spec)
    spec_dict["env"] = redact_pairs(spec.env)  # values of secret-looking names never reach the record
    return RunRecord(
        id=paths.run_id,
        script=spec.script,
        spec=spec_dict,
        nodes=len({slot.host for slot in prepared.slots}),
        ranks=len(prepared.slots),
        host_source=prepared.placed.source.origin,
        gpu_mode=prepared.placed.gpu_mode,
        slots=[slot._asdict() for slot in prepared.slots],
        argv=[unshared(word) for word in the_plan.argv],
        env_added={name: unshared(value) for name, value in redact(the_plan.env).items()},
        hostfile=the_plan.hostfile_text,
        launcher={"host": hostname(), "pid": os.getpid(), "cwd": os.getcwd(),
                  "argv": redact_argv(sys.argv), "transport": prepared.transport.name},
        versions=versions(prepared.mpi),
        experiment=spec.experiment_name,
        tags=dict(spec.tags),
        inputs=[item.record() for item in prepared.inputs],
        container=container_record(prepared.context.container),
    )


def container_record(container: Container | None) -> dict[str, Any] | None:
    """run.json's container: its identity (a hash of the image) is filled in by
    ``_image_identity`` while the job runs, not before it starts."""
    if container is None:
        return None
    from .container import record

    return record(container)


def _image_identity(record: RunRecord, container: Container | None) -> Callable[[], None]:
    """Hash the image in the background; the returned call waits for it and puts it in
    the record."""
    if container is None or record.container is None:
        return lambda: None
    from .container import identity

    found: dict[str, str] = {}

    def work() -> None:
        try:
            found["identity"] = identity(container)
        except Exception as exc:  # noqa: BLE001 - the run goes on; the record says why
            found["identity"] = f"unknown: {exc}"

    worker = threading.Thread(target=work, daemon=True)
    worker.start()

    def fill() -> None:
        worker.join()
        if record.container is not None:
            record.container["identity"] = found.get("identity", "unknown")

    return fill


def shared_source_check(prepared: Prepared, progress: Callable[[str], None]) -> Prepared:
    """When --remote-dir holds the source dir itself, copying makes no sense: if every node
    sees the source (a shared filesystem), say so and skip the sync; else refuse."""
    spec = prepared.spec
    if not (prepared.multi_node and spec.sync and inside(spec.source, os.path.abspath(spec.remote_root))):
        return prepared
    marker = Path(spec.source) / f".distlaunch-shared-check-{os.getpid()}"
    marker.write_text("distlaunch checks whether the nodes share this directory\n", encoding="utf-8")
    try:
        answers = prepared.nodes.call_all(prepared.remote_hosts, "sees", str(marker), timeout=60)
    finally:
        marker.unlink(missing_ok=True)
    if all(answer is not None and answer.get("exists") for answer, _proc in answers):
        progress(f"{spec.source} is on a filesystem the nodes share: running there, not syncing")
        return dataclasses.replace(prepared, spec=dataclasses.replace(spec, sync=False))
    raise SpecError(f"--remote-dir {spec.remote_root} contains the source dir {spec.source}, but not every node "
                    "sees it: choose a node-local --remote-dir, or pass --no-sync on a shared filesystem")


@dataclass
class NodeSide:
    """The other nodes of a running job, as the supervisor needs them (``RemoteSide``)."""

    prepared: Prepared
    paths: RunPaths
    layout: RemoteLayout | None
    missing: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)  # nodes that did not answer the cleanup
    metrics_before: dict[str, int] = field(default_factory=dict)  # the run's metrics files as the attempt starts

    def __post_init__(self) -> None:
        if self.layout is not None:
            from ..nodes.treesync import metrics_sizes

            self.metrics_before = metrics_sizes(self.paths.metrics)

    def dump(self, run_id: str) -> int:
        answers = self.prepared.nodes.call_all(self.prepared.remote_hosts, "dump", run_id, timeout=60)
        return sum((answer or {}).get("dumped", 0) for answer, _proc in answers)

    def after_exit(self) -> None:
        """Kill what is left on the nodes and bring their logs and outputs back (``release``
        follows once no attempt comes after this one)."""
        nodes, hosts = self.prepared.nodes, self.prepared.remote_hosts
        for host, (answer, proc) in zip(hosts, nodes.call_all(hosts, "cleanup", self.paths.run_id, timeout=60)):
            if answer is None:
                log.warning("cleanup on %s failed: %s", host, proc.stderr.strip()[-200:])
                if proc.returncode == 255:  # ssh's own failure: the node did not answer
                    self.unreachable.append(host)
        if self.layout is not None:
            from ..nodes.treesync import collect

            self.missing = collect(nodes, self.prepared.hosts, self.prepared.slots[0].host, self.layout,
                                   self.paths.root, self.prepared.spec.collect_all_ranks, self.metrics_before)

    def release(self, hosts: list[str]) -> None:
        """The run's copies on ``hosts`` may be pruned by later runs: the ones everything
        came back from (a node whose collection failed keeps its copy)."""
        if self.layout is None:
            return
        failed = {item.split(":", 1)[0] for item in self.missing}
        done = [host for host in hosts if host not in failed]
        self.prepared.nodes.call_all(done, "release", self.layout.workdir, timeout=60)


def _before_launch(prepared: Prepared, paths: RunPaths, record: RunRecord, progress: Callable[[str], None]) -> None:
    """The code snapshot, inputs, the code on the nodes and packages in their Python; the
    record says how it went."""
    spec = prepared.spec
    snap = None
    if not spec.runs_in_place:
        from . import snapshot

        snap = snapshot.load(paths) if record.code else None  # a batch job's, taken at submit time
        if snap is None:
            snap = snapshot.take(spec.source, paths, progress, exclude=(str(paths.root.parent),),
                                 max_files=spec.max_source_files, max_bytes=spec.max_source_bytes)
            record.code = snap.summary()
            record.save(paths)
    if prepared.inputs:
        from ..nodes import inputs as node_inputs

        node_inputs.check_in_place(prepared.nodes, prepared.hosts, prepared.inputs)
        if any(item.spec.copy for item in prepared.inputs):
            staged = node_inputs.stage(prepared.nodes, prepared.hosts, prepared.inputs, spec.remote_root,
                                       paths.run_id, progress)
            for item in record.inputs:
                item["nodes"] = [r for r in staged if r["name"] == item["name"]]
            record.save(paths)
    layout = prepared.remote_layout(paths.run_id)
    if layout is not None and snap is not None:
        from ..nodes.treesync import sync

        synced = sync(prepared.nodes, prepared.hosts, snap.tree(), layout, progress)
        record.sync = {"remote_dir": layout.workdir, "nodes": [dataclasses.asdict(result) for result in synced]}
        record.save(paths)
    elif prepared.multi_node and not spec.runs_in_place:
        host = _first_blind(prepared, str(paths.code))
        if host is not None:
            raise SpecError(f"nothing is synced (--no-sync, or a source dir the nodes share), so the ranks run in "
                            f"the run's code snapshot {paths.code}, which {host} does not see: put --run-dir on "
                            "the filesystem the nodes share, or run with --in-place")
    elif prepared.multi_node:  # in place: the directory and the program must be there already
        program = prepared.program
        script = program[program.index("distlaunch.rank.bootstrap") + 1] if spec.is_python else program[0]
        for path in (os.getcwd(), script):
            host = _first_blind(prepared, path)
            if host is not None:
                raise SpecError(f"{path} does not exist on {host}, and the ranks run in place (--in-place, or a "
                                "program that is not a .py script without --source-dir): use a filesystem every "
                                "node shares, or give --source-dir to copy the code to the nodes")
    if spec.pip_packages or spec.requirements:
        from ..nodes.pipinstall import ensure_packages

        requirements = Path(spec.requirements).read_text(encoding="utf-8") if spec.requirements else ""
        ensure_packages(prepared.nodes, prepared.hosts, spec.pip_packages, requirements, paths.logs / "pip.log",
                        progress)


def _first_blind(prepared: Prepared, path: str) -> str | None:
    """The first other node that does not see ``path``."""
    hosts = prepared.remote_hosts
    for host, (answer, _proc) in zip(hosts, prepared.nodes.call_all(hosts, "sees", path, timeout=60)):
        if not (answer or {}).get("exists"):
            return host
    return None


MAX_RESTART_DELAY_S = 60.0


class _Between:
    """Signal handlers for the time between attempts, when no Supervisor has its own: a
    Ctrl-C, SIGTERM or SIGHUP is kept and ends the run before another attempt starts;
    SIGUSR1/SIGUSR2 have no rank to go to and are dropped."""

    def __init__(self, active: bool) -> None:
        self.active = active  # without restarts there is no "between": signals keep their usual meaning
        self.stop: int | None = None
        self.woken = threading.Event()
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Between:
        if self.active and threading.current_thread() is threading.main_thread():
            self._old = {signum: signal.signal(signum, self._on_signal) for signum in (*STOP_SIGNALS, *PASS_SIGNALS)}
        return self

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum in STOP_SIGNALS and self.stop is None:
            self.stop = signum
            self.woken.set()

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)


def _attempts(prepared: Prepared, the_plan: LaunchPlan, paths: RunPaths, record: RunRecord, watch: Watch,
              console: Console, progress: Callable[[str], None],
              host_cores: Mapping[str, int] | None) -> tuple[Outcome, Prepared]:
    """Run the plan under a Supervisor; with --max-restarts, relaunch it after a failure
    (nodes at fault recorded and left out, ranks re-placed) until it succeeds, fails for
    a reason a restart cannot help, or the budget is spent. The last outcome, and the
    Prepared it ran with. The record never stays 'running' when this raises."""
    spec = prepared.spec
    deadline = None if watch.timeout is None else time.monotonic() + watch.timeout
    cores = dict(host_cores or {})
    restart = 0
    sides: list[NodeSide] = []
    outcome: Outcome | None = None
    with _Between(spec.max_restarts > 0) as between:
        try:
            while True:
                if outcome is not None and between.stop is not None:  # came while the restart was being prepared
                    why = f"cancelled by {signal.Signals(between.stop).name} before the restart started"
                    record.attempts[-1].next = why
                    record.save(paths)
                    return dataclasses.replace(outcome, status=Status.CANCELLED, exit_code=128 + between.stop,
                                               reason=why), prepared
                node_side = NodeSide(prepared, paths, prepared.remote_layout(paths.run_id, restart)) \
                    if prepared.multi_node else None
                sides += [node_side] if node_side is not None else []
                left = None if deadline is None else max(0.1, deadline - time.monotonic())
                supervisor = Supervisor(the_plan, paths, dataclasses.replace(watch, timeout=left), console, node_side)
                try:
                    pid = supervisor.start()
                    record.running(pid, supervisor.started if restart == 0 else record.started)
                    record.save(paths)
                    outcome = supervisor.wait()
                except BaseException as exc:
                    record.failed(f"the launcher stopped: {type(exc).__name__}: {exc}")
                    record.save(paths)
                    raise
                if node_side is not None:
                    record.collect_missing = node_side.missing
                if spec.max_restarts == 0:
                    return outcome, prepared
                attempt = Attempt(restart + 1, outcome.started, outcome.ended, outcome.status, outcome.exit_code,
                                  [host for host, _ in placement(prepared.slots)], len(prepared.slots),
                                  outcome.failure, outcome.reason)
                record.attempts.append(attempt)
                if outcome.status is not Status.COMPLETED:
                    from .health import blamed_hosts

                    attempt.blamed = blamed_hosts(outcome.ranks, {slot.rank: slot.host for slot in prepared.slots},
                                                  outcome.failure.rank if outcome.failure else None,
                                                  node_side.unreachable if node_side is not None else ())
                    if len(prepared.placed.source.hosts) > 1:  # with one host there is nothing to leave out
                        _quarantine(attempt.blamed, paths.run_id, spec.quarantine_ttl, progress)
                delay = min(spec.restart_delay * 2 ** restart, MAX_RESTART_DELAY_S)
                stop = supervisor.late_stop or between.stop
                why_not = _no_restart(outcome, restart, spec.max_restarts, deadline, delay, stop)
                following = prepared
                if why_not is None:
                    following = _replaced(prepared, attempt.blamed, progress)
                    if outcome.exit_code == ExitCode.LAUNCH and following is prepared:
                        why_not = "no restart: the job could not start, and a restart would not change that"
                if why_not is not None:
                    attempt.next = why_not
                    record.save(paths)
                    if outcome.status is not Status.COMPLETED:
                        progress(f"{attempt.describe()}; {why_not}")
                    if stop is not None and outcome.status is Status.FAILED:
                        return dataclasses.replace(outcome, status=Status.CANCELLED, exit_code=128 + stop,
                                                   reason=why_not), prepared
                    return outcome, prepared
                restart += 1
                where = f" without {', '.join(following.placed.left_out)}" if following.placed.left_out else ""
                again = sorted(set(attempt.blamed) & set(following.hosts))
                if again and len(prepared.placed.source.hosts) > 1:
                    where += (f" (again on {', '.join(again)}: too few other hosts; --min-nodes lets it go on "
                              "with fewer)")
                record.save(paths)
                progress(f"{attempt.describe()}; restart {restart} of {spec.max_restarts} in {delay:g} s{where}")
                stopped = _wait_to_restart(delay, paths, between)
                if stopped is not None:  # nothing of the job runs now: the run ends here, its logs where they are
                    attempt.next = stopped[1]
                    record.save(paths)
                    return dataclasses.replace(outcome, status=Status.CANCELLED, exit_code=stopped[0],
                                               reason=stopped[1]), prepared
                attempt.next = f"restarted after {delay:g} s{where}"
                paths.archive_attempt(restart)
                progress(f"attempt {restart}'s logs and exit records: {paths.attempt(restart)}")
                _set_up_new_hosts(following, prepared, paths, record, cores, progress)
                _move_outputs(following, prepared, paths, progress)
                prepared = following
                the_plan = prepared.plan(paths.run_id, str(paths.root), cores or None, restart)
                _replan_record(record, prepared, the_plan)
                record.save(paths)
        except BaseException as exc:
            if record.status is Status.RUNNING:
                record.failed(f"the launcher stopped between attempts: {type(exc).__name__}: {exc}",
                              exc.exit_code if isinstance(exc, DistlaunchError) else None)
                record.save(paths)
            raise
        finally:
            _release(sides)


def _checked(prepared: Prepared, progress: Callable[[str], None]) -> tuple[dict[str, int], Prepared]:
    """The node check before a multi-node launch, and each node's CPU count. With
    --max-restarts, nodes with a critical problem are recorded as at fault and left out
    (as a restart would) while enough others remain; else the check's error stands."""
    from ..nodes.doctor import NodeCheckFailed, preflight  # multi-node runs only

    spec = prepared.spec
    for _ in range(3):
        progress(f"checking {len(prepared.hosts)} node(s)")
        try:
            return preflight(prepared.nodes, prepared.hosts, spec.remote_root, need_rsync=spec.sync,
                             container=prepared.container_check), prepared
        except NodeCheckFailed as exc:
            if spec.max_restarts == 0:
                raise
            if len(prepared.placed.source.hosts) > 1:
                _quarantine(exc.hosts, "", spec.quarantine_ttl, progress)
            following = _replaced(prepared, exc.hosts, progress)
            if set(exc.hosts) & set(following.hosts) or not following.multi_node:
                raise
            progress(f"leaving out {', '.join(following.placed.left_out)} before the launch: {exc}")
            prepared = following
    raise HostError("node check: nodes kept failing it: run 'distlaunch doctor'")


def _release(sides: list[NodeSide]) -> None:
    """The run's copies on every host any attempt used may be pruned by later runs, but
    not where a collection failed (that copy is all there is)."""
    if not sides:
        return
    failed = {item.split(":", 1)[0] for side in sides for item in side.missing}
    hosts = list(dict.fromkeys(host for side in sides for host in side.prepared.hosts))
    sides[-1].release([host for host in hosts if host not in failed])


def _set_up_new_hosts(following: Prepared, before: Prepared, paths: RunPaths, record: RunRecord,
                      cores: dict[str, int], progress: Callable[[str], None]) -> None:
    """Hosts a restart uses for the first time (spare nodes) get what the first ones got:
    the node check, the code, the inputs and the packages."""
    new = [host for host in following.hosts if host not in before.hosts]
    if not new or not following.multi_node:
        return
    progress(f"setting up {', '.join(new)} for the restart")
    spec = following.spec
    remote = [host for host in new if host in following.remote_hosts]
    if remote and not spec.skip_checks:
        from ..nodes.doctor import preflight

        cores.update(preflight(following.nodes, remote, spec.remote_root, need_rsync=spec.sync,
                               container=following.container_check))
    _before_launch(following, paths, record, progress)


def _move_outputs(following: Prepared, before: Prepared, paths: RunPaths, progress: Callable[[str], None]) -> None:
    """When a restart moves rank 0 to another node, the ./outputs the last attempt left
    (brought back into the run folder: checkpoints included) go to the new rank 0's copy."""
    layout = following.remote_layout(paths.run_id)
    old, new = before.slots[0].host, following.slots[0].host
    if layout is None or old == new or not paths.outputs.is_dir() or not any(paths.outputs.iterdir()):
        return
    from ..nodes.treesync import hand_over

    if hand_over(following.nodes, new, paths.outputs, f"{layout.workdir}/outputs", exclude=before.hosts):
        progress(f"rank 0 moves from {old} to {new}: the last attempt's ./outputs went with it")
    else:
        progress(f"warning: rank 0 moves from {old} to {new}, and the last attempt's ./outputs could not be copied "
                 "there: a checkpoint in them is not found (DISTLAUNCH_CHECKPOINT_DIR on a shared filesystem avoids "
                 "this)")


def _wait_to_restart(delay: float, paths: RunPaths, between: _Between) -> tuple[int, str] | None:
    """Sleep ``delay`` seconds before a restart; a Ctrl-C, SIGTERM, SIGHUP or cancel request
    meanwhile ends the run instead: (exit code, why), else None."""
    end = time.monotonic() + delay
    while not between.woken.wait(min(0.2, max(0.0, end - time.monotonic()))):
        if paths.cancel_marker.exists():
            return 128 + signal.SIGTERM, "cancelled on request (distlaunch cancel / Run.cancel) before a restart"
        if time.monotonic() >= end:
            return None
    assert between.stop is not None
    return 128 + between.stop, f"cancelled by {signal.Signals(between.stop).name} while waiting to restart"


def _no_restart(outcome: Outcome, restart: int, budget: int, deadline: float | None, delay: float,
                stop: int | None) -> str | None:
    """Why this attempt is the last one, or None to restart."""
    if outcome.status is Status.COMPLETED:
        return "completed"
    if outcome.status is Status.CANCELLED:
        return "no restart after a cancel or Ctrl-C"
    if stop is not None:
        return f"no restart: {signal.Signals(stop).name} came while the attempt was ending"
    if outcome.status is Status.TIMEOUT and "--hang-timeout" not in outcome.reason:
        return "no restart after --timeout"
    if outcome.exit_code == ExitCode.RUN_DIR and outcome.reason.startswith("cannot write to the run folder"):
        return "no restart: the run folder cannot be written"
    if restart >= budget:
        return f"no restart left (--max-restarts {budget})"
    if deadline is not None and time.monotonic() + delay >= deadline:
        return "no restart: --timeout would run out before it"
    return None


def _quarantine(blamed: Mapping[str, str], run_id: str, ttl: float, progress: Callable[[str], None]) -> None:
    if not blamed or ttl <= 0:
        return
    from .health import NodeHealth

    health = NodeHealth()
    for host, why in blamed.items():
        try:
            health.blame(host, why, run_id, ttl)
        except RunDirError as exc:
            progress(f"warning: {exc}")
            return
        progress(f"node {host} kept out for {ttl:g} s: {why} ('distlaunch nodes clear {host}' to take it back)")


def _replaced(prepared: Prepared, blamed: Mapping[str, str], progress: Callable[[str], None]) -> Prepared:
    """The job placed again without the nodes at fault (this attempt's and the user's
    other recorded ones) while enough others remain, or down to --min-nodes; else on the
    same nodes (the fault may have passed)."""
    spec = prepared.spec
    avoid: dict[str, str] = {}
    if spec.quarantine_ttl > 0:
        try:
            from .health import NodeHealth

            avoid = {host: entry.reason for host, entry in NodeHealth().entries().items()}
        except RunDirError as exc:
            progress(f"warning: {exc}")
    avoid.update(blamed)
    if len(prepared.placed.source.hosts) < 2 or not set(avoid) & set(prepared.hosts):
        return prepared
    try:
        placed = place(spec.target, local_cores=prepared.context.local_cores, avoid=avoid, min_nodes=spec.min_nodes)
    except HostError as exc:
        progress(f"restarting on the same hosts: without the ones at fault, {exc}")
        return prepared
    following = dataclasses.replace(prepared, placed=placed)
    if prepared.multi_node and not following.multi_node:  # the ranks' working copy would move: keep it
        progress("restarting on the same hosts: only this machine would be left, and the ranks would lose "
                 "their working copy (and checkpoints) on the nodes")
        return prepared
    return following


def _replan_record(record: RunRecord, prepared: Prepared, the_plan: LaunchPlan) -> None:
    """What the next attempt runs, in the record (the earlier ones are in record.attempts)."""
    record.nodes = len({slot.host for slot in prepared.slots})
    record.ranks = len(prepared.slots)
    record.slots = [slot._asdict() for slot in prepared.slots]
    record.argv = [unshared(word) for word in the_plan.argv]
    record.env_added = {name: unshared(value) for name, value in redact(the_plan.env).items()}
    record.hostfile = the_plan.hostfile_text


@contextlib.contextmanager
def _shared_connections(prepared: Prepared) -> Iterator[Prepared]:
    """``prepared`` reaching its other nodes over one ssh connection and one agent session
    each, for as long as the block runs (nodes/sshshare.py); as it is without ssh to
    other nodes."""
    transport = prepared.transport
    if not (prepared.multi_node and isinstance(transport, SSHTransport)):
        yield prepared
        return
    from ..nodes.sshshare import SharedConnections

    with SharedConnections(prepared.spec.ssh, prepared.remote_hosts, prepared.spec.python) as shared:
        if shared.options.control_path is None:
            yield prepared
            return
        yield dataclasses.replace(prepared, spec=dataclasses.replace(prepared.spec, ssh=shared.options),
                                  transport=dataclasses.replace(transport, options=shared.options,
                                                                agents=shared.agents))


def launch(
    prepared: Prepared,
    console: Console = NO_CONSOLE,
    watch: Watch = DEFAULT_WATCH,
    on_ready: Callable[[RunPaths], None] | None = None,
    progress: Callable[[str], None] = log.info,
    paths: RunPaths | None = None,
) -> tuple[RunPaths, Outcome]:
    """Run the job to its end; the run folder records every step. ``on_ready`` is called
    once the run folder exists, before the code is synced and mpirun starts. ``paths``:
    the run folder of a submitted (queued) run, which this launch carries out."""
    with _shared_connections(prepared) as shared:
        return _launch(shared, console, watch, on_ready, progress, paths)


def _launch(prepared: Prepared, console: Console, watch: Watch, on_ready: Callable[[RunPaths], None] | None,
            progress: Callable[[str], None], paths: RunPaths | None) -> tuple[RunPaths, Outcome]:
    prepared = shared_source_check(prepared, progress)
    spec = prepared.spec
    host_cores = None
    if prepared.multi_node and not spec.skip_checks:
        host_cores, prepared = _checked(prepared, progress)
    queued = RunRecord.load(paths) if paths is not None else None
    paths = paths or allocate(spec.runs_root)
    the_plan = prepared.plan(paths.run_id, str(paths.root), host_cores)
    record = new_record(prepared, the_plan, paths)
    identified = _image_identity(record, prepared.context.container)
    if queued is not None:  # keep what the submission knew
        record.created, record.scheduler, record.code = queued.created, queued.scheduler, queued.code
    try:
        record.save(paths)
    except RunDirError:
        if queued is None:
            shutil.rmtree(paths.root, ignore_errors=True)  # nothing worth keeping yet
        raise
    if on_ready is not None:
        on_ready(paths)
    try:
        _before_launch(prepared, paths, record, progress)
    except BaseException as exc:  # never leave the record queued: say how far it got
        code = exc.exit_code if isinstance(exc, DistlaunchError) else 130 if isinstance(exc, KeyboardInterrupt) else 1
        record.failed(str(exc) if isinstance(exc, DistlaunchError) else f"stopped before the launch: "
                      f"{type(exc).__name__}: {exc}", code)
        record.save(paths)
        raise
    outcome, prepared = _attempts(prepared, the_plan, paths, record, watch, console, progress, host_cores)
    first_start = record.attempts[0].started if record.attempts else outcome.started
    record.finished(outcome.status, outcome.exit_code, outcome.mpirun_exit_code, first_start, outcome.ended,
                    outcome.failure, outcome.ranks, outcome.leftovers_killed, outcome.reason)
    if not spec.runs_in_place and prepared.remote_layout(paths.run_id) is None:
        from . import snapshot

        try:
            snapshot.gather(paths)  # the ranks ran in the snapshot: ./outputs and ./logs into the run folder
        except OSError as exc:
            log.warning("could not move ./outputs and ./logs out of %s: %s", paths.code, exc)
    try:
        events = write_tensorboard(paths.root)
    except Exception as exc:  # noqa: BLE001 - metrics stay in JSON lines; the run is done
        log.warning("could not write TensorBoard events: %s", exc)
        events = None
    record.tensorboard = str(events) if events is not None else None
    identified()
    record.save(paths)
    return paths, outcome
