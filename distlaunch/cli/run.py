"""``distlaunch run``: options → JobSpec (once, here), then the launch pipeline."""
from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Callable
from typing import Any

import click

from ..errors import SpecError
from ..launch.launcher import Prepared, launch, prepare
from ..launch.mpisession import planned
from ..launch.supervise import Console, Outcome, Watch
from ..plan.container import RUNTIMES, ContainerSpec, image_arg
from ..plan.envpolicy import is_secret, redact
from ..plan.inputs import parse_input
from ..plan.mpirun import LaunchPlan
from ..plan.spec import LAUNCHERS, JobSpec, parse_env_file, parse_env_items, parse_tags
from ..plan.units import parse_duration, parse_size
from ..records import Failure, RunPaths, RunRecord, new_run_id
from .hosts import placement_table
from .options import (
    mpi_options,
    pop_mpi,
    pop_remote_root,
    pop_ssh,
    pop_target,
    ssh_options,
    target_options,
)
from .table import format_table

RUN_HELP = """Run SCRIPT on every rank, with MPI, and keep a run folder.

SCRIPT is a .py file (run with this Python) or any executable; ARGS after it go to
the script untouched, even ones that look like distlaunch options.

\b
Examples:
  distlaunch run --ppn 2 examples/train.py --epochs 2
  distlaunch run -n 8 -H node1:4,node2:4 train.py --lr 0.1
  distlaunch run -v --ppn 2 --output-ranks 0 train.py      # show the plan; only rank 0 on screen
  distlaunch run --hostfile hostfiles/two-nodes-4-gpus.txt --nodes 2 train.py
  distlaunch run --ppn 4 --env OMP_NUM_THREADS=1 --mpi-arg "--mca btl tcp,self" train.py
  distlaunch run --dry-run --ppn 8 --oversubscribe train.py
  distlaunch run --hosts 10.0.0.2:4,10.0.0.3:4 --ssh-key ~/.ssh/cluster train.py
  distlaunch run --env WANDB_API_KEY --env-file secrets.env train.py   # values from here, not argv
  salloc -N2 --ntasks-per-node=2 distlaunch run --launcher srun train.py   # a step of the allocation
  distlaunch run --input train=/shared/data/train --input vocab=~/vocab.txt:copy train.py --data {inputs.train}
  distlaunch run --experiment resnet --tag lr=0.1 --tag baseline train.py
  distlaunch run --ppn 4 --hvd-ops mpi train.py     # real Horovod with its MPI operations
  distlaunch run -H n1:4,n2:4,n3:4 --nodes 2 --max-restarts 3 train.py   # relaunch on failure, spare node
  distlaunch run -H n1:4,n2:4 --max-restarts 2 --min-nodes 1 train.py    # go on without a node at fault
  distlaunch run --ppn 2 --container /images/train train.py   # each rank inside the image (Charliecloud)

\b
Hosts come from --hosts, else --hostfile, else the Slurm/PBS/LSF allocation, else
localhost. The run folder (default ./runs/<run-id>/) holds run.json, the hostfile,
logs/rank-<N>.log, outputs/ and code/.

\b
Every run works in its own copy of the source directory (the script's directory unless
--source-dir): code/ in the run folder, or its synced copy on other nodes. So the
script's ./outputs and ./logs are the run's own, relative paths are relative to the
source dir, and code/ keeps the code that ran ('distlaunch runs restore' gives it back).
--in-place runs in the current directory instead, as plain mpirun would.

\b
With other nodes, the snapshot is rsynced to each of them (only changed files travel),
the ranks run in that copy, and afterwards every rank's log and rank 0's ./outputs and
./logs come back into the run folder, also when the job fails.

\b
Inside a Slurm allocation (salloc, sbatch) hosts come from it, and the nodes are reached
through srun steps, so no ssh is needed.

\b
With --max-restarts N, a failed job is relaunched whole (a fresh MPI job: ranks
re-placed, hvd initialised again), up to N times, after --restart-delay (doubled each
time). Nodes at fault (ranks killed by a signal, a node lost) are recorded for
--quarantine-ttl and left out while enough others remain ('distlaunch nodes'); with
--min-nodes the job may go on with fewer. run.json lists every attempt and why it ended.

\b
Exit code: the job's (the first failing rank's code, 128+N for signal N); 2 for bad
input, 69 when no MPI is found, 70 when the job could not be started (mpirun failed,
or the code sync or package install on a node), 73 when the run folder cannot be
written, 124 after --timeout/--hang-timeout, 130 after Ctrl-C, 143 after SIGTERM.
"""


