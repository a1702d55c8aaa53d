"""distlaunch.checkpoint and hvd.elastic: files on one rank in this process, then a
2-rank job through the real launcher that crashes after a commit and resumes from it."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, SCRIPTS, backends

from distlaunch import checkpoint

RESUME = str(SCRIPTS / "ckpt_resume.py")
WORLD_VARIABLES = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "SLURM_PROCID",
                   "HOROVOD_RANK", "RANK", "WORLD_SIZE")


@pytest.fixture
def alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as a job of one rank, whatever launched pytest."""
    for name in WORLD_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def steps(folder: Path) -> list[int]:
    return sorted(int(p.name[5:-3]) for p in folder.glob("ckpt-*.pt"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- one rank, in this process
def test_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DISTLAUNCH_CHECKPOINT_DIR", raising=False)
    monkeypatch.delenv("DISTLAUNCH_OUTPUT_DIR", raising=False)
    assert checkpoint.directory() == Path("outputs") / "checkpoints"
    monkeypatch.setenv("DISTLAUNCH_OUTPUT_DIR", str(tmp_path / "out"))
    assert checkpoint.directory() == tmp_path / "out" / "checkpoints"
    monkeypatch.setenv("DISTLAUNCH_CHECKPOINT_DIR", str(tmp_path / "mine"))
    assert checkpoint.directory() == tmp_path / "mine"


def test_save_keeps_the_newest_and_files_are_private(alone, monkeypatch, tmp_path):
    folder = tmp_path / "ckpt"
    monkeypatch.setenv("DISTLAUNCH_CHECKPOINT_DIR", str(folder))  # the default directory
    assert checkpoint.latest() is None and checkpoint.load_latest() is None
    for step in range(1, 6):
        path = checkpoint.save(step, keep=3, note=f"step {step}")
        assert path == folder / f"ckpt-{step:09d}.pt" and path.is_file()
    assert steps(folder) == [3, 4, 5]
    assert checkpoint.latest() == folder / "ckpt-000000005.pt"
    assert mode(folder) == 0o700
    assert {mode(p) for p in folder.iterdir()} == {0o600}
    checkpoint.save(6, keep=1)
    assert steps(folder) == [6]


def test_latest_goes_by_step_number_not_by_name(alone, tmp_path):
    for step in (999_999_999, 1_000_000_000, 7):  # the 10-digit name sorts first as text
        checkpoint.save(step, directory=tmp_path, keep=5)
    assert checkpoint.latest(tmp_path) == tmp_path / "ckpt-1000000000.pt"
    assert checkpoint.load_latest(directory=tmp_path).step == 1_000_000_000


def test_an_older_step_saved_later_is_kept(alone, tmp_path):
    for step in (5, 6, 7):
        checkpoint.save(step, directory=tmp_path, keep=2)
    assert checkpoint.save(1, directory=tmp_path, keep=2) == tmp_path / "ckpt-000000001.pt"
    assert steps(tmp_path) == [1, 7]  # the newest 2 by step would have deleted the file just written
    assert checkpoint.latest(tmp_path) == tmp_path / "ckpt-000000007.pt"


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_must_be_positive(alone, tmp_path, keep):
    with pytest.raises(ValueError) as caught:
        checkpoint.save(1, directory=tmp_path / "ckpt", keep=keep)
    assert "keep >= 1" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "ckpt").exists()


def test_a_failed_save_leaves_the_last_checkpoint_and_no_partial_file(alone, tmp_path):
    checkpoint.save(1, directory=tmp_path, epoch=1)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        checkpoint.save(2, directory=tmp_path, epoch=2, callback=lambda: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000001.pt"]
    # a save that crashed for good (the process died) leaves its temporary file: ignored, then cleaned
    stray = tmp_path / ".ckpt-000000009-crashed.tmp"
    stray.write_bytes(b"half a checkpoint")
    assert checkpoint.latest(tmp_path) == tmp_path / "ckpt-000000001.pt"
    assert checkpoint.load_latest(directory=tmp_path).extra == {"epoch": 1}
    checkpoint.save(3, directory=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000001.pt", "ckpt-000000003.pt"]


def test_model_optimizer_and_extras_round_trip(alone, tmp_path):
    import torch

    def trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(seed + 1):
            optimizer.zero_grad()
            model(torch.randn(5, 3)).pow(2).mean().backward()
            optimizer.step()
        return model, optimizer

    model, optimizer = trained(1)
    extra = {"epoch": 3, "history": [0.5, 0.25], "name": "run", "best": None, "shape": (2, 3),
             "mask": torch.tensor([True, False])}
    path = checkpoint.save(12, model=model, optimizer=optimizer, directory=tmp_path, **extra)
    other_model, other_optimizer = trained(2)
    found = checkpoint.load_latest(model=other_model, optimizer=other_optimizer, directory=tmp_path)
    assert found is not None and (found.step, found.path) == (12, str(path))
    assert found.extra.keys() == extra.keys() and torch.equal(found.extra.pop("mask"), extra.pop("mask"))
    assert found.extra == extra
    for name, value in model.state_dict().items():
        assert torch.equal(other_model.state_dict()[name], value), name
    mine, theirs = optimizer.state_dict(), other_optimizer.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]
    for index, per_param in mine["state"].items():
        for key, value in per_param.items():
            assert torch.equal(theirs["state"][index][key], value), (index, key)
    with pytest.raises(AttributeError):
        found.step = 13  # type: ignore[misc]  # frozen


def test_extras_beyond_plain_values_fail_to_load_in_one_line(alone, tmp_path):
    import pickle

    checkpoint.save(1, directory=tmp_path, tags=frozenset({"a"}))  # pickles, but weights_only refuses it
    with pytest.raises(pickle.UnpicklingError) as caught:
        checkpoint.load_latest(directory=tmp_path)
    message = str(caught.value)
    assert "GLOBAL frozenset" in message and "add_safe_globals" in message and "\n" not in message, message


def test_other_ranks_neither_write_nor_load_alone(alone, monkeypatch, tmp_path):
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert checkpoint.save(1, directory=tmp_path / "ckpt") is None
    assert not (tmp_path / "ckpt").exists()
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    with pytest.raises(RuntimeError) as caught:
        checkpoint.load_latest(directory=tmp_path / "ckpt")
    assert "hvd.init()" in str(caught.value) and "\n" not in str(caught.value)


def test_checkpoint_import_is_light():
    code = ("import sys\nfrom distlaunch import checkpoint\nimport distlaunch\n"
            "assert distlaunch.checkpoint is checkpoint\nassert 'torch' not in sys.modules, 'torch'\nprint('light')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "light", proc.stderr


ELASTIC_ALONE = textwrap.dedent("""
    import sys, torch
    import distlaunch.hvd as hvd
    assert hvd.elastic.__name__ == "distlaunch.hvd.elastic", hvd.elastic
    hvd.init()
    def fresh(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(2, 1)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = fresh(0)
    sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    state = hvd.elastic.TorchState(model, optimizer, sched=sched, epoch=0, seen=[])
    calls = []
    state.register_reset_callbacks([lambda: calls.append("reset")])

    @hvd.elastic.run
    def train(state, epochs):
        while state.epoch < epochs:
            state.model(torch.ones(1, 2)).sum().backward()
            state.optimizer.step()
            state.sched.step()
            state.seen.append(state.epoch)
            state.epoch += 1
            state.commit()
        return "done"

    assert train(state, 2) == "done" and calls == []  # nothing to resume: no reset
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    state.epoch, state.seen = 9, ["x"]
    state.seen.append("y")
    state.restore()  # back to the last commit, in memory
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())
    assert (state.epoch, state.seen) == (2, [0, 1]), (state.epoch, state.seen)

    model2, optimizer2 = fresh(1)
    sched2 = torch.optim.lr_scheduler.StepLR(optimizer2, step_size=1, gamma=0.5)
    again = hvd.elastic.TorchState(model2, optimizer2, sched=sched2, epoch=0, seen=[])
    again.register_reset_callbacks([lambda: calls.append("reset")])
    assert train(again, 3) == "done"  # resumes at epoch 2 from the disk, runs one more
    assert (again.epoch, again.seen, calls) == (3, [0, 1, 2], ["reset"]), (again.epoch, again.seen, calls)
    assert sched2.last_epoch == 3, sched2.last_epoch
    print("elastic ok")
""")


@pytest.mark.parametrize("backend", backends())
def test_elastic_state_alone_commits_restores_and_resumes(tmp_path, backend):
    env = {**os.environ, "DISTLAUNCH_HVD_BACKEND": backend, "DISTLAUNCH_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
           "DISTLAUNCH_HVD_QUIET": "1"}
    for name in WORLD_VARIABLES:
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", ELASTIC_ALONE], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "elastic ok" in proc.stdout, proc.stderr[-3000:]
    assert steps(tmp_path / "ckpt") == [1, 2, 3]


# ---------------------------------------------------------------- two ranks, through the launcher
LINE = re.compile(r"^\[(\d+)\] (start|committed|final) epoch (\d+)(?: restart (\d+))? (params \S+ momentum \S+)$")


def progress(stdout: str) -> dict[tuple[str, int, int], str]:
    """(what, epoch, rank) -> 'params P momentum M' for the script's lines."""
    found = {}
    for line in stdout.splitlines():
        match = LINE.match(line)
        if match:
            rank, what, epoch, _restart, sums = match.groups()
            found[(what, int(epoch), int(rank))] = sums
    return found


def launch(distlaunch, backend: str, folder: Path, *script_args: str, options: tuple[str, ...] = ()):
    return distlaunch("run", "--ppn", "2", "--env", f"DISTLAUNCH_CHECKPOINT_DIR={folder}", *options, RESUME,
                      *script_args, env={"DISTLAUNCH_HVD_BACKEND": backend}, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("backend", backends())
def test_a_crashed_job_resumes_after_its_last_commit(distlaunch, tmp_path, backend):
    ckpt = tmp_path / "ckpt"
    first = launch(distlaunch, backend, ckpt, "--epochs", "4", "--crash-after", "1")
    assert first.returncode == 3, first.stderr[-3000:]
    done = progress(first.stdout)
    assert done[("start", 0, 0)] == done[("start", 0, 1)]  # rank 1's own random start was synced away
    assert done[("committed", 0, 0)] == done[("committed", 0, 1)]
    saved = done[("committed", 1, 1)]  # rank 1 exits right after; rank 0 may be killed before it prints
    assert done.get(("committed", 1, 0), saved) == saved
    assert not any(what == "committed" and epoch > 1 for what, epoch, _rank in done)
    assert steps(ckpt) == [1, 2] and {mode(p) for p in ckpt.iterdir()} == {0o600}

    second = launch(distlaunch, backend, ckpt, "--epochs", "4")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = progress(second.stdout)
    assert {(what, epoch) for what, epoch, _rank in resumed if what == "start"} == {("start", 2)}, second.stdout
    assert resumed[("start", 2, 0)] == resumed[("start", 2, 1)] == saved  # parameters and momentum as committed
    assert sorted(epoch for what, epoch, rank in resumed if what == "committed" and rank == 0) == [2, 3]
    assert resumed[("final", 4, 0)] == resumed[("final", 4, 1)]
    assert steps(ckpt) == [2, 3, 4]

    # the interruption changed nothing: an uninterrupted run ends at the very same numbers
    whole = launch(distlaunch, backend, tmp_path / "whole", "--epochs", "4")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert progress(whole.stdout)[("final", 4, 0)] == resumed[("final", 4, 0)]


@pytest.mark.slow
def test_max_restarts_relaunches_from_the_last_commit(distlaunch, tmp_path):
    """The default place (the run's outputs folder) survives the launcher's relaunch."""
    result = distlaunch("run", "--ppn", "2", "--max-restarts", "1", "--restart-delay", "0", RESUME,
                        "--epochs", "3", "--crash-after", "0", env={"DISTLAUNCH_HVD_BACKEND": "torch"}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    starts = re.findall(r"^\[(\d)\] start epoch (\d+) restart (\d+) ", result.stdout, re.MULTILINE)
    assert sorted(starts) == [("0", "0", "0"), ("0", "1", "1"), ("1", "0", "0"), ("1", "1", "1")], result.stdout
    done = progress(result.stdout)
    assert done[("start", 1, 0)] == done[("committed", 0, 1)]
    assert done[("final", 3, 0)] == done[("final", 3, 1)]
    assert steps(result.run_dirs()[0] / "outputs" / "checkpoints") == [1, 2, 3]
