"""Run folders and the typed run record: the only code that reads or writes ``run.json``.

Layout of ``<runs_root>/<run-id>/`` (``RunPaths`` holds every path rule)::

    run.json            the RunRecord: spec, argv, hosts, status, exit code, times, versions
    hostfile            the hostfile given to mpirun
    logs/rank-<N>.log   everything rank N printed (stdout and stderr)
    logs/mpirun.log     what mpirun itself printed (not the ranks' lines)
    logs/output.log     all output, rank-prefixed, in arrival order
    metrics/rank-<N>.jsonl  metrics logged with distlaunch.log_metric
    ranks/rank-<N>.json how rank N ended (a RankExit, written by the worker shim)
    outputs/            files the job keeps (its ./outputs)
    code/               the snapshot of the source dir the ranks ran in (read-only files)
    code.json           the snapshot's file list with a digest per file, and its tree hash
    tags.json           tags added after the launch (Run.tag, distlaunch runs tag)
    attempts/<K>/       a restarted run's earlier attempt K (1, 2, ...): its logs/, ranks/,
                        hostfile and a copy of metrics/; the top-level ones are the last attempt's

``RunRecord`` carries the state machine of a run (queued → running → completed,
failed, cancelled or timeout) and is versioned on disk. ``write_json`` never leaves a
half-written file. The worker shim writes ``ranks/rank-<N>.json`` without importing this
module (its dataclasses, pathlib): ``protocol`` and ``runfiles`` are what they share.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import protocol
from .errors import RunDirError
from .runfiles import PRIVATE_DIR as PRIVATE_DIR
from .runfiles import PRIVATE_FILE as PRIVATE_FILE
from .runfiles import AppendedLines as AppendedLines
from .runfiles import open_private as open_private
from .runfiles import read_json as read_json
from .runfiles import write_json as write_json

TYPE_CHECKING = False  # not typing's: ~3 ms for a rank that logs metrics (rank/metrics imports this module)
if TYPE_CHECKING:
    from typing import Any
else:
    Any = object  # what ``typing.get_type_hints`` reads these annotations as, typing not imported
# (a field typed ``ClassVar[...]`` would need typing imported here: dataclasses only know typing's own)

RECORD_VERSION = 2  # 1: the untyped run.json of distlaunch 0.1 (read, never written)


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
    return f"{stamp}-{int(now * 1000) % 1000:03d}-{os.urandom(2).hex()}"


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run folder."""

    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    record = property(lambda self: self.root / "run.json")
    hostfile = property(lambda self: self.root / "hostfile")
    logs = property(lambda self: self.root / protocol.LOGS)
    ranks = property(lambda self: self.root / protocol.RANKS)
    outputs = property(lambda self: self.root / "outputs")
    metrics = property(lambda self: self.root / protocol.METRICS)
    mpirun_log = property(lambda self: self.logs / "mpirun.log")
    output_log = property(lambda self: self.logs / "output.log", doc="every line the job printed, rank-prefixed")
    cancel_marker = property(lambda self: self.root / "cancel-requested")
    code = property(lambda self: self.root / "code", doc="the snapshot of the source dir the run ran")
    code_digests = property(lambda self: self.root / "code.json", doc="the snapshot's files and their digests")
    tags_file = property(lambda self: self.root / "tags.json", doc="tags added while or after the run ran")
    attempts = property(lambda self: self.root / "attempts", doc="earlier attempts of a restarted run")

    def attempt(self, number: int) -> Path:
        """Where attempt ``number`` (1-based) keeps its logs and records once it is over."""
        return self.attempts / str(number)

    def archive_attempt(self, number: int) -> Path:
        """Move the ended attempt's logs/, ranks/ and hostfile to ``attempts/<number>/``, copy
        its metrics/ there, and start the next one with empty logs/ and ranks/."""
        target = self.attempt(number)
        try:
            self.attempts.mkdir(mode=PRIVATE_DIR, exist_ok=True)
            target.mkdir(mode=PRIVATE_DIR)
            for path in (self.logs, self.ranks, self.hostfile):
                if path.exists():
                    os.replace(path, target / path.name)
            if self.metrics.is_dir():  # they carry on: a copy of the history up to this attempt
                import shutil

                shutil.copytree(self.metrics, target / "metrics")
            for sub in (self.logs, self.ranks):
                sub.mkdir(mode=PRIVATE_DIR)
        except OSError as exc:
            raise RunDirError(f"cannot keep attempt {number} in {target}: {exc.strerror or exc}: "
                              "free space or pick another --run-dir") from None
        return target

    # a rank's own files: named in protocol, which the worker reads them from
    def rank_log(self, rank: int) -> Path:
        return Path(protocol.rank_log(self.root, rank))

    def rank_record(self, rank: int) -> Path:
        return Path(protocol.rank_record(self.root, rank))

    def rank_exception(self, rank: int) -> Path:
        return Path(protocol.rank_exception(self.root, rank))

    def rank_metrics(self, rank: int) -> Path:
        return Path(protocol.rank_metrics(self.root, rank))

    def create(self) -> None:
        """Make the folder (private to its owner) and its sub-folders; RunDirError if impossible."""
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            self.root.mkdir(mode=PRIVATE_DIR)
            for sub in (self.logs, self.ranks, self.outputs):
                sub.mkdir(mode=PRIVATE_DIR)
        except OSError as exc:
            raise RunDirError(
                f"cannot create run folder {self.root}: {exc.strerror or exc}: "
                "pick a writable place with --run-dir"
            ) from None


