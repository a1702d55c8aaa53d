"""``distlaunch nodes``: the nodes kept out of placement after a fault, and taking them back."""
from __future__ import annotations

import time

import click

from ..launch.health import NodeHealth
from .table import format_table

NODES_HELP = """The nodes your runs found at fault, kept out of placement for a while.

A run with --max-restarts records a node when its ranks were killed by a signal
(SIGKILL from the OOM killer, SIGSEGV, SIGBUS) or it was lost; later placements leave
it out while enough other hosts remain, until --quarantine-ttl runs out. The list is
yours alone (in $DISTLAUNCH_STATE_DIR, default ~/.local/state/distlaunch).

\b
Examples:
  distlaunch nodes                 # what is kept out, why, and for how long
  distlaunch nodes clear node3     # take node3 back now
  distlaunch nodes clear --all
"""


@click.group("nodes", invoke_without_command=True, help=NODES_HELP)
@click.pass_context
def nodes_group(ctx: click.Context) -> None:
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_command)


@nodes_group.command("list")
def list_command() -> None:
    """The nodes kept out now, with why and until when."""
    entries = NodeHealth().entries()
    if not entries:
        click.echo("no node is kept out")
        return
    rows: list[list[object]] = [["HOST", "SINCE", "LEFT", "TIMES", "RUN", "WHY"]]
    for entry in sorted(entries.values(), key=lambda item: item.since):
        rows.append([entry.host, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.since)),
                     f"{entry.left_s() / 60:.0f} min", entry.count, entry.run_id or "-", entry.reason])
    click.echo(format_table(rows), nl=False)


@nodes_group.command("clear")
@click.argument("hosts", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Take every node back.")
def clear_command(hosts: tuple[str, ...], everything: bool) -> None:
    """Take HOSTS back into placement now."""
    if bool(hosts) == everything:
        raise click.UsageError("name the hosts to take back, or give --all")
    health = NodeHealth()
    known = health.entries()
    unknown = [host for host in hosts if host not in known]
    cleared = health.clear(None if everything else hosts)
    if unknown:
        click.echo(f"not kept out: {', '.join(unknown)}", err=True)
    click.echo(f"taken back: {', '.join(cleared)}" if cleared else "nothing to take back")
