"""``JobSpec``: what the user asked for, validated once, immutable afterwards.

The CLI and the Python API both build a JobSpec; nothing downstream sees parsed
arguments. ``resolve_program`` finds the user's program on this machine (the one step
that looks at files and PATH), and ``program_in`` rewrites its paths for a synced copy
of the source directory (pure).
"""
from __future__ import annotations

import dataclasses
import getpass
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import SpecError
from .container import ContainerSpec
from .inputs import InputSpec, check_inputs
from .ssh import SSHOptions

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LAUNCHERS = ("mpirun", "srun")
# Python 3.11+: ``-P`` keeps the current directory off sys.path, so a project file named
# like a module we import (json.py, distlaunch/) cannot replace it in the worker or agent
SAFE_PATH = ("-P",) if sys.version_info >= (3, 11) else ()


def default_remote_root() -> str:
    """Node-local scratch, one per user: ``/tmp/distlaunch-<user>`` (kept 0700 on the nodes)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"/tmp/distlaunch-{re.sub(r'[^A-Za-z0-9._-]', '_', user)}"


def parse_env_items(items: Sequence[str], environ: dict[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    """``("K=V", "NAME", ...)`` → ``(("K", "V"), ("NAME", <its value here>), ...)``.

    A bare ``NAME`` takes its value from the launcher's environment, so a secret never
    has to appear on the command line."""
    environ = dict(os.environ) if environ is None else environ
    pairs = []
    for item in items:
        name, eq, value = item.partition("=")
        if not eq:
            if not _ENV_NAME.match(item):
                raise SpecError(f"--env {item!r}: expected NAME=VALUE or NAME, e.g. --env OMP_NUM_THREADS=4")
            if item not in environ:
                raise SpecError(f"--env {item}: {item} is not set here: set it, or write --env {item}=VALUE")
            value = environ[item]
        pairs.append((name, value))
    return tuple(pairs)


def parse_env_file(path: str) -> tuple[tuple[str, str], ...]:
    """``--env-file F``: ``NAME=VALUE`` lines; blank lines and ``#`` comments skipped."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as exc:
        raise SpecError(f"--env-file {path!r}: {exc.strerror or exc}: check the path") from None
    pairs = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, eq, value = line.removeprefix("export ").partition("=")
        name = name.strip()
        if not eq or not _ENV_NAME.match(name):
            raise SpecError(f"--env-file {path}:{number}: expected NAME=VALUE")
        pairs.append((name, value.strip().strip("'\"")))
    return tuple(pairs)