def make_private(tree: Path) -> None:
    """Take group and other permissions off a tree that a library wrote into the run folder."""
    for path in (tree, *tree.rglob("*")):
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~0o077)


def allocate(runs_root: str | os.PathLike[str]) -> RunPaths:
    """Create a fresh run folder under ``runs_root`` with a new unique id."""
    for _ in range(100):
        paths = RunPaths(Path(runs_root).absolute() / new_run_id())
        if not paths.root.exists():
            paths.create()
            return paths
    raise RunDirError(f"cannot find a free run id under {runs_root}: clean it up or pick another --run-dir")


def _fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``data`` that ``cls`` has (records written by newer versions may have more)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in data.items() if key in names}


@dataclass
class RankExit:
    """How one rank ended, as its worker shim saw it (``ranks/rank-<N>.json``).

    Written once when the rank starts (``exit_code`` None) and again when it ends, by the
    worker as a plain dict of these fields (``worker.new_exit_record``; a test keeps the
    two the same): the worker does not import this module."""

    rank: int
    local_rank: int = 0
    size: int = 1
    host: str = ""
    worker_pid: int = 0
    started: float = 0.0
    gpus: list[str] = field(default_factory=list)
    pid: int | None = None
    ended: float | None = None
    exit_code: int | None = None
    signal: str | None = None
    exception: dict[str, Any] | None = None  # type, message, traceback (from the bootstrap)
    error: str | None = None  # the program could not be started

    @property
    def failed(self) -> bool:
        return self.exit_code not in (None, 0)

    def to_dict(self) -> dict[str, Any]:
        # what dataclasses.asdict gives, without its walk: a run of 80,000 ranks has as many
        values = self.__dict__
        data = {name: values[name] for name in _RANK_EXIT_FIELDS}
        for name in _RANK_EXIT_CONTAINERS:  # never shared with the record
            data[name] = copy.deepcopy(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankExit:
        return cls(**_fields(cls, data))


_RANK_EXIT_FIELDS = tuple(f.name for f in dataclasses.fields(RankExit))
_RANK_EXIT_CONTAINERS = ("gpus", "exception")  # its fields that hold lists or dicts (a test keeps this true)


def read_rank_exits(paths: RunPaths) -> dict[int, RankExit]:
    """The exit records the workers wrote, by rank (ranks that never started are absent)."""
    found: dict[int, RankExit] = {}
    if not paths.ranks.is_dir():
        return found
    for file in paths.ranks.glob("rank-[0-9]*.json"):
        if file.name.endswith(".exception.json"):
            continue
        try:
            item = RankExit.from_dict(read_json(file))
        except (OSError, ValueError, TypeError):
            continue
        found[item.rank] = item
    return found


@dataclass(frozen=True)
class Failure:
    """The root cause: the first rank that failed, or mpirun itself (rank None)."""

    rank: int | None
    host: str | None
    exit_code: int
    signal: str | None
    last_lines: tuple[str, ...] = ()
    exception: str | None = None  # "ValueError: bad input" when Python raised
    launcher: str | None = None  # rank None: the launcher that failed (mpirun, srun, mpiexec.hydra)

    def describe(self) -> str:
        who = f"rank {self.rank} on {self.host}" if self.rank is not None else (self.launcher or "mpirun")
        if self.exception:
            how = f"raised {self.exception}"
        elif self.signal:
            how = f"was killed by {self.signal}"
        else:
            how = f"exited with code {self.exit_code}"
        return f"{who} {how}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Failure:
        values = _fields(cls, data)
        values["last_lines"] = tuple(values.get("last_lines", ()))
        return cls(**values)


@dataclass
class Attempt:
    """One launch of a run that may be restarted (``--max-restarts``): where it ran, how
    it ended, and which nodes it blamed (``distlaunch nodes``)."""

    number: int  # 1-based
    started: float
    ended: float
    status: Status
    exit_code: int
    hosts: list[str] = field(default_factory=list)
    ranks: int = 0
    failure: Failure | None = None
    reason: str = ""
    blamed: dict[str, str] = field(default_factory=dict)  # host -> why it is left out
    next: str = ""  # what the launcher did next: "restarted after 2 s", or why it did not

    def describe(self) -> str:
        how = self.reason or (self.failure.describe() if self.failure else self.status.value)
        return f"attempt {self.number} {self.status.value} after {self.ended - self.started:.1f} s: {how}"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attempt:
        values = _fields(cls, data)
        values["status"] = Status(values["status"])
        if values.get("failure"):
            values["failure"] = Failure.from_dict(values["failure"])
        return cls(**values)


@dataclass
class RunRecord:
    """Everything known about one run, saved as ``run.json`` at every change of state.

    The launcher creates it ``queued``, then calls ``running``, and ends it with
    ``finished`` (the job ran to an outcome) or ``failed`` (distlaunch itself could not go
    on). Readers get it back with ``RunRecord.load``.
    """

    id: str
    script: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    status: Status = Status.QUEUED
    created: float = field(default_factory=time.time)
    nodes: int = 1
    ranks: int = 0
    host_source: str = ""
    gpu_mode: bool = False
    slots: list[dict[str, Any]] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)
    env_added: dict[str, str] = field(default_factory=dict)
    hostfile: str = ""
    launcher: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    sync: dict[str, Any] | None = None
    started: float | None = None
    ended: float | None = None
    mpirun_pid: int | None = None
    exit_code: int | None = None
    mpirun_exit_code: int | None = None
    duration_s: float | None = None
    first_failure: Failure | None = None
    rank_exits: dict[int, RankExit] = field(default_factory=dict)
    leftovers_killed: int = 0
    reason: str = ""  # why the launcher ended the job (cancel, timeout), else ""
    error: str | None = None  # what stopped distlaunch itself (sync, pip, a crash)
    tensorboard: str | None = None
    collect_missing: list[str] = field(default_factory=list)
    scheduler: dict[str, Any] | None = None  # a batch job: {"kind": "slurm", "job_id", "submitted", ...}
    experiment: str = ""
    tags: dict[str, str] = field(default_factory=dict)  # given at launch (``tags.json`` holds later ones)
    code: dict[str, Any] | None = None  # the snapshot: {"files", "bytes", "hash", "linked", "copied"}
    inputs: list[dict[str, Any]] = field(default_factory=list)  # --input: name, source, mode, path, hash
    attempts: list[Attempt] = field(default_factory=list)  # every launch of a restarted run, last one included
    container: dict[str, Any] | None = None  # --container: runtime, image, its identity (digest/hash), binds
    version: int = RECORD_VERSION

    # -- transitions
    def running(self, pid: int, started: float | None = None) -> None:
        self.status, self.mpirun_pid = Status.RUNNING, pid
        self.started = time.time() if started is None else started

    def finished(self, status: Status, exit_code: int, mpirun_exit_code: int | None, started: float,
                 ended: float, failure: Failure | None, rank_exits: dict[int, RankExit], leftovers: int,
                 reason: str) -> None:
        self.status, self.exit_code, self.mpirun_exit_code = status, exit_code, mpirun_exit_code
        self.started, self.ended, self.duration_s = started, ended, round(ended - started, 3)
        self.first_failure, self.rank_exits = failure, dict(sorted(rank_exits.items()))
        self.leftovers_killed, self.reason = leftovers, reason

    def failed(self, error: str, exit_code: int | None = None) -> None:
        """distlaunch could not carry the run out (not the job's own failure)."""
        self.status, self.error, self.ended = Status.FAILED, error, time.time()
        if exit_code is not None:
            self.exit_code = exit_code

    # -- on disk
    def to_dict(self) -> dict[str, Any]:
        rest = copy.copy(self)  # without the per-rank and per-attempt records, which
        rest.rank_exits, rest.attempts = {}, []  # asdict would copy only to be replaced here
        data = dataclasses.asdict(rest)
        data["status"] = self.status.value
        data["rank_exits"] = {str(rank): item.to_dict() for rank, item in self.rank_exits.items()}
        data["attempts"] = [item.to_dict() for item in self.attempts]
        return data

    def save(self, paths: RunPaths) -> None:
        # room for the final version (exit records, failure lines) even on a full disk
        reserve = min(1 << 20, 16384 + 1024 * max(self.ranks, len(self.rank_exits)))
        write_json(paths.record, self.to_dict(), reserve=reserve)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        values = _fields(cls, data)
        values["status"] = Status(values.get("status", Status.QUEUED))
        if values.get("first_failure"):
            values["first_failure"] = Failure.from_dict(values["first_failure"])
        values["rank_exits"] = {int(rank): RankExit.from_dict(item)
                                for rank, item in (values.get("rank_exits") or {}).items()}
        values["collect_missing"] = list(values.get("collect_missing") or [])
        values["attempts"] = [Attempt.from_dict(item) for item in values.get("attempts") or []]
        values["version"] = int(data.get("version", 1))
        return cls(**values)

    @classmethod
    def load(cls, paths: RunPaths) -> RunRecord:
        try:
            data = read_json(paths.record)
        except (OSError, ValueError) as exc:
            raise RunDirError(f"cannot read {paths.record}: {exc}: is it a run folder?") from None
        if int(data.get("version", 1)) > RECORD_VERSION:
            raise RunDirError(f"{paths.record} was written by a newer distlaunch (record version "
                              f"{data['version']}): upgrade distlaunch to read it")
        return cls.from_dict(data)


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
