"""``distlaunch bench train``: training throughput per launcher and runtime, side by side.

Every row runs ``python -m distlaunch.bench.train`` (Horovod's synthetic benchmark
loop) with the same ranks on this host, rows interleaved round by round so that noise
hits all alike; the table gives samples/s (median over every timed batch of every
round, with min and max) and each row's ratio to torchrun + DDP and to the ceiling (the
same ranks training alone, with no communication at all).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..errors import DistlaunchError

HELP = """Measure training throughput under every launcher and runtime installed here.

Each row trains the same model with the same loop (Horovod's synthetic benchmark:
DistributedOptimizer, parameters and optimizer state broadcast, timed batches of
forward, backward and step on random data) with --ranks ranks on this host, one
thread each by default. Rows run interleaved, --rounds times.

\b
Rows (those whose parts are not installed are skipped):
  ceiling               every rank trains alone (distlaunch run, no communication at all)
  hvd-torch             distlaunch run + distlaunch.hvd, torch backend
  ddp                   torchrun --standalone + torch DDP (gloo)
  horovodrun-gloo       horovodrun --gloo + real Horovod
  distlaunch-hvd-mpi    distlaunch run + real Horovod, MPI operations
  distlaunch-hvd-gloo   distlaunch run + real Horovod, Gloo operations (its default without CUDA)
  mpirun-hvd            plain mpirun + real Horovod (MPI operations)

A row that fails is named with its last lines, and the others go on; the exit status is
1 when any row failed or none ran. Interrupted, it ends the running row's processes.

\b
Examples:
  distlaunch bench train
  distlaunch bench train --model transformer --rounds 3 --json train.json --plot train.png
  distlaunch bench train --rows ddp,hvd-torch --ranks 4 --threads 2
"""

ROW_NAMES = {
    "ceiling": "ceiling: no communication",
    "hvd-torch": "distlaunch + hvd, torch backend",
    "ddp": "torchrun + DDP (gloo)",
    "horovodrun-gloo": "horovodrun --gloo + Horovod",
    "distlaunch-hvd-mpi": "distlaunch + Horovod, MPI ops",
    "distlaunch-hvd-gloo": "distlaunch + Horovod, Gloo ops",
    "mpirun-hvd": "mpirun + Horovod",
}
PAYLOAD = ["-m", "distlaunch.bench.train"]


class BenchTrainError(DistlaunchError):
    """A row of the training benchmark failed, or none could run."""

    exit_code = 1


@dataclass
class Row:
    key: str
    argv: list[str]
    env: dict[str, str]
    rates: list[float] = field(default_factory=list)
    error: str = ""


def horovod_installed() -> bool:
    probe = [sys.executable, "-c", "import horovod.torch"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def make_rows(ranks: int, runs: str, wanted: set[str]) -> list[Row]:
    """The ``wanted`` rows (every one for 'all') that can run here, in ROW_NAMES' order."""
    python = sys.executable
    every = "all" in wanted

    def want(key: str) -> bool:
        return every or key in wanted

    crowded = ["--oversubscribe"] if ranks > usable_cores() else []
    distlaunch = [python, "-m", "distlaunch", "run", "--ppn", str(ranks), *crowded, "--kill-grace", "2",
                  "--run-dir", runs, "--in-place", python, *PAYLOAD]
    rows = [Row("ceiling", distlaunch, {"RUNTIME": "none"}),
            Row("hvd-torch", distlaunch, {"DISTLAUNCH_HVD_BACKEND": "torch"}),
            Row("ddp", [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *PAYLOAD],
                {"RUNTIME": "ddp"})]
    rows = [row for row in rows if want(row.key)]
    horovod_rows = [key for key in ROW_NAMES if key.startswith(("horovodrun", "distlaunch-hvd", "mpirun-hvd"))]
    if not any(want(key) for key in horovod_rows) or not horovod_installed():
        return rows
    horovodrun = shutil.which("horovodrun", path=str(Path(python).parent)) or shutil.which("horovodrun")
    if horovodrun and want("horovodrun-gloo"):
        rows.append(Row("horovodrun-gloo", [horovodrun, "--gloo", "-np", str(ranks), "-H", f"localhost:{ranks}",
                                            python, *PAYLOAD], {"DISTLAUNCH_HVD_BACKEND": "horovod"}))
    for ops in ("mpi", "gloo"):
        if want(f"distlaunch-hvd-{ops}"):
            rows.append(Row(f"distlaunch-hvd-{ops}", distlaunch,
                            {"DISTLAUNCH_HVD_BACKEND": "horovod", "DISTLAUNCH_HVD_OPS": ops}))
    if want("mpirun-hvd"):
        argv, env = plain_mpirun(ranks)
        rows.append(Row("mpirun-hvd", [*argv, python, *PAYLOAD],
                        {**env, "DISTLAUNCH_HVD_BACKEND": "horovod", "DISTLAUNCH_HVD_OPS": "mpi"}))
    return rows


