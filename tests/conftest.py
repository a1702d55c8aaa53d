"""Shared fixtures: run the real ``distlaunch`` command in a scratch folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from skips import pytest_sessionfinish  # noqa: F401 - the skip accounting hook

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"


@pytest.fixture(scope="session", autouse=True)
def own_node_health(tmp_path_factory: pytest.TempPathFactory):
    """Nodes the tests find at fault go to a file of the test session, never the user's."""
    if "DISTLAUNCH_STATE_DIR" in os.environ:
        yield
        return
    os.environ["DISTLAUNCH_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    yield
    os.environ.pop("DISTLAUNCH_STATE_DIR", None)


class Launched:
    """The result of one ``distlaunch`` invocation."""

    def __init__(self, proc: subprocess.CompletedProcess[str], cwd: Path) -> None:
        self.proc, self.cwd = proc, cwd
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr

    def run_dirs(self) -> list[Path]:
        runs = self.cwd / "runs"
        return sorted(runs.iterdir()) if runs.is_dir() else []

    def record(self) -> dict[str, Any]:
        dirs = self.run_dirs()
        assert len(dirs) == 1, f"expected one run folder, found {dirs}"
        return json.loads((dirs[0] / "run.json").read_text())


@pytest.fixture
def distlaunch(tmp_path: Path):
    """Call ``distlaunch ARGS...`` as a real process in tmp_path; returns a Launched."""

    def call(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Launched:
        full_env = {**os.environ, "OUT_DIR": str(tmp_path), **(env or {})}
        proc = subprocess.run(
            [sys.executable, "-m", "distlaunch", *args],
            cwd=tmp_path, env=full_env, capture_output=True, text=True, errors="replace", timeout=timeout,
        )
        return Launched(proc, tmp_path)

    return call


@pytest.fixture
def rank_script() -> str:
    return str(SCRIPTS / "rank_file.py")


def working_in(folder: Path) -> list[Any]:
    """Live processes whose working directory or command line is inside ``folder``: what a
    test started there (distlaunch, mpirun, ranks, ssh, rsync) and everything they started."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cwd", "cmdline", "status"]):
        if proc.pid == os.getpid() or proc.info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        cwd, cmdline = proc.info.get("cwd") or "", " ".join(proc.info.get("cmdline") or [])
        if cwd == str(folder) or cwd.startswith(f"{folder}/") or f"{folder}/" in cmdline:
            found.append(proc)
    return found


@pytest.fixture(autouse=True)
def no_leftovers(request: pytest.FixtureRequest):
    """After every test that used tmp_path: nothing it started may still run. A test that
    failed half-way gets its job stopped here (SIGTERM to distlaunch, so that it stops the
    job itself, then SIGKILL for what is left); a test that passed and left a process
    behind is an error (no orphans, ever)."""
    import signal

    import psutil

    yield
    folder = request.node.funcargs.get("tmp_path")
    if folder is None:
        return
    left = working_in(folder)
    if not left:
        return
    for proc in left:
        try:
            if "distlaunch" in " ".join(proc.cmdline()) and "-m" in proc.cmdline():
                proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=15)
    still = working_in(folder)
    for proc in still:
        try:
            proc.kill()
        except psutil.Error:
            pass
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.passed:
        pytest.fail(f"the test left {len(left)} process(es) running: "
                    + "; ".join(" ".join(p.info.get("cmdline") or [])[:120] for p in left[:3]))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Keep each phase's report on the item, so fixtures can tell a passed test from a failed one."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def oversubscribe(ranks: int) -> list[str]:
    """``--oversubscribe`` when ``ranks`` is more than this machine's usable cores (2 in CI)."""
    return ["--oversubscribe"] if ranks > len(os.sched_getaffinity(0)) else []


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/mpi runs only inside MPI jobs (``--with-mpi``), which tests/test_hvd.py starts."""
    if collection_path.name == "mpi" and not config.getoption("--with-mpi", default=False):
        return True
    return None


def horovod_available() -> bool:
    """Real Horovod importable (checked in a child so this process stays torch-free)."""
    code = "import horovod.torch as h; assert h.mpi_built() or h.gloo_built()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def backends() -> list:
    """The hvd backends to test, as pytest params: torch always; horovod too, skipped when
    it is not installed, and required when DISTLAUNCH_REQUIRE_HOROVOD=1 (CI builds it)."""
    if horovod_available():
        return ["torch", "horovod"]
    if os.environ.get("DISTLAUNCH_REQUIRE_HOROVOD") == "1":
        raise RuntimeError("DISTLAUNCH_REQUIRE_HOROVOD=1 but horovod.torch does not import: "
                           "run 'distlaunch install-horovod'")
    return ["torch", pytest.param("horovod", marks=pytest.mark.skip(
        reason="Horovod is not installed (distlaunch install-horovod)"))]


def installed_backends() -> list[str]:
    return ["torch", "horovod"] if horovod_available() else ["torch"]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (root only): a run folder on a disk that fills up."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs mounts")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
