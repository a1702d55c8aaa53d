"""Allreduce backends under real mpirun, and the bench CLI end to end (tiny sweep)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import pytest
from conftest import REPO, horovod_available, oversubscribe, working_in

pytestmark = pytest.mark.slow

ROW = {
    "type": "object",
    "required": ["backend", "size", "count", "type", "redop", "iters", "time_us", "min_us", "max_us", "algbw_GBps",
                 "busbw_GBps", "wrong"],
    "properties": {
        "backend": {"enum": ["mpi4py", "shm", "torch", "horovod"]},
        "size": {"type": "integer", "minimum": 1}, "count": {"type": "integer", "minimum": 1},
        "iters": {"type": "integer", "minimum": 1}, "time_us": {"type": "number", "exclusiveMinimum": 0},
        "busbw_GBps": {"type": "number", "minimum": 0},
        "wrong": {"const": 0},
    },
}
SCHEMA = {
    "type": "object",
    "required": ["ranks", "hosts", "dtype", "op", "memcpy_one_core_GBps", "memcpy_per_core_all_ranks_GBps", "rows"],
    "properties": {"ranks": {"type": "integer", "minimum": 2}, "rows": {"type": "array", "minItems": 1, "items": ROW},
                   "memcpy_one_core_GBps": {"type": "number", "exclusiveMinimum": 0}},
}


@pytest.mark.parametrize("ranks", [2, 4])
def test_backends_are_correct_under_mpirun(tmp_path, ranks):
    proc = subprocess.run([sys.executable, "-m", "distlaunch", "run", "--ppn", str(ranks), *oversubscribe(ranks),
                           "--run-dir",
                           str(tmp_path / "runs"), sys.executable, "-m", "pytest", "--with-mpi", "-q", "-p",
                           "no:cacheprovider", str(REPO / "tests" / "mpi" / "test_allreduce_backends.py")],
                          cwd=REPO, capture_output=True, text=True, errors="replace", timeout=900,
                          env={**__import__("os").environ, "OMPI_MCA_osc": "^ucx"})
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert re.search(r"^\[0\] \d+ passed", proc.stdout, re.M)


def test_bench_cli_tiny_sweep(tmp_path):
    out = tmp_path / "ar.json"
    proc = subprocess.run([sys.executable, "-m", "distlaunch", "bench", "allreduce", "--ppn", "2", "--sizes",
                           "8B:64KiB", "--factor", "8", "--iters", "3", "--warmup", "1", "--mpi-arg", "--bind-to none",
                           "--json", str(out), "--csv",
                           str(tmp_path / "ar.csv"), "--plot", str(tmp_path / "ar.png")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMPI_MCA_osc": "^ucx"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    jsonschema.validate(result, SCHEMA)
    assert {r["backend"] for r in result["rows"]} >= {"mpi4py", "shm", "torch"}
    assert sorted({r["size"] for r in result["rows"]}) == [8, 64, 512, 4096, 32768]
    assert {r["iters"] for r in result["rows"]} == {3}  # as asked: every size is below LARGE
    assert "busbw" in proc.stdout and "#wrong" in proc.stdout
    assert (tmp_path / "ar.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "ar.csv").read_text().startswith("backend,size,count")
    record = json.loads(next((tmp_path / "runs").glob("*/run.json")).read_text())
    assert "--bind-to" in record["argv"] and "none" in record["argv"]  # --mpi-arg reached mpirun


def test_the_shared_allreduce_steps_shrink_with_ranks_and_a_small_dev_shm():
    from distlaunch.hvd.shm_allreduce import CHUNK, step_bytes

    assert step_bytes(CHUNK, 2, 24 << 30) == CHUNK == 4 << 20  # a large /dev/shm: the chunk asked
    assert step_bytes(CHUNK, 2, None) == CHUNK  # none to read: SEGMENT bounds it alone
    assert step_bytes(CHUNK, 8, None) == 2_796_160  # many ranks: 64 MiB over 24 slots, in 64-byte lines
    assert step_bytes(CHUNK, 2, 64 << 20) == 1_398_080  # a container's 64 MiB: 1/8 of it over 6 slots
    assert step_bytes(CHUNK, 8, 64 << 20) == 1 << 20  # ... over 24 slots: no smaller than the 1 MiB of old
    assert step_bytes(CHUNK, 24, 64 << 20) == 932_032  # ... unless SEGMENT says so: 64 MiB over 72 slots
    assert step_bytes(CHUNK, 20_000, None) == 4096  # never below a page
    assert step_bytes(12_345, 2, None) == 12_288  # whole 64-byte lines: whole elements of every dtype


def test_large_rows_time_a_quarter_of_the_iterations_but_never_fewer_than_five():
    from distlaunch.hvd.bench import LARGE, timed_iters

    assert [timed_iters(asked, LARGE - 1) for asked in (1, 3, 10, 20)] == [1, 3, 10, 20]
    assert [timed_iters(asked, LARGE) for asked in (1, 3, 10, 20, 40)] == [1, 3, 5, 5, 10]


def test_bench_exit_codes_follow_the_table(tmp_path):
    """bench speaks the README's exit codes: 70 when mpirun cannot start the job, 2 for bad input."""
    base = [sys.executable, "-m", "distlaunch", "bench", "allreduce", "--ppn", "2", "--sizes", "8B", "--iters", "1"]
    cannot_start = subprocess.run([*base, "--mpi-arg", "--no-such-flag-xyz"], cwd=tmp_path, capture_output=True,
                                  text=True, timeout=300)
    assert cannot_start.returncode == 70, cannot_start.stderr[-2000:]
    assert "could not start the job" in cannot_start.stderr
    bad = subprocess.run([*base, "--sizes", "lots"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("distlaunch: error: --sizes"), bad.stderr


def test_bench_train_runs_every_row_and_says_how_they_compare(tmp_path):
    """distlaunch bench train end to end, tiny: every row trains for real under its own
    launcher, the table and the JSON agree, and the ratios are computed from the rates."""
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, "-m", "distlaunch", "bench", "train", "--model", "transformer",
                           "--batch", "2", "--iters", "1", "--batches", "2", "--rounds", "1", "--json", str(out),
                           "--plot", str(tmp_path / "train.png")],
                          cwd=tmp_path, capture_output=True, text=True, errors="replace", timeout=900,
                          env={**__import__("os").environ, "TMPDIR": str(tmp_path)})  # its work folder
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    expected = {"ceiling", "hvd-torch", "ddp"}
    if horovod_available():
        expected |= {"horovodrun-gloo", "distlaunch-hvd-mpi", "distlaunch-hvd-gloo", "mpirun-hvd"}
    assert set(result["summary"]) == expected and result["failed"] == {}
    for key, rates in result["rates"].items():
        assert len(rates) == 2 and all(rate > 0 for rate in rates), (key, rates)
        summary = result["summary"][key]
        assert summary["min"] <= summary["median"] <= summary["max"]
        assert summary["x_ddp"] == pytest.approx(summary["median"] / result["summary"]["ddp"]["median"])
    table = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] and line.split()[0] in expected]
    assert {row[0] for row in table} == expected, proc.stdout
    assert (tmp_path / "train.png").stat().st_size > 1000
    assert working_in(tmp_path) == []


