"""``distlaunch sweep``: hyperparameter sweeps (run, resume, show, list) over the options
of ``distlaunch run``; the work is in ``distlaunch.sweep``."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import click

from ..errors import SpecError
from .run import job_options, progress, run_command, spec_from_options, watch_from_options
from .table import format_table

SWEEP_HELP = """Hyperparameter sweeps: many runs of one script over a search space.

Each trial is an ordinary run (its own run folder, experiment = the sweep's name, tagged
with its parameters), given its values as --NAME VALUE after the script's arguments.
Rank 0 logs the metric with distlaunch.log_metric; early termination reads it as it
is logged and stops bad trials. The study is kept in runs/sweeps/<name>/study.db
(Optuna, SQLite): after Ctrl-C or a crash, 'distlaunch sweep resume NAME' goes on.

\b
Examples:
  distlaunch sweep run --name lr --param lr=loguniform(1e-4,1e-1) --param batch=choice(16,32,64) \\
      --metric loss --sampler tpe --max-trials 12 --max-concurrent 2 --early-stop median \\
      --ppn 1 examples/train.py --epochs 3
  distlaunch sweep run --config sweep.yaml
  distlaunch sweep resume lr
  distlaunch sweep show lr            # trials best first, and runs/sweeps/lr/sweep.png
  distlaunch runs list --sweep lr
