"""Run history commands: ``runs list|show|rm``, ``logs``, ``download``, ``cancel``."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from ..launch import snapshot
from ..launch.history import add_tags, current, matches, merge, remove, request_cancel, resolve, run_folders, summary
from ..launch.metrics import read_metrics
from ..plan.units import human_size
from ..records import RunPaths
from .table import format_table

RUN_DIR_OPTION = click.option("--run-dir", "runs_root", default="runs", show_default=True, metavar="DIR",
                              help="Where the run folders are.")


@click.group("runs")
def runs_group() -> None:
    """List, inspect and remove past runs (ids may be shortened to any unique prefix).

    \b
    Examples:
      distlaunch runs list --experiment resnet --tag lr=0.1
      distlaunch runs show 20261122-2153 --files
      distlaunch runs restore 20261122-2153 ./code-that-ran
      distlaunch runs tag 20261122-2153 best baseline=no
      distlaunch runs rm 20261122-215342-417-a298
    """


@runs_group.command("list")
@click.option("--experiment", metavar="NAME", help="Only the runs of this experiment.")
@click.option("--tag", "tags", multiple=True, metavar="KEY[=VALUE]", help="Only runs with this tag (repeatable).")
@click.option("--sweep", metavar="NAME", help="Only the trials of this sweep ('distlaunch sweep').")
@RUN_DIR_OPTION
def list_command(runs_root: str, experiment: str | None, tags: tuple[str, ...], sweep: str | None) -> None:
    """One line per run, oldest first."""
    tags = (*tags, f"sweep={sweep}") if sweep else tags
    records = [current(RunPaths(p)) for p in run_folders(runs_root)]
    rows = [summary(record) for record in records if matches(record, experiment, tags)]
    if not rows:
        which = " matching" if experiment or tags else ""
        click.echo(f"no{which} runs under {runs_root}")
        return
    header = {"id": "id", "experiment": "experiment", "script": "script", "status": "status",
              "shape": "nodes x ppn", "started": "started", "duration": "duration", "exit": "exit", "tags": "tags"}
    click.echo(format_table([list(header.values()), *([row[key] for key in header] for row in rows)]), nl=False)


@runs_group.command("show")
@click.argument("run_id")
@click.option("--plot", "plot_to", type=click.Path(dir_okay=False), help="Also draw its metrics into this PNG.")
@click.option("--files", "list_files", is_flag=True, help="Also list the files of its code snapshot.")
@RUN_DIR_OPTION
def show_command(run_id: str, runs_root: str, plot_to: str | None, list_files: bool) -> None:
    """Details of one run: placement, status, metrics summary, root cause if it failed."""
    paths = resolve(runs_root, run_id)
    if plot_to:
        from ..launch.metrics import plot

        click.echo(f"plot      {plot(paths.root, Path(plot_to))}")
    record = current(paths)
    row = summary(record)
    click.echo(f"run       {record.id}")
    if record.experiment:
        click.echo(f"experiment {record.experiment}")
    if record.tags:
        click.echo(f"tags      {', '.join(f'{k}={v}' if v else k for k, v in sorted(record.tags.items()))}")
    click.echo(f"script    {record.script} {' '.join(record.spec.get('script_args', []))}")
    click.echo(f"status    {record.status.value} (exit {row['exit']}), {row['duration']}")
    click.echo(f"started   {row['started']}")
    click.echo(f"ranks     {record.ranks} on {record.nodes} host(s) ({record.host_source})")
    click.echo(f"mpi       {record.versions.get('mpi')}")
    if record.container:
        box = record.container
        click.echo(f"container {box['image']} ({box['runtime']}, {box.get('identity') or 'identity not recorded'})")
    if record.scheduler:
        click.echo(f"slurm     job {record.scheduler.get('job_id')} (submitted "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record.scheduler['submitted']))})")
    click.echo(f"folder    {paths.root}")
    snap = snapshot.load(paths)
    if snap is not None:
        click.echo(f"code      {len(snap.digests)} files ({human_size(snap.nbytes)}) from {snap.source}, sha256 "
                   f"{snap.hash}; restore: distlaunch runs restore {record.id} DEST")
        if list_files:
            for name in snap.files:
                click.echo(f"          {snap.digests[name][:12]}  {name}")
    elif record.code is None and record.status.finished:
        click.echo(f"code      none kept: ran in place in {record.launcher.get('cwd', '?')}")
    for item in record.inputs:
        how = f"copied, sha256 {str(item.get('hash'))[:16]}" if item.get("mode") == "copy" else "in place"
        click.echo(f"input     {item['name']}: {item['source']} ({how}) at {item['path']}")
    if record.reason:
        click.echo(f"reason    {record.reason}")
    if record.error:
        click.echo(f"error     {record.error}")
    failure = record.first_failure
    if failure:
        who = f"rank {failure.rank} on {failure.host}" if failure.rank is not None else failure.launcher or "mpirun"
        how = failure.exception or (f"killed by {failure.signal}" if failure.signal
                                    else f"exit code {failure.exit_code}")
        click.echo(f"failure   {who}: {how}")
        for line in failure.last_lines:
            click.echo(f"          | {line}")
    for attempt in record.attempts:
        blamed = "; ".join(f"{host} at fault: {why}" for host, why in attempt.blamed.items())
        click.echo(f"attempt   {attempt.describe()[len('attempt '):]} on {', '.join(attempt.hosts)}"
                   + (f"; {blamed}" if blamed else "") + (f"; {attempt.next}" if attempt.next else ""))
    metrics = read_metrics(paths.root)
    if metrics:
        click.echo("metrics   name: last (min .. max, count)")
        for name, items in sorted(metrics.items()):
            values = [i["value"] for i in items if isinstance(i["value"], (int, float))]
            if values:
                span = f"{min(values):.6g} .. {max(values):.6g}"
                click.echo(f"          {name}: {values[-1]:.6g} ({span}, {len(values)})")


@runs_group.command("restore")
@click.argument("run_id")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@RUN_DIR_OPTION
def restore_command(run_id: str, dest: Path, runs_root: str) -> None:
    """Copy the code a run ran (its snapshot) into DEST, a new or empty folder, checked
    against the recorded hash."""
    paths = resolve(runs_root, run_id)
    snap = snapshot.restore(paths, dest)
    click.echo(f"restored {len(snap.digests)} files of run {paths.run_id} into {dest} (sha256 {snap.hash[:16]})")


@runs_group.command("tag")
@click.argument("run_id")
@click.argument("tags", nargs=-1, required=True, metavar="KEY[=VALUE]...")
@RUN_DIR_OPTION
def tag_command(run_id: str, tags: tuple[str, ...], runs_root: str) -> None:
    """Tag a run (running or long ended)."""
    paths = resolve(runs_root, run_id)
    add_tags(paths, {key: value for key, _eq, value in (item.partition("=") for item in tags)})
    click.echo(f"run {paths.run_id}: {', '.join(tags)}")


@runs_group.command("rm")
@click.argument("run_ids", nargs=-1, required=True)
@RUN_DIR_OPTION
def rm_command(run_ids: tuple[str, ...], runs_root: str) -> None:
    """Delete finished runs' folders."""
    for run_id in run_ids:
        paths = resolve(runs_root, run_id)
        remove(paths)
        click.echo(f"removed {paths.run_id}")


