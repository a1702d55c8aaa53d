"""Slurm as the engine, against a real slurmctld with two slurmd (tests/slurmbox): runs
inside allocations and steps with no ssh at all, the srun launcher, stale allocations,
and batch jobs from ``distlaunch submit`` followed to their end."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, SCRIPTS
from test_failures import survivors

from tests.slurmbox.box import INSTALL_HINT, SlurmBox, missing

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def box():
    """The box: started here (root), or the one DISTLAUNCH_TEST_SLURM names (started by
    root for an unprivileged user's run, see .ci/run)."""
    given = os.environ.get("DISTLAUNCH_TEST_SLURM")
    if given:
        yield SlurmBox(Path(given))
        return
    lack = missing()
    if lack == ["root"]:
        pytest.skip("needs root to start slurmctld and slurmd")
    if lack:
        pytest.fail(f"Slurm is missing ({', '.join(lack)}): {INSTALL_HINT}")
    root = Path(tempfile.mkdtemp(prefix="slurmbox-"))  # not tmp_path: munged needs o+x on every parent
    with SlurmBox(root) as running:
        yield running


@pytest.fixture
def workdir():
    """A folder every node and every Slurm user can reach (the batch job runs there)."""
    folder = Path(tempfile.mkdtemp(prefix="slurmjob-"))
    folder.chmod(0o755)
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def no_ssh(folder: Path) -> dict[str, str]:
    """PATH with an ``ssh`` that records being called and fails: proof that nothing used it."""
    bin_dir = folder / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "ssh"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {folder}/ssh-was-called\nexit 255\n")
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def slurm(box: SlurmBox, argv: list[str], cwd: Path, env: dict[str, str] | None = None,
          timeout: float = 240) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(argv, cwd=cwd, env={**clean, **box.env, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def distlaunch(*args: str) -> list[str]:
    return [sys.executable, "-m", "distlaunch", *args]


RANK_VARS = ("import json, os\nkeys = ['RANK', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_LOCALID', 'SLURM_NTASKS', "
             "'SLURM_NODEID']\nimport socket\nprint('VARS', json.dumps([socket.gethostname()] + "
             "[os.environ.get(k) for k in keys]), flush=True)\n")


def rank_vars(stdout: str) -> list[list[str | None]]:
    return [json.loads(line.split("VARS ", 1)[1]) for line in stdout.splitlines() if "VARS " in line]


def test_two_node_allocation_needs_no_ssh(box, workdir):
    (workdir / "vars.py").write_text(RANK_VARS)
    proc = slurm(box, ["salloc", "-N2", "-n4", *distlaunch("run", "--ppn", "2", "--mpi-arg", "--bind-to none",
                                                              str(workdir / "vars.py"))], workdir, env=no_ssh(workdir))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not (workdir / "ssh-was-called").exists(), (workdir / "ssh-was-called").read_text()
    record = json.loads(next((workdir / "runs").glob("*/run.json")).read_text())
    assert record["host_source"] == "slurm allocation" and record["launcher"]["transport"] == "srun"
    assert {r["host"] for r in record["rank_exits"].values()} == set(box.nodes)
    seen = rank_vars(proc.stdout)
    assert len(seen) == 4
    for _host, rank, local, procid, localid, ntasks, nodeid in seen:  # mpirun's ranks tell no lies about Slurm
        assert procid == rank and localid == local and ntasks == "4" and nodeid is None
    assert sorted(row[1] for row in seen) == ["0", "1", "2", "3"]


def test_a_step_places_from_the_step(box, workdir):
    """``srun -N1 -n1 distlaunch run`` inside ``salloc -N2 -n4``: the step's one node."""
    (workdir / "vars.py").write_text(RANK_VARS)
    proc = slurm(box, ["salloc", "-N2", "-n4", "srun", "-N1", "-n1",
                       *distlaunch("run", str(workdir / "vars.py"))], workdir, env=no_ssh(workdir))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads(next((workdir / "runs").glob("*/run.json")).read_text())
    assert record["host_source"] == "slurm step" and record["nodes"] == 1 and record["ranks"] == 1
    assert rank_vars(proc.stdout)[0][1:4] == ["0", "0", "0"]


def test_stale_allocation_is_a_clear_error(box, workdir):
    env = {**box.env, "SLURM_JOB_ID": "99999", "SLURM_JOB_NODELIST": "ghost[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)"}
    proc = subprocess.run(distlaunch("run", str(SCRIPTS / "rank_file.py")), cwd=workdir, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "SLURM_JOB_ID=99999" in lines[0] and "left over" in lines[0], lines
    assert not (workdir / "runs").exists()


def test_srun_launcher_trains_on_two_nodes(box, workdir):
    proc = slurm(box, ["salloc", "-N2", "-n4", *distlaunch("run", "--launcher", "srun", "--ppn", "2",
                                                              str(REPO / "examples" / "train.py"), "--epochs", "1")],
                 workdir, env=no_ssh(workdir))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "training on 4 rank(s)" in proc.stdout
    record = json.loads(next((workdir / "runs").glob("*/run.json")).read_text())
    assert os.path.basename(record["argv"][0]) == "srun" and "--mpi=pmix" in record["argv"]
    assert {r["host"] for r in record["rank_exits"].values()} == set(box.nodes)
    assert next((workdir / "runs").glob("*/outputs/model.pt"))
    assert not (workdir / "ssh-was-called").exists()


def test_srun_launcher_failing_rank_gives_its_code(box, workdir):
    """One failing task ends the step; the exit code is that rank's. (srun applies the env
    policy to every rank, so the knobs travel with --env.)"""
    knobs = [f"--env={name}={value}" for name, value in
             (("OUT_DIR", workdir), ("FAIL_RANK", 3), ("FAIL_CODE", 6), ("SLEEP", 30))]
    proc = slurm(box, ["salloc", "-N2", "-n4", *distlaunch("run", "--launcher", "srun", "--ppn", "2", *knobs,
                                                              str(SCRIPTS / "rank_file.py"))], workdir)
    assert proc.returncode == 6, proc.stderr[-3000:]
    record = json.loads(next((workdir / "runs").glob("*/run.json")).read_text())
    assert record["first_failure"]["rank"] == 3 and record["duration_s"] < 25
    assert survivors(record["id"]) == []


def wait_status(box: SlurmBox, workdir: Path, run_id: str, want: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        shown = slurm(box, distlaunch("runs", "show", run_id), workdir).stdout
        status = next((line.split()[1] for line in shown.splitlines() if line.startswith("status ")), "?")
        if status in want or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def test_submit_returns_at_once_and_the_run_completes(box, workdir):
    start = time.monotonic()
    proc = slurm(box, distlaunch("submit", "--nodes", "2", "--ppn", "2", "--time", "10", "--mpi-arg",
                                 "--bind-to none", str(REPO / "examples" / "train.py"), "--epochs", "1"), workdir)
    returned = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip()
    assert returned < 10 and "queued as Slurm job" in proc.stderr
    listing = slurm(box, distlaunch("runs", "list"), workdir).stdout
    assert run_id in listing and ("queued" in listing or "running" in listing)
    follow = slurm(box, distlaunch("logs", run_id, "--follow"), workdir, timeout=300)
    assert "epoch 1: loss" in follow.stdout
    assert wait_status(box, workdir, run_id, {"completed"}, 60) == "completed"
    run_dir = workdir / "runs" / run_id
    record = json.loads((run_dir / "run.json").read_text())
    assert record["scheduler"]["job_id"] and record["host_source"] == "slurm allocation"
    assert (run_dir / "outputs" / "model.pt").is_file() and (run_dir / "submit.py").is_file()
    assert {r["host"] for r in record["rank_exits"].values()} == set(box.nodes)


def test_cancel_a_queued_and_a_running_batch_run(box, workdir):
    """Queued (the cluster is busy): cancel takes it out of the queue. Running: it stops as
    on Ctrl-C and nothing of it is left."""
    blocker_id = ""
    (workdir / "long.py").write_text("import time\nprint('started', flush=True)\ntime.sleep(300)\n")
    # the sleep runs as a step (under slurmstepd), so scancel ends it and salloc with it
    blocker = subprocess.Popen(["salloc", "-N2", "-n4", f"--job-name=blocker-{workdir.name}", "srun", "sleep", "300"],
                               cwd=workdir, env={**os.environ, **box.env}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (blocker_id := slurm(box, ["squeue", "-h", "-o", "%i", "-n", f"blocker-{workdir.name}"],
                                       workdir).stdout.strip()):
            assert time.monotonic() < deadline, "the blocking allocation did not start"
            time.sleep(0.2)
        queued = slurm(box, distlaunch("submit", "--nodes", "2", "--ppn", "2", str(workdir / "long.py")), workdir)
        assert queued.returncode == 0, queued.stderr
        run_id = queued.stdout.strip()
        assert wait_status(box, workdir, run_id, {"queued"}, 10) == "queued"
        cancelled = slurm(box, distlaunch("cancel", run_id), workdir, timeout=120)
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout, cancelled.stdout + cancelled.stderr
        job = json.loads((workdir / "runs" / run_id / "run.json").read_text())["scheduler"]["job_id"]
        assert slurm(box, ["squeue", "-h", "-j", job], workdir).stdout.strip() == ""
    finally:
        if blocker_id:
            slurm(box, ["scancel", blocker_id], workdir)
        try:
            blocker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(blocker.pid, signal.SIGKILL)  # the group we started, nothing else
            blocker.wait()
    running = slurm(box, distlaunch("submit", "--nodes", "1", "--ppn", "2", str(workdir / "long.py")), workdir)
    run_id = running.stdout.strip()
    assert wait_status(box, workdir, run_id, {"running"}, 60) == "running"
    output = workdir / "runs" / run_id / "logs" / "output.log"
    deadline = time.monotonic() + 60
    while "started" not in (output.read_text() if output.exists() else ""):
        if time.monotonic() > deadline:
            folder = workdir / "runs" / run_id
            said = {name: (folder / name).read_text(errors="replace")[-2000:] for name in
                    ("run.json", "logs/sbatch.log", "logs/mpirun.log", "logs/output.log") if (folder / name).exists()}
            raise AssertionError(f"the batch run did not start: {said}")
        time.sleep(0.2)
    cancelled = slurm(box, distlaunch("cancel", run_id), workdir, timeout=120)
    assert "cancelled" in cancelled.stdout, cancelled.stdout + cancelled.stderr
    assert survivors(run_id) == []


def test_python_api_submits_to_slurm(box, workdir, monkeypatch):
    """Job(..., compute_target=Slurm(...)).submit() returns a queued Run at once, and
    Run.wait() follows it to its end."""
    from distlaunch import Job, Slurm

    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in box.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(workdir)
    (workdir / "hello.py").write_text("import os\nprint('hello from', os.environ['RANK'], flush=True)\n")
    run = Job(entry_script="hello.py", source_dir=str(workdir), nodes=2, ppn=1,
              compute_target=Slurm(time="5")).submit()
    assert run.status in ("queued", "running")
    assert run.wait(timeout=180) == "completed"
    assert run.record.scheduler["job_id"] and "hello from 1" in run.logs(rank=1)


def test_hvd_joins_plain_srun_steps(box, workdir):
    """distlaunch.hvd started by srun itself, with no PMI (the box's MpiDefault=none: the
    step's own store) and with --mpi=pmix (MPI): the same 3-rank world on two nodes, 2 + 1
    tasks (uneven, so the topology is gathered, never assumed), and the example's losses
    are those of the same 3 ranks under distlaunch."""
    from test_launchers import losses, worlds

    (workdir / "world.py").write_text((SCRIPTS / "world.py").read_text())
    env = {"DISTLAUNCH_HVD_BACKEND": "torch", "OMP_NUM_THREADS": "1", **no_ssh(workdir)}
    seen = {}
    for mpi in ("none", "pmix"):
        proc = slurm(box, ["srun", "-N2", "-n3", f"--mpi={mpi}", sys.executable, str(workdir / "world.py")], workdir,
                     env=env)
        assert proc.returncode == 0, f"--mpi={mpi}: " + proc.stdout[-2000:] + proc.stderr[-3000:]
        found = worlds(proc.stdout)
        assert {w["launcher"] for w in found} == {"slurm"}
        seen[mpi] = [(w["rank"], w["size"], w["local_rank"], w["local_size"], w["cross_rank"], w["cross_size"],
                      w["sum"]) for w in found]
    expected = [(0, 3, 0, 2, 0, 2, 6.0), (1, 3, 1, 2, 0, 1, 6.0), (2, 3, 0, 1, 1, 2, 6.0)]
    assert seen["none"] == seen["pmix"] == expected
    train = [str(REPO / "examples" / "train.py"), "--epochs", "2"]
    by_srun = slurm(box, ["srun", "-N2", "-n3", sys.executable, *train], workdir, env=env)
    assert by_srun.returncode == 0, by_srun.stderr[-3000:]
    assert by_srun.stdout.count("training on 3 rank(s)") == 1
    here = subprocess.run(distlaunch("run", "--ppn", "3", "--oversubscribe", *train), cwd=workdir, text=True,
                          capture_output=True, env={**os.environ, **env}, timeout=240)
    assert here.returncode == 0, here.stderr[-3000:]
    assert len(losses(by_srun.stdout)) == 3 and losses(by_srun.stdout) == losses(here.stdout)


def test_a_batch_run_runs_the_code_as_submitted(box, workdir):
    """The snapshot is taken at submit time: editing the code while the job waits in the
    queue (or runs) changes nothing for it."""
    project = workdir / "proj"
    project.mkdir()
    (project / "show.py").write_text("print('VERSION', open('version.txt').read().strip(), flush=True)\n")
    (project / "version.txt").write_text("as submitted\n")
    proc = slurm(box, distlaunch("submit", "--nodes", "1", "--ppn", "1", str(project / "show.py")), workdir)
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip()
    (project / "version.txt").write_text("edited later\n")
    (project / "show.py").write_text("print('VERSION edited', flush=True)\n")
    assert wait_status(box, workdir, run_id, {"completed", "failed"}, 120) == "completed"
    output = (workdir / "runs" / run_id / "logs" / "output.log").read_text()
    assert "VERSION as submitted" in output and "edited" not in output


def test_a_source_dir_over_the_limit_is_not_submitted(box, workdir):
    """Refused at submit time, before sbatch: the run folder says why, no job is queued."""
    project = workdir / "big"
    project.mkdir()
    (project / "show.py").write_text("print('ran')\n")
    (project / "data.txt").write_text("x\n")
    proc = slurm(box, distlaunch("submit", "--max-source-files", "1", str(project / "show.py")), workdir)
    assert proc.returncode == 2 and "holds more than 1 files to copy" in proc.stderr, proc.stderr
    (folder,) = (workdir / "runs").iterdir()
    record = json.loads((folder / "run.json").read_text())
    assert record["status"] == "failed" and record["scheduler"]["job_id"] is None
    assert "--max-source-files" in record["error"] and not (folder / "code").exists()


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_sweep_trials_are_steps_of_the_allocation(box, workdir, launcher):
    """A sweep inside ``salloc -N2``: each trial on its own node, two at a time, as an srun
    step (or an mpirun whose daemon is one), no ssh; the grid's optimum found."""
    shutil.copy(SCRIPTS / "sweep_target.py", workdir)
    argv = ["salloc", "-N2", "-n2", *distlaunch(
        "sweep", "run", "--name", "steps", "--sampler", "grid", "--param", "x=choice(0.1, 0.3, 0.5, 0.7)",
        "--metric", "loss", "--max-concurrent", "2", "--launcher", launcher, "--ppn", "1", "--env", "OUT_DIR",
        str(workdir / "sweep_target.py"), "--steps", "4", "--step-time", "0.3")]
    proc = slurm(box, argv, workdir, env={**no_ssh(workdir), "OUT_DIR": str(workdir)}, timeout=400)
    logs = "".join(p.read_text()[-1500:] for p in (workdir / "runs").glob("*/logs/*.log"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:] + logs
    assert not (workdir / "ssh-was-called").exists()
    shown = subprocess.run(distlaunch("sweep", "show", "steps", "--json"), cwd=workdir, capture_output=True,
                           text=True, check=True)
    found = json.loads(shown.stdout)
    assert [row["state"] for row in found] == ["completed"] * 4 and found[0]["x"] == "0.3"
    nodes_used = set()
    for row in found:
        record = json.loads((workdir / "runs" / row["run"] / "run.json").read_text())
        assert os.path.basename(record["argv"][0]) == launcher and record["launcher"]["transport"] == "srun"
        (host,) = {r["host"] for r in record["rank_exits"].values()}
        nodes_used.add(host)
    assert nodes_used == set(box.nodes)  # packed: the two trials at a time ran on the two nodes
