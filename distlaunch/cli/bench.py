"""``distlaunch bench allreduce``: allreduce throughput in nccl-tests' terms (and the
group that also holds ``bench train``, in bench_train)."""
from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from ..errors import DistlaunchError
from ..launch.launcher import launch, local_cores, prepare
from ..launch.supervise import Console
from ..plan.placement import place
from ..plan.spec import JobSpec
from ..plan.units import format_size
from .bench_train import train_command
from .options import mpi_options, pop_mpi, pop_remote_root, pop_ssh, pop_target, ssh_options, target_options
from .run import progress, summarize

HELP = """Measure allreduce on the given hosts, per backend, like nccl-tests.

Launches 'python -m distlaunch.hvd.bench allreduce' through the normal run path. Every
backend works on the same preallocated buffers; each time is the slowest rank's;
every result is checked (#wrong). busbw = algbw x 2(n-1)/n; the memcpy rate of one
core, measured in the same run, is the ceiling to compare it with.

\b
Backends: mpi4py (MPI Allreduce), shm (distlaunch's shared-memory allreduce: inside
a node through shared memory, across nodes hierarchically, needs equal ranks per node),
torch (torch.distributed gloo), horovod (real Horovod, if installed), all.

\b
Examples:
  distlaunch bench allreduce --ppn 2
  distlaunch bench allreduce --ppn 2 --backend all --sizes 8B:256MiB --json ar.json --plot ar.png
  distlaunch bench allreduce --hosts node1:4,node2:4 --backend mpi4py --sizes 1MiB:1GiB
"""


def backends_for(choice: str, ranks_per_host: list[int]) -> str:
    """``all`` → every backend that can run here: shm needs the same rank count on every host."""
    if choice != "all":
        return choice
    import importlib.util

    names = ["mpi4py", "torch"]
    if len(set(ranks_per_host)) == 1:
        names.insert(1, "shm")
    if importlib.util.find_spec("horovod") is not None:
        names.append("horovod")
    return ",".join(names)


def table(result: dict[str, Any]) -> str:  # nccl-tests' layout, wider than format_table's
    head = (f"{'size':>10} {'count':>12} {'type':>8} {'redop':>6} {'backend':>8} {'time(us)':>10} "
            f"{'min(us)':>9} {'max(us)':>9} {'algbw':>7} {'busbw':>7} {'%memcpy':>8} {'#wrong':>6}")
    ceiling = result["memcpy_one_core_GBps"]
    lines = [f"# {result['ranks']} ranks on {len(result['hosts'])} host(s); memcpy one core "
             f"{ceiling:.2f} GB/s, per core with all ranks copying {result['memcpy_per_core_all_ranks_GBps']:.2f} GB/s",
             head]
    for row in result["rows"]:
        lines.append(f"{format_size(row['size']):>10} {row['count']:>12} {row['type']:>8} {row['redop']:>6} "
                     f"{row['backend']:>8} {row['time_us']:>10.1f} {row['min_us']:>9.1f} {row['max_us']:>9.1f} "
                     f"{row['algbw_GBps']:>7.2f} {row['busbw_GBps']:>7.2f} "
                     f"{100 * row['busbw_GBps'] / ceiling:>7.0f}% {row['wrong']:>6}")
    return "\n".join(lines)


@click.group("bench")
def bench_group() -> None:
    """Benchmarks run through distlaunch: allreduce like nccl-tests, and training throughput
    per launcher and runtime (see 'distlaunch bench allreduce --help', 'distlaunch bench
    train --help')."""


bench_group.add_command(train_command)


@bench_group.command("allreduce", help=HELP)
@target_options
@ssh_options
@click.option("--backend", default="all", show_default=True,
              type=click.Choice(["all", "mpi4py", "shm", "torch", "horovod", "hvd"]))
@click.option("--sizes", default="8B:64MiB", show_default=True, help="FROM:TO (or one size), e.g. 8B:256MiB.")
@click.option("--factor", type=click.IntRange(min=2), default=2, show_default=True)
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float16", "float32", "float64", "int32", "int64"]))
@click.option("--op", default="sum", show_default=True, type=click.Choice(["sum", "min", "max", "prod"]))
@click.option("--iters", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed iterations per size and backend; from 64 MiB up a quarter of them, at least 5 "
                   "(or all, if fewer).")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results here.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="And as CSV.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Draw busbw vs size into a PNG.")
