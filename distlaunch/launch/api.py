"""The Python API, in the spirit of the cloud estimators: ``Job(...).submit()`` → ``Run``.

    from distlaunch import Job
    job = Job(source_dir=".", entry_script="train.py", script_params={"--lr": 0.1, "--verbose": ""},
              nodes=1, ppn=2)
    run = job.submit()          # returns at once; the job runs in a background thread
    # or on a Slurm cluster: Job(..., compute_target=Slurm(partition="debug", time="30")).submit()
    run.wait(show_output=True)
    run.get_metrics(); run.download_file("outputs/model.onnx", "model.onnx")

``Job`` builds the same ``JobSpec`` the CLI builds and goes through the same launcher.
``Run.load(id)`` reopens any past run (an id prefix is enough).
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DistlaunchError, RunNotFound, SpecError
from ..plan.slurm import SlurmTarget
from ..plan.spec import JobSpec
from ..records import RunPaths, RunRecord, Status
from .history import add_tags, current, request_cancel, resolve
from .launcher import launch, prepare
from .metrics import read_metrics
from .supervise import Watch

log = logging.getLogger(__name__)


def params_to_args(params: Mapping[str, Any] | Sequence[str] | None) -> tuple[str, ...]:
    """``{"--lr": 0.1, "--verbose": ""}`` → ``("--lr", "0.1", "--verbose")``."""
    if params is None:
        return ()
    if isinstance(params, Mapping):
        args: list[str] = []
        for key, value in params.items():
            args.append(str(key))
            if value is not None and value != "":
                args.append(str(value))
        return tuple(args)
    return tuple(str(p) for p in params)


# Job takes the options of ``distlaunch run`` by their own names: the command's option
# table is the one table. These are the few that only make sense on a terminal.
CLI_ONLY = frozenset({"verbose", "dry_run", "output_ranks", "script", "args"})
# estimator-style spellings of options, as the keyword and the option's name
ALIASES = {"env": "env_items", "env_file": "env_files", "remote_dir": "remote_root", "pip": "pip_packages",
           "tag": "tags", "input": "inputs", "sync": "no_sync", "container_bind": "container_binds"}


def _option_table() -> dict[str, Any]:
    """``distlaunch run``'s options by name (the click parameters)."""
    from ..cli.run import run_command

    return {param.name: param for param in run_command.params if param.name and param.name not in CLI_ONLY}


def option_names() -> list[str]:
    """Every keyword ``Job`` takes besides entry_script, source_dir, script_params and compute_target."""
    return sorted(_option_table())


def _as_cli(name: str, value: Any) -> tuple[str, Any]:
    """A Python value for option ``name`` (or its alias) as the command line would give it."""
    key = ALIASES.get(name, name)
    if key == "env_items" and isinstance(value, Mapping):
        return key, tuple(f"{k}={v}" for k, v in value.items())
    if key == "tags" and isinstance(value, Mapping):
        return key, tuple(f"{k}={v}" if v not in (None, "") else str(k) for k, v in value.items())
    if key == "inputs" and isinstance(value, Mapping):
        return key, tuple(f"{k}={v}" for k, v in value.items())
    if name == "sync":
        return "no_sync", not value
    if name == "mpi_args" and not isinstance(value, str):
        return name, tuple(shlex.quote(str(word)) for word in value)
    if name in ("timeout", "hang_timeout") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return name, f"{value}s"
    if name == "gpus" and not isinstance(value, str) and value is not None:
        return name, ",".join(str(item) for item in value)
    return key, value


