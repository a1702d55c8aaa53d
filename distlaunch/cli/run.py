"""``distlaunch run``: options → JobSpec (once, here), then the launch pipeline."""
from __future__ import annotations

import shlex
import sys

import click

from ..launcher import Prepared, launch, prepare
from ..records import new_run_id
from ..spec import JobSpec, parse_env_items
from ..supervise import Outcome

RUN_HELP = """Run SCRIPT on every rank, with MPI, and keep a run folder.

SCRIPT is a .py file (run with this Python) or any executable; ARGS after it go to
the script untouched, even ones that look like distlaunch options.

\b
Examples:
  distlaunch run --ppn 2 examples/train.py --epochs 2
  distlaunch run --hosts node1:4,node2:4 train.py --lr 0.1
  distlaunch run --hostfile hostfiles/two-nodes-4-gpus.txt --nodes 2 train.py
  distlaunch run --ppn 4 --env OMP_NUM_THREADS=1 --mpi-arg "--mca btl tcp,self" train.py
  distlaunch run --dry-run --ppn 8 --oversubscribe train.py

\b
Hosts come from --hosts, else --hostfile, else the Slurm/PBS/LSF allocation, else
localhost. The run folder (default ./runs/<run-id>/) holds run.json, the hostfile,
logs/rank-<N>.log and outputs/.

\b
Exit code: the job's (the first failing rank's code, 128+N for signal N); 2 for bad
input, 69 when no MPI is found, 73 when the run folder cannot be written, 130 after
Ctrl-C.
"""


def split_mpi_args(values: tuple[str, ...]) -> tuple[str, ...]:
    """Each --mpi-arg may carry several words: '--mca btl tcp,self'."""
    return tuple(word for value in values for word in shlex.split(value))


@click.command("run", help=RUN_HELP, context_settings={"allow_interspersed_args": False})
@click.option("--nodes", type=click.IntRange(min=1), help="Number of hosts to use (default: all found).")
@click.option("--ppn", type=click.IntRange(min=1), help="Ranks per host (default: the host's slots, else 1).")
@click.option("--hosts", metavar="H1:N,H2:N", help="Hosts and their slots, e.g. node1:4,node2:4.")
@click.option("--hostfile", metavar="FILE", help="Open MPI (host slots=N) or MPICH (host:N) hostfile.")
@click.option("--oversubscribe", is_flag=True, help="Allow more ranks than slots (or cores).")
@click.option("--env", "env_items", multiple=True, metavar="NAME=VALUE",
              help="Set a variable on every rank (repeatable).")
@click.option("--mpi-arg", "mpi_args", multiple=True, metavar="ARGS",
              help="Extra mpirun arguments, e.g. \"--mca btl tcp,self\" (repeatable).")
@click.option("--mpirun", metavar="PATH", help="The mpirun to use (default: beside this Python, then PATH).")
@click.option("--run-dir", "runs_root", default="runs", show_default=True, metavar="DIR",
              help="Where run folders are created.")
@click.option("--kill-grace", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds between a forwarded Ctrl-C/SIGTERM and SIGKILL.")
@click.option("--dry-run", is_flag=True, help="Print hostfile, mpirun argv and environment; launch nothing.")
@click.argument("script")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run_command(
    nodes: int | None,
    ppn: int | None,
    hosts: str | None,
    hostfile: str | None,
    oversubscribe: bool,
    env_items: tuple[str, ...],
    mpi_args: tuple[str, ...],
    mpirun: str | None,
    runs_root: str,
    kill_grace: float,
    dry_run: bool,
    script: str,
    args: tuple[str, ...],
) -> None:
    spec = JobSpec(
        script=script,
        script_args=args,
        nodes=nodes,
        ppn=ppn,
        hosts=hosts,
        hostfile=hostfile,
        oversubscribe=oversubscribe,
        env=parse_env_items(env_items),
        mpi_args=split_mpi_args(mpi_args),
        mpirun=mpirun,
        runs_root=runs_root,
    )
    prepared = prepare(spec)
    if dry_run:
        show_dry_run(prepared)
        return
    nhosts = len({slot.host for slot in prepared.slots})
    click.echo(
        f"distlaunch: {len(prepared.slots)} rank(s) on {nhosts} host(s) ({prepared.source.origin}), "
        f"{prepared.mpi.label}",
        err=True,
    )
    paths, outcome = launch(prepared, sys.stdout.buffer, sys.stderr.buffer, kill_grace)
    summarize(paths.run_id, str(paths.root), outcome, nhosts)
    sys.exit(outcome.exit_code)


def show_dry_run(prepared: Prepared) -> None:
    run_id = new_run_id()
    run_dir = f"{prepared.spec.runs_root}/{run_id}"
    the_plan = prepared.plan(run_id, run_dir)
    click.echo(f"# hostfile ({the_plan.hostfile_path})")
    click.echo(the_plan.hostfile_text, nl=False)
    click.echo("# command")
    click.echo(shlex.join(the_plan.argv))
    click.echo("# environment added")
    for name, value in sorted(the_plan.env.items()):
        click.echo(f"{name}={value}")
    click.echo("# placement")
    for slot in prepared.slots:
        click.echo(f"rank {slot.rank}: host {slot.host}, local rank {slot.local_rank}")


def summarize(run_id: str, root: str, outcome: Outcome, nhosts: int) -> None:
    ranks = len(outcome.ranks) or "?"
    head = f"distlaunch: run {run_id} {outcome.status.value} in {outcome.duration:.2f} s"
    if outcome.failure is None:
        click.echo(f"{head} ({ranks} ranks on {nhosts} host(s)); run folder {root}", err=True)
        return
    click.echo(f"{head}: {outcome.failure.describe()} (first failure), exit code {outcome.exit_code}", err=True)
    if outcome.failure.last_lines:
        click.echo("distlaunch: its last lines:", err=True)
        for line in outcome.failure.last_lines:
            click.echo(f"    {line}", err=True)
    rank = outcome.failure.rank
    where = f"{root}/logs/rank-{rank}.log" if rank is not None else f"{root}/logs/mpirun.log"
    click.echo(f"distlaunch: full log: {where}; run folder {root}", err=True)
