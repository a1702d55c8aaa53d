"""Containers, on the launcher's side: find the runtime, check the image before anything
starts, and name exactly which image ran (its digest or content hash) for run.json.
The argv itself is planned in ``plan.container``; other nodes are checked by their probe
(``nodes.agent``)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ..errors import SpecError
from ..nodes.imagecheck import image_problem, python_in_image
from ..plan.container import Container, ContainerSpec, choose_runtime, parse_bind


def resolve(spec: ContainerSpec, python: str) -> Container:
    """The container of a launch: the runtime found here, the image checked here; a
    one-line SpecError saying what to fix otherwise."""
    runtime, exe = choose_runtime(spec, shutil.which)
    problem = image_problem(runtime, exe, spec.image)
    if problem:
        raise SpecError(problem)
    inside = spec.python or python
    if not python_in_image(spec.image, inside):
        raise SpecError(f"image {spec.image} has no {inside}: install Python with distlaunch there (the same path "
                        "as here), or give --container-python PATH")
    for item in spec.binds:
        src, _dst = parse_bind(item)
        if not os.path.exists(src):
            raise SpecError(f"--container-bind {item!r}: {src} does not exist here: check the path")
    return Container(runtime, exe, spec.image, spec.binds, spec.python)


def identity(container: Container) -> str:
    """Which image exactly: podman's image id, a file's sha256, or for an image directory a
    hash of every entry's path, type, size and modification time (cheap, and it changes
    whenever the tree does)."""
    image = container.image
    if container.runtime == "podman":
        proc = subprocess.run([container.exe, "image", "inspect", "--format", "{{.Id}}", image],
                              capture_output=True, text=True)
        return f"podman:{proc.stdout.strip()}" if proc.returncode == 0 else "podman:unknown"
    path = Path(image)
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"
    return f"tree:{tree_signature(path)}"


def tree_signature(path: Path) -> str:
    """sha256 over every entry's relative path, type, mode, size and mtime, in sorted
    order (GNU find lists a large image in a fraction of a Python walk's time)."""
    fmt = "%P\\0%y%m\\0%s\\0%T@\\n"
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []  # it runs while the ranks start: it yields to them
    proc = subprocess.run([*nice, "find", str(path), "-printf", fmt], capture_output=True)
    if proc.returncode == 0:
        lines = sorted(proc.stdout.split(b"\n"))
    else:
        lines = []
        for folder, dirs, files in os.walk(path):
            for name in files + dirs:
                entry = os.path.join(folder, name)
                try:
                    info = os.lstat(entry)
                except OSError:
                    continue
                lines.append(f"{os.path.relpath(entry, path)}\0{info.st_mode:o}\0{info.st_size}\0{info.st_mtime}"
                             .encode(errors="surrogateescape"))
        lines.sort()
    return hashlib.sha256(b"\n".join(lines)).hexdigest()


def record(container: Container) -> dict[str, Any]:
    """What run.json keeps of the container (its identity comes later: ``identity``)."""
    return {"runtime": container.runtime, "exe": container.exe, "image": container.image,
            "identity": None, "binds": list(container.binds), "python": container.python}
