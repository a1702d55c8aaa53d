"""Rank → GPU mapping. There is no GPU here, so the inventory is injected through the
same seam the NVML code uses (DISTLAUNCH_GPU_INVENTORY); on a machine with NVML the
real inventory is checked too."""
from __future__ import annotations

import json
import os
import re

import pytest

from distlaunch.errors import SpecError
from distlaunch.plan.gpus import GPU, Inventory, allowed_devices, devices_for, inventory
from distlaunch.plan.placement import place
from distlaunch.plan.spec import TargetSpec

FOUR = Inventory(tuple(GPU(i, f"GPU-{i:04d}") for i in range(4)), "test")
NONE = Inventory((), "none", problem="NVML unavailable: NVML Shared Library Not Found")


@pytest.fixture
def inventory_file(tmp_path):
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps([{"index": g.index, "uuid": g.uuid, "name": "Fake H100"} for g in FOUR.gpus]))
    return str(path)


def test_devices_per_local_rank():
    allowed = allowed_devices(FOUR, None, None)
    assert [devices_for(r, 1, allowed) for r in range(4)] == [("0",), ("1",), ("2",), ("3",)]
    assert [devices_for(r, 2, allowed) for r in range(2)] == [("0", "1"), ("2", "3")]
    with pytest.raises(SpecError, match="only 4 are available"):
        devices_for(2, 2, allowed)


def test_restriction_and_visible_devices():
    assert allowed_devices(FOUR, "3,1", None) == ("3", "1")
    assert allowed_devices(FOUR, None, "GPU-0002,GPU-0000") == ("GPU-0002", "GPU-0000")
    assert allowed_devices(FOUR, "0", "2,3") == ("0",)  # --gpus wins over CUDA_VISIBLE_DEVICES
    with pytest.raises(SpecError, match="GPU\\(s\\) 7 not on this node"):
        allowed_devices(FOUR, "0,7", None)
    with pytest.raises(SpecError, match="listed twice"):
        allowed_devices(FOUR, "1,1", None)


def test_placement_defaults_ppn_to_gpu_count():
    placed = place(TargetSpec(), env={}, inv=FOUR)
    assert placed.gpu_mode and [s.gpus for s in placed.slots] == [("0",), ("1",), ("2",), ("3",)]
    placed = place(TargetSpec(gpus_per_rank=2), env={}, inv=FOUR)
    assert [s.gpus for s in placed.slots] == [("0", "1"), ("2", "3")]
    placed = place(TargetSpec(), env={"CUDA_VISIBLE_DEVICES": "1,2"}, inv=FOUR)
    assert [s.gpus for s in placed.slots] == [("1",), ("2",)] and placed.restricted == ("1", "2")


def test_more_ranks_than_gpus_is_an_error():
    with pytest.raises(SpecError, match="need 5 GPUs but it has 4"):
        place(TargetSpec(ppn=5), env={}, inv=FOUR)
    with pytest.raises(SpecError, match="need 6 GPUs but it has 4"):
        place(TargetSpec(ppn=3, gpus_per_rank=2, use_gpu=True), env={}, inv=FOUR)


def test_no_gpu_means_cpu_mode_with_one_note():
    placed = place(TargetSpec(ppn=2, use_gpu=True), env={}, inv=NONE)
    assert not placed.gpu_mode and len(placed.slots) == 2
    assert placed.note.startswith("no GPU found (NVML unavailable")
    assert place(TargetSpec(ppn=2), env={}, inv=NONE).note == ""  # auto mode: nothing to say
    placed = place(TargetSpec(ppn=2, use_gpu=False), env={}, inv=FOUR)
    assert not placed.gpu_mode and all(s.gpus == () for s in placed.slots)


def test_inventory_file_seam(inventory_file):
    inv = inventory({"DISTLAUNCH_GPU_INVENTORY": inventory_file})
    assert [g.uuid for g in inv.gpus] == [g.uuid for g in FOUR.gpus] and inv.source.startswith("file")
    with pytest.raises(SpecError, match="cannot read a GPU list"):
        inventory({"DISTLAUNCH_GPU_INVENTORY": inventory_file + ".missing"})


def test_real_nvml_inventory_does_not_crash():
    inv = inventory({})
    if inv.gpus:  # a GPU machine: the real NVML path
        assert inv.source == "nvml" and all(g.uuid.startswith("GPU-") for g in inv.gpus)
    else:
        assert inv.source == "none" and inv.problem


@pytest.mark.slow
def test_each_rank_sees_its_own_devices(distlaunch, tmp_path, inventory_file):
    script = tmp_path / "show.py"
    script.write_text("import os\nprint('devices', os.environ['LOCAL_RANK'], os.environ['CUDA_VISIBLE_DEVICES'])\n")
    result = distlaunch("run", "--gpus-per-rank", "2", str(script),
                        env={"DISTLAUNCH_GPU_INVENTORY": inventory_file})
    assert result.returncode == 0, result.stderr
    seen = dict(re.findall(r"devices (\d) (\S+)", result.stdout))
    assert seen == {"0": "0,1", "1": "2,3"}
    records = result.record()["rank_exits"]
    assert sorted(tuple(r["gpus"]) for r in records.values()) == [("0", "1"), ("2", "3")]


@pytest.mark.slow
def test_use_gpu_without_gpu_runs_on_cpu(distlaunch, tmp_path):
    script = tmp_path / "show.py"
    script.write_text("import os\nprint('visible', os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))\n")
    if inventory({}).gpus:
        pytest.skip("this machine has GPUs")
    result = distlaunch("run", "--use-gpu", "--ppn", "2", str(script))
    assert result.returncode == 0, result.stderr
    assert "no GPU found" in result.stderr and "running on CPU" in result.stderr
    unchanged = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    assert result.stdout.count(f"visible {unchanged}\n") == 2  # the worker pinned nothing