_JOB_OPTIONS = [
    click.option("--source-dir", type=click.Path(file_okay=False), metavar="DIR",
                 help="Directory copied to the nodes (default: the script's directory)."),
    click.option("--no-sync", is_flag=True, help="Do not copy the code: the nodes share a filesystem."),
    click.option("--collect-all-ranks", is_flag=True, help="Bring every node's ./outputs back, under outputs/<host>/."),
    click.option("--skip-checks", is_flag=True, help="Do not check the nodes before a multi-node launch."),
    click.option("--env", "env_items", multiple=True, metavar="NAME[=VALUE]",
                 help="Set a variable on every rank (repeatable); NAME alone takes its value from here."),
    click.option("--env-file", "env_files", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
                 help="Set the NAME=VALUE lines of FILE on every rank (repeatable; keeps secrets off argv)."),
    click.option("--pip", "pip_packages", multiple=True, metavar="PKG",
                 help="Install this package on every node first (repeatable; cached per node)."),
    click.option("--requirements", type=click.Path(dir_okay=False), metavar="FILE",
                 help="Install this requirements file on every node first (cached per node)."),
    click.option("--env-pass", multiple=True, metavar="PATTERN",
                 help="Also export launcher variables matching this pattern, e.g. 'MYAPP_*' (repeatable)."),
    click.option("--run-dir", "runs_root", default="runs", show_default=True, metavar="DIR",
                 help="Where run folders are created."),
    click.option("--iface", metavar="NAME", help="Network interface for MPI and gloo between nodes, e.g. eth0."),
    click.option("--launcher", type=click.Choice(LAUNCHERS), default="mpirun", show_default=True,
                 help="Start the ranks with mpirun, or as a step of the Slurm allocation you run in (srun)."),
    click.option("--in-place", is_flag=True,
                 help="Run in the current directory as it is (plain mpirun): no code snapshot, and only "
                      "$DISTLAUNCH_OUTPUT_DIR lands in the run folder."),
    click.option("--max-source-size", default="2GiB", show_default=True, metavar="SIZE",
                 help="Refuse to snapshot a source dir holding more than this (0: no limit), before copying "
                      "anything: a run started from $HOME or /tmp stops at once."),
    click.option("--max-source-files", type=click.IntRange(min=0), default=20_000, show_default=True, metavar="N",
                 help="Likewise for its number of files."),
    click.option("--hvd-backend", type=click.Choice(["auto", "horovod", "torch"]), default="auto", show_default=True,
                 help="distlaunch.hvd's runtime: real Horovod when installed (auto), or distlaunch's own on "
                      "torch.distributed; sets DISTLAUNCH_HVD_BACKEND on every rank."),
    click.option("--hvd-ops", type=click.Choice(["auto", "gloo", "mpi"]), default="auto", show_default=True,
                 help="Real Horovod's CPU operations: auto is Gloo's where no rank has CUDA and every host's "
                      "name resolves, else MPI's; Adasum needs mpi. Sets DISTLAUNCH_HVD_OPS on every rank."),
    click.option("--experiment", metavar="NAME", help="Group the run under this name [default: the source dir's]."),
    click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Tag the run (repeatable)."),
    click.option("--input", "inputs", multiple=True, metavar="NAME=PATH[:copy]",
                 help="Data for the script: PATH in place (a filesystem every node sees), or with ':copy' "
                      "staged once per node into a cache; the script gets $DISTLAUNCH_INPUT_<NAME> and "
                      "{inputs.NAME} in its arguments (repeatable)."),
    click.option("--container", metavar="IMAGE",
                 help="Run every rank inside this image: a directory or .sqfs (Charliecloud), a .sif (Apptainer, "
                      "Singularity) or a podman image name; mpirun stays outside. The image needs this Python "
                      "(same path, or --container-python) with distlaunch and the job's packages."),
    click.option("--container-runtime", type=click.Choice(list(RUNTIMES)),
                 help="The runtime for --container [default: by the image: charliecloud for a directory or .sqfs, "
                      "apptainer for a .sif, podman for a name]."),
    click.option("--container-bind", "container_binds", multiple=True, metavar="SRC[:DST]",
                 help="Also bind this path into the container (repeatable); the run's working copy, run folder "
                      "and inputs are bound already."),
    click.option("--container-python", metavar="PATH",
                 help="The Python inside the image [default: this one's path, as on every node]."),
    click.option("--max-restarts", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
                 help="After a failure, relaunch the whole job, up to N times (never after Ctrl-C, cancel or "
                      "--timeout); each attempt's logs stay under attempts/<K>/, and the ranks see "
                      "$DISTLAUNCH_RESTART_COUNT (resume with distlaunch.checkpoint)."),
    click.option("--restart-delay", type=click.FloatRange(min=0), default=1.0, show_default=True, metavar="SECONDS",
                 help="Wait this long before the first restart, twice as long before each next one (at most 60 s)."),
    click.option("--min-nodes", type=click.IntRange(min=1), metavar="M",
                 help="A restart may go on with as few as M nodes when nodes were found at fault "
                      "[default: all the nodes asked for]."),
    click.option("--quarantine-ttl", default="1h", show_default=True, metavar="DURATION",
                 help="How long a node found at fault (ranks killed by a signal, node lost) stays out of "
                      "placement while enough others remain; 'distlaunch nodes' lists them; 0: do not record."),
]


