"""Who am I in the job? Rank, size and local rank from the launcher's environment.

Read from torchrun (``RANK`` … with ``TORCHELASTIC_RUN_ID``: the innermost launcher when
it runs inside srun), Open MPI (``OMPI_COMM_WORLD_*``), MPICH/Hydra (``PMI_*``,
``MPI_LOCAL*``), Slurm's srun (``SLURM_PROCID`` …), horovodrun's Gloo mode
(``HOROVOD_RANK`` …) or a bare ``RANK``/``WORLD_SIZE``, in that order; a process started
with none of them is rank 0 of 1. Never derive the local rank from ``rank % ppn``: Open
MPI does not promise that order.
"""
from __future__ import annotations

import os
from collections import namedtuple
from collections.abc import Mapping

from ..protocol import rank_prefix

_SOURCES = (
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
     "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
    ("horovodrun", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
)
TORCHRUN = _SOURCES[-1]
MPI_SOURCES = ("openmpi", "mpich")  # the world comes from MPI itself
PMI_VARIABLES = ("PMIX_RANK", "PMI_RANK", "PMI_FD")  # srun gave the tasks a PMI: MPI can wire up


class RankInfo(namedtuple("RankInfo", "rank size local_rank local_size source pmi",
                          defaults=(0, 1, 0, 1, "single", False))):
    """This process in the job: ``rank`` of ``size``, ``local_rank`` of ``local_size`` on
    its node, the launcher it was read from (``source``: "openmpi", "slurm"... or
    "single"), and ``pmi``: (srun) MPI inside the tasks can find the world through
    Slurm's PMI. An immutable named tuple, not a dataclass: every rank's worker reads it,
    and importing dataclasses (and inspect with it) was a third of the worker's start."""

    __slots__ = ()
    rank: int
    size: int
    local_rank: int
    local_size: int
    source: str
    pmi: bool

    @property
    def prefix(self) -> bytes:
        """Output prefix such as ``[3] `` (padded so that columns line up)."""
        return rank_prefix(self.rank, self.size)


def _slurm_local_size(env: Mapping[str, str], total: int) -> int:
    """Tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE (``2(x3),1``) at SLURM_NODEID."""
    from ..errors import HostError
    from ..plan.hosts import expand_counts

    counts, node = env.get("SLURM_STEP_TASKS_PER_NODE"), env.get("SLURM_NODEID")
    if not counts or node is None:
        return total
    try:
        return expand_counts(counts, "SLURM_STEP_TASKS_PER_NODE")[int(node)]
    except (HostError, ValueError, IndexError):
        return total


def from_environ(env: Mapping[str, str] | None = None) -> RankInfo:
    env = os.environ if env is None else env
    sources = (TORCHRUN, *_SOURCES) if "TORCHELASTIC_RUN_ID" in env else _SOURCES
    for source, rank, size, local_rank, local_size in sources:
        if rank in env and size in env:
            if source == "slurm" and "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
                continue  # a batch script inside an allocation, not an srun task
            total = int(env[size])
            local = int(env.get(local_rank, env[rank]))
            if source == "slurm":
                nlocal = _slurm_local_size(env, total)
            else:
                nlocal = int(env.get(local_size, total))
            return RankInfo(int(env[rank]), total, local, nlocal, source,
                            pmi=source == "slurm" and any(name in env for name in PMI_VARIABLES))
    return RankInfo()
