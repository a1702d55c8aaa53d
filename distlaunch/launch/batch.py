"""Inside a Slurm batch job: launch the run that ``distlaunch submit`` recorded.

``submit.py`` (the batch script) calls ``main(run_dir)``: the JobSpec comes back from
``job.json`` (secret values from the environment sbatch passed on), hosts come from the
allocation, and the run folder made at submit time is the one this launch fills.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import DistlaunchError
from ..plan.spec import spec_from_dict
from ..records import RunPaths, RunRecord, read_json
from .launcher import launch, prepare
from .supervise import Console


def progress(message: str) -> None:
    print(f"distlaunch: {message}", file=sys.stderr, flush=True)


def main(run_dir: str) -> None:
    paths = RunPaths(Path(run_dir))
    try:
        data = read_json(paths.root / "job.json")
        data["env"] = [(name, os.environ.get(name, "") if value is None else value) for name, value in data["env"]]
        prepared = prepare(spec_from_dict(data))
        progress(f"run {paths.run_id} starts in Slurm job {os.environ.get('SLURM_JOB_ID', '?')}")
        record = RunRecord.load(paths)
        if record.scheduler is not None and os.environ.get("SLURM_JOB_ID"):
            record.scheduler["job_id"] = os.environ["SLURM_JOB_ID"]  # whatever the submitter got to save
            record.save(paths)
        _paths, outcome = launch(prepared, Console(sys.stdout.buffer, sys.stderr.buffer), paths=paths,
                                 progress=progress)
    except DistlaunchError as exc:
        progress(f"error: {exc}")
        record = RunRecord.load(paths)
        if not record.status.finished:
            record.failed(str(exc), exc.exit_code)
            record.save(paths)
        sys.exit(exc.exit_code)
    progress(f"run {paths.run_id} {outcome.status.value} (exit code {outcome.exit_code})")
    sys.exit(outcome.exit_code)
