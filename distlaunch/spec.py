"""``JobSpec``: what the user asked for, validated once, immutable afterwards.

The CLI and the Python API both build a JobSpec; nothing downstream sees parsed
arguments. ``JobSpec.command()`` gives the argv of the user's program on a rank.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpecError
from .ssh import SSHOptions

DEFAULT_REMOTE_ROOT = "/tmp/distlaunch-scratch"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_env_items(items: tuple[str, ...] | list[str]) -> tuple[tuple[str, str], ...]:
    """``("K=V", ...)`` → ``(("K", "V"), ...)``; a bad item is a SpecError."""
    pairs = []
    for item in items:
        name, eq, value = item.partition("=")
        if not eq:
            raise SpecError(f"--env {item!r}: expected NAME=VALUE, e.g. --env OMP_NUM_THREADS=4")
        pairs.append((name, value))
    return tuple(pairs)


@dataclass(frozen=True)
class TargetSpec:
    """Where and how wide a job runs: hosts, nodes, ranks per node, GPUs."""

    nodes: int | None = None
    ppn: int | None = None
    hosts: str | None = None
    hostfile: str | None = None
    oversubscribe: bool = False
    use_gpu: bool | None = None  # None: use GPUs when the node has some
    gpus_per_rank: int = 1
    gpus: str | None = None  # restrict to these device ids, e.g. "0,1,3"

    def __post_init__(self) -> None:
        for name in ("nodes", "ppn", "gpus_per_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SpecError(f"--{name.replace('_', '-')} {value!r} must be a whole number of at least 1")
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
    remote_root: str = DEFAULT_REMOTE_ROOT
    sync: bool = True
    ssh: SSHOptions = field(default_factory=SSHOptions)
    collect_all_ranks: bool = False
    skip_checks: bool = False
    pip_packages: tuple[str, ...] = ()  # installed into the ranks' Python on every node first
    requirements: str | None = None  # a requirements file, likewise

    def __post_init__(self) -> None:
        if not self.script:
            raise SpecError("no script given: name the training script, e.g. distlaunch run train.py")
        if self.source_dir is not None and not os.path.isdir(self.source_dir):
            raise SpecError(f"--source-dir {self.source_dir!r} is not a directory: check the path")
        if not self.remote_root.startswith("/"):
            raise SpecError(f"--remote-dir {self.remote_root!r} must be an absolute path")
        if self.requirements and not os.path.isfile(self.requirements):
            raise SpecError(f"--requirements {self.requirements!r} does not exist: check the path")
        if self.ssh.config and not os.path.isfile(self.ssh.config):
            raise SpecError(f"--ssh-config {self.ssh.config!r} does not exist: check the path")
        if self.ssh.key and not os.path.isfile(self.ssh.key):
            raise SpecError(f"--ssh-key {self.ssh.key!r} does not exist: check the path")
        for name, _ in self.env:
            if not _ENV_NAME.match(name):
                raise SpecError(
                    f"--env {name!r}: not a valid variable name: use letters, digits and _, "
                    "not starting with a digit"
                )
        self.command()  # validates the script

    @property
    def is_python(self) -> bool:
        return self.script.endswith(".py")

    @property
    def source(self) -> Path:
        """The directory copied to the nodes (the script's own by default)."""
        return Path(self.source_dir or os.path.dirname(os.path.abspath(self.script))).resolve()

    def _moved(self, path: str, workdir: str | None) -> str:
        """``path`` as seen from ``workdir`` when it lies inside the source directory."""
        absolute = Path(path).resolve()
        if workdir is None or not absolute.is_relative_to(self.source):
            return str(absolute)
        return f"{workdir}/{absolute.relative_to(self.source).as_posix()}"

    def command(self, workdir: str | None = None) -> list[str]:
        """The user program's argv, run on every rank (after the worker shim). With
        ``workdir``, paths inside the source directory point into that copy of it."""
        if self.is_python:
            if not os.path.isfile(self.script):
                raise SpecError(f"script {self.script!r} not found: check the path (relative to {os.getcwd()})")
            if workdir is not None and not Path(self.script).resolve().is_relative_to(self.source):
                raise SpecError(f"script {self.script!r} is outside --source-dir {self.source}: "
                                "put it inside, or choose a source dir that contains it")
            script = self._moved(self.script, workdir)
            return [self.python, "-u", "-m", "distlaunch.bootstrap", script, *self.script_args]
        if os.sep in self.script or os.path.exists(self.script):
            path = Path(self.script)
            if not path.is_file():
                raise SpecError(f"program {self.script!r} not found: check the path")
            if not os.access(path, os.X_OK):
                raise SpecError(
                    f"program {self.script!r} is not executable: chmod +x it, or pass a .py script"
                )
            return [self._moved(str(path), workdir), *self.script_args]
        found = shutil.which(self.script)
        if found is None:
            raise SpecError(
                f"program {self.script!r} is neither a file nor on PATH: give its path, or a .py script"
            )
        return [found, *self.script_args]
