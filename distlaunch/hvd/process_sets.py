"""Horovod's process sets on torch.distributed: a ``ProcessSet`` is a list of global
ranks with a torch process group of its own; collectives given ``process_set=`` run
over its members only (Average divides by its size, ranks inside it count from 0).

As in Horovod: sets are given to ``hvd.init(process_sets=[...])``, or added and removed
later by every rank at once when ``HOROVOD_DYNAMIC_PROCESS_SETS=1``; the global set
(id 0, every rank) always exists; a rank outside a set may not use it.
"""
from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from .core import run, state, topo


class ProcessSet:
    """The ranks of a process set (``hvd.ProcessSet([0, 2])``); usable once registered."""

    def __init__(self, ranks_or_comm: Any) -> None:
        if hasattr(ranks_or_comm, "Get_group"):  # an mpi4py communicator, as Horovod accepts
            from mpi4py import MPI

            world = MPI.COMM_WORLD.Get_group()
            ranks = MPI.Group.Translate_ranks(ranks_or_comm.Get_group(), list(range(ranks_or_comm.size)), world)
        else:
            ranks = list(ranks_or_comm)
        self.ranks: list[int] = sorted(int(r) for r in ranks)
        self.process_set_id: int | None = None
        self.group: Any = None  # the torch group; None for the global set (the default group)

    def _registered(self) -> bool:
        return self.process_set_id is not None and state.process_sets.get(self.process_set_id) is self

    def size(self) -> int | None:
        """Number of ranks in the set (None before it is registered)."""
        return len(self.ranks) if self._registered() else None

    def rank(self) -> int | None:
        """This rank's position in the set (ValueError outside it, None before it is registered)."""
        if not self._registered():
            return None
        me = topo().rank
        if me not in self.ranks:
            raise ValueError("Process is not part of provided process set.")
        return self.ranks.index(me)

    def included(self) -> bool | None:
        return topo().rank in self.ranks if self._registered() else None

    def __str__(self) -> str:  # Horovod's text; equality stays identity, as in Horovod
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks}, mpi_comm=None)"


global_process_set = ProcessSet([])


def setup(process_sets: Any) -> None:
    """At init: the global set, then the ones given (the same list on every rank), or
    ``"dynamic"`` to allow adding sets later, as HOROVOD_DYNAMIC_PROCESS_SETS=1 does."""
    global_process_set.ranks = list(range(topo().size))
    global_process_set.process_set_id = 0
    state.process_sets[0] = global_process_set
    state.dynamic_sets = process_sets == "dynamic" or os.environ.get(
        "HOROVOD_DYNAMIC_PROCESS_SETS", "").lower() in ("1", "true", "yes", "on")
    for ps in process_sets if isinstance(process_sets, (list, tuple)) else []:
        _register(ps)


def _register(ps: ProcessSet) -> ProcessSet:
    size = topo().size
    bad = [r for r in ps.ranks if r < 0 or r >= size]
    if bad or not ps.ranks:
        raise ValueError(f"Tried to register process set with invalid rank: {bad[0] if bad else 'none given'}")
    if len(set(ps.ranks)) != len(ps.ranks) or any(e.ranks == ps.ranks for e in state.process_sets.values()):
        raise ValueError(f"Attempted to add a duplicate process set: {ps}")
    ps.group = dist.new_group(ps.ranks)  # every rank calls new_group, members or not
    ps.process_set_id = next(i for i in range(1, len(state.process_sets) + 2) if i not in state.process_sets)
    state.process_sets[ps.process_set_id] = ps
    return ps


def _dynamic(doing: str) -> None:
    if not state.dynamic_sets:
        raise ValueError(f"Set HOROVOD_DYNAMIC_PROCESS_SETS=1 to allow {doing} process sets after Horovod "
                         "initialization.")


def add_process_set(process_set: Any) -> ProcessSet:
    """Register a set with every rank at once (``HOROVOD_DYNAMIC_PROCESS_SETS=1``)."""
    topo()
    _dynamic("adding")
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    return _register(ps)


def remove_process_set(process_set: ProcessSet) -> bool:
    """Unregister a set with every rank at once; False if it was not registered."""
    topo()
    _dynamic("removing")
    if process_set.process_set_id in (None, 0) or not process_set._registered():
        return False

    def remove() -> None:  # behind the set's queued collectives, which still need its group
        del state.process_sets[process_set.process_set_id]
        process_set.process_set_id, process_set.group = None, None

    run(remove)
    return True


def resolve(process_set: Any, what: str = "Collective") -> ProcessSet | None:
    """None for the global set; the registered set this rank belongs to otherwise."""
    if process_set is None or process_set is global_process_set:
        return None
    if not isinstance(process_set, ProcessSet) or not process_set._registered():
        raise ValueError(f"{process_set} is not a registered process set: pass it to hvd.init(process_sets=...) "
                         "or hvd.add_process_set() first")
    if topo().rank not in process_set.ranks:
        raise ValueError(f"{what}: Rank {topo().rank} is not a member of the provided process set.")
    return process_set
