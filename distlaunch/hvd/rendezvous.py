"""Bring the ranks of an MPI-launched job together in torch.distributed.

Rank 0 opens a ``TCPStore`` on a free port (chosen by the OS, so no race) at an address
the other ranks can reach, and sends ``(address, port)`` to everyone over MPI. The
address is, in order: ``DISTLAUNCH_MASTER_ADDR`` (set by ``distlaunch run`` from the host
list), 127.0.0.1 when every rank is on this node, else this node's first non-loopback
IPv4 address. Never ``gethostbyname(gethostname())``: it is 127.0.0.1 on many machines.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..rankinfo import RankInfo

TIMEOUT_S = float(os.environ.get("DISTLAUNCH_RENDEZVOUS_TIMEOUT", "300"))


@dataclass(frozen=True)
class Topology:
    """Horovod's notion of where a rank sits: local = this node, cross = across nodes."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int


def reachable_address(all_local: bool) -> str:
    explicit = os.environ.get("DISTLAUNCH_MASTER_ADDR")
    if explicit:
        return explicit
    if all_local:
        return "127.0.0.1"
    import socket

    import psutil

    for _name, addrs in sorted(psutil.net_if_addrs().items()):
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                return str(addr.address)
    return "127.0.0.1"


def mpi_topology() -> tuple[Any, Topology]:
    """COMM_WORLD and the local/cross layout, from MPI itself (not from rank % ppn)."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.rank)
    cross = world.Split(color=local.rank, key=world.rank)
    topo = Topology(world.rank, world.size, local.rank, local.size, cross.rank, cross.size)
    local.Free()
    cross.Free()
    return world, topo


def single_topology() -> Topology:
    return Topology(0, 1, 0, 1, 0, 1)


def create_store(info: RankInfo) -> tuple[Any, Topology]:
    """A torch.distributed store shared by all ranks, and the job's topology."""
    from datetime import timedelta

    import torch.distributed as dist

    if info.size == 1:
        return dist.HashStore(), single_topology()
    world, topo = mpi_topology()
    timeout = timedelta(seconds=TIMEOUT_S)
    store = None
    if topo.rank == 0:
        addr = reachable_address(topo.local_size == topo.size)
        store = dist.TCPStore(addr, 0, topo.size, is_master=True, timeout=timeout, wait_for_workers=False)
        addr_port = (addr, store.port)
    else:
        addr_port = None
    addr, port = world.bcast(addr_port, root=0)
    if store is None:
        store = dist.TCPStore(addr, port, topo.size, is_master=False, timeout=timeout)
    return store, topo