@click.option("--run-dir", "runs_root", default="runs", show_default=True)
@mpi_options
def allreduce_command(**kwargs: Any) -> None:
    from ..plan.units import parse_size

    for part in kwargs["sizes"].split(":"):
        parse_size(part, "--sizes")
    target = pop_target(kwargs)
    ssh = pop_ssh(kwargs)
    mpi = pop_mpi(kwargs)
    backend = "torch" if kwargs["backend"] == "hvd" else kwargs["backend"]
    placed = place(target, local_cores=local_cores())
    names = backends_for(backend, list(Counter(slot.host for slot in placed.slots).values()))
    args = ["-m", "distlaunch.hvd.bench", "allreduce", "--backends", names, "--sizes", kwargs["sizes"],
            "--factor", str(kwargs["factor"]), "--dtype", kwargs["dtype"], "--op", kwargs["op"],
            "--iters", str(kwargs["iters"]), "--warmup", str(kwargs["warmup"])]
    spec = JobSpec(script=sys.executable, script_args=tuple(args), target=target, ssh=ssh, **mpi,
                   runs_root=kwargs["runs_root"], **pop_remote_root(kwargs), sync=False)
    prepared = prepare(spec)
    click.echo(f"distlaunch: allreduce with {names} on {len(prepared.slots)} rank(s)", err=True)
    paths, outcome = launch(prepared, Console(sys.stdout.buffer, sys.stderr.buffer), progress=progress)
    result_file = paths.outputs / "allreduce.json"
    if outcome.exit_code != 0:  # the job's own exit code, as 'distlaunch run' gives it
        summarize(paths.run_id, str(paths.root), outcome, len(prepared.slots), prepared.placed.nhosts)
        sys.exit(outcome.exit_code)
    if not result_file.is_file():
        raise BenchError(f"the benchmark run {paths.run_id} wrote no {result_file.name}: see {paths.root}/logs")
    result = json.loads(result_file.read_text())
    click.echo(table(result))
    if kwargs["json_path"]:
        Path(kwargs["json_path"]).write_text(json.dumps(result, indent=1))
    if kwargs["csv_path"]:
        with open(kwargs["csv_path"], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(result["rows"][0]))
            writer.writeheader()
            writer.writerows(result["rows"])
    if kwargs["plot_path"]:
        plot_busbw(result["rows"], result["memcpy_one_core_GBps"],
                   f"allreduce, {result['ranks']} ranks, {result['dtype']} {result['op']}", kwargs["plot_path"])
    wrong = sum(row["wrong"] for row in result["rows"])
    if wrong:
        raise BenchError(f"{wrong} wrong element(s) in the results: a backend computed a wrong allreduce")


class BenchError(DistlaunchError):
    """The benchmark ran but its results are missing or wrong."""

    exit_code = 1


LATENCY_PANEL_MAX = 64 << 10  # sizes up to this go into the latency panel too


def plot_busbw(rows: list[dict[str, Any]], ceiling: float, title: str, target: str) -> None:
    """Two panels, log-log, sizes in KiB/MiB: busbw vs size per backend (the row's median,
    a band from its fastest to its slowest time, the one-core memcpy rate as the ceiling),
    and time vs size for the small sizes, where latency is what counts."""
    try:
        import matplotlib
    except ImportError:
        raise click.ClickException("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, (bandwidth, latency) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["size"])
        sizes = [r["size"] for r in mine]
        line = bandwidth.plot(sizes, [r["busbw_GBps"] for r in mine], marker="o", markersize=3, label=backend)[0]
        if all("min_us" in r and "max_us" in r for r in mine):  # busbw scales as 1/time
            scale = [r["busbw_GBps"] * r["time_us"] for r in mine]
            bandwidth.fill_between(sizes, [k / r["max_us"] for k, r in zip(scale, mine)],
                                   [k / r["min_us"] for k, r in zip(scale, mine)], color=line.get_color(),
                                   alpha=0.2, linewidth=0)
        small = [r for r in mine if r["size"] <= LATENCY_PANEL_MAX]
        if small:
            latency.plot([r["size"] for r in small], [r["time_us"] for r in small], marker="o", markersize=3,
                         color=line.get_color(), label=backend)
            if all("min_us" in r and "max_us" in r for r in small):
                latency.fill_between([r["size"] for r in small], [r["min_us"] for r in small],
                                     [r["max_us"] for r in small], color=line.get_color(), alpha=0.2, linewidth=0)
    bandwidth.axhline(ceiling, color="grey", linestyle="--", label="memcpy, one core")
    size_ticks = FuncFormatter(lambda value, _pos: format_size(int(round(value))))
    for ax, ylabel in ((bandwidth, "busbw (GB/s), median; band: fastest-slowest"),
                       (latency, "time (us), median; band: fastest-slowest")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=4))
        ax.xaxis.set_major_formatter(size_ticks)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelrotation=45)
        ax.set_xlabel("message size")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    bandwidth.set_title(title, fontsize=10)
    latency.set_title(f"small messages (up to {format_size(LATENCY_PANEL_MAX)})", fontsize=10)
    bandwidth.legend(fontsize=8)
    if latency.lines:
        latency.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=80)
    plt.close(fig)