"""

RUN_HELP = """Start a sweep of SCRIPT over the --param space (or of the sweep file's job).

The options of 'distlaunch run' describe each trial (--ppn, --nodes, --hosts, --env,
...). With --max-concurrent N, trials run side by side, each on its own slots of the
hosts (localhost's cores by default; never two trials on one slot).

\b
Parameters (--param NAME=KIND(ARGS), repeatable):
  choice(16, 32, 64)  uniform(0, 1)  loguniform(1e-5, 1e-1)  quniform(0, 1, 0.25)  randint(1, 8)

\b
Early termination (--early-stop):
  none, median (Optuna's MedianPruner), truncation:P (stop the worst P percent at a
  step), bandit:S (stop a trial S worse, as a fraction, than the best at that step),
  hyperband. They act from step --early-stop-after on, once --early-stop-startup trials
  have completed.

\b
A sweep file (YAML, or TOML when it ends in .toml) holds the same settings; options
given here win:
  name: lr
  metric: loss            # goal: minimize (default) or maximize
  sampler: tpe            # grid, random, tpe
  max_trials: 12
  max_concurrent: 2
  early_stop: median
  space:
    lr: loguniform(1e-4, 1e-1)
    batch: [16, 32, 64]
  script: examples/train.py
  args: [--epochs, "3"]
  job: {ppn: 1, env: {OMP_NUM_THREADS: 1}}   # any keyword of distlaunch.Job

\b
Exit code: 0 when the sweep ran to its end (whatever its trials did), 1 when trials kept
failing (--max-failures in a row), 2 for bad input, 130/143 after Ctrl-C/SIGTERM.
"""

_SWEEP_KEYS = ("name", "metric", "goal", "sampler", "early_stop", "early_stop_after", "early_stop_startup",
               "max_trials", "max_concurrent", "max_failures", "seed")


@click.group("sweep", help=SWEEP_HELP)
def sweep_group() -> None:
    pass


def _read_config(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    try:
        if path.endswith(".toml"):
            try:
                import tomllib
            except ImportError:  # Python < 3.11
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error of the file is one line
        raise SpecError(f"sweep file {path}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise SpecError(f"sweep file {path}: expected a mapping of settings (name:, metric:, space:, ...)")
    known = {*_SWEEP_KEYS, "space", "script", "args", "job"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"sweep file {path}: unknown setting {unknown[0]!r}; the settings are "
                        f"{', '.join(sorted(known))}")
    return data


@sweep_group.command("run", help=RUN_HELP, context_settings={"allow_interspersed_args": False})
@click.option("--config", "config", type=click.Path(dir_okay=False, exists=True), metavar="FILE",
              help="Read the sweep (and its job) from this YAML or TOML file.")
@click.option("--name", metavar="NAME", help="The sweep's name [default: SCRIPT's stem and the time].")
@click.option("--param", "params", multiple=True, metavar="NAME=KIND(ARGS)", help="A parameter to sweep (repeatable).")
@click.option("--metric", metavar="NAME", help="The primary metric, as rank 0 logs it (distlaunch.log_metric).")
@click.option("--goal", type=click.Choice(["minimize", "maximize"]), help="Minimize (default) or maximize it.")
@click.option("--sampler", type=click.Choice(["grid", "random", "tpe"]), help="How trials are chosen [default: tpe].")
@click.option("--early-stop", metavar="POLICY", help="none, median, truncation:P, bandit:S, hyperband [default: none].")
@click.option("--early-stop-after", type=click.IntRange(min=0), metavar="STEPS",
              help="Early termination acts from this step on [default: 1].")
@click.option("--early-stop-startup", type=click.IntRange(min=0), metavar="N",
              help="... once N trials have completed [default: 2].")
@click.option("--max-trials", type=click.IntRange(min=1), metavar="N", help="Trials in all (a grid: at most its size).")
@click.option("--max-concurrent", type=click.IntRange(min=1), metavar="N", help="Trials at once [default: 1].")
@click.option("--max-failures", type=click.IntRange(min=1), metavar="N",
              help="Stop after N failed trials in a row [default: 3].")
@click.option("--seed", type=int, help="Seed of the sampler, for a sweep that picks the same trials again.")
@job_options
@click.argument("script", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run_sweep_command(**kwargs: Any) -> None:
    from ..launch.api import Job
    from ..sweep.policy import parse_early_stop
    from ..sweep.space import parse_space
    from ..sweep.study import Sweep, SweepSpec, absolute, default_name

    data = _read_config(kwargs["config"]) if kwargs["config"] else {}
    setting = {key: kwargs[key] if kwargs[key] is not None else data.get(key) for key in _SWEEP_KEYS}
    if kwargs["script"]:
        values = dict(kwargs)
        for key in (*_SWEEP_KEYS, "config", "params"):
            values.pop(key)
        job, watch = spec_from_options(values), watch_from_options(values)
    elif data.get("script"):
        options = dict(data.get("job") or {})
        made = Job(str(data["script"]), options.pop("source_dir", "."), [str(a) for a in data.get("args") or ()],
                   **options)
        job, watch = made.spec, made.watch
    else:
        raise SpecError("no script to sweep: give SCRIPT after the options, or 'script:' in the --config file")
    space = parse_space(kwargs["params"]) if kwargs["params"] else parse_space(data.get("space") or {})
    startup, warmup = setting["early_stop_startup"], setting["early_stop_after"]
    policy = parse_early_stop(setting["early_stop"] or "none", startup=2 if startup is None else int(startup),
                              warmup=1 if warmup is None else int(warmup))
    spec = SweepSpec(
        name=setting["name"] or default_name(job), job=absolute(job), space=space, metric=setting["metric"] or "",
        goal=setting["goal"] or "minimize", sampler=setting["sampler"] or "tpe", early_stop=policy,
        max_trials=setting["max_trials"], max_concurrent=setting["max_concurrent"] or 1,
        max_failures=setting["max_failures"] or 3, seed=setting["seed"], watch=dataclasses.asdict(watch))
    Sweep(spec, progress).run()
    click.echo(f"distlaunch: trials: distlaunch sweep show {spec.name}", err=True)


# the trials' watch: the three options of 'distlaunch run' that are not job options
run_sweep_command.params[-2:-2] = [p for p in run_command.params if p.name in ("kill_grace", "timeout", "hang_timeout")]

RUN_DIR = click.option("--run-dir", "runs_root", default="runs", show_default=True, metavar="DIR",
                       help="Where run folders (and sweeps/) are.")


@sweep_group.command("resume")
@click.argument("name")
@RUN_DIR
def resume_command(name: str, runs_root: str) -> None:
    """Go on with a sweep that was stopped (Ctrl-C, SIGTERM, a crash): its unfinished
    trials run again, and it ends at the number of trials it was given."""
    from ..sweep.study import Sweep

    Sweep.load(name, runs_root, progress).run(resume=True)


@sweep_group.command("show")
@click.argument("name")
@click.option("--plot", "plot_to", type=click.Path(dir_okay=False), metavar="FILE",
              help="Where to draw the plot [default: runs/sweeps/NAME/sweep.png].")
@click.option("--no-plot", is_flag=True, help="Only the table.")
@click.option("--json", "as_json", is_flag=True, help="The trials as JSON instead, numbers unrounded.")
@RUN_DIR
def show_command(name: str, plot_to: str | None, no_plot: bool, as_json: bool, runs_root: str) -> None:
    """The trials of a sweep, best first, and a plot: the metric by trial with the best so
    far, and against each parameter."""
    from ..sweep.report import plot, rows
    from ..sweep.study import Sweep, counted

    sweep = Sweep.load(name, runs_root)
    trials = sweep.trials()
    if as_json:
        click.echo(json.dumps(rows(sweep.spec, trials, exact=True), indent=1))
        return
    table = rows(sweep.spec, trials)
    spec = sweep.spec
    click.echo(f"sweep {spec.name}: {spec.goal} {spec.metric}, {spec.sampler} sampling, early stop "
               f"{spec.early_stop}; {sum(1 for t in trials if counted(t))} of {spec.total} trials")
    if table:
        click.echo(format_table([list(table[0]), *(list(row.values()) for row in table)]), nl=False)
    if no_plot or not table:
        return
    target = Path(plot_to) if plot_to else sweep.folder / "sweep.png"
    try:
        click.echo(f"plot: {plot(spec, trials, target)}")
    except SpecError as exc:
        click.echo(f"no plot: {exc}", err=True)


@sweep_group.command("list")
@RUN_DIR
def list_command(runs_root: str) -> None:
    """The sweeps under the run folder: trials done, and the best value."""
    from ..sweep.report import rows
    from ..sweep.study import Sweep, counted

    folders = sorted(p for p in (Path(runs_root) / "sweeps").glob("*") if (p / "sweep.json").is_file())
    if not folders:
        click.echo(f"no sweeps under {os.path.join(runs_root, 'sweeps')}")
        return
    table = [["name", "script", "metric", "sampler", "trials", "best", "best trial"]]
    for folder in folders:
        sweep = Sweep.load(folder.name, runs_root)
        trials = sweep.trials()
        found = rows(sweep.spec, trials)
        best = found[0] if found and found[0]["state"] == "completed" else None
        table.append([sweep.spec.name, os.path.basename(sweep.spec.job.script),
                      f"{sweep.spec.goal[:3]} {sweep.spec.metric}", sweep.spec.sampler,
                      f"{sum(1 for t in trials if counted(t))}/{sweep.spec.total}",
                      best[sweep.spec.metric] if best else "", best["trial"] if best else ""])
    click.echo(format_table(table), nl=False)