def usable_cores() -> int:
    """The cores this process may run on (a container's or cpuset's, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plain_mpirun(ranks: int) -> tuple[list[str], dict[str, str]]:
    """mpirun as a user would start ranks on this host by hand, for Open MPI or MPICH; the
    ranks inherit its environment (local launch), so nothing needs -x."""
    from ..plan.mpi import Flavour, detect, find_mpirun

    mpi = detect(find_mpirun())
    env = {"MPI4PY_LIBMPI": mpi.libmpi} if mpi.libmpi and "MPI4PY_LIBMPI" not in os.environ else {}
    if mpi.flavour is not Flavour.OPENMPI:
        return [mpi.path, "-n", str(ranks), "-bind-to", "none"], env
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    crowded = ["--oversubscribe"] if ranks > usable_cores() else []
    return [mpi.path, "-n", str(ranks), "--bind-to", "none", *crowded], env


def run_row(row: Row, env: dict[str, str], cwd: str, timeout: float) -> list[float]:
    """One run of a row: its rates, or raises BenchTrainError with the row's last words."""
    full = {**os.environ, "RUNTIME": "hvd", "DISTLAUNCH_HVD_QUIET": "1", **env, **row.env}
    # its own process group: a row that overruns (or Ctrl-C here) ends with all its ranks
    proc = subprocess.Popen(row.argv, env=full, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException as exc:
        end_row(proc)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise BenchTrainError(f"{row.key}: no result after {timeout:.0f} s") from None
        raise
    for line in stdout.splitlines():
        if "RESULT " in line:
            return [float(rate) for rate in json.loads(line.split("RESULT ", 1)[1])["rates"]]
    tail = [line for line in (stderr + stdout).splitlines() if line.strip()][-3:]
    raise BenchTrainError(f"{row.key}: exit {proc.returncode}, no result: " + " | ".join(tail))


END_GRACE_S = 20.0  # > distlaunch run's --kill-grace 2 and torchrun's own clean-up of its workers


def end_row(proc: subprocess.Popen[str]) -> None:
    """End a row with everything it started. The launchers put their ranks in sessions
    of their own (distlaunch run's mpirun, torchrun's workers), out of reach of the row's
    process group: so the row's descendants are noted while it ends, the group gets
    SIGTERM (each launcher then ends its ranks its own way), and whatever of them is still
    there after END_GRACE_S gets SIGKILL, by pid (psutil checks each is still the process
    noted). The row's output is drained meanwhile, so no launcher blocks writing it."""
    # a second Ctrl-C (or SIGTERM) waits until this is done, instead of cutting it short
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    try:
        _end_row(proc)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _end_row(proc: subprocess.Popen[str]) -> None:
    import psutil

    noted: dict[int, psutil.Process] = {}

    def note() -> None:
        if proc.returncode is not None:  # reaped: its pid may be another process's now
            return
        try:
            noted.update({child.pid: child for child in psutil.Process(proc.pid).children(recursive=True)})
        except psutil.NoSuchProcess:
            pass

    note()
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + END_GRACE_S
    while time.monotonic() < deadline:
        note()
        try:
            proc.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            continue
    _gone, alive = psutil.wait_procs(list(noted.values()), timeout=max(0.0, deadline - time.monotonic()))
    for leftover in alive:
        try:
            leftover.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # a pipe still held open by something never noted: stop reading it
        proc.kill()
        proc.wait()


def summarize(rows: list[Row]) -> dict[str, dict[str, float | None]]:
    """Each row's median, min and max, and its ratio to DDP's and the ceiling's medians
    (None where that row did not run)."""
    medians = {row.key: statistics.median(row.rates) for row in rows if row.rates}

    def ratio(key: str, to: str) -> float | None:
        return medians[key] / medians[to] if to in medians else None

    return {row.key: {"median": medians[row.key], "min": min(row.rates), "max": max(row.rates),
                      "x_ddp": ratio(row.key, "ddp"), "x_ceiling": ratio(row.key, "ceiling")}
            for row in rows if row.rates}


def format_table(rows: list[Row], summary: dict[str, dict[str, Any]], unit: str) -> str:
    lines = [f"{'row':20s} {'launcher + runtime':32s} {unit + '/s':>8s} {'min':>8s} {'max':>8s} "
             f"{'x DDP':>6s} {'x ceil':>6s}"]
    for row in rows:
        if row.key in summary:
            s = summary[row.key]
            ratios = " ".join("     -" if s[k] is None else f"{s[k]:6.2f}" for k in ("x_ddp", "x_ceiling"))
            lines.append(f"{row.key:20s} {ROW_NAMES[row.key]:32s} {s['median']:8.1f} {s['min']:8.1f} "
                         f"{s['max']:8.1f} {ratios}")
        else:
            lines.append(f"{row.key:20s} {ROW_NAMES[row.key]:32s} failed: {row.error}")
    return "\n".join(lines)


def plot(rows: list[Row], summary: dict[str, dict[str, Any]], unit: str, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in rows if row.key in summary]
    medians = [summary[row.key]["median"] for row in done]
    low = [m - summary[row.key]["min"] for m, row in zip(medians, done)]
    high = [summary[row.key]["max"] - m for m, row in zip(medians, done)]
    colors = ["#999999" if row.key == "ceiling" else "#DD8452" if row.key == "ddp" else "#4C72B0" for row in done]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(done) + 1.6))
    ax.barh([ROW_NAMES[row.key] for row in done], medians, xerr=[low, high], color=colors, capsize=4)
    for y, median in enumerate(medians):
        ax.text(max(medians) * 0.01, y, f"{median:.1f}", va="center", ha="left", fontsize=8, color="white")
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit}/s (median over timed batches; bars: min to max)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("train", help=HELP)
@click.option("--ranks", type=click.IntRange(min=1), default=2, show_default=True, help="Ranks on this host.")
@click.option("--model", type=click.Choice(["resnet18", "transformer"]), default="resnet18", show_default=True,
              help="CIFAR-size ResNet-18 (11.2 M parameters) or 4 transformer blocks (3.67 M).")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Times each row runs, interleaved.")
