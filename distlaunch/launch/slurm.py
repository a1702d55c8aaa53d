"""Slurm from the launcher's side: is the allocation we seem to be in alive, submit a
batch job (``distlaunch submit``), and follow it until its run record says how it ended.

A submitted run gets its run folder at once: ``job.json`` (the JobSpec, secrets left
out: they travel in sbatch's own environment), ``submit.py`` (the batch script) and a
``queued`` run record holding the Slurm job id. Inside the allocation the batch script
launches that very run (``launch.batch``), which moves the record on to ``running`` and
its final status; ``reconcile`` covers a batch job that ended before it could (cancelled
while queued, killed by Slurm), asking ``squeue`` and ``scontrol``. The run folder must
be on a filesystem the compute nodes share, as Slurm's working directories are.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import DistlaunchError, HostError, LaunchFailed, SpecError
from ..plan.envpolicy import is_secret, redact_pairs
from ..plan.slurm import SlurmTarget, batch_lines, batch_script
from ..plan.spec import JobSpec, spec_to_dict
from ..records import RunPaths, RunRecord, Status, allocate, open_private, write_json

log = logging.getLogger(__name__)
TERMINAL = {"CANCELLED": Status.CANCELLED, "TIMEOUT": Status.TIMEOUT, "DEADLINE": Status.TIMEOUT}
QUEUED_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED"}
LIVE_STATES = QUEUED_STATES | {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SpecError(f"{name} is not on PATH: run this on a Slurm login node (or install slurm-client)")
    return found


GONE = "GONE"  # Slurm says it has no such job (any more)
_recent: dict[str, tuple[float, str | None]] = {}  # job id -> (when asked, answer): at most one ask per 5 s


def job_state(job_id: str, max_age: float = 0.0) -> str | None:
    """Slurm's state of the job (PENDING, RUNNING, COMPLETED, ...), GONE once Slurm has
    forgotten it, None when Slurm could not be asked (no answer is not an answer)."""
    asked = _recent.get(job_id)
    if asked is not None and time.monotonic() - asked[0] < max_age:
        return asked[1]
    state = _ask(job_id)
    _recent[job_id] = (time.monotonic(), state)
    return state


def _ask(job_id: str) -> str | None:
    try:
        proc = subprocess.run([_tool("squeue"), "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.split()[0]
        squeue_forgot = "Invalid job id" in proc.stderr or (proc.returncode == 0 and not proc.stdout.strip())
        proc = subprocess.run([_tool("scontrol"), "show", "job", job_id], capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired, SpecError):
        return None
    for word in proc.stdout.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    if squeue_forgot and "Invalid job id" in proc.stderr:
        return GONE
    return None


def check_allocation(env: Mapping[str, str]) -> None:
    """HostError unless SLURM_JOB_ID names a job that is running now: ``SLURM_*`` left over
    from an ended job (or copied from elsewhere) must not place ranks on its old nodes."""
    job_id = env.get("SLURM_JOB_ID", "")
    if shutil.which("squeue") is None:
        raise HostError(f"SLURM_JOB_ID={job_id} is set but squeue is not on PATH, so the allocation cannot be "
                        "checked: run inside salloc/sbatch on the cluster, or unset the SLURM_* variables")
    state = job_state(job_id)
    if state is None:
        raise HostError(f"SLURM_JOB_ID={job_id} is set but Slurm does not answer (squeue, scontrol): "
                        "try again, or check the cluster (sinfo)")
    if state not in LIVE_STATES - QUEUED_STATES:
        raise HostError(f"SLURM_JOB_ID={job_id} and SLURM_JOB_NODELIST={env.get('SLURM_JOB_NODELIST', '')} are set, "
                        f"but that job is {(state or 'unknown to Slurm').lower()}: these variables are left over "
                        "from another allocation; unset the SLURM_* variables, or run inside salloc/sbatch")


def _job_file(spec: JobSpec) -> dict[str, Any]:
    """job.json: the spec with the values of secret-looking variables left out."""
    data = spec_to_dict(spec)
    data["env"] = [(name, None if is_secret(name) else value) for name, value in spec.env]
    return data


def submit(spec: JobSpec, target: SlurmTarget, ranks: int, nodes: int, tasks_per_node: int,
           progress: Callable[[str], None] = log.warning) -> RunPaths:
    """Create the run folder, write the batch script, ``sbatch`` it: a ``queued`` run."""
    sbatch = _tool("sbatch")
    paths = allocate(spec.runs_root)
    write_json(paths.root / "job.json", _job_file(spec))
    job_name = f"distlaunch-{os.path.splitext(os.path.basename(spec.script))[0]}"[:60]
    gpus = tasks_per_node * spec.target.gpus_per_rank if spec.target.use_gpu else 0
    lines = batch_lines(target, nodes, tasks_per_node, str(paths.logs / "sbatch.log"), job_name, gpus)
    script = paths.root / "submit.py"
    with open_private(script, "w") as handle:
        handle.write(batch_script(spec.python, str(paths.root), lines))
    spec_dict = spec_to_dict(spec)
    spec_dict["env"] = redact_pairs(spec.env)
    record = RunRecord(id=paths.run_id, script=spec.script, spec=spec_dict, nodes=nodes, ranks=ranks,
                       host_source="slurm batch job",
                       scheduler={"kind": "slurm", "job_id": None, "submitted": time.time(),
                                  "script": str(script), "target": dict(target.__dict__)},
                       experiment=spec.experiment_name, tags=dict(spec.tags))
    if not spec.runs_in_place:  # the code as it is now is what runs, whatever is edited meanwhile
        from .snapshot import take

        try:
            record.code = take(spec.source, paths, progress, exclude=(str(paths.root.parent),),
                               max_files=spec.max_source_files, max_bytes=spec.max_source_bytes).summary()
        except DistlaunchError as exc:  # nothing was submitted: the folder says why
            record.failed(str(exc), exc.exit_code)
            record.save(paths)
            raise
    record.save(paths)
    env = {**os.environ, **{name: value for name, value in spec.env if is_secret(name)}}
    # submitted on hold: the record knows its job id before the job can start and write it
    argv = [sbatch, "--parsable", "--hold", f"--chdir={os.getcwd()}", *target.sbatch_args, str(script)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        record.failed(f"sbatch did not answer ({exc}); a job may have been queued all the same: check squeue",
                      LaunchFailed.exit_code)
        record.save(paths)
        raise LaunchFailed(f"sbatch did not answer ({exc}): check squeue before submitting again") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        record.failed(f"sbatch refused the job: {last}", LaunchFailed.exit_code)
        record.save(paths)
        raise LaunchFailed(f"sbatch refused the job: {last}")
    job_id = proc.stdout.strip().split(";")[0]
    assert record.scheduler is not None
    record.scheduler["job_id"] = job_id
    record.save(paths)
    released = subprocess.run([_tool("scontrol"), "release", job_id], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)
    if released.returncode != 0:
        last = (released.stderr.strip().splitlines() or ["no answer"])[-1]
        raise LaunchFailed(f"Slurm job {job_id} is queued but held, and could not be released ({last}): "
                           f"scontrol release {job_id}")
    return paths


def reconcile(paths: RunPaths, record: RunRecord) -> RunRecord:
    """For a batch run the record does not show as ended: ask Slurm, and if the job is
    over (cancelled while queued, killed, failed before distlaunch started), say so."""
    scheduler = record.scheduler or {}
    if record.status.finished or not scheduler.get("job_id"):
        return record
    state = job_state(str(scheduler["job_id"]), max_age=5.0)
    if state is None or state in LIVE_STATES:  # alive, or Slurm could not be asked: change nothing
        return record
    fresh = RunRecord.load(paths)  # the batch job may have finished the record meanwhile
    if fresh.status.finished:
        return fresh
    fresh.failed(f"the Slurm job {scheduler['job_id']} ended as {state or 'unknown'} before distlaunch recorded "
                 "an end: see logs/sbatch.log")
    fresh.status = TERMINAL.get(state or "", Status.FAILED)
    fresh.reason = f"Slurm job {scheduler['job_id']}: {state or 'gone'}"
    fresh.save(paths)
    return fresh


def cancel(record: RunRecord) -> None:
    """scancel the batch job behind a run."""
    job_id = (record.scheduler or {}).get("job_id")
    if job_id:
        subprocess.run([_tool("scancel"), str(job_id)], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