@click.command("logs")
@click.argument("run_id")
@click.option("--rank", type=int, default=None, help="Show only this rank's log.")
@click.option("--all", "raw", is_flag=True, help="Every line as printed, without folding.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the run ends.")
@RUN_DIR_OPTION
def logs_command(run_id: str, rank: int | None, raw: bool, follow: bool, runs_root: str) -> None:
    """Show a run's output: merged (the same line from several ranks folded into one,
    like '[0-3] epoch 1 loss 0.5'), one rank's (--rank N), or everything (--all).

    \b
    Examples:
      distlaunch logs 20261122-2153
      distlaunch logs 20261122-2153 --rank 1
      distlaunch logs 20261122-2153 --all --follow
    """
    paths = resolve(runs_root, run_id)
    source = paths.rank_log(rank) if rank is not None else paths.output_log
    if not source.exists() and not follow:
        what = f"log for rank {rank}" if rank is not None else "output"
        raise click.ClickException(f"run {paths.run_id} has no {what}")
    if not follow:
        lines = source.read_text(encoding="utf-8", errors="replace").splitlines()
        for line in (lines if raw or rank is not None else merge(lines)):
            click.echo(line)
        return
    offset = 0
    while True:
        finished = current(paths).status.finished
        if source.exists():
            with open(source, "rb") as handle:
                if os.fstat(handle.fileno()).st_size < offset:
                    offset = 0  # a restart began a new log (the old one is in attempts/)
                handle.seek(offset)
                data = handle.read()
            offset += len(data)
            sys.stdout.write(data.decode("utf-8", "replace"))
            sys.stdout.flush()
        if finished:
            return
        time.sleep(0.2)


@click.command("download")
@click.argument("run_id")
@click.argument("name")
@click.option("-o", "--output", "dest", default=None, help="Where to put it (file or folder; default: here).")
@RUN_DIR_OPTION
def download_command(run_id: str, name: str, dest: str | None, runs_root: str) -> None:
    """Copy a file of a run (e.g. outputs/model.onnx) out of its folder.

    \b
    Example:
      distlaunch download 20261122-2153 outputs/model.onnx -o model.onnx
    """
    from ..launch.api import Run

    target = Run(resolve(runs_root, run_id)).download_file(name, dest)
    click.echo(str(target))


@click.command("cancel")
@click.argument("run_id")
@RUN_DIR_OPTION
def cancel_command(run_id: str, runs_root: str) -> None:
    """Stop a running run (as Ctrl-C in its terminal would) and wait until it has ended."""
    paths = resolve(runs_root, run_id)
    status = request_cancel(paths)
    click.echo(f"run {paths.run_id}: {status}")
