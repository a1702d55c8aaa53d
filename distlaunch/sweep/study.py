"""Running a sweep: trials asked of an Optuna study (kept in SQLite in the sweep's folder,
so Ctrl-C or a crash loses nothing and ``resume`` goes on), each trial an ordinary run of
the job with its parameters as ``--NAME VALUE`` arguments, packed onto the hosts by
slots; rank 0's primary metric read as it is logged, so early termination acts live.

    <runs_root>/sweeps/<name>/sweep.json   the sweep as given (the job, space, policy)
    <runs_root>/sweeps/<name>/study.db     Optuna's study: trials, values, steps
    <runs_root>/<run-id>/                  each trial's run (experiment <name>, tagged)
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DistlaunchError, SpecError
from ..plan.spec import JobSpec, TargetSpec, spec_from_dict, spec_to_dict
from ..records import AppendedLines, open_private
from .packing import SlotPool
from .policy import SAMPLERS, EarlyStop, make_pruner, make_sampler, parse_early_stop
from .space import Param, as_args, grid, parse_space

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
GOALS = ("minimize", "maximize")
Progress = Callable[[str], None]


class SweepError(DistlaunchError):
    """A sweep that cannot start or go on (its trials keep failing, it is running already)."""

    exit_code = 1


class SweepStopped(DistlaunchError):
    """The sweep was stopped by Ctrl-C or SIGTERM: its unfinished trials are re-run on resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass(frozen=True)
class SweepSpec:
    """A sweep: the job each trial runs, the space, the goal, the policy and the budget."""

    name: str
    job: JobSpec
    space: tuple[Param, ...]
    metric: str
    goal: str = "minimize"
    sampler: str = "tpe"
    early_stop: EarlyStop = field(default_factory=EarlyStop)
    max_trials: int | None = None  # grid: the grid's size at most; else required
    max_concurrent: int = 1
    max_failures: int = 3  # this many failed trials in a row stop the sweep
    seed: int | None = None
    watch: dict[str, Any] = field(default_factory=dict)  # the trials' Watch (kill grace, timeouts)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise SpecError(f"sweep name {self.name!r}: use letters, digits, '.', '_' and '-' (at most 100)")
        if not self.metric:
            raise SpecError("a sweep needs --metric NAME: the metric rank 0 logs with distlaunch.log_metric")
        if self.goal not in GOALS:
            raise SpecError(f"--goal {self.goal!r}: choose minimize or maximize")
        if self.sampler not in SAMPLERS:
            raise SpecError(f"--sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.sampler == "grid":
            grid(self.space)  # every parameter enumerable, else its error
        elif self.max_trials is None:
            raise SpecError(f"--sampler {self.sampler} needs --max-trials N (only a grid has a natural end)")
        for name, value in (("--max-trials", self.max_trials), ("--max-concurrent", self.max_concurrent),
                            ("--max-failures", self.max_failures)):
            if value is not None and value < 1:
                raise SpecError(f"{name} {value} must be at least 1")
        taken = {name for name, _value in self.job.tags} & {"sweep", "trial", *(p.name for p in self.space)}
        if taken:
            raise SpecError(f"--tag {sorted(taken)[0]} is set by the sweep itself: drop it")
        given = set(self.job.script_args)
        clash = [p.name for p in self.space if f"--{p.name}" in given]
        if clash:
            raise SpecError(f"--{clash[0]} is both a fixed argument of the script and a swept parameter: drop one")

    @property
    def total(self) -> int:
        """How many trials the sweep runs in all."""
        if self.sampler == "grid":
            size = math.prod(len(values) for values in grid(self.space).values())
            return min(size, self.max_trials or size)
        assert self.max_trials is not None
        return self.max_trials

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "name": self.name, "job": spec_to_dict(self.job),
                "space": {p.name: str(p) for p in self.space}, "metric": self.metric, "goal": self.goal,
                "sampler": self.sampler, "early_stop": dataclasses.asdict(self.early_stop),
                "max_trials": self.max_trials, "max_concurrent": self.max_concurrent,
                "max_failures": self.max_failures, "seed": self.seed, "watch": self.watch}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepSpec:
        values = dict(data)
        values.pop("version", None)
        values["job"] = spec_from_dict(values["job"])
        values["space"] = parse_space(values["space"])
        values["early_stop"] = EarlyStop(**values.get("early_stop", {}))
        return cls(**values)


