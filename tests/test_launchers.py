"""``distlaunch.hvd`` under any launcher: distlaunch, plain mpirun, torchrun and horovodrun
here (srun: tests/test_slurm.py). Each must give the same world, and the example the
same losses; a launcher whose world cannot be found is one clear error, never a
silent split into single-rank trainings. Real launchers, real ranks."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, SCRIPTS, backends

pytestmark = pytest.mark.slow
WORLD = str(SCRIPTS / "world.py")
TRAIN = str(REPO / "examples" / "train.py")
BIN = Path(sys.executable).parent
RANKS = 3


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, errors="replace", timeout=timeout)


def mpirun() -> list[str]:
    found = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
    assert found, "no mpirun"
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [found, *root, "--oversubscribe", "--bind-to", "none", "-n", str(RANKS)]


LAUNCHERS = {
    "distlaunch": lambda: [sys.executable, "-m", "distlaunch", "run", "--ppn", str(RANKS), "--oversubscribe"],
    "mpirun": lambda: [*mpirun(), sys.executable],
    "torchrun": lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS)],
}


def worlds(output: str) -> list[dict[str, Any]]:
    # by regex, not by line: torchrun's workers share one pipe, and their lines may meet
    found = [json.loads(item) for item in re.findall(r"WORLD (\{[^{}]*\})", output)]
    return sorted(found, key=lambda item: item["rank"])


def one_node_world(found: list[dict[str, Any]]) -> list[tuple[int, ...]]:
    return [(w["rank"], w["size"], w["local_rank"], w["local_size"], w["cross_rank"], w["cross_size"], w["sum"])
            for w in found]


EXPECTED = [(rank, RANKS, rank, RANKS, 0, 1, 6.0) for rank in range(RANKS)]


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_the_same_world_under_every_launcher(name, tmp_path):
    proc = run([*LAUNCHERS[name](), WORLD], tmp_path, {"DISTLAUNCH_HVD_BACKEND": "torch"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    found = worlds(proc.stdout)
    assert one_node_world(found) == EXPECTED, proc.stdout
    expected = {"distlaunch": "openmpi", "mpirun": "openmpi", "torchrun": "torchrun"}[name]
    assert {w["launcher"] for w in found} == {expected}


def losses(output: str) -> list[str]:
    return re.findall(r"epoch \d+: loss [\d.]+", output)


def test_the_example_trains_the_same_under_every_launcher(tmp_path):
    seen = {}
    for name, argv in sorted(LAUNCHERS.items()):
        proc = run([*argv(), TRAIN, "--epochs", "2"], tmp_path, {"DISTLAUNCH_HVD_BACKEND": "torch"})
        assert proc.returncode == 0, f"{name}: " + proc.stderr[-3000:]
        assert f"training on {RANKS} rank(s)" in proc.stdout, f"{name}: {proc.stdout}"
        assert proc.stdout.count("training on") == 1, f"{name} split the job: {proc.stdout}"
        seen[name] = losses(proc.stdout)
    assert len(seen["distlaunch"]) == 3 and seen["distlaunch"] == seen["mpirun"] == seen["torchrun"], seen


def test_metrics_outside_distlaunch_go_to_a_named_place(tmp_path):
    proc = run([*LAUNCHERS["torchrun"](), TRAIN, "--epochs", "1"], tmp_path, {"DISTLAUNCH_HVD_BACKEND": "torch"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "metrics").exists()  # no stray folder beside the outputs
    lines = (tmp_path / "outputs" / "metrics" / "rank-0.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["name"] == "loss"
    assert proc.stderr.count("metrics go to outputs/metrics/") == 1  # said once, by rank 0
    chosen = tmp_path / "chosen"
    proc = run([sys.executable, TRAIN, "--epochs", "1"], tmp_path, {"DISTLAUNCH_OUTPUT_DIR": str(chosen)})
    assert proc.returncode == 0 and (chosen / "metrics" / "rank-0.jsonl").is_file() and (chosen / "model.pt").is_file()


def test_a_single_process_is_a_world_of_one(tmp_path):
    proc = run([sys.executable, WORLD], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert one_node_world(worlds(proc.stdout)) == [(0, 1, 0, 1, 0, 1, 1.0)]


def test_a_launcher_whose_variables_were_cleared_is_one_clear_error(tmp_path):
    """mpirun starts the ranks, but 'env -i' strips its variables: each would think it is
    alone. hvd.init() names the launcher instead."""
    kept = [f"{name}={os.environ[name]}" for name in ("PATH", "HOME") if name in os.environ]
    proc = run([*mpirun()[:-2], "-n", "2", "env", "-i", *kept, "DISTLAUNCH_HVD_BACKEND=torch", sys.executable,
                WORLD], tmp_path)
    assert proc.returncode != 0 and "WORLD " not in proc.stdout, proc.stdout
    assert "WorldError: started by prterun, but none of its variables" in proc.stderr, proc.stderr[-2000:]
    # a process started by anything else (a shell, a batch script) is a world of one
    alone = run(["bash", "-c", '"$0" "$1"; true', sys.executable, WORLD], tmp_path)
    assert alone.returncode == 0 and one_node_world(worlds(alone.stdout)) == [(0, 1, 0, 1, 0, 1, 1.0)]


def test_torchrun_variables_without_its_rendezvous_are_one_clear_error(tmp_path):
    proc = run([sys.executable, WORLD], tmp_path, {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                                   "DISTLAUNCH_HVD_BACKEND": "torch"})
    assert proc.returncode != 0
    assert "WorldError: RANK and WORLD_SIZE are set but MASTER_ADDR is not" in proc.stderr


def test_an_mpi_mismatch_is_one_clear_error_not_a_split(tmp_path):
    """MPICH's launcher starts the ranks, but mpi4py loads another MPI: each would be a
    world of one. hvd.init() says so instead."""
    hydra = shutil.which("mpirun.mpich")
    if hydra is None:
        pytest.skip("MPICH is not installed (apt-get install mpich)")
    proc = run([hydra, "-n", "2", sys.executable, WORLD], tmp_path, {"DISTLAUNCH_HVD_BACKEND": "torch"})
    assert proc.returncode != 0 and "WORLD " not in proc.stdout, proc.stdout
    assert "started by MPICH's mpiexec as rank" in proc.stderr and "sees 1 process(es)" in proc.stderr
    assert "MPI4PY_LIBMPI" in proc.stderr


# real Horovod's param of backends(): skipped where it is not installed, required in CI's root run
REAL_HOROVOD = [param for param in backends() if getattr(param, "values", [param])[0] == "horovod"]


@pytest.mark.parametrize("backend", REAL_HOROVOD)
def test_horovodrun_with_real_horovod_and_the_torch_backend(tmp_path, backend):
    horovodrun = shutil.which("horovodrun", path=str(BIN))
    assert horovodrun, "horovod is installed but horovodrun is not beside this Python"
    base = [horovodrun, "-np", str(RANKS), "-H", f"localhost:{RANKS}"]
    for choice in ("horovod", "torch"):
        # horovodrun's own binding (-bind-to core) fails where ranks outnumber cores
        proc = run([*base, "--mpi", "--binding-args=--bind-to none --map-by slot", "--mpi-args=--oversubscribe",
                    sys.executable, WORLD], tmp_path,
                   {"DISTLAUNCH_HVD_BACKEND": choice})
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = worlds(proc.stdout)
        assert one_node_world(found) == EXPECTED and {w["backend"] for w in found} == {choice}
    # Gloo mode: its rendezvous is Horovod's own, so only real Horovod can join it
    proc = run([*base, "--gloo", sys.executable, WORLD], tmp_path, {"DISTLAUNCH_HVD_BACKEND": "horovod"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert one_node_world(worlds(proc.stdout)) == EXPECTED
    proc = run([*base, "--gloo", sys.executable, WORLD], tmp_path, {"DISTLAUNCH_HVD_BACKEND": "torch"})
    assert proc.returncode != 0 and "WORLD " not in proc.stdout
    assert "started by horovodrun in Gloo mode" in proc.stdout + proc.stderr