@dataclass(frozen=True)
class TargetSpec:
    """Where and how wide a job runs: hosts, nodes, ranks per node (or in all), GPUs."""

    nodes: int | None = None
    ppn: int | None = None
    hosts: str | None = None
    hostfile: str | None = None
    oversubscribe: bool = False
    use_gpu: bool | None = None  # None: use GPUs when the node has some
    gpus_per_rank: int = 1
    gpus: str | None = None  # restrict to these device ids, e.g. "0,1,3"
    np: int | None = None  # total ranks (mpirun's -n), instead of or with --ppn

    def __post_init__(self) -> None:
        for name in ("nodes", "ppn", "gpus_per_rank", "np"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                flag = "-n/--np" if name == "np" else f"--{name.replace('_', '-')}"
                raise SpecError(f"{flag} {value!r} must be a whole number of at least 1")
        if self.hosts and self.hostfile:
            raise SpecError("--hosts and --hostfile both given: use one of them")
        if self.hostfile and not os.path.isfile(self.hostfile):
            raise SpecError(f"hostfile {self.hostfile!r} does not exist: check the path")
        if self.use_gpu is False and self.gpus:
            raise SpecError("--gpus given together with --cpu-only: drop one of them")


@dataclass(frozen=True)
class JobSpec:
    """A distributed job, independent of where and how it is launched."""

    script: str
    script_args: tuple[str, ...] = ()
    target: TargetSpec = field(default_factory=TargetSpec)
    env: tuple[tuple[str, str], ...] = ()
    env_pass: tuple[str, ...] = ()  # patterns of launcher variables to export to every rank
    mpi_args: tuple[str, ...] = ()
    mpirun: str | None = None
    runs_root: str = "runs"
    python: str = field(default_factory=lambda: sys.executable)
    # multi-node: what is copied where, and how nodes are reached
    source_dir: str | None = None  # default: the script's directory
    remote_root: str = field(default_factory=default_remote_root)
    sync: bool = True
    ssh: SSHOptions = field(default_factory=SSHOptions)
    collect_all_ranks: bool = False
    skip_checks: bool = False
    pip_packages: tuple[str, ...] = ()  # installed into the ranks' Python on every node first
    requirements: str | None = None  # a requirements file, likewise
    iface: str | None = None  # the network interface MPI and gloo use between nodes
    launcher: str = "mpirun"  # or "srun": a step of the Slurm allocation we run in
    # the estimator's working-directory rule, history and data
    in_place: bool = False  # run in the current directory as is (no snapshot; plain mpirun)
    max_source_files: int = 20_000  # a source dir with more files to snapshot is refused (0: no limit)
    max_source_bytes: int = 2 << 30  # likewise for their size: a run started from $HOME or /tmp
    experiment: str | None = None  # default: the source directory's name
    tags: tuple[tuple[str, str], ...] = ()
    inputs: tuple[InputSpec, ...] = ()
    # fault tolerance: relaunch after a failure, leaving out the nodes it blamed
    max_restarts: int = 0
    restart_delay: float = 1.0  # seconds before the first restart, doubled each time (at most 60)
    min_nodes: int | None = None  # a restart may go on with this few nodes (default: as many as asked)
    quarantine_ttl: float = 3600.0  # seconds a blamed node stays out of placement (0: not recorded)
    container: ContainerSpec | None = None  # each rank's worker and program run inside this image

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise SpecError(f"--launcher {self.launcher!r}: choose one of {', '.join(LAUNCHERS)}")
        if not self.script:
            raise SpecError("no script given: name the training script, e.g. distlaunch run train.py")
        if self.source_dir is not None and not os.path.isdir(self.source_dir):
            raise SpecError(f"--source-dir {self.source_dir!r} is not a directory: check the path")
        if not self.remote_root.startswith("/"):
            raise SpecError(f"--remote-dir {self.remote_root!r} must be an absolute path")
        if self.requirements and not os.path.isfile(self.requirements):
            raise SpecError(f"--requirements {self.requirements!r} does not exist: check the path")
        self.ssh.validate()
        for name, _ in self.env:
            if not _ENV_NAME.match(name):
                raise SpecError(
                    f"--env {name!r}: not a valid variable name: use letters, digits and _, "
                    "not starting with a digit"
                )
        if self.iface is not None and not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,64}", self.iface):
            raise SpecError(f"--iface {self.iface!r} is not an interface name: write e.g. --iface eth0")
        for key, _ in self.tags:
            if not key or "=" in key or any(ch.isspace() for ch in key):
                raise SpecError(f"--tag {key!r}: a tag name must be non-empty, without '=' or spaces: "
                                "write --tag KEY=VALUE")
        if self.experiment is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", self.experiment):
            raise SpecError(f"--experiment {self.experiment!r}: use letters, digits, '.', '_' and '-' "
                            "(at most 100), starting with a letter or digit")
        for name, option in (("max_source_files", "--max-source-files"), ("max_source_bytes", "--max-source-size")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"{option} {value!r} must be a whole number, 0 or more (0: no limit)")
        check_inputs(self.inputs, self.script_args)
        self._check_restarts()
        resolve_program(self)  # the script must exist now, not when the ranks start

    def _check_restarts(self) -> None:
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise SpecError(f"--max-restarts {self.max_restarts!r} must be a whole number, 0 or more")
        for name in ("restart_delay", "quarantine_ttl"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise SpecError(f"--{name.replace('_', '-')} {value!r} must be a number of seconds, 0 or more")
        if self.min_nodes is not None:
            if isinstance(self.min_nodes, bool) or not isinstance(self.min_nodes, int) or self.min_nodes < 1:
                raise SpecError(f"--min-nodes {self.min_nodes!r} must be a whole number of at least 1")
            if self.target.nodes is not None and self.min_nodes > self.target.nodes:
                raise SpecError(f"--min-nodes {self.min_nodes} is more than --nodes {self.target.nodes}: "
                                "lower --min-nodes")

    @property
    def is_python(self) -> bool:
        return self.script.endswith(".py")

    @property
    def source(self) -> str:
        """The directory copied to the nodes (the script's own by default), absolute.
        Symlinks are kept as given: resolving them would change what the user named."""
        return os.path.abspath(self.source_dir or os.path.dirname(os.path.abspath(self.script)))

    @property
    def runs_in_place(self) -> bool:
        """No snapshot: ``--in-place``, or a program that is not a .py script and no
        --source-dir says what belongs to it (``hostname``, a venv's python)."""
        return self.in_place or (not self.is_python and self.source_dir is None)

    @property
    def experiment_name(self) -> str:
        """The experiment a run belongs to: ``--experiment``, else the source dir's name."""
        if self.experiment:
            return self.experiment
        name = os.path.basename(self.source.rstrip("/")) or "default"
        return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def parse_tags(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``("team=vision", "baseline")`` → ``(("team", "vision"), ("baseline", ""))``."""
    return tuple((key, value) for key, _eq, value in (item.partition("=") for item in items))


def spec_to_dict(spec: JobSpec) -> dict[str, object]:
    """A JSON-able copy of the spec (``spec_from_dict`` gives it back)."""
    data = dataclasses.asdict(spec)
    data["ssh"].pop("control_path", None)  # a run's own connections, not part of the job
    return data


def spec_from_dict(data: dict[str, Any]) -> JobSpec:
    """The JobSpec that ``spec_to_dict`` wrote (validated again, as any spec is)."""
    values = dict(data)
    values["target"] = TargetSpec(**values.get("target", {}))
    values["ssh"] = SSHOptions(**values.get("ssh", {}))
    values["env"] = tuple((str(name), str(value)) for name, value in values.get("env", ()))
    values["tags"] = tuple((str(key), str(value)) for key, value in values.get("tags", ()))
    values["inputs"] = tuple(InputSpec(**item) for item in values.get("inputs", ()))
    if values.get("container"):
        item = dict(values["container"])
        values["container"] = ContainerSpec(**{**item, "binds": tuple(item.get("binds", ()))})
    for name in ("script_args", "env_pass", "mpi_args", "pip_packages"):
        values[name] = tuple(values.get(name, ()))
    names = {f.name for f in dataclasses.fields(JobSpec)}
    return JobSpec(**{key: value for key, value in values.items() if key in names})


def resolve_program(spec: JobSpec) -> tuple[str, ...]:
    """The user program's argv on a rank, its paths absolute (never symlink-resolved: a
    venv's ``bin/python`` is a symlink, and resolving it loses the venv); SpecError if
    the program cannot run."""
    script = spec.script
    if spec.is_python:
        if not os.path.isfile(script):
            raise SpecError(f"script {script!r} not found: check the path (relative to {os.getcwd()})")
        return (spec.python, *SAFE_PATH, "-u", "-m", "distlaunch.rank.bootstrap", os.path.abspath(script),
                *spec.script_args)
    if os.sep in script or os.path.exists(script):
        if not os.path.isfile(script):
            raise SpecError(f"program {script!r} not found: check the path")
        if not os.access(script, os.X_OK):
            raise SpecError(f"program {script!r} is not executable: chmod +x it, or pass a .py script")
        return (os.path.abspath(script), *spec.script_args)
    found = shutil.which(script)
    if found is None:
        raise SpecError(f"program {script!r} is neither a file nor on PATH: give its path, or a .py script")
    return (os.path.abspath(found), *spec.script_args)


def inside(path: str, folder: str) -> bool:
    """Whether absolute ``path`` lies in absolute ``folder`` (by name, no file access)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def program_in(program: Sequence[str], source: str, workdir: str | None, is_python: bool) -> list[str]:
    """``program`` with the path of the script (or executable) moved into ``workdir``, a
    copy of ``source`` on the nodes; unchanged without a workdir. Pure."""
    argv = list(program)
    if workdir is None:
        return argv
    index = argv.index("distlaunch.rank.bootstrap") + 1 if is_python else 0
    path = argv[index]
    if inside(path, source):
        argv[index] = f"{workdir}/{os.path.relpath(path, source)}" if path != source else workdir
    elif is_python:
        raise SpecError(f"script {path!r} is outside --source-dir {source}: put it inside, or choose a "
                        "source dir that contains it")
    return argv
