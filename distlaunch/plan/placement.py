"""``place()``: a TargetSpec resolved to ranks on hosts, with their GPUs.

Shared by ``distlaunch run`` (and its ``--dry-run``) and ``distlaunch hosts``. The GPU
inventory is this node's; other nodes are assumed to have the same devices until their
workers look for themselves (each worker maps its own rank on its own node).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .gpus import Inventory, allowed_devices, check_capacity, devices_for, inventory
from .hosts import HostSource, Slots, assign_slots, leave_out, placement, resolve
from .spec import TargetSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    source: HostSource
    slots: Slots
    gpu_mode: bool = False
    gpus_per_rank: int = 1
    restricted: tuple[str, ...] | None = None  # devices the user narrowed to (--gpus / CUDA_VISIBLE_DEVICES)
    note: str = ""  # one line worth telling the user (e.g. why we run on CPU)
    left_out: tuple[str, ...] = ()  # hosts kept out for their health (``avoid``)

    @property
    def nhosts(self) -> int:
        return len(placement(self.slots))


def place(target: TargetSpec, env: Mapping[str, str] | None = None, inv: Inventory | None = None,
          local_cores: int | None = None, avoid: Mapping[str, str] | None = None,
          min_nodes: int | None = None) -> Placement:
    """Resolve the hosts and place every rank; ``local_cores`` limits localhost's slots.
    Hosts in ``avoid`` (host -> why: node health) are left out while enough others remain
    (``hosts.leave_out``), down to ``min_nodes``."""
    env = os.environ if env is None else env
    source = resolve(target.hosts, target.hostfile, env, local_cores)
    source, nodes, left_out = leave_out(source, target.nodes, avoid or {}, min_nodes)
    if left_out:
        log.info("leaving out %s: %s", ", ".join(left_out), "; ".join(f"{h}: {(avoid or {})[h]}" for h in left_out))

    def slots_for(ppn: int | None) -> Slots:
        return assign_slots(source, nodes, ppn, target.oversubscribe, target.np)

    if target.use_gpu is False:
        return Placement(source, slots_for(target.ppn), left_out=left_out)
    inv = inventory(env) if inv is None else inv
    visible = env.get("CUDA_VISIBLE_DEVICES") or None
    allowed = allowed_devices(inv, target.gpus, visible)
    if not inv.gpus:
        note = ""
        if target.use_gpu or target.gpus:
            note = f"no GPU found ({inv.problem or 'none listed'}): running on CPU"
            log.info(note)
        return Placement(source, slots_for(target.ppn), note=note, left_out=left_out)
    per_rank = target.gpus_per_rank
    ppn = target.ppn or max(1, len(allowed) // per_rank)
    slots = slots_for(ppn)
    for host, count in placement(slots):
        check_capacity(count, per_rank, allowed, host)
    most = max((count for _, count in slots.groups), default=0)
    mapped = Slots(slots.groups, [devices_for(local, per_rank, allowed) for local in range(most)])
    restricted = allowed if (target.gpus or visible) else None
    return Placement(source, mapped, True, per_rank, restricted, left_out=left_out)
