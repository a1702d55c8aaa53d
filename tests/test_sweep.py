"""distlaunch sweep: real trials (distlaunch runs of a script whose loss is a known
function of its parameters) through a real Optuna study in SQLite."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SCRIPTS
from test_failures import survivors

from distlaunch.errors import SpecError
from distlaunch.sweep.packing import SlotPool
from distlaunch.sweep.space import as_args, grid, parse_item, parse_space

TARGET = str(SCRIPTS / "sweep_target.py")


def sweep(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT_DIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "distlaunch", "sweep", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def trials(tmp_path: Path, name: str) -> list[dict[str, str]]:
    proc = sweep(tmp_path, "show", name, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def steps_run(tmp_path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in (tmp_path / "steps").read_text().splitlines():
        trial = line.split()[0]
        counts[trial] = counts.get(trial, 0) + 1
    return counts


def test_space_parsing_and_grid():
    params = parse_space(["x=quniform(0, 1, 0.25)", "n=randint(1, 3)", "opt=choice(adam, 'sgd')",
                          "lr=loguniform(1e-4, 1e-1)"])
    assert params[0].values() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert params[1].values() == [1, 2, 3] and params[2].values() == ["adam", "sgd"]
    assert params[3].values() is None
    assert grid(params[:3]) == {"x": [0.0, 0.25, 0.5, 0.75, 1.0], "n": [1, 2, 3], "opt": ["adam", "sgd"]}
    with pytest.raises(SpecError, match="grid sampling needs every parameter"):
        grid(params)
    assert as_args({"lr": 0.01, "opt": "adam"}) == ("--lr", "0.01", "--opt", "adam")
    for bad, why in [("lr=loguniform(0, 1)", "low > 0"), ("x=uniform(1, 0)", "low must be less"),
                     ("x=normal(0, 1)", "unknown kind"), ("x", "NAME=KIND"), ("x=quniform(0, 1, 0.3)", "divide")]:
        with pytest.raises(SpecError, match=why):
            parse_item(bad)


def test_slot_pool_never_gives_one_slot_twice():
    pool = SlotPool([("a", 2), ("b", 1)])
    assert pool.capacity(1, 1) == 3 and pool.capacity(2, 1) == 1 and pool.capacity(1, 2) == 1
    first, second, third = pool.take(1, 1), pool.take(1, 1), pool.take(1, 1)
    assert sorted([first, second, third]) == [[("a", 1)], [("a", 1)], [("b", 1)]]
    assert pool.take(1, 1) is None
    pool.give_back(second)
    assert pool.take(1, 1) == second


def test_grid_finds_the_exact_optimum_two_trials_at_a_time(tmp_path):
    proc = sweep(tmp_path, "run", "--name", "g", "--sampler", "grid", "--param", "x=choice(0.1, 0.3, 0.5)",
                 "--param", "kind=choice(a, b)", "--metric", "loss", "--max-concurrent", "2", "--ppn", "1",
                 "--env", "OUT_DIR", TARGET, "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = trials(tmp_path, "g")
    assert len(found) == 6 and {row["state"] for row in found} == {"completed"}
    best = found[0]
    assert (best["x"], best["kind"]) == ("0.3", "a") and float(best["loss"]) == pytest.approx(1 / 3)
    for row in found:  # each trial's value is the script's known function of its parameters
        expected = (float(row["x"]) - 0.3) ** 2 + (0.5 if row["kind"] == "b" else 0) + 1 / 3
        assert float(row["loss"]) == pytest.approx(expected)
    assert sorted((row["x"], row["kind"]) for row in found) == sorted(
        (x, k) for x in ("0.1", "0.3", "0.5") for k in ("a", "b"))
    table = sweep(tmp_path, "show", "g", "--no-plot")  # the table: numbers rounded, words as they are
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["trial", "state"])
    assert lines[header].split()[-2:] == ["x", "kind"] and lines[header + 1].split()[-2:] == ["0.3", "a"]
    listed = subprocess.run([sys.executable, "-m", "distlaunch", "runs", "list", "--sweep", "g"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert len(listed.stdout.splitlines()) == 7 and "sweep=g" in listed.stdout
    # a second sweep of that name is refused, in one line
    again = sweep(tmp_path, "run", "--name", "g", "--sampler", "grid", "--param", "x=choice(1)", "--metric", "loss",
                  TARGET)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"distlaunch: error: sweep 'g' exists ({tmp_path}/runs/sweeps/g): 'distlaunch sweep resume g' goes on "
        "with it, or choose another --name"]


def test_median_early_stop_ends_bad_trials_early(tmp_path):
    proc = sweep(tmp_path, "run", "--name", "p", "--sampler", "random", "--seed", "0", "--param", "x=uniform(0, 1)",
                 "--metric", "loss", "--max-trials", "8", "--early-stop", "median", "--ppn", "1", "--env", "OUT_DIR",
                 TARGET, "--steps", "10", "--step-time", "0.15")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = trials(tmp_path, "p")
    pruned = [row for row in found if row["state"] == "stopped early"]
    completed = [row for row in found if row["state"] == "completed"]
    assert pruned and len(pruned) + len(completed) == 8, found
    ran = steps_run(tmp_path)
    assert all(ran[row["trial"]] == 10 for row in completed)
    assert all(ran[row["trial"]] < 10 for row in pruned)  # measured: fewer steps really ran
    worst_completed = max(float(row["loss"]) for row in completed)
    assert min(float(row["loss"]) for row in pruned) > min(float(row["loss"]) for row in completed)
    assert worst_completed > 0
    record = json.loads((tmp_path / "runs" / pruned[0]["run"] / "run.json").read_text())
    assert record["status"] == "cancelled"


def test_trials_that_keep_failing_stop_the_sweep(tmp_path):
    proc = sweep(tmp_path, "run", "--name", "f", "--sampler", "random", "--param", "x=uniform(0, 1)",
                 "--metric", "loss", "--max-trials", "10", "--max-failures", "2", "--ppn", "1", TARGET, "--fail")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("distlaunch: error: the last 2 trials failed: see "
                                                           "'distlaunch logs ")
    assert [row["state"] for row in trials(tmp_path, "f")] == ["failed", "failed"]


@pytest.mark.parametrize("args, message", [
    (["--param", "x=uniform(0, 1)", "--metric", "loss", "--sampler", "grid"], "grid sampling needs every"),
    (["--param", "x=uniform(0, 1)", "--metric", "loss"], "--sampler tpe needs --max-trials N"),
    (["--param", "x=uniform(0, 1)", "--max-trials", "2"], "a sweep needs --metric NAME"),
    (["--metric", "loss", "--max-trials", "2"], "the search space is empty"),
    (["--param", "x=uniform(0, 1)", "--metric", "loss", "--max-trials", "2", "--early-stop", "often"],
     "--early-stop 'often': choose one of"),
])
def test_bad_sweeps_are_one_line_errors(tmp_path, args, message):
    proc = sweep(tmp_path, "run", *args, TARGET)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("distlaunch: error: ") and message in line
    assert not (tmp_path / "runs").exists()


def spans(tmp_path: Path) -> dict[str, tuple[float, float]]:
    """Each trial's first and last step time (rank 0's lines in $OUT_DIR/steps)."""
    found: dict[str, tuple[float, float]] = {}
    for line in (tmp_path / "steps").read_text().splitlines():
        trial, when = line.split()[0], float(line.split()[4])
        first, last = found.get(trial, (when, when))
        found[trial] = (min(first, when), max(last, when))
    return found


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda item: (item[0], item[1]))
    now = most = 0
    for _when, change in events:
        now += change
        most = max(most, now)
    return most


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_random_and_tpe_run_twelve_trials_two_at_a_time(tmp_path, sampler):
    proc = sweep(tmp_path, "run", "--name", sampler, "--sampler", sampler, "--seed", "1", "--param",
                 "x=uniform(0, 1)", "--param", "kind=choice(a, b)", "--metric", "loss", "--max-trials", "12",
                 "--max-concurrent", "2", "--ppn", "1", "--env", "OUT_DIR", TARGET, "--steps", "4",
                 "--step-time", "0.2", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = trials(tmp_path, sampler)
    assert len(found) == 12 and {row["state"] for row in found} == {"completed"}
    losses = [float(row["loss"]) for row in found]
    assert losses == sorted(losses)  # best first
    for row in found:
        expected = (float(row["x"]) - 0.3) ** 2 + (0.5 if row["kind"] == "b" else 0) + 1 / 4
        assert float(row["loss"]) == pytest.approx(expected)
    assert len({row["x"] for row in found}) == 12  # sampled, not repeated
    # two trials ran side by side, never more: the host has two slots, each trial takes one
    assert most_at_once(list(spans(tmp_path).values())) == 2
    for row in found:
        record = json.loads((tmp_path / "runs" / row["run"] / "run.json").read_text())
        assert record["experiment"] == sampler and record["tags"]["trial"] == row["trial"]
        assert record["ranks"] == 1 and record["tags"]["x"] == row["x"]


def test_a_sweep_stopped_mid_way_resumes_to_the_same_total(tmp_path):
    args = ["--name", "r", "--sampler", "random", "--seed", "3", "--param", "x=uniform(0, 1)", "--metric", "loss",
            "--max-trials", "5", "--ppn", "1", "--env", "OUT_DIR", TARGET, "--steps", "6", "--step-time", "0.3"]
    env = {**os.environ, "OUT_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "distlaunch", "sweep", "run", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        # stop it while its third trial runs: two done, one cut short
        while not any(line.startswith("2 ") for line in read_lines(tmp_path / "steps")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGINT)  # the sweep's own pid, as Ctrl-C would (the trial gets it from the sweep)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == ("distlaunch: error: sweep r stopped: 2 of 5 trials done; "
                                            "'distlaunch sweep resume r' goes on")
    stopped = trials(tmp_path, "r")
    assert [row["state"] for row in stopped] == ["completed", "completed", "interrupted"]
    cut = json.loads(next(p for p in (tmp_path / "runs").glob("*/run.json")
                          if json.loads(p.read_text())["tags"].get("trial") == "2").read_text())
    assert cut["status"] == "cancelled" and not survivors(cut["id"])
    resumed = sweep(tmp_path, "resume", "r", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trial 2 was not finished: it runs again" in resumed.stderr
    found = trials(tmp_path, "r")
    assert [row["state"] for row in found] == ["completed"] * 5 + ["interrupted"]
    cut_x = cut["tags"]["x"]
    assert cut_x in {row["x"] for row in found}  # the trial cut short ran again with its parameters
    assert steps_run(tmp_path)  # and the sweep's runs are all there, 6 (5 trials and the one cut short)
    assert len(subprocess.run([sys.executable, "-m", "distlaunch", "runs", "list", "--sweep", "r"], cwd=tmp_path,
                              capture_output=True, text=True).stdout.splitlines()) == 7


def test_python_api_sweep(tmp_path, monkeypatch):
    from distlaunch import Job, Sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUT_DIR", str(tmp_path))
    said: list[str] = []
    (tmp_path / "src").mkdir()
    shutil.copy(TARGET, tmp_path / "src")
    job = Job("sweep_target.py", "src", script_params={"--steps": 2, "--step-time": 0.05}, ppn=1,
              env={"OUT_DIR": str(tmp_path)})
    sweep_ = Sweep.create(job, {"x": "choice(0.0, 0.3)", "kind": "choice(a, b)"}, "loss", name="api",
                          sampler="grid", progress=said.append)
    best = sweep_.run()
    assert best.params == {"x": 0.3, "kind": "a"} and best.value == pytest.approx(0.5)
    assert len(Sweep.load("api").trials()) == 4 and said[-1].startswith("sweep api: 4 trials (4 completed")
    run_folder = tmp_path / "runs" / best.user_attrs["run_id"]
    assert json.loads((run_folder / "run.json").read_text())["tags"]["sweep"] == "api"


def test_only_rank_0s_relayed_metrics_lines_are_taken():
    from distlaunch.protocol import METRIC_MARK, metric_payload

    assert metric_payload(b"[0] " + METRIC_MARK + b'{"name": "loss"}') == b'{"name": "loss"}'
    assert metric_payload(b"[ 0] " + METRIC_MARK + b"{}") == b"{}"
    assert metric_payload(b"[3] " + METRIC_MARK + b"{}") is None  # another rank cannot write rank 0's metrics
    assert metric_payload(b"[0] loss 0.5") is None and metric_payload(METRIC_MARK + b"{}") is None
