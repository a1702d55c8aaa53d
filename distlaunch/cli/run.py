"""``distlaunch run``: options → JobSpec (once, here), then the launch pipeline."""
from __future__ import annotations

import shlex
import sys
from typing import Any

import click

from ..launcher import Prepared, Watch, launch, prepare
from ..records import RunPaths, new_run_id
from ..spec import JobSpec, parse_env_items
from ..supervise import Outcome
from ..units import parse_duration
from .hosts import placement_table
from .options import mpi_options, pop_mpi, pop_ssh, pop_target, ssh_options, target_options

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
  distlaunch run --hosts 10.0.0.2:4,10.0.0.3:4 --ssh-key ~/.ssh/cluster train.py

\b
Hosts come from --hosts, else --hostfile, else the Slurm/PBS/LSF allocation, else
localhost. The run folder (default ./runs/<run-id>/) holds run.json, the hostfile,
logs/rank-<N>.log and outputs/.

\b
With other nodes, the source directory is rsynced to each of them (only changed files
travel), the ranks run in that copy, and afterwards every rank's log and rank 0's
./outputs and ./logs come back into the run folder, also when the job fails.

\b
Exit code: the job's (the first failing rank's code, 128+N for signal N); 2 for bad
input, 69 when no MPI is found, 73 when the run folder cannot be written, 124 after
--timeout/--hang-timeout, 130 after Ctrl-C, 143 after SIGTERM.
"""


@click.command("run", help=RUN_HELP, context_settings={"allow_interspersed_args": False})
@target_options
@ssh_options
@click.option("--source-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Directory copied to the nodes (default: the script's directory).")
@click.option("--no-sync", is_flag=True, help="Do not copy the code: the nodes share a filesystem.")
@click.option("--collect-all-ranks", is_flag=True, help="Bring every node's ./outputs back, under outputs/<host>/.")
@click.option("--skip-checks", is_flag=True, help="Do not check the nodes before a multi-node launch.")
@click.option("--env", "env_items", multiple=True, metavar="NAME=VALUE",
              help="Set a variable on every rank (repeatable).")
@click.option("--pip", "pip_packages", multiple=True, metavar="PKG",
              help="Install this package on every node first (repeatable; cached per node).")
@click.option("--requirements", type=click.Path(dir_okay=False), metavar="FILE",
              help="Install this requirements file on every node first (cached per node).")
@click.option("--env-pass", multiple=True, metavar="PATTERN",
              help="Also export launcher variables matching this pattern, e.g. 'MYAPP_*' (repeatable).")
@mpi_options
@click.option("--run-dir", "runs_root", default="runs", show_default=True, metavar="DIR",
              help="Where run folders are created.")
@click.option("--kill-grace", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds between a forwarded Ctrl-C/SIGTERM and SIGKILL.")
@click.option("--timeout", "timeout", metavar="DURATION",
              help="End the job after this long (90, 90s, 5m, 1h30m); status 'timeout', exit 124.")
@click.option("--hang-timeout", metavar="DURATION",
              help="End the job when no rank printed anything for this long, after dumping every "
                   "rank's Python stack into its log; status 'timeout', exit 124.")
@click.option("--dry-run", is_flag=True, help="Print hostfile, mpirun argv and environment; launch nothing.")
@click.argument("script")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run_command(**kwargs: Any) -> None:
    target = pop_target(kwargs)
    watch = Watch(
        kill_grace=kwargs["kill_grace"],
        timeout=parse_duration(kwargs["timeout"], "--timeout") if kwargs["timeout"] else None,
        hang_timeout=parse_duration(kwargs["hang_timeout"], "--hang-timeout") if kwargs["hang_timeout"] else None,
    )
    spec = JobSpec(
        script=kwargs["script"],
        script_args=kwargs["args"],
        target=target,
        env=parse_env_items(kwargs["env_items"]),
        **pop_mpi(kwargs),
        runs_root=kwargs["runs_root"],
        env_pass=tuple(kwargs["env_pass"]),
        source_dir=kwargs["source_dir"],
        remote_root=kwargs["remote_root"],
        sync=not kwargs["no_sync"],
        ssh=pop_ssh(kwargs),
        collect_all_ranks=kwargs["collect_all_ranks"],
        skip_checks=kwargs["skip_checks"],
        pip_packages=tuple(kwargs["pip_packages"]),
        requirements=kwargs["requirements"],
    )
    prepared = prepare(spec)
    if prepared.placed.note:
        click.echo(f"distlaunch: {prepared.placed.note}", err=True)
    if kwargs["dry_run"]:
        show_dry_run(prepared)
        return
    placed = prepared.placed

    def banner(paths: RunPaths) -> None:
        click.echo(
            f"distlaunch: run {paths.run_id}: {len(placed.slots)} rank(s) on {placed.nhosts} host(s) "
            f"({placed.source.origin}), {'GPU' if placed.gpu_mode else 'CPU'}, {prepared.mpi.label}",
            err=True,
        )

    def progress(message: str) -> None:
        click.echo(f"distlaunch: {message}", err=True)

    paths, outcome = launch(prepared, sys.stdout.buffer, sys.stderr.buffer, watch, on_ready=banner,
                            progress=progress)
    summarize(paths.run_id, str(paths.root), outcome, len(placed.slots), placed.nhosts)
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
    click.echo(placement_table(prepared.placed), nl=False)


def summarize(run_id: str, root: str, outcome: Outcome, ranks: int, nhosts: int) -> None:
    head = f"distlaunch: run {run_id} {outcome.status.value} in {outcome.duration:.2f} s"
    if outcome.reason:
        click.echo(f"{head}: {outcome.reason}; exit code {outcome.exit_code}; run folder {root}", err=True)
        return
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