def job_options(script: str, script_args: tuple[str, ...], options: Mapping[str, Any]) -> tuple[JobSpec, Watch]:
    """The JobSpec and Watch of ``Job(**options)``, through the same option table and the
    same conversion as ``distlaunch run`` (so the same checks and the same errors)."""
    import click

    from ..cli.run import run_command, spec_from_options, watch_from_options

    table = _option_table()
    # the command line's defaults, as the command line would have them
    ctx = run_command.make_context("Job", ["--", script])
    values: dict[str, Any] = dict(ctx.params)
    options = dict(options)
    ssh = options.pop("ssh", None)
    if ssh is not None:  # an SSHOptions: its three options
        options.update(ssh_config=ssh.config, ssh_port=ssh.port, ssh_key=ssh.key)
    for name, value in options.items():
        if name in CLI_ONLY:
            raise SpecError(f"Job({name}=...) is a terminal option of 'distlaunch run' only")
        key, value = _as_cli(name, value)
        param = table.get(key)
        if param is None:
            raise SpecError(f"Job() has no option {name!r}: the options are {', '.join(sorted(table))}")
        if param.multiple and isinstance(value, (str, bytes)):
            value = (value,)
        try:
            values[key] = param.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise SpecError(f"Job({name}={value!r}): {exc.message}") from None
    values.update(script=script, args=script_args)
    return spec_from_options(values), watch_from_options(values)


class Job:
    """A job to run: what, where, and how wide.

    Besides the estimator's four arguments, ``Job`` takes every option of ``distlaunch
    run`` by its name (``nodes``, ``ppn``, ``np``, ``hosts``, ``use_gpu``, ``gpus``,
    ``env``, ``env_pass``, ``mpirun``, ``mpi_args``, ``in_place``, ``experiment``,
    ``tags``, ``inputs``, ``timeout``, ``kill_grace``, ... see ``option_names()``), with
    the same checks; mappings are welcome where the command line repeats an option
    (``env={"OMP_NUM_THREADS": 1}``, ``tags={"lr": 0.1}``, ``inputs={"train": "/data"}``).
    """

    def __init__(self, entry_script: str, source_dir: str = ".", script_params: Any = None, *,
                 compute_target: SlurmTarget | None = None, **options: Any) -> None:
        script = entry_script if os.path.isabs(entry_script) else os.path.join(source_dir, entry_script)
        options.setdefault("source_dir", source_dir)
        self.spec, self.watch = job_options(script, params_to_args(script_params), options)
        self.compute_target = compute_target

    def submit(self) -> Run:
        """Start the job and return its Run as soon as its folder exists: here, in a
        background thread; or, with ``compute_target=Slurm(...)``, as a queued batch job."""
        if self.compute_target is not None:
            from .slurm import submit

            target = self.spec.target
            nodes, ppn = target.nodes or 1, target.ppn or 1
            return Run(submit(self.spec, self.compute_target, target.np or nodes * ppn, nodes, ppn))
        return start(self.spec, self.watch)


def start(spec: JobSpec, watch: Watch | None = None) -> Run:
    """Launch ``spec`` here, in a background thread; its Run as soon as its folder exists
    (``Job.submit`` without a compute target; a sweep starts its trials so)."""
    prepared = prepare(spec)
    ready = threading.Event()
    box: dict[str, Any] = {}

    def on_ready(paths: RunPaths) -> None:
        box["run"] = Run(paths, thread, box)  # before the job can end: its end reaches the Run
        ready.set()

    def body() -> None:
        try:
            launch(prepared, watch=watch or Watch(), on_ready=on_ready)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc
        finally:
            ready.set()
            if "run" in box:
                box["run"]._fire()

    # not a daemon: the interpreter waits for the job instead of leaving mpirun behind
    thread = threading.Thread(target=body, name="distlaunch-run")
    thread.start()
    ready.wait()
    if "run" not in box:
        thread.join()
        raise box["error"]
    run: Run = box["run"]
    return run


class RunFailed(DistlaunchError):
    """A run ended other than completed (``Run.result``, ``wait_for_completion``)."""

    def __init__(self, record: RunRecord) -> None:
        why = record.error or (record.first_failure.describe() if record.first_failure else record.reason)
        super().__init__(f"run {record.id} {record.status.value}" + (f": {why}" if why else ""))
        self.record = record
        self.exit_code = record.exit_code or 1


