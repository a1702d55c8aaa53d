"""``distlaunch submit``: the job as a Slurm batch job; returns its run id at once."""
from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import SpecError
from ..launch.slurm import submit
from ..plan.slurm import SlurmTarget, batch_lines, batch_script
from .options import split_mpi_args
from .run import job_options, progress, spec_from_options, warn_secret_values

HELP = """Submit SCRIPT to Slurm as a batch job and return at once with its run id.

The run folder is made now (state 'queued', with the Slurm job id); inside the
allocation the batch job launches the ranks exactly as 'distlaunch run' would there
(mpirun, or srun steps with --launcher srun), and the run folder fills as with any run:
logs, exit records, rank 0's outputs. Follow it with 'distlaunch runs list', 'logs
--follow', 'runs show'; 'distlaunch cancel' takes it out of the queue (scancel) or
stops it. The run folder (--run-dir) must be on a filesystem the compute nodes see.

\\b
Examples:
  distlaunch submit --nodes 2 --ppn 2 --partition debug --time 30 examples/train.py --epochs 2
  distlaunch submit --nodes 4 --ppn 8 --use-gpu --account proj42 --time 4:00:00 train.py
  distlaunch submit --sbatch-arg "--qos=high --mail-type=END" --launcher srun train.py
  distlaunch submit --dry-run --nodes 2 --ppn 4 train.py      # print the batch script only
"""


@click.command("submit", help=HELP, context_settings={"allow_interspersed_args": False})
@job_options
@click.option("--partition", metavar="NAME", help="Slurm partition (queue).")
@click.option("--time", "time_limit", metavar="TIME", help="Time limit in Slurm's format: 30, 2:00:00, 1-12:00:00.")
@click.option("--account", metavar="NAME", help="Slurm account to charge.")
@click.option("--job-name", metavar="NAME", help="Slurm job name [default: distlaunch-<script>].")
@click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="ARGS",
              help="More sbatch options, e.g. \"--qos=high\" (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the batch script; submit nothing.")
@click.argument("script")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def submit_command(**kwargs: Any) -> None:
    target = SlurmTarget(kwargs.pop("partition"), kwargs.pop("time_limit"), kwargs.pop("account"),
                         kwargs.pop("job_name"), split_mpi_args(kwargs.pop("sbatch_args")))
    dry_run = kwargs.pop("dry_run")
    warn_secret_values(kwargs["env_items"])
    spec = spec_from_options(kwargs)
    if spec.target.hosts or spec.target.hostfile:
        raise SpecError("--hosts/--hostfile do not apply to a batch job: Slurm chooses the nodes "
                        "(use --nodes, --ppn and --sbatch-arg \"--nodelist=...\")")
    nodes, ppn = spec.target.nodes or 1, spec.target.ppn or 1
    ranks = spec.target.np or nodes * ppn
    if dry_run:
        lines = batch_lines(target, nodes, ppn, "<run folder>/logs/sbatch.log", "distlaunch-job")
        click.echo(batch_script(spec.python, "<run folder>", lines), nl=False)
        return
    paths = submit(spec, target, ranks, nodes, ppn, progress)
    from ..records import RunRecord

    job_id = (RunRecord.load(paths).scheduler or {}).get("job_id")
    click.echo(f"distlaunch: run {paths.run_id} queued as Slurm job {job_id}; run folder {paths.root}", err=True)
    click.echo(paths.run_id)
    sys.exit(0)
