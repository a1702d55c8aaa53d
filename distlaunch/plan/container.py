"""Containers, planned: which runtime runs an image, what it binds, and the argv that
puts a rank inside it. Pure functions (the argv is pinned by golden files).

The hybrid model MPI users know: mpirun (or srun) runs outside, on the host; each rank's
worker shim and the user's program run inside the image, started by the runtime in
front of the worker's argv. The runtime must exec the worker (ch-run, apptainer and
singularity do; podman runs it under conmon), so supervision, exit records, logs and
signals are those of a run without a container.

Runtimes and the images they take:

    charliecloud  ch-run        an image directory, or a SquashFS file (.sqfs)
    apptainer     apptainer     a .sif file (or a sandbox directory)
    singularity   singularity   likewise
    podman        podman        an image name in podman's store (localhost/train:1)
"""
from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..errors import SpecError

RUNTIMES = {"charliecloud": "ch-run", "apptainer": "apptainer", "singularity": "singularity", "podman": "podman"}
_FILE_IMAGE = re.compile(r"\.(sif|simg|sqfs|squashfs|squash)$")


@dataclass(frozen=True)
class ContainerSpec:
    """What the user asked for: the image, the runtime (None: by the image), binds beyond
    the run's own paths (``SRC`` or ``SRC:DST``), and the Python inside (None: the
    launcher's, at the same path, as on every node)."""

    image: str
    runtime: str | None = None
    binds: tuple[str, ...] = ()
    python: str | None = None

    def __post_init__(self) -> None:
        if not self.image or self.image != self.image.strip() or self.image.startswith("-"):
            raise SpecError(f"--container {self.image!r}: name an image (a directory, a .sif/.sqfs file, or a "
                            "podman image name)")
        if self.runtime is not None and self.runtime not in RUNTIMES:
            raise SpecError(f"--container-runtime {self.runtime!r}: choose one of {', '.join(RUNTIMES)}")
        for item in self.binds:
            parse_bind(item)
        if self.python is not None and not self.python.startswith("/"):
            raise SpecError(f"--container-python {self.python!r} must be an absolute path inside the image")

    @property
    def is_path(self) -> bool:
        """Whether the image is a file or directory (else a name in podman's store)."""
        return self.image.startswith(("/", "./", "../", "~")) or os.path.exists(self.image) or bool(
            _FILE_IMAGE.search(self.image))


def image_arg(image: str) -> str:
    """--container as given: a path that exists made absolute (the same on every node,
    whatever the working directory), else as it is (a podman image name)."""
    path = os.path.expanduser(image)
    return os.path.abspath(path) if os.path.exists(path) else image


def parse_bind(item: str) -> tuple[str, str]:
    """``SRC`` or ``SRC:DST`` (both absolute) → ``(SRC, DST)``."""
    src, _colon, dst = item.partition(":")
    dst = dst or src
    if not src.startswith("/") or not dst.startswith("/") or "," in item:
        raise SpecError(f"--container-bind {item!r}: write SRC or SRC:DST, absolute paths without commas")
    return posixpath.normpath(src), posixpath.normpath(dst)


def choose_runtime(spec: ContainerSpec, which: Callable[[str], str | None]) -> tuple[str, str]:
    """The runtime for the image and its executable's path here: the one asked for, else
    charliecloud for a directory or .sqfs, apptainer (or singularity) for a .sif, podman
    for an image name. SpecError, in one line, when it is not installed."""
    name = spec.runtime
    if name is None:
        image = spec.image
        if not spec.is_path:
            name = "podman"
        elif re.search(r"\.(sif|simg)$", image):
            name = "apptainer" if which("apptainer") or not which("singularity") else "singularity"
        else:
            name = "charliecloud"
    exe = which(RUNTIMES[name])
    if exe is None:
        package = {"charliecloud": "charliecloud (apt-get install charliecloud)", "podman": "podman"}.get(name, name)
        raise SpecError(f"container runtime {name}: {RUNTIMES[name]} is not on PATH: install {package}, or choose "
                        "another with --container-runtime")
    return name, exe


