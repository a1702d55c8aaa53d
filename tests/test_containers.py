"""--container: the ranks run inside a real Charliecloud image built from this machine's
files (tests/containerimage.py), mpirun outside; failures, records and cleanup as usual."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SCRIPTS
from containerimage import build
from test_failures import survivors

pytestmark = pytest.mark.slow
# a file of this machine's that the image leaves out (and that no bind brings in: not under /tmp)
HOST_ONLY = next(path for path in ("/etc/os-release", "/etc/debian_version", "/usr/share", "/var/lib")
                 if os.path.exists(path))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    if shutil.which("ch-run") is None:
        pytest.fail("Charliecloud is missing: apt-get install -y charliecloud")
    return build(tmp_path_factory.mktemp("images") / "train")


def run(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 240):
    proc = subprocess.run([sys.executable, "-m", "distlaunch", "run", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "USER": os.environ.get("USER", "tester"),
                                                           **(env or {})})
    runs = sorted((cwd / "runs").glob("*/run.json")) if (cwd / "runs").is_dir() else []
    return proc, (json.loads(runs[-1].read_text()) if runs else {})


def where(stdout: str) -> list[dict]:
    return sorted((json.loads(line.split("WHERE ", 1)[1]) for line in stdout.splitlines() if "WHERE " in line),
                  key=lambda item: item["rank"])


def in_image(path: Path) -> list[int]:
    """Processes still inside the image: ch-run's mounts live in their namespaces, so none
    of these means no mount is left either."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            root = os.readlink(f"/proc/{proc.pid}/root")
        except OSError:
            root = ""
        if root.startswith(str(path)) or str(path) in (proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


def test_ranks_run_inside_the_image_and_train(image, tmp_path):
    proc, record = run(tmp_path, "--ppn", "2", "--container", str(image), str(SCRIPTS / "where_am_i.py"),
                       HOST_ONLY)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    seen = where(proc.stdout)
    assert [item["rank"] for item in seen] == [0, 1] and {item["sum"] for item in seen} == {3}  # MPI inside
    assert all(item["marker"] and not item["host_file"] for item in seen)  # the image's files, not the host's
    assert {item["cwd"] for item in seen} == {f"{tmp_path}/runs/{record['id']}/code"}
    container = record["container"]
    assert container["runtime"] == "charliecloud" and container["image"] == str(image)
    assert container["identity"].startswith("tree:") and len(container["identity"]) == 5 + 64
    argv = record["argv"]
    runtime = next(arg for arg in argv if os.path.basename(arg) == "ch-run")
    assert argv[argv.index(runtime):argv.index(str(image))][:3] == [runtime, "--join", "--join-ct=2"]
    # training with torch inside, its outputs in the run folder as without a container
    proc, record = run(tmp_path, "--ppn", "2", "--container", str(image), str(REPO / "examples" / "train.py"),
                       "--epochs", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "training on 2 rank(s)" in proc.stdout
    assert (tmp_path / "runs" / record["id"] / "outputs" / "model.pt").is_file()
    assert not survivors(record["id"]) and not in_image(image)


def test_a_rank_failing_inside_is_named_and_nothing_is_left(image, tmp_path):
    knobs = [f"--env={name}={value}" for name, value in (("OUT_DIR", tmp_path), ("FAIL_RANK", 1), ("FAIL_CODE", 6),
                                                            ("SLEEP", 30))]
    proc, record = run(tmp_path, "--ppn", "2", "--container", str(image), *knobs, str(SCRIPTS / "rank_file.py"))
    assert proc.returncode == 6, proc.stderr[-3000:]
    assert record["first_failure"]["rank"] == 1 and record["first_failure"]["exit_code"] == 6
    assert "rank 1 on" in proc.stderr and "exited with code 6" in proc.stderr
    assert record["duration_s"] < 25  # rank 0, asleep inside, was stopped with the job
    assert not survivors(record["id"]) and not in_image(image)


def test_the_python_api_takes_a_container(image, tmp_path, monkeypatch):
    from distlaunch import Job

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("USER", os.environ.get("USER", "tester"))
    job = Job("where_am_i.py", str(SCRIPTS), [HOST_ONLY], ppn=2, container=str(image))
    the_run = job.submit()
    assert the_run.wait(timeout=180) == "completed"
    seen = where(the_run.logs(rank=0) + the_run.logs(rank=1))
    assert len(seen) == 2 and all(item["marker"] for item in seen)
    assert the_run.record.container["runtime"] == "charliecloud"
    shown = subprocess.run([sys.executable, "-m", "distlaunch", "runs", "show", the_run.id], capture_output=True,
                           text=True, check=True).stdout
    assert f"container {image} (charliecloud, tree:" in shown


@pytest.mark.parametrize("args, message", [
    (["--container", "/no/such/image"], "image /no/such/image does not exist: check the path"),
    (["--container-bind", "/tmp"], "--container-bind without --container IMAGE"),
    (["--container", "IMAGE", "--container-python", "/opt/none/python"], "has no /opt/none/python: install Python"),
    (["--container", "IMAGE", "--container-bind", "/no/such/dir"], "/no/such/dir does not exist here"),
    (["--container", "IMAGE", "--container-runtime", "charliecloud"], "ch-run is not on PATH: install charliecloud"),
])
def test_bad_container_input_is_one_line(image, tmp_path, args, message):
    args = [str(image) if arg == "IMAGE" else arg for arg in args]
    env = {"PATH": str(Path(sys.executable).parent)} if "charliecloud" in args else None  # no ch-run there
    proc, _record = run(tmp_path, "--ppn", "2", *args, str(SCRIPTS / "rank_file.py"), env=env)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("distlaunch: error: ") and message in line, line
    assert not (tmp_path / "runs").exists()
