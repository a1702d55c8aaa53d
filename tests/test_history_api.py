"""The estimator-style API (Job/Run), run history commands, metrics, ONNX export."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import REPO

from distlaunch.errors import RunNotFound
from distlaunch.launch.history import merge, rank_set, resolve
from distlaunch.launch.metrics import read_metrics
from distlaunch.rank.metrics import log_metric

pytestmark = pytest.mark.slow


def cli(*args: str, cwd) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "distlaunch", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_merge_folds_identical_lines():
    lines = ["[0] epoch 1 loss 0.5", "[1] epoch 1 loss 0.5", "[2] epoch 1 loss 0.5", "[3] epoch 1 loss 0.5",
             "[1] only one", "[0] rank 0 differs", "[2] rank 2 differs", "[0] epoch 1 loss 0.5", "mpirun says"]
    assert list(merge(lines)) == ["[0-3] epoch 1 loss 0.5", "[1] only one", "[0] rank 0 differs",
                                  "[2] rank 2 differs", "[0] epoch 1 loss 0.5", "mpirun says"]
    assert rank_set({0, 1, 2, 3, 5, 7, 8}) == "0-3,5,7-8"


def test_metrics_are_json_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTLAUNCH_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    for step, value in enumerate([0.9, 0.5, 0.2]):
        log_metric("loss", value, step=step)
    log_metric("lr", 0.1)
    found = read_metrics(tmp_path)
    assert [m["value"] for m in found["loss"]] == [0.9, 0.5, 0.2] and [m["step"] for m in found["loss"]] == [0, 1, 2]
    lines = (tmp_path / "metrics" / "rank-0.jsonl").read_text().splitlines()
    assert all(json.loads(line)["rank"] == 0 for line in lines) and len(lines) == 4


def test_estimator_flow_submit_wait_metrics_download_onnx(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from distlaunch import Job, Run

    job = Job(entry_script="train.py", source_dir=str(REPO / "examples"),
              script_params={"--epochs": 2, "--export-onnx": ""}, ppn=2)
    run = job.submit()
    assert run.status in ("queued", "running", "completed")
    assert run.wait() == "completed"
    metrics = run.get_metrics()
    assert len(metrics["loss"]) == 2 and metrics["loss"][-1] < metrics["loss"][0]
    assert metrics["onnx_max_abs_diff"][0] < 1e-4
    assert "outputs/model.onnx" in run.get_file_names()
    local = run.download_file("outputs/model.onnx", str(tmp_path / "model.onnx"))
    import numpy as np
    import onnx
    import onnxruntime

    onnx.checker.check_model(onnx.load(str(local)))
    session = onnxruntime.InferenceSession(str(local), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.zeros((3, 16), dtype=np.float32)})[0]
    assert out.shape == (3, 1)
    again = Run.load(run.id[:15])
    assert again.id == run.id and again.get_details()["status"] == "completed"
    assert "epoch 2: loss" in run.logs(rank=0)
    with pytest.raises(RunNotFound):
        run.download_file("../../etc/passwd")


def test_history_commands(tmp_path):
    script = tmp_path / "talk.py"
    script.write_text("import os\nprint('epoch 1 loss 0.5', flush=True)\nprint('rank', os.environ['RANK'])\n")
    assert cli("run", "--ppn", "2", str(script), cwd=tmp_path).returncode == 0
    bad = tmp_path / "bad.py"
    bad.write_text("raise KeyError('missing key')\n")
    assert cli("run", "--ppn", "2", str(bad), cwd=tmp_path).returncode == 1
    first, second = sorted(p.name for p in (tmp_path / "runs").iterdir())

    listing = cli("runs", "list", cwd=tmp_path)
    assert first in listing.stdout and "completed" in listing.stdout and "failed" in listing.stdout
    merged = cli("logs", first[:-2], cwd=tmp_path).stdout.splitlines()
    assert "[0-1] epoch 1 loss 0.5" in merged
    assert "[0] rank 0" in merged and "[1] rank 1" in merged  # different lines stay apart
    assert cli("logs", first, "--rank", "1", cwd=tmp_path).stdout.strip().endswith("rank 1")
    shown = cli("runs", "show", second, cwd=tmp_path).stdout
    assert "failed" in shown and "KeyError" in shown
    assert cli("download", first, "logs/rank-0.log", "-o", str(tmp_path / "r0.log"), cwd=tmp_path).returncode == 0
    assert "epoch 1 loss 0.5" in (tmp_path / "r0.log").read_text()
    ambiguous = cli("runs", "show", first[:8], cwd=tmp_path)
    assert ambiguous.returncode == 2 and "give more of the id" in ambiguous.stderr
    assert cli("runs", "rm", first, cwd=tmp_path).returncode == 0
    with pytest.raises(RunNotFound):
        resolve(tmp_path / "runs", first)


def test_cancel_a_running_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from distlaunch import Job

    script = tmp_path / "long.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    run = Job(entry_script=str(script), source_dir=str(tmp_path), ppn=2).submit()
    deadline = time.monotonic() + 30
    while "started" not in (run.paths.output_log.read_text() if run.paths.output_log.exists() else ""):
        assert time.monotonic() < deadline, "job did not start"
        time.sleep(0.1)
    proc = cli("cancel", run.id, cwd=tmp_path)
    assert proc.returncode == 0 and "cancelled" in proc.stdout
    assert run.wait(timeout=30) == "cancelled"
    from test_failures import survivors

    assert survivors(run.id) == []


def test_metrics_become_tensorboard_events_and_a_plot(tmp_path):
    script = tmp_path / "learn.py"
    script.write_text("import distlaunch\nfor step in range(5):\n"
                      "    distlaunch.log_metric('loss', 1.0 / (step + 1), step=step)\n"
                      "    distlaunch.log_metric('acc', step / 5, step=step)\n")
    assert cli("run", "--ppn", "2", str(script), cwd=tmp_path).returncode == 0
    run_dir = next((tmp_path / "runs").iterdir())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs" / "tensorboard" / "rank-0"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["acc", "loss"]
    assert [round(e.value, 4) for e in events.Scalars("loss")] == [1.0, 0.5, 0.3333, 0.25, 0.2]
    assert [e.step for e in events.Scalars("loss")] == [0, 1, 2, 3, 4]
    png = tmp_path / "metrics.png"
    shown = cli("runs", "show", run_dir.name, "--plot", str(png), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_pip_packages_installed_once_per_node(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    pkg = tmp_path / "pkgsrc"
    (pkg / "dltestpkg").mkdir(parents=True)
    (pkg / "dltestpkg" / "__init__.py").write_text("VALUE = 'installed by distlaunch'\n")
    (pkg / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\nbuild-backend = '
                                        '"setuptools.build_meta"\n[project]\nname = "dltestpkg"\nversion = "1.0"\n')
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "wheels"), str(pkg)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    wheel = str(next((tmp_path / "wheels").glob("dltestpkg-*.whl")))
    script = tmp_path / "use.py"
    script.write_text("import dltestpkg\nprint(dltestpkg.VALUE)\n")
    from distlaunch import Job

    try:
        first = Job(entry_script=str(script), source_dir=str(tmp_path), ppn=2, pip_packages=[wheel]).submit()
        assert first.wait() == "completed"
        assert "installed by distlaunch" in first.logs(rank=1)
        assert "pip exit 0" in (first.paths.logs / "pip.log").read_text()
        second = Job(entry_script=str(script), source_dir=str(tmp_path), ppn=2, pip_packages=[wheel]).submit()
        assert second.wait() == "completed"
        assert "already installed" in (second.paths.logs / "pip.log").read_text()
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "dltestpkg"], capture_output=True)


def test_pip_failure_is_one_clear_line(tmp_path):
    script = tmp_path / "x.py"
    script.write_text("print('never')\n")
    proc = cli("run", "--pip", str(tmp_path / "no-such-package-1.0-py3-none-any.whl"), str(script), cwd=tmp_path)
    assert proc.returncode == 70
    assert proc.stderr.strip().splitlines()[-1].startswith("distlaunch: error: pip install failed on localhost")