def bind_roots(paths: Iterable[str]) -> list[str]:
    """The fewest folders that cover ``paths`` (a path inside another is left out), in the
    order the paths were given."""
    given = [posixpath.normpath(p) for p in paths if p]
    roots: list[str] = []
    for path in sorted(set(given)):  # a folder sorts before what is inside it
        if not any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots):
            roots.append(path)
    order = {root: min(i for i, path in enumerate(given) if path == root or path.startswith(root.rstrip("/") + "/"))
             for root in roots}
    return sorted(roots, key=order.__getitem__)


def container_argv(runtime: str, exe: str, image: str, binds: Sequence[tuple[str, str]], cwd: str | None,
                   gpus: bool, is_root: bool = False, per_node: int | None = None) -> list[str]:
    """The argv in front of the rank's worker: ``exe ... IMAGE [--]``. Every runtime gets
    the binds at their paths, the working directory, and the environment mpirun gave the
    rank (the env policy applies inside as outside); GPUs where mapped. ``per_node``: the
    ranks on each node, when every node has as many."""
    if runtime == "charliecloud":
        # the ranks of a node share one container (namespaces), so MPI's shared memory and
        # single-copy transfers work between them: --join, with the count given (ch-run
        # would guess it from the MPI or Slurm environment, and not for every MPI)
        argv = [exe, "--join", f"--join-ct={per_node}"] if per_node else [exe]
        for src, dst in binds:
            argv += ["-b", f"{src}:{dst}"]
        if cwd:
            argv += ["--cd", cwd]
        return [*argv, image, "--"]  # GPUs: the image's own driver libraries (ch-fromhost --nvidia)
    if runtime in ("apptainer", "singularity"):
        argv = [exe, "exec"]
        if binds:
            argv += ["--bind", ",".join(f"{src}:{dst}" for src, dst in binds)]
        if cwd:
            argv += ["--pwd", cwd]
        if gpus:
            argv.append("--nv")
        return [*argv, image]
    if runtime == "podman":
        # the rank shares the host's network, IPC and PIDs (MPI's wire-up, shared memory,
        # and the launcher's leftover scan), keeps its user id (rootless), and sees /tmp
        # (PMIx sockets)
        argv = [exe, "run", "--rm", "--network=host", "--ipc=host", "--pid=host",
                *([] if is_root else ["--userns=keep-id"]), "--security-opt", "label=disable", "--env-host",
                "-v", "/tmp:/tmp"]
        for src, dst in binds:
            argv += ["-v", f"{src}:{dst}"]
        if cwd:
            argv += ["-w", cwd]
        if gpus:
            argv += ["--device", "nvidia.com/gpu=all"]
        return [*argv, image]
    raise SpecError(f"container runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")


@dataclass(frozen=True)
class Container:
    """A container resolved for a launch: the runtime and its executable, the image, the
    user's extra binds and the Python inside."""

    runtime: str
    exe: str
    image: str
    binds: tuple[str, ...] = ()
    python: str | None = None


def rank_prefix(container: Container, paths: Iterable[str], cwd: str | None, gpus: bool,
                is_root: bool = False, per_node: int | None = None) -> list[str]:
    """The runtime's argv in front of a rank's worker: ``paths`` (the rank's working copy,
    run folder, inputs) bound at their own places, then the user's ``--container-bind``s."""
    roots = bind_roots(paths)
    if "/" in roots:
        raise SpecError("--container would bind the whole host over the image (a run in place from /): run from "
                        "a project folder, or without --in-place")
    binds = [(path, path) for path in roots] + [parse_bind(item) for item in container.binds]
    return container_argv(container.runtime, container.exe, container.image, binds, cwd, gpus, is_root, per_node)
