"""Run folders: where every file of a run lives, and the atomic ``run.json`` record.

Layout of ``<runs_root>/<run-id>/``::

    run.json            spec, argv, hosts, status, exit code, times, versions
    hostfile            the hostfile given to mpirun
    logs/rank-<N>.log   everything rank N printed (stdout and stderr)
    logs/mpirun.log     what mpirun itself printed (not the ranks' lines)
    logs/output.log     all output, rank-prefixed, in arrival order
    metrics/rank-<N>.jsonl  metrics logged with distlaunch.log_metric
    ranks/rank-<N>.json how rank N ended (written by the worker shim)
    outputs/            files the job keeps

All path rules live in ``RunPaths``; ``write_json`` never leaves a half-written file.
"""
from __future__ import annotations

import enum
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RunDirError


class Status(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"

    @property
    def finished(self) -> bool:
        return self not in (Status.QUEUED, Status.RUNNING)


def new_run_id(now: float | None = None) -> str:
    """Unique and sortable by start time, to the millisecond: ``20261122-213502-123-3f9a``."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{stamp}-{int(now * 1000) % 1000:03d}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run folder."""

    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def record(self) -> Path:
        return self.root / "run.json"

    @property
    def hostfile(self) -> Path:
        return self.root / "hostfile"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def ranks(self) -> Path:
        return self.root / "ranks"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def mpirun_log(self) -> Path:
        return self.logs / "mpirun.log"

    @property
    def output_log(self) -> Path:
        """Every line the job printed, rank-prefixed, in arrival order (the terminal's view)."""
        return self.logs / "output.log"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def cancel_marker(self) -> Path:
        return self.root / "cancel-requested"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank-{rank}.log"

    def rank_record(self, rank: int) -> Path:
        return self.ranks / f"rank-{rank}.json"

    def rank_exception(self, rank: int) -> Path:
        return self.ranks / f"rank-{rank}.exception.json"

    def create(self) -> None:
        """Make the folder and its sub-folders; RunDirError if that is impossible."""
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            self.root.mkdir()
            for sub in (self.logs, self.ranks, self.outputs):
                sub.mkdir()
        except OSError as exc:
            raise RunDirError(
                f"cannot create run folder {self.root}: {exc.strerror or exc}: "
                "pick a writable place with --run-dir"
            ) from None


def allocate(runs_root: str | os.PathLike[str]) -> RunPaths:
    """Create a fresh run folder under ``runs_root`` with a new unique id."""
    for _ in range(100):
        paths = RunPaths(Path(runs_root).absolute() / new_run_id())
        if not paths.root.exists():
            paths.create()
            return paths
    raise RunDirError(f"cannot find a free run id under {runs_root}: clean it up or pick another --run-dir")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically: a reader sees the old or the new file, never half.

    No fsync: it can take longer than mpirun's 250 ms between SIGTERM and SIGKILL, and
    the rename alone already protects against a crash of the writing process.
    """
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise RunDirError(f"cannot write {path}: {exc.strerror or exc}: free space or pick another --run-dir") from None


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_rank_records(paths: RunPaths) -> dict[int, dict[str, Any]]:
    """The exit records the workers wrote, by rank (ranks that never wrote one are absent)."""
    records: dict[int, dict[str, Any]] = {}
    if not paths.ranks.is_dir():
        return records
    for file in paths.ranks.glob("rank-[0-9]*.json"):
        if file.name.endswith(".exception.json"):
            continue
        try:
            data = read_json(file)
            records[int(data["rank"])] = data
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records


def tail_lines(path: Path, count: int = 10, max_bytes: int = 16384) -> list[str]:
    """The last ``count`` lines of a log file, decoded leniently."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-count:]