def test_bench_train_ratios_are_null_without_their_row():
    """Without a DDP or ceiling row the ratios are None (JSON null), never NaN."""
    from distlaunch.cli.bench_train import Row, format_table, summarize

    summary = summarize([Row("hvd-torch", [], {}, rates=[10.0, 30.0, 20.0]), Row("ddp", [], {}, error="boom")])
    assert summary == {"hvd-torch": {"median": 20.0, "min": 10.0, "max": 30.0, "x_ddp": None, "x_ceiling": None}}
    assert "NaN" not in json.dumps(summary)
    table = format_table([Row("hvd-torch", [], {}, rates=[10.0, 30.0, 20.0]), Row("ddp", [], {}, error="boom")],
                         summary, "img")
    assert table.splitlines()[1].split()[-2:] == ["-", "-"] and "failed: boom" in table


def test_bench_train_row_overrunning_ends_with_what_it_started(tmp_path, monkeypatch):
    """A row past its time ends with its descendants, even one in a session of its own
    that ignores SIGTERM (as launchers put their ranks): killed by pid, none left."""
    import time

    import psutil

    from distlaunch.cli import bench_train

    monkeypatch.setattr(bench_train, "END_GRACE_S", 2.0)
    pid_file = tmp_path / "child.pid"
    child = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             f"open({str(pid_file)!r} + '.tmp', 'w').write(str(os.getpid())); "
             f"os.replace({str(pid_file)!r} + '.tmp', {str(pid_file)!r}); time.sleep(600)")
    launcher = (f"import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}], "
                f"start_new_session=True)\nwhile not os.path.exists({str(pid_file)!r}): time.sleep(0.05)\n"
                "time.sleep(600)")
    row = bench_train.Row("ddp", [sys.executable, "-c", launcher], {})
    start = time.monotonic()
    with pytest.raises(bench_train.BenchTrainError, match="ddp: no result after 10 s"):
        bench_train.run_row(row, {}, str(tmp_path), timeout=10)
    assert time.monotonic() - start < 25
    child_pid = int(pid_file.read_text())  # the launcher waited for it before its timeout could start
    deadline = time.monotonic() + 10
    while True:
        try:
            if psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        assert time.monotonic() < deadline, f"pid {child_pid} outlived its row"
        time.sleep(0.1)
