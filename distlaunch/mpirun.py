"""``plan()``: turn a job and its placement into the exact mpirun argv, env and hostfile.

Pure: the same inputs always give the same ``LaunchPlan`` (golden-file tested). Each
rank runs ``python -m distlaunch.worker`` which then starts the user's program, so the
per-rank set-up (log, GPU, exit record) works with any MPI flavour.
"""
from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .envpolicy import exported_names
from .hosts import RankSlot, is_local, placement
from .mpi import Flavour, MPIInstall
from .placement import Placement
from .spec import JobSpec
from .treesync import RemoteLayout


@dataclass(frozen=True)
class LaunchContext:
    """Facts about the launching machine that change the argv."""

    is_root: bool
    local_cores: int
    ambient_env: frozenset[str] = frozenset()  # variable names already set for mpirun
    host_cores: Mapping[str, int] = field(default_factory=dict)  # other nodes' CPUs, when probed


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to start the job; nothing is started yet."""

    argv: tuple[str, ...]
    env: Mapping[str, str]  # added to mpirun's environment and exported to every rank
    hostfile_text: str
    hostfile_path: str
    slots: tuple[RankSlot, ...] = field(default=())

    @property
    def nranks(self) -> int:
        return len(self.slots)


def hostfile_text(slots: Sequence[RankSlot], flavour: Flavour) -> str:
    """Hostfile in the flavour's own syntax, one line per host in rank order."""
    if flavour is Flavour.MPICH:
        lines = [f"{host}:{count}" for host, count in placement(slots)]
    else:
        lines = [f"{host} slots={count}" for host, count in placement(slots)]
    return "\n".join(lines) + "\n"


def _user_sets_btl(spec: JobSpec, ctx: LaunchContext) -> bool:
    if "OMPI_MCA_btl" in ctx.ambient_env or any(k == "OMPI_MCA_btl" for k, _ in spec.env):
        return True
    args = list(spec.mpi_args)
    return any(a in ("--mca", "-mca") and args[i + 1 : i + 2] == ["btl"] for i, a in enumerate(args))


def master_addr(slots: Sequence[RankSlot]) -> str:
    """Address of rank 0's host as the other ranks can reach it."""
    first = slots[0].host
    return "127.0.0.1" if is_local(first) and len(placement(slots)) == 1 else first


def rank_env(spec: JobSpec, slots: Sequence[RankSlot], run_id: str, rank_dir: str, outputs: str) -> dict[str, str]:
    """Variables every rank gets (the user's --env last, so it wins)."""
    env = {
        "DISTLAUNCH_RUN_ID": run_id,
        "DISTLAUNCH_RUN_DIR": rank_dir,
        "DISTLAUNCH_MASTER_ADDR": master_addr(slots),
        "DISTLAUNCH_OUTPUT_DIR": outputs,
        "PYTHONUNBUFFERED": "1",
    }
    env.update(spec.env)
    return env


def worker_argv(spec: JobSpec, placed: Placement, rank_dir: str, workdir: str | None) -> list[str]:
    argv = [spec.python, "-m", "distlaunch.worker", "--run-dir", rank_dir]
    if placed.gpu_mode:
        argv += ["--gpus-per-rank", str(placed.gpus_per_rank)]
        if placed.restricted:
            argv += ["--gpus", ",".join(placed.restricted)]
    return [*argv, "--", *spec.command(workdir)]


def _ssh_agent_args(spec: JobSpec, flavour: Flavour) -> list[str]:
    """How mpirun reaches the other nodes: the same ssh options distlaunch uses."""
    if flavour is Flavour.OPENMPI:
        return ["--mca", "plm_rsh_agent", spec.ssh.command_string()]
    return ["-launcher", "ssh"]  # its options travel in HYDRA_LAUNCHER_EXTRA_ARGS


def plan(
    spec: JobSpec,
    placed: Placement,
    mpi: MPIInstall,
    run_id: str,
    run_dir: str,
    ctx: LaunchContext,
    remote: RemoteLayout | None = None,
) -> LaunchPlan:
    """Build the mpirun argv for the placement with the flags this MPI flavour needs.

    With ``remote`` (a multi-node run) every rank works in the node's synced copy of the
    source directory and keeps its log and exit record there until they are collected.
    """
    slots = placed.slots
    oversubscribe = spec.target.oversubscribe
    hostfile_path = f"{run_dir}/hostfile"
    workdir = remote.workdir if remote else None
    rank_dir = remote.agent_dir if remote else run_dir
    env = rank_env(spec, slots, run_id, rank_dir, f"{workdir}/outputs" if workdir else f"{run_dir}/outputs")
    exported = sorted(set(env) | set(exported_names(ctx.ambient_env, spec.env_pass)))
    hosts = placement(slots)
    multi = any(not is_local(host) for host, _ in hosts)
    argv = [mpi.path, "-n", str(len(slots))]
    if mpi.flavour is Flavour.OPENMPI:
        argv += ["--hostfile", hostfile_path]
        if ctx.is_root:
            argv.append("--allow-run-as-root")
        if oversubscribe:
            argv.append("--oversubscribe")
        crowded = any(count > (ctx.local_cores if is_local(host) else ctx.host_cores.get(host, count))
                      for host, count in hosts)
        if crowded or oversubscribe:
            argv += ["--bind-to", "none"]
        if len(hosts) == 1 and not _user_sets_btl(spec, ctx):
            argv += ["--mca", "btl", "^ofi"]
        if multi:
            argv += _ssh_agent_args(spec, mpi.flavour)
        if workdir:
            argv += ["--wdir", workdir]
        for name in exported:
            argv += ["-x", name]
    else:  # Hydra passes mpirun's whole environment to the ranks by default
        argv += ["-f", hostfile_path]
        if multi:
            argv += _ssh_agent_args(spec, mpi.flavour)
            env["HYDRA_LAUNCHER_EXTRA_ARGS"] = shlex.join(spec.ssh.argv()[1:])
        if workdir:
            argv += ["-wdir", workdir]
    argv += list(spec.mpi_args)
    argv += worker_argv(spec, placed, rank_dir, workdir)
    return LaunchPlan(tuple(argv), env, hostfile_text(slots, mpi.flavour), hostfile_path, tuple(slots))
