"""``distlaunch hosts``: show where the ranks would go, without launching anything."""
from __future__ import annotations

from typing import Any

import click

from ..launch.launcher import local_cores
from ..plan.placement import Placement, place
from .options import pop_target, target_options
from .table import format_table

HOSTS_HELP = """Print the placement: every rank's host, local rank and GPU(s).

Takes the same host and GPU options as 'distlaunch run' and resolves them the same
way (--hosts, else --hostfile, else the Slurm/PBS/LSF allocation, else localhost).

\b
Examples:
  distlaunch hosts --hosts node1:4,node2:4
  distlaunch hosts --hostfile hostfiles/two-nodes-4-gpus.txt --nodes 2 --ppn 2
  distlaunch hosts --use-gpu --gpus-per-rank 2
"""


def placement_table(placed: Placement) -> str:
    """Rank → host, local rank, GPUs as aligned text."""
    rows = [("rank", "host", "local", "gpus")]
    rows += [(str(slot.rank), slot.host, str(slot.local_rank), ",".join(slot.gpus) or "-") for slot in placed.slots]
    return format_table(rows)


@click.command("hosts", help=HOSTS_HELP)
@target_options
def hosts_command(**kwargs: Any) -> None:
    placed = place(pop_target(kwargs), local_cores=local_cores())
    if placed.note:
        click.echo(f"distlaunch: {placed.note}", err=True)
    mode = f"GPU, {placed.gpus_per_rank} per rank" if placed.gpu_mode else "CPU"
    click.echo(f"# {len(placed.slots)} rank(s) on {placed.nhosts} host(s) from {placed.source.origin}; {mode}")
    click.echo(placement_table(placed), nl=False)