class Run:
    """One run: its status, output, metrics and files. ``Run.load(id)`` for past runs.

    A Run is also a future of its record: ``done()``, ``running()``, ``cancelled()``,
    ``result(timeout)``, ``exception(timeout)``, ``add_done_callback(fn)``."""

    def __init__(self, paths: RunPaths, thread: threading.Thread | None = None,
                 box: dict[str, Any] | None = None) -> None:
        self.paths, self._thread, self._box = paths, thread, box or {}
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Run], Any]] = []
        self._watcher: threading.Thread | None = None
        self._fired = False

    @classmethod
    def load(cls, run_id: str, runs_root: str = "runs") -> Run:
        return cls(resolve(runs_root, run_id))

    @property
    def id(self) -> str:
        return self.paths.run_id

    @property
    def status(self) -> str:
        return current(self.paths).status.value

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, status={self.status!r})"

    def wait(self, show_output: bool = False, timeout: float | None = None) -> str:
        """Block until the run ends (streaming its output if asked); return the status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        offset = 0
        try:
            while True:
                if show_output:
                    offset = self._print_new_output(offset)
                done = current(self.paths).status.finished and (self._thread is None
                                                                 or not self._thread.is_alive())
                if done:
                    if show_output:
                        self._print_new_output(offset)
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"run {self.id} still {self.status} after {timeout} s")
                time.sleep(0.1)
        except KeyboardInterrupt:
            self.cancel()
            raise
        if self._thread is not None:
            self._thread.join()  # its callbacks have run
        self._fire()
        if "error" in self._box:
            raise self._box["error"]
        return self.status

    def _print_new_output(self, offset: int) -> int:
        try:
            with open(self.paths.output_log, "rb") as handle:
                if os.fstat(handle.fileno()).st_size < offset:
                    offset = 0  # a restart began a new output.log (the old one is in attempts/)
                handle.seek(offset)
                data = handle.read()
        except OSError:
            return offset
        if data:
            sys.stdout.write(data.decode("utf-8", "replace"))
            sys.stdout.flush()
        return offset + len(data)

    def cancel(self) -> str:
        """Stop the run (as Ctrl-C would) and wait for it to end; return the status."""
        return request_cancel(self.paths)

    def get_details(self) -> dict[str, Any]:
        """The estimator's run details: ``runId``, ``experiment``, ``target``, ``status``,
        ``startTimeUtc``, ``endTimeUtc``, ``tags``, ``properties`` (code hash, exit code,
        versions), ``inputDatasets``, ``runDefinition`` (the job as given), ``logFiles``
        (name → path), ``error``; and ``record``, the whole run.json."""
        record = current(self.paths)

        def utc(stamp: float | None) -> str | None:
            return None if stamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))

        logs = self.paths.logs
        target = "slurm" if record.scheduler else record.host_source or "localhost"
        failure = record.first_failure.describe() if record.first_failure else None
        return {
            "runId": record.id,
            "experiment": record.experiment,
            "target": target,
            "status": record.status.value,
            "startTimeUtc": utc(record.started),
            "endTimeUtc": utc(record.ended),
            "tags": self.get_tags(),
            "properties": {"code_hash": (record.code or {}).get("hash"), "exit_code": record.exit_code,
                           "nodes": record.nodes, "ranks": record.ranks, **record.versions},
            "inputDatasets": record.inputs,
            "runDefinition": record.spec,
            "logFiles": {p.name: str(p) for p in sorted(logs.glob("*")) if p.is_file()} if logs.is_dir() else {},
            "error": record.error or failure,
            "record": record.to_dict(),
        }

    def get_tags(self) -> dict[str, str]:
        """The tags given at launch, with those added later (``tag``)."""
        return current(self.paths).tags

    def tag(self, key: str, value: str = "") -> None:
        """Tag the run (now, or long after it ended); ``runs list --tag`` finds it."""
        add_tags(self.paths, {key: value})

    # -- a Run is a future of its record (concurrent.futures.Future's calls)
    def done(self) -> bool:
        if self._fired:
            return True
        return current(self.paths).status.finished and (self._thread is None or not self._thread.is_alive())

    def running(self) -> bool:
        return current(self.paths).status is Status.RUNNING

    def cancelled(self) -> bool:
        return current(self.paths).status is Status.CANCELLED

    def result(self, timeout: float | None = None) -> RunRecord:
        """Wait for the end; the record if the run completed, else raise RunFailed."""
        self.wait(timeout=timeout)
        record = current(self.paths)
        if record.status is not Status.COMPLETED:
            raise RunFailed(record)
        return record

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the end; None if the run completed, else the error ``result`` raises."""
        try:
            self.result(timeout)
        except TimeoutError:
            raise
        except Exception as exc:  # noqa: BLE001 - returned, as Future.exception does
            return exc
        return None

    def add_done_callback(self, fn: Callable[[Run], Any]) -> None:
        """Call ``fn(run)`` once the run has ended (at once if it has): before ``wait`` and
        ``result`` return, from the thread that saw the end."""
        if self._thread is not None and not self._thread.is_alive():
            self._fire()  # the launch thread has ended (its own _fire may not have found us)
        with self._lock:
            if not self._fired:
                self._callbacks.append(fn)
                if self._thread is None and self._watcher is None:  # no launch thread to tell us: poll
                    self._watcher = threading.Thread(target=self._poll, name=f"distlaunch-watch-{self.id}",
                                                     daemon=True)
                    self._watcher.start()
                return
        fn(self)

    def _poll(self) -> None:
        while not current(self.paths).status.finished:
            time.sleep(0.2)
        self._fire()

    def _fire(self) -> None:
        """The run has ended: call the done callbacks, once."""
        with self._lock:
            if self._fired:
                return
            self._fired = True
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - as Future: a failing callback does not stop the others
                log.exception("done callback of run %s failed", self.id)

    def wait_for_completion(self, show_output: bool = False, raise_on_error: bool = True,
                            timeout: float | None = None) -> dict[str, Any]:
        """The estimator's wait: block (streaming output if asked), then the run's details;
        RunFailed unless it completed (``raise_on_error=False`` returns the details anyway)."""
        self.wait(show_output=show_output, timeout=timeout)
        details = self.get_details()
        if raise_on_error and details["status"] != Status.COMPLETED.value:
            raise RunFailed(current(self.paths))
        return details

    @property
    def record(self) -> RunRecord:
        return current(self.paths)

    def get_metrics(self, rank: int | None = 0) -> dict[str, list[float]]:
        """Metric values by name, in logged order (rank 0's unless told)."""
        found = read_metrics(self.paths.root, rank)
        return {name: [item["value"] for item in items] for name, items in found.items()}

    def get_file_names(self) -> list[str]:
        """Every file of the run folder, relative to it (outputs/..., logs/...)."""
        root = self.paths.root
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def download_file(self, name: str, output_file_path: str | None = None) -> Path:
        """Copy one file of the run (as listed by get_file_names) to ``output_file_path``."""
        source = (self.paths.root / name).resolve()
        if not source.is_relative_to(self.paths.root.resolve()) or not source.is_file():
            raise RunNotFound(f"run {self.id} has no file {name!r}: see get_file_names()")
        target = Path(output_file_path or Path(name).name)
        if target.is_dir():
            target = target / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return target

    def logs(self, rank: int | None = 0) -> str:
        """One rank's log, or with ``rank=None`` the merged output of all ranks."""
        if rank is None:
            from .history import merge

            text = self.paths.output_log.read_text(encoding="utf-8", errors="replace")
            return "\n".join(merge(text.splitlines())) + "\n"
        path = self.paths.rank_log(rank)
        if not path.is_file():
            raise DistlaunchError(f"run {self.id} has no log for rank {rank}")
        return path.read_text(encoding="utf-8", errors="replace")
