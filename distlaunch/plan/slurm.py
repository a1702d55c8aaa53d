"""Slurm as the engine, planned: the ``srun`` launch (``--launcher srun``) and the batch
script of ``distlaunch submit``, both pure functions of the job (golden-file tested).

``srun_plan`` gives the same ``LaunchPlan`` shape as ``mpirun.plan``: every rank still
runs the worker shim, so run folder, exit records, failure handling and signals are the
same. Ranks go exactly where the placement says (``--distribution=arbitrary`` with a
one-line-per-rank ``SLURM_HOSTFILE``); PMIx wires up MPI; one failing task ends the
step (``--kill-on-bad-exit``); only the env policy's variables are exported.

``batch_script`` is what ``sbatch`` runs: a Python script (no shell), whose ``#SBATCH``
lines ask for the nodes and tasks, and which launches the run recorded in its run
folder from inside the allocation.
"""
from __future__ import annotations

import re
import shlex
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import SpecError
from .envpolicy import exported_names
from .hosts import placement
from .layout import RemoteLayout
from .mpi import MPIInstall
from .mpirun import LaunchContext, LaunchPlan, Workspace, rank_env, worker_argv
from .placement import Placement
from .spec import SAFE_PATH, JobSpec

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.:,=@%+/-]+$")


@dataclass(frozen=True)
class SlurmTarget:
    """Where ``distlaunch submit`` (or ``Job(compute_target=...)``) sends a job: a partition,
    a time limit and an account of the Slurm cluster this machine submits to."""

    partition: str | None = None
    time: str | None = None  # Slurm's format: "30", "2:00:00", "1-12:00:00"
    account: str | None = None
    job_name: str | None = None
    sbatch_args: tuple[str, ...] = ()  # more sbatch options, as words

    def __post_init__(self) -> None:
        for flag, value in (("--partition", self.partition), ("--time", self.time), ("--account", self.account),
                            ("--job-name", self.job_name)):
            if value is not None and not _SAFE_VALUE.match(value):
                raise SpecError(f"{flag} {value!r}: use letters, digits and .:,=@%+/-_ only (no spaces)")
        if self.time is not None and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", self.time):
            raise SpecError(f"--time {self.time!r} is not a Slurm time: write minutes (30), H:MM:SS or D-HH:MM:SS")


Slurm = SlurmTarget  # reads naturally: Job(..., compute_target=Slurm(partition="gpu", time="2:00:00"))


def batch_lines(target: SlurmTarget, nodes: int, tasks_per_node: int, log: str, job_name: str,
                gpus_per_node: int = 0) -> list[str]:
    """The ``#SBATCH`` options: shape of the allocation, queue, limits, where its log goes."""
    if any(ch.isspace() for ch in log):
        raise SpecError(f"the run folder {log.rsplit('/logs/', 1)[0]!r} has whitespace in its path, which #SBATCH "
                        "lines cannot carry: pick another --run-dir")
    lines = [f"--job-name={target.job_name or job_name}", f"--nodes={nodes}",
             f"--ntasks-per-node={tasks_per_node}", f"--output={log}", "--open-mode=append"]
    if gpus_per_node:
        lines.append(f"--gpus-per-node={gpus_per_node}")
    for flag, value in (("--partition", target.partition), ("--time", target.time), ("--account", target.account)):
        if value:
            lines.append(f"{flag}={value}")
    return [f"#SBATCH {line}" for line in lines]


def batch_script(python: str, run_dir: str, lines: Sequence[str]) -> str:
    """The batch job: a Python script run by the ranks' interpreter (no shell involved)."""
    if any(ch.isspace() for ch in python) or len(python) > 120:
        raise SpecError(f"the Python at {python!r} cannot start a batch script (a #! line allows no spaces and "
                        "about 127 characters): use a venv at a shorter path without spaces")
    return "\n".join([
        f"#!{python} {' '.join(SAFE_PATH)}".rstrip(),
        *lines,
        f'"""distlaunch batch job: runs the job recorded in {run_dir} inside this allocation."""',
        "from distlaunch.launch.batch import main",
        "",
        f"main({run_dir!r})",
        "",
    ])


def srun_hostfile(placed: Placement) -> str:
    """SLURM_HOSTFILE for ``--distribution=arbitrary``: one line per rank, in rank order."""
    return "".join(f"{slot.host}\n" for slot in placed.slots)


def srun_plan(spec: JobSpec, placed: Placement, srun: str, run_id: str, run_dir: str, ctx: LaunchContext,
              program: Sequence[str], mpi: MPIInstall, remote: RemoteLayout | None = None) -> LaunchPlan:
    """The srun argv (a step of the allocation we run in) for the placement."""
    slots = placed.slots
    hosts = [host for host, _ in placement(slots)]
    hostfile_path = f"{run_dir}/hostfile"
    space = Workspace.of(spec, run_dir, remote)
    env = rank_env(spec, slots, run_id, space.rank_dir, space.outputs, ctx, mpi, synced=remote is not None)
    env["SLURM_HOSTFILE"] = hostfile_path
    # srun starts tasks without a login: who the user is must travel too (MPI needs HOME)
    identity = {"HOME", "USER", "LOGNAME"} & set(ctx.ambient_env)
    exported = sorted(set(env) | set(exported_names(ctx.ambient_env, spec.env_pass)) | identity)
    added = [(["--overlap"], "a step beside any other of the allocation (distlaunch may itself run in one)"),
             (["--distribution=arbitrary"], "ranks placed exactly as planned, through SLURM_HOSTFILE"),
             (["--mpi=pmix"], "MPI in the ranks wires up through Slurm's PMIx"),
             (["--kill-on-bad-exit=1"], "one failing rank ends the whole job, as with mpirun"),
             ([f"--export={','.join(exported)}"], "the env policy: only these variables reach the ranks")]
    argv = [srun, f"--nodes={len(hosts)}", f"--ntasks={len(slots)}"]  # the hosts: SLURM_HOSTFILE
    for flags, _why in added:
        argv += flags
    if space.workdir:
        argv.append(f"--chdir={space.workdir}")
    argv += list(spec.mpi_args)
    argv += worker_argv(spec, placed, space, program, ctx)
    notes = tuple((shlex.join(flags), why) for flags, why in added)
    return LaunchPlan(tuple(argv), env, srun_hostfile(placed), hostfile_path, slots, notes,
                      interrupt_as=signal.SIGTERM)
