"""GPU inventory and the rank → GPU mapping.

The inventory of a node comes from NVML (``pynvml`` from ``nvidia-ml-py``, imported
lazily). ``DISTLAUNCH_GPU_INVENTORY=FILE`` replaces NVML with a JSON list of devices
(``[{"index": 0, "uuid": "GPU-...", "name": "...", "memory_mib": 81559}, ...]``): for
nodes where NVML cannot be read, and for tests on machines without a GPU. Both go
through ``inventory()``, the one seam the launcher and the worker use.

Local rank r with K GPUs per rank gets devices ``allowed[r*K:(r+1)*K]``, where
``allowed`` is ``--gpus`` if given, else ``CUDA_VISIBLE_DEVICES`` if set, else every
device. The worker exports that choice as ``CUDA_VISIBLE_DEVICES``.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import SpecError
from ..protocol import GPU_INVENTORY

log = logging.getLogger(__name__)
INVENTORY_ENV = GPU_INVENTORY


@dataclass(frozen=True)
class GPU:
    index: int
    uuid: str
    name: str = ""
    memory_mib: int = 0


@dataclass(frozen=True)
class Inventory:
    """What a node has: its GPUs, and why there are none when there are none."""

    gpus: tuple[GPU, ...]
    source: str  # "nvml", "file <path>" or "none"
    driver: str = ""
    problem: str = ""


def _from_file(path: str) -> Inventory:
    try:
        items = json.loads(open(path, encoding="utf-8").read())
        gpus = tuple(GPU(int(d["index"]), str(d["uuid"]), str(d.get("name", "")), int(d.get("memory_mib", 0)))
                     for d in items)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpecError(f"{INVENTORY_ENV}={path}: cannot read a GPU list from it ({exc}): "
                        "fix the file or unset the variable") from None
    return Inventory(gpus, f"file {path}", driver="(from file)")


# where an NVIDIA driver shows itself: host or container (/proc/driver/nvidia, /dev/nvidiactl), WSL (/dev/dxg)
DRIVER_SIGNS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg")


def _from_nvml() -> Inventory:
    if not any(os.path.exists(sign) for sign in DRIVER_SIGNS):  # spares NVML's import and probe on CPU machines
        return Inventory((), "none", problem="no NVIDIA driver here (no /proc/driver/nvidia, /dev/nvidiactl)")
    try:
        import pynvml
    except ImportError:
        return Inventory((), "none", problem="nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return Inventory((), "none", problem=f"NVML unavailable: {exc}")
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total // (1024 * 1024)
            gpus.append(GPU(index, _text(pynvml.nvmlDeviceGetUUID(handle)),
                            _text(pynvml.nvmlDeviceGetName(handle)), int(memory)))
        return Inventory(tuple(gpus), "nvml", driver=_text(driver))
    finally:
        pynvml.nvmlShutdown()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def inventory(env: Mapping[str, str] | None = None) -> Inventory:
    """This node's GPUs (from the JSON file named by DISTLAUNCH_GPU_INVENTORY, else NVML)."""
    env = os.environ if env is None else env
    path = env.get(INVENTORY_ENV)
    return _from_file(path) if path else _from_nvml()


def parse_gpu_list(text: str, where: str = "--gpus") -> tuple[str, ...]:
    """``0,1,3`` or ``GPU-uuid,...`` → ids as CUDA_VISIBLE_DEVICES would name them."""
    ids = tuple(part.strip() for part in text.split(",") if part.strip())
    if not ids:
        raise SpecError(f"{where} {text!r}: no devices listed: write e.g. --gpus 0,1")
    if len(set(ids)) != len(ids):
        raise SpecError(f"{where} {text!r}: a device is listed twice")
    return ids


def allowed_devices(inv: Inventory, gpus: str | None, visible: str | None) -> tuple[str, ...]:
    """The device ids ranks may use on this node, in order."""
    known = {str(g.index) for g in inv.gpus} | {g.uuid for g in inv.gpus}
    if gpus:
        chosen = parse_gpu_list(gpus)
    elif visible:
        chosen = parse_gpu_list(visible, "CUDA_VISIBLE_DEVICES")
    else:
        return tuple(str(g.index) for g in inv.gpus)
    unknown = [d for d in chosen if d not in known]
    if unknown and inv.gpus:
        raise SpecError(f"GPU(s) {', '.join(unknown)} not on this node (it has "
                        f"{', '.join(str(g.index) for g in inv.gpus)}): fix --gpus or CUDA_VISIBLE_DEVICES")
    return chosen


def devices_for(local_rank: int, per_rank: int, allowed: Sequence[str]) -> tuple[str, ...]:
    """The devices of one local rank; SpecError if the node has too few."""
    need = (local_rank + 1) * per_rank
    if need > len(allowed):
        raise SpecError(f"local rank {local_rank} needs GPUs {local_rank * per_rank}..{need - 1} but only "
                        f"{len(allowed)} are available ({','.join(allowed) or 'none'}): lower --ppn or "
                        "--gpus-per-rank, or pass --cpu-only")
    return tuple(allowed[local_rank * per_rank : need])


def check_capacity(ranks_on_host: int, per_rank: int, allowed: Sequence[str], host: str) -> None:
    if ranks_on_host * per_rank > len(allowed):
        raise SpecError(f"{ranks_on_host} rank(s) × {per_rank} GPU(s) on {host} need "
                        f"{ranks_on_host * per_rank} GPUs but it has {len(allowed)}: lower --ppn or "
                        "--gpus-per-rank, or run with --cpu-only")