def job_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Everything that describes the job itself: shared by ``run`` and ``submit``."""
    for option in reversed(_JOB_OPTIONS):
        func = option(func)
    return mpi_options(ssh_options(target_options(func)))


def hvd_env(backend: str, ops: str, env: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """--hvd-backend/--hvd-ops as the variables distlaunch.hvd reads (refusing an --env
    that says otherwise, so the job never runs with a choice nobody made)."""
    chosen = [(name, value) for name, value in (("DISTLAUNCH_HVD_BACKEND", backend), ("DISTLAUNCH_HVD_OPS", ops))
              if value != "auto"]
    if backend == "torch" and ops != "auto":
        raise SpecError(f"--hvd-ops {ops} chooses real Horovod's operations, but --hvd-backend torch does not use "
                        "real Horovod: drop one of the two")
    given = dict(env)
    for name, value in chosen:
        if given.get(name, value) != value:
            option = "--hvd-backend" if name.endswith("BACKEND") else "--hvd-ops"
            raise SpecError(f"{option} {value} but --env {name}={given[name]}: give one of the two")
    return chosen


def spec_from_options(kwargs: dict[str, Any]) -> JobSpec:
    """The JobSpec of the options (the one place options become a spec: the command line's,
    and ``Job``'s, which are the same options by the same names)."""
    env = [pair for path in kwargs.pop("env_files") for pair in parse_env_file(path)]
    env += parse_env_items(kwargs.pop("env_items"))
    env += hvd_env(kwargs.pop("hvd_backend"), kwargs.pop("hvd_ops"), env)
    return JobSpec(
        script=kwargs["script"],
        script_args=kwargs["args"],
        target=pop_target(kwargs),
        env=tuple(env),
        **pop_mpi(kwargs),
        runs_root=kwargs["runs_root"],
        env_pass=tuple(kwargs["env_pass"]),
        source_dir=kwargs["source_dir"],
        **pop_remote_root(kwargs),
        sync=not kwargs["no_sync"],
        ssh=pop_ssh(kwargs),
        collect_all_ranks=kwargs["collect_all_ranks"],
        skip_checks=kwargs["skip_checks"],
        pip_packages=tuple(kwargs["pip_packages"]),
        requirements=kwargs["requirements"],
        iface=kwargs["iface"],
        launcher=kwargs["launcher"],
        in_place=kwargs["in_place"],
        max_source_files=kwargs["max_source_files"],
        max_source_bytes=parse_limit(kwargs["max_source_size"], "--max-source-size"),
        experiment=kwargs["experiment"],
        tags=parse_tags(kwargs["tags"]),
        inputs=tuple(parse_input(item) for item in kwargs["inputs"]),
        max_restarts=kwargs["max_restarts"],
        restart_delay=kwargs["restart_delay"],
        min_nodes=kwargs["min_nodes"],
        quarantine_ttl=parse_ttl(kwargs["quarantine_ttl"]),
        container=pop_container(kwargs),
    )


def parse_limit(text: str | int, what: str) -> int:
    """A size limit in bytes (``2GiB``), or 0 for none."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    return parse_size(str(text), what, allow_zero=True)


def pop_container(kwargs: dict[str, Any]) -> ContainerSpec | None:
    """--container and its companions (which mean nothing without it)."""
    image = kwargs.pop("container")
    runtime, binds, python = (kwargs.pop("container_runtime"), tuple(kwargs.pop("container_binds")),
                              kwargs.pop("container_python"))
    if image is None:
        given = [name for name, value in (("--container-runtime", runtime), ("--container-bind", binds),
                                          ("--container-python", python)) if value]
        if given:
            raise SpecError(f"{given[0]} without --container IMAGE: name the image, or drop {given[0]}")
        return None
    return ContainerSpec(image_arg(image), runtime, binds, python)


def parse_ttl(text: str | float) -> float:
    """--quarantine-ttl: a duration, or 0 (do not record nodes at fault)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    if re.fullmatch(r"\s*(0+(\.0*)?\s*(ms|s|m|h|d)?\s*)+", str(text), re.IGNORECASE):
        return 0.0  # any zero duration: 0, 0s, 0m, 0h
    return parse_duration(str(text), "--quarantine-ttl")


@click.command("run", help=RUN_HELP, context_settings={"allow_interspersed_args": False})
@job_options
@click.option("--kill-grace", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds between a forwarded Ctrl-C/SIGTERM and SIGKILL.")
@click.option("--timeout", "timeout", metavar="DURATION",
              help="End the job after this long (90, 90s, 5m, 1h30m); status 'timeout', exit 124.")
@click.option("--hang-timeout", metavar="DURATION",
              help="End the job when no rank printed anything for this long, after dumping every "
                   "rank's Python stack into its log; status 'timeout', exit 124.")
@click.option("--output-ranks", metavar="0,1", help="Show only these ranks' output here (the logs keep all).")
@click.option("-v", "--verbose", is_flag=True, help="Show the plan: mpirun argv and what distlaunch added, and why.")
@click.option("--dry-run", is_flag=True, help="Print hostfile, mpirun argv and environment; launch nothing.")
@click.argument("script")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run_command(**kwargs: Any) -> None:
    watch = watch_from_options(kwargs)
    warn_secret_values(kwargs["env_items"])
    spec = spec_from_options(kwargs)
    console = Console(sys.stdout.buffer, sys.stderr.buffer, parse_ranks(kwargs["output_ranks"]))
    prepared = prepare(spec, progress)
    if prepared.placed.note:
        click.echo(f"distlaunch: {prepared.placed.note}", err=True)
    if kwargs["dry_run"]:
        show_dry_run(prepared)
        return
    placed = prepared.placed
    engine = "srun" if prepared.srun else prepared.mpi.label

    def ready(paths: RunPaths) -> None:
        click.echo(
            f"distlaunch: run {paths.run_id}: {len(placed.slots)} rank(s) on {placed.nhosts} host(s) "
            f"({placed.source.origin}), {'GPU' if placed.gpu_mode else 'CPU'}, {engine}",
            err=True,
        )
        if kwargs["verbose"]:
            the_plan = prepared.plan(paths.run_id, str(paths.root))
            click.echo(explain(the_plan), err=True, nl=False)

    paths, outcome = launch(prepared, console, watch, on_ready=ready, progress=progress)
    record = RunRecord.load(paths)
    summarize(paths.run_id, str(paths.root), outcome, record.ranks, record.nodes, len(record.attempts) - 1,
              record.duration_s)
    sys.exit(outcome.exit_code)


def watch_from_options(kwargs: dict[str, Any]) -> Watch:
    """How the supervisor watches the job: --kill-grace, --timeout, --hang-timeout."""
    return Watch(
        kill_grace=kwargs["kill_grace"],
        timeout=parse_duration(kwargs["timeout"], "--timeout") if kwargs["timeout"] else None,
        hang_timeout=parse_duration(kwargs["hang_timeout"], "--hang-timeout") if kwargs["hang_timeout"] else None,
    )


def progress(message: str) -> None:
    click.echo(f"distlaunch: {message}", err=True)


def parse_ranks(text: str | None) -> frozenset[int] | None:
    """``--output-ranks 0,2-3`` → {0, 2, 3}."""
    if not text:
        return None
    ranks: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            ranks.update(range(int(low), int(high) + 1) if dash else [int(low)])
        except ValueError:
            raise SpecError(f"--output-ranks {text!r}: write ranks like 0,1 or 0-3") from None
    return frozenset(ranks)


def warn_secret_values(items: tuple[str, ...]) -> None:
    for item in items:
        name, eq, _value = item.partition("=")
        if eq and is_secret(name):
            click.echo(f"distlaunch: warning: --env {name}=... puts a secret on the command line, where "
                       f"'ps' shows it: write --env {name} (value from your environment) or use --env-file",
                       err=True)


def explain(the_plan: LaunchPlan) -> str:
    """What ``-v`` shows: the mpirun argv and what distlaunch added (flags, and its
    session folder's variable), with reasons."""
    lines = [f"distlaunch: launch argv: {shlex.join(the_plan.argv)}\n"]
    added = [*the_plan.added, *planned(the_plan, os.environ)]
    if added:
        lines.append("distlaunch: added on its own:\n")
        lines += [f"distlaunch:   {row}" for row in format_table(added).splitlines(keepends=True)]
    return "".join(lines)


def show_dry_run(prepared: Prepared) -> None:
    run_id = new_run_id()
    run_dir = f"{prepared.spec.runs_root}/{run_id}"
    the_plan = prepared.plan(run_id, run_dir)
    click.echo(f"# hostfile ({the_plan.hostfile_path})")
    click.echo(the_plan.hostfile_text, nl=False)
    click.echo("# command")
    click.echo(shlex.join(the_plan.argv))
    session = planned(the_plan, os.environ)  # in mpirun's environment, not exported with -x
    click.echo("# environment added")
    for name, value in sorted(redact(the_plan.env).items()):
        click.echo(f"{name}={value}")
    for line, _why in session:
        click.echo(line)
    added = [*the_plan.added, *session]
    if added:
        click.echo("# added by distlaunch")
        click.echo(format_table(added), nl=False)
    click.echo("# placement")
    click.echo(placement_table(prepared.placed), nl=False)


def summarize(run_id: str, root: str, outcome: Outcome, ranks: int, nhosts: int, restarts: int = 0,
              duration: float | None = None) -> None:
    took = outcome.duration if duration is None else duration
    head = f"distlaunch: run {run_id} {outcome.status.value} in {took:.2f} s"
    if restarts > 0:
        head += f" after {restarts} restart{'s' if restarts > 1 else ''}"
    ranks_fault = outcome.failure is not None and outcome.failure.rank is not None and \
        outcome.exit_code == outcome.failure.exit_code  # then the reason only adds to it
    if outcome.reason and not ranks_fault:
        click.echo(f"{head}: {outcome.reason}; exit code {outcome.exit_code}; run folder {root}", err=True)
        if outcome.failure is not None and outcome.failure.rank is not None:  # e.g. a stop after it
            click.echo(f"distlaunch: first failure: {outcome.failure.describe()}", err=True)
            _last_words(outcome.failure, root)
        return
    if outcome.failure is None:
        click.echo(f"{head} ({ranks} ranks on {nhosts} host(s)); run folder {root}", err=True)
        return
    click.echo(f"{head}: {outcome.failure.describe()} (first failure), exit code {outcome.exit_code}", err=True)
    _last_words(outcome.failure, root, outcome.reason)


def _last_words(failure: Failure, root: str, reason: str = "") -> None:
    """The failed rank's last lines, then ``reason``, then where its whole log is."""
    if failure.last_lines:
        click.echo("distlaunch: its last lines:", err=True)
        for line in failure.last_lines:
            click.echo(f"    {line}", err=True)
    if reason:
        click.echo(f"distlaunch: {reason}", err=True)
    rank = failure.rank
    where = f"{root}/logs/rank-{rank}.log" if rank is not None else f"{root}/logs/mpirun.log"
    click.echo(f"distlaunch: full log: {where}; run folder {root}", err=True)