@click.option("--rows", "only", default="all", show_default=True, metavar="R1,R2",
              help="Which rows (names above), comma-separated.")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True, help="Samples per rank per step.")
@click.option("--iters", type=click.IntRange(min=1), default=5, show_default=True, help="Steps per timed batch.")
@click.option("--batches", type=click.IntRange(min=1), default=4, show_default=True, help="Timed batches per run.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="OMP_NUM_THREADS of every rank.")
@click.option("--timeout", type=click.FloatRange(min=1), default=900, show_default=True,
              help="Seconds one run of a row may take.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Draw the rows into a PNG.")
def train_command(**kwargs: Any) -> None:
    wanted = [name.strip() for name in kwargs["only"].split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(ROW_NAMES) - {"all"})
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: the rows are {', '.join(ROW_NAMES)}", param_hint="--rows")
    unit = "img" if kwargs["model"] == "resnet18" else "seq"
    env = {"OMP_NUM_THREADS": str(kwargs["threads"]), "MODEL": kwargs["model"], "BATCH": str(kwargs["batch"]),
           "ITERS": str(kwargs["iters"]), "BATCHES": str(kwargs["batches"]), **_import_path()}
    with tempfile.TemporaryDirectory(prefix="distlaunch-bench-train-") as work, _signals_interrupt():
        rows = make_rows(kwargs["ranks"], str(Path(work) / "runs"), set(wanted))
        skipped = sorted(set(wanted) - {"all"} - {row.key for row in rows})
        if skipped:
            click.echo(f"distlaunch: skipping {', '.join(skipped)}: real Horovod (or its horovodrun) is not "
                       "installed in this Python ('distlaunch install-horovod' builds it)", err=True)
        for round_ in range(kwargs["rounds"]):
            for row in rows:
                if row.error:
                    continue
                click.echo(f"round {round_ + 1}/{kwargs['rounds']}: {row.key} ...", err=True, nl=False)
                try:
                    rates = run_row(row, env, work, kwargs["timeout"])
                except BenchTrainError as exc:
                    row.error = str(exc).split(": ", 1)[1]
                    click.echo(f" failed ({row.error})", err=True)
                    continue
                row.rates += rates
                click.echo(f" {statistics.median(rates):.1f} {unit}/s", err=True)
    if not rows:
        raise BenchTrainError(f"no row could run: {', '.join(skipped)} need(s) real Horovod; "
                              "'distlaunch install-horovod' builds it")
    summary = summarize(rows)
    title = (f"{kwargs['model']}, {kwargs['ranks']} ranks on one host, OMP_NUM_THREADS={kwargs['threads']}, "
             f"batch {kwargs['batch']}, {kwargs['rounds']} rounds")
    click.echo(f"# {title}; {os.cpu_count()} CPUs")
    click.echo(format_table(rows, summary, unit))
    if kwargs["json_path"]:
        versions = {"python": platform.python_version(), "torch": _version("torch"), "horovod": _version("horovod")}
        Path(kwargs["json_path"]).write_text(json.dumps(
            {"title": title, "model": kwargs["model"], "ranks": kwargs["ranks"], "unit": unit,
             "threads": kwargs["threads"], "batch": kwargs["batch"], "rounds": kwargs["rounds"],
             "cpus": os.cpu_count(), "versions": versions, "summary": summary,
             "rates": {row.key: row.rates for row in rows}, "failed": {r.key: r.error for r in rows if r.error}},
            indent=1))
    if kwargs["plot_path"] and summary:
        plot(rows, summary, unit, title, kwargs["plot_path"])
    failed = [row.key for row in rows if row.error]
    if failed:
        raise BenchTrainError(f"{len(failed)} row(s) failed: {', '.join(failed)} (their last lines are above)")


def _import_path() -> dict[str, str]:
    """PYTHONPATH for the ranks when this distlaunch is not importable without it (run
    from a source tree, not installed): its package's parent, after the user's entries."""
    parent = Path(__file__).resolve().parents[2]
    for entry in sys.path[1:]:  # [0] is the current directory or the script's: not the ranks'
        if entry and Path(entry).resolve() == parent:
            return {}
    return {"PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(parent)) if p)}


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the benchmark as Ctrl-C does: through run_row's clean-up,
    which ends the running row's processes."""
    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None
