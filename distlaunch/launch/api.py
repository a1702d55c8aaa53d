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

import os
import shutil
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DistlaunchError, RunNotFound
from ..plan.slurm import SlurmTarget
from ..plan.spec import JobSpec, TargetSpec, default_remote_root
from ..plan.ssh import SSHOptions
from ..records import RunPaths, RunRecord
from .history import current, request_cancel, resolve
from .launcher import launch, prepare
from .metrics import read_metrics
from .supervise import Watch


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


class Job:
    """A job to run: what, where, and how wide."""

    def __init__(self, entry_script: str, source_dir: str = ".", script_params: Any = None, *,
                 nodes: int | None = None, ppn: int | None = None, hosts: str | None = None,
                 hostfile: str | None = None, use_gpu: bool | None = None, gpus_per_rank: int = 1,
                 env: Mapping[str, str] | None = None, mpi_args: Sequence[str] = (), runs_root: str = "runs",
                 timeout: float | None = None, hang_timeout: float | None = None, oversubscribe: bool = False,
                 remote_dir: str | None = None, ssh: SSHOptions | None = None, sync: bool = True,
                 pip_packages: Sequence[str] = (), requirements: str | None = None,
                 compute_target: SlurmTarget | None = None, launcher: str = "mpirun") -> None:
        script = entry_script if os.path.isabs(entry_script) else os.path.join(source_dir, entry_script)
        self.spec = JobSpec(
            script=script,
            script_args=params_to_args(script_params),
            target=TargetSpec(nodes=nodes, ppn=ppn, hosts=hosts, hostfile=hostfile, oversubscribe=oversubscribe,
                              use_gpu=use_gpu, gpus_per_rank=gpus_per_rank),
            env=tuple((env or {}).items()),
            mpi_args=tuple(mpi_args),
            runs_root=runs_root,
            source_dir=source_dir,
            remote_root=remote_dir or default_remote_root(),
            ssh=ssh or SSHOptions(),
            sync=sync,
            pip_packages=tuple(pip_packages),
            requirements=requirements,
            launcher=launcher,
        )
        self.watch = Watch(timeout=timeout, hang_timeout=hang_timeout)
        self.compute_target = compute_target

    def submit(self) -> Run:
        """Start the job and return its Run as soon as its folder exists: here, in a
        background thread; or, with ``compute_target=Slurm(...)``, as a queued batch job."""
        if self.compute_target is not None:
            from .slurm import submit

            target = self.spec.target
            nodes, ppn = target.nodes or 1, target.ppn or 1
            return Run(submit(self.spec, self.compute_target, target.np or nodes * ppn, nodes, ppn))
        prepared = prepare(self.spec)
        ready = threading.Event()
        box: dict[str, Any] = {}

        def on_ready(paths: RunPaths) -> None:
            box["paths"] = paths
            ready.set()

        def body() -> None:
            try:
                launch(prepared, watch=self.watch, on_ready=on_ready)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc
            finally:
                ready.set()

        # not a daemon: the interpreter waits for the job instead of leaving mpirun behind
        thread = threading.Thread(target=body, name="distlaunch-run")
        thread.start()
        ready.wait()
        if "paths" not in box:
            thread.join()
            raise box["error"]
        return Run(box["paths"], thread, box)


class Run:
    """One run: its status, output, metrics and files. ``Run.load(id)`` for past runs."""

    def __init__(self, paths: RunPaths, thread: threading.Thread | None = None,
                 box: dict[str, Any] | None = None) -> None:
        self.paths, self._thread, self._box = paths, thread, box or {}

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
        if "error" in self._box:
            raise self._box["error"]
        return self.status

    def _print_new_output(self, offset: int) -> int:
        try:
            with open(self.paths.output_log, "rb") as handle:
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
        """The run record as a dict (``run.json``)."""
        return current(self.paths).to_dict()

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