def absolute(job: JobSpec) -> JobSpec:
    """The job with its script, source dir and runs root absolute, so a resumed sweep
    finds them from any directory."""
    script = os.path.abspath(job.script) if os.path.isfile(job.script) else job.script
    source = os.path.abspath(job.source_dir) if job.source_dir else None
    return dataclasses.replace(job, script=script, source_dir=source, runs_root=os.path.abspath(job.runs_root))


def sweep_dir(runs_root: str | os.PathLike[str], name: str) -> Path:
    return Path(runs_root) / "sweeps" / name


def trial_shape(target: TargetSpec) -> tuple[int, int]:
    """Nodes and ranks per node each trial needs."""
    nodes = target.nodes or 1
    ppn = target.ppn or (-(-target.np // nodes) if target.np else 1)
    return nodes, ppn


def _host_pool(job: JobSpec) -> SlotPool:
    from ..launch.launcher import local_cores
    from ..plan.hosts import resolve

    source = resolve(job.target.hosts, job.target.hostfile, local_cores=local_cores())
    return SlotPool([(host.name, host.soft_limit or 1) for host in source.hosts])


@dataclass
class _Live:
    """A trial that is running: its Optuna trial, its run, its slots, what was read."""

    trial: Any
    run: Any
    slots: list[tuple[str, int]] | None
    params: dict[str, Any]
    metrics: AppendedLines = field(init=False)  # rank 0's metrics file, read as it grows
    steps: int = 0
    last: float | None = None
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.metrics = AppendedLines(self.run.paths.rank_metrics(0))


class Sweep:
    """A sweep over the parameters of a job: ``Sweep(spec).run()``, or from the Python API
    ``Sweep.create(Job(...), space={...}, metric="loss", ...)``; ``Sweep.load(name)``
    reopens one (to resume it or read its trials)."""

    def __init__(self, spec: SweepSpec, progress: Progress | None = None) -> None:
        self.spec = spec
        self.folder = sweep_dir(spec.job.runs_root, spec.name)
        self.progress = progress or (lambda message: None)
        self._stop: int | None = None

    # -- making and finding sweeps
    @classmethod
    def create(cls, job: Any, space: Mapping[str, Any] | Sequence[str], metric: str, *, name: str | None = None,
               goal: str = "minimize", sampler: str = "tpe", early_stop: str | EarlyStop = "none",
               max_trials: int | None = None, max_concurrent: int = 1, max_failures: int = 3,
               seed: int | None = None, progress: Progress | None = None) -> Sweep:
        """A new sweep of ``job`` (a ``distlaunch.Job``) over ``space``."""
        policy = early_stop if isinstance(early_stop, EarlyStop) else parse_early_stop(early_stop)
        watch = dataclasses.asdict(job.watch)
        spec = SweepSpec(name or default_name(job.spec), absolute(job.spec), parse_space(space), metric, goal,
                         sampler, policy, max_trials, max_concurrent, max_failures, seed, watch)
        return cls(spec, progress)

    @classmethod
    def load(cls, name: str, runs_root: str | os.PathLike[str] = "runs", progress: Progress | None = None) -> Sweep:
        path = sweep_dir(runs_root, name) / "sweep.json"
        if not path.is_file():
            known = sorted(p.name for p in (Path(runs_root) / "sweeps").glob("*") if (p / "sweep.json").is_file())
            hint = f"; the sweeps here are {', '.join(known)}" if known else ""
            raise SpecError(f"no sweep {name!r} under {runs_root}/sweeps{hint}")
        return cls(SweepSpec.from_dict(json.loads(path.read_text())), progress)

    def _save(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open_private(self.folder / "sweep.json", "w") as handle:
            json.dump(self.spec.to_dict(), handle, indent=1)

    def study(self, existing: int = 0) -> Any:
        """The Optuna study in the sweep's SQLite file (made on first use)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        spec = self.spec
        storage = optuna.storages.RDBStorage(f"sqlite:///{self.folder / 'study.db'}",
                                             engine_kwargs={"connect_args": {"timeout": 60}})
        seed = None if spec.seed is None else spec.seed + existing  # a resumed random sweep does not repeat itself
        sampler = make_sampler(spec.sampler, grid(spec.space) if spec.sampler == "grid" else None, seed)
        return optuna.create_study(study_name=spec.name, storage=storage, direction=spec.goal, sampler=sampler,
                                   pruner=make_pruner(spec.early_stop), load_if_exists=True)

    def trials(self) -> list[Any]:
        """Every trial so far (Optuna FrozenTrials), in order."""
        if not (self.folder / "study.db").is_file():
            return []
        return self.study().get_trials(deepcopy=False)

    # -- running
    def run(self, resume: bool = False) -> Any:
        """Run the sweep to its end (or go on with one that was stopped, ``resume=True``);
        returns the best trial, or None when no trial completed."""
        if resume and not (self.folder / "sweep.json").is_file():
            raise SpecError(f"no sweep {self.spec.name!r} to resume under {self.folder.parent}")
        if not resume and (self.folder / "sweep.json").is_file():
            raise SpecError(f"sweep {self.spec.name!r} exists ({self.folder}): 'distlaunch sweep resume "
                             f"{self.spec.name}' goes on with it, or choose another --name")
        pool = _host_pool(self.spec.job)
        nodes, ppn = trial_shape(self.spec.job.target)
        if not pool.fits_ever(nodes, ppn):
            raise SpecError(f"a trial needs {nodes} node(s) x {ppn} slot(s), more than the hosts have "
                             f"({', '.join(f'{h}:{n}' for h, n in pool.total.items())}): ask for less")
        if not resume:
            self._save()
        with self._locked():
            return self._run(pool, nodes, ppn)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Held while the sweep runs: a second process running it is refused."""
        with open_private(self.folder / "lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SweepError(f"sweep {self.spec.name} is being run by another process: wait for it, "
                                 "or stop it first") from None
            yield

    def _run(self, pool: SlotPool, nodes: int, ppn: int) -> Any:
        import optuna

        spec = self.spec
        study = self.study(existing=len(self.trials()))
        self._requeue(study)
        total = spec.total
        concurrent = min(spec.max_concurrent, total)
        fit = pool.capacity(nodes, ppn)
        if concurrent > fit:
            self.progress(f"at most {fit} trial(s) of {nodes} node(s) x {ppn} fit at once on "
                          f"{', '.join(f'{h}:{n}' for h, n in pool.total.items())}: running {fit} at a time")
            concurrent = fit
        pack = concurrent > 1
        done = sum(1 for t in study.get_trials(deepcopy=False) if counted(t))
        self.progress(f"sweep {spec.name}: {total} trial(s) of {spec.job.script}, {concurrent} at a time, "
                      f"{spec.sampler} sampling, {spec.goal} {spec.metric}, early stop {spec.early_stop}"
                      + (f"; {done} done before" if done else ""))
        live: list[_Live] = []
        streak = 0
        started = time.monotonic()
        try:
            with _StopSignals(self):
                while True:
                    for item in list(live):
                        state = self._follow(study, item)
                        if state is None:
                            continue
                        live.remove(item)
                        if item.slots is not None:
                            pool.give_back(item.slots)
                        done += 1
                        streak = streak + 1 if state == optuna.trial.TrialState.FAIL else 0
                        if streak >= spec.max_failures:
                            raise SweepError(f"the last {streak} trials failed: see 'distlaunch logs "
                                             f"{item.run.id}', fix the script, then 'distlaunch sweep resume "
                                             f"{spec.name}'")
                    if self._stop is not None:
                        raise KeyboardInterrupt
                    while len(live) < concurrent and done + len(live) < total:
                        slots = pool.take(nodes, ppn) if pack else None
                        if pack and slots is None:
                            break
                        live.append(self._start(study, slots, nodes, ppn, pack))
                    if not live:
                        break
                    time.sleep(0.2)
        except KeyboardInterrupt:
            signum = self._stop or 2
            self._interrupt(study, live)
            raise SweepStopped(f"sweep {spec.name} stopped: {done} of {total} trials done; 'distlaunch sweep "
                               f"resume {spec.name}' goes on", signum) from None
        except BaseException:
            self._interrupt(study, live)
            raise
        return self._summary(study, time.monotonic() - started)

    def _requeue(self, study: Any) -> None:
        """Trials a stopped sweep left unfinished run again with the same parameters: those
        it marked as interrupted, and any still 'running' from a sweep that died."""
        import optuna
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        for frozen in trials:
            if frozen.state == TrialState.RUNNING:
                optuna.trial.Trial(study, frozen._trial_id).set_user_attr("interrupted", True)
                study.tell(frozen.number, state=TrialState.FAIL)
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retry_of") for t in trials}
        for frozen in trials:
            if frozen.user_attrs.get("interrupted") and frozen.number not in retried and frozen.params:
                study.enqueue_trial(frozen.params, user_attrs={"retry_of": frozen.number})
                self.progress(f"trial {frozen.number} was not finished: it runs again")

    def _start(self, study: Any, slots: list[tuple[str, int]] | None, nodes: int, ppn: int, pack: bool) -> _Live:
        from ..launch.api import start
        from ..launch.supervise import Watch

        trial = study.ask()
        params = {param.name: param.suggest(trial) for param in self.spec.space}
        job = self._trial_job(trial.number, params, slots, nodes, ppn, pack)
        try:
            run = start(job, Watch(**self.spec.watch))
        except BaseException:
            from optuna.trial import TrialState

            study.tell(trial, state=TrialState.FAIL)
            raise
        trial.set_user_attr("run_id", run.id)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        where = f" on {', '.join(h for h, _n in slots)}" if slots else ""
        self.progress(f"trial {trial.number} started: run {run.id}{where}: {shown}")
        return _Live(trial, run, slots, params)

    def _trial_job(self, number: int, params: Mapping[str, Any], slots: list[tuple[str, int]] | None,
                   nodes: int, ppn: int, pack: bool) -> JobSpec:
        """The job of one trial: the sweep's job with the trial's arguments, tags and, when
        trials are packed, its own hosts and slots."""
        job = self.spec.job
        tags = (*job.tags, ("sweep", self.spec.name), ("trial", str(number)),
                *((name, str(value)) for name, value in params.items()))
        env = (*job.env, ("DISTLAUNCH_SWEEP", self.spec.name), ("DISTLAUNCH_TRIAL", str(number)))
        changes: dict[str, Any] = {"script_args": (*job.script_args, *as_args(params)), "tags": tags, "env": env,
                                   "experiment": self.spec.name}
        if pack and slots is not None:
            hosts = ",".join(f"{host}:{count}" for host, count in slots)
            changes["target"] = dataclasses.replace(job.target, hosts=hosts, hostfile=None, nodes=nodes, ppn=ppn,
                                                    np=None)
            # trials share hosts: two jobs would bind their ranks to the same cores
            if job.launcher == "mpirun" and "--bind-to" not in job.mpi_args:
                changes["mpi_args"] = (*job.mpi_args, "--bind-to", "none")
            elif job.launcher == "srun" and not any(arg.startswith("--cpu-bind") for arg in job.mpi_args):
                changes["mpi_args"] = (*job.mpi_args, "--cpu-bind=none")
        return dataclasses.replace(job, **changes)

    def _follow(self, study: Any, item: _Live) -> Any:
        """Read what rank 0 logged of the metric since last time, report it, prune if the
        policy says so; when the run has ended, tell the study. The trial's final state,
        or None while it runs."""
        from optuna.trial import TrialState

        ended = item.run.done()
        for value in self._new_values(item):
            self._report(item, value)
            if not ended and item.trial.should_prune():
                item.run.cancel()
                item.run.tag("pruned", f"step {item.steps - 1}")
                item.trial.set_user_attr("steps", item.steps)
                study.tell(item.trial, state=TrialState.PRUNED)
                self.progress(f"trial {item.trial.number} stopped early at step {item.steps - 1}: "
                              f"{self.spec.metric} {value:.6g}")
                return TrialState.PRUNED
        if not ended:
            return None
        item.run.wait()  # its thread has ended and the record is final
        for value in self._new_values(item):  # the last lines, and metrics collected from other nodes
            self._report(item, value)
        item.trial.set_user_attr("steps", item.steps)
        record = item.run.record
        status = record.status.value
        took = time.monotonic() - item.started
        if status == "completed" and item.last is not None and math.isfinite(item.last):
            study.tell(item.trial, item.last)
            self.progress(f"trial {item.trial.number} completed in {took:.1f} s: {self.spec.metric} "
                          f"{item.last:.6g}{self._best_text(study)}")
            return TrialState.COMPLETE
        if status == "completed":
            why = (f"it logged no {self.spec.metric!r} (distlaunch.log_metric on rank 0)" if item.last is None
                   else f"its last {self.spec.metric} is {item.last}")
        else:
            from ..launch.api import RunFailed

            why = str(RunFailed(record))
        item.trial.set_user_attr("error", why)
        study.tell(item.trial, state=TrialState.FAIL)
        self.progress(f"trial {item.trial.number} failed: {why}")
        return TrialState.FAIL

    @staticmethod
    def _report(item: _Live, value: float) -> None:
        """One value of the metric, as the trial's next step."""
        item.trial.report(value, item.steps)
        item.steps += 1
        item.last = value

    def _new_values(self, item: _Live) -> list[float]:
        """The metric's values rank 0 appended to its metrics file since the last read."""
        values = []
        for line in item.metrics.read():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("name") == self.spec.metric:
                value = entry.get("value")
                try:
                    values.append(float(value))
                except (TypeError, ValueError):
                    continue
        return values

    def _best_text(self, study: Any) -> str:
        try:
            best = study.best_trial
        except ValueError:
            return ""
        return f" (best {best.value:.6g}, trial {best.number})"

    def _interrupt(self, study: Any, live: list[_Live]) -> None:
        """Stop the running trials (each as Ctrl-C would) and mark them to run again."""
        from optuna.trial import TrialState

        if not live:
            return
        self.progress(f"stopping {len(live)} running trial(s)")
        threads = [threading.Thread(target=item.run.cancel) for item in live]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for item in live:
            item.run.wait()
            if study._storage.get_trial(item.trial._trial_id).state.is_finished():
                continue  # told already (the error came after)
            item.trial.set_user_attr("interrupted", True)
            study.tell(item.trial, state=TrialState.FAIL)
        live.clear()

    def _summary(self, study: Any, took: float) -> Any:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        counts = {state: sum(1 for t in trials if t.state == state and counted(t))
                  for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        head = (f"sweep {self.spec.name}: {sum(counts.values())} trials ({counts[TrialState.COMPLETE]} completed, "
                f"{counts[TrialState.PRUNED]} stopped early, {counts[TrialState.FAIL]} failed) in {took:.1f} s")
        try:
            best = study.best_trial
        except ValueError:
            self.progress(f"{head}; no trial completed")
            return None
        shown = ", ".join(f"{k}={v}" for k, v in best.params.items())
        self.progress(f"{head}; best {self.spec.metric} {best.value:.6g} at trial {best.number} "
                      f"(run {best.user_attrs.get('run_id')}): {shown}")
        return best


def counted(trial: Any) -> bool:
    """Whether a trial counts towards the budget: finished, and not stopped by the sweep."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and not trial.user_attrs.get("interrupted"))


def default_name(job: JobSpec) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(job.script).stem) or "sweep"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


class _StopSignals:
    """While a sweep runs in the main thread: Ctrl-C, SIGTERM and SIGHUP stop it between two
    polls (also where SIGINT came ignored, as for a job started in the background)."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.old: dict[int, Any] = {}

    def __enter__(self) -> None:
        import signal

        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, _frame: Any) -> None:
            self.sweep._stop = signum

        self.old = {signum: signal.signal(signum, on_signal)
                    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def __exit__(self, *exc: object) -> None:
        import signal

        for signum, handler in self.old.items():
            signal.signal(signum, handler)
