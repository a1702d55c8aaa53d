"""Bring the ranks of an MPI-launched job together in torch.distributed, privately.

Rank 0 opens a ``TCPStore`` on a socket it binds itself to ONE address (never all
interfaces), on a port the OS picks, and sends ``(address, port, key)`` to every rank
over MPI. ``key`` is a fresh random token: every key the job uses lives under it
(``PrefixStore``), so a process outside the job that finds the port can neither read
nor plant the job's keys. The address is, in order: 127.0.0.1 when every rank is on
this node; the address of ``GLOO_SOCKET_IFNAME`` when set; ``DISTLAUNCH_MASTER_ADDR``
(rank 0's host from the host list) resolved here, unless a name resolves to loopback;
else this node's first non-loopback IPv4 address. Never
``gethostbyname(gethostname())``: it is 127.0.x.1 on many machines.

Each rank also tells gloo which interface to use (``GLOO_SOCKET_IFNAME``, the one that
reaches rank 0) unless the user chose one, so gloo does not fall back to guessing.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Any

from ..protocol import MASTER_ADDR
from ..rank.rankinfo import RankInfo

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


def _interface_ipv4(name: str) -> str | None:
    import psutil

    for addr in psutil.net_if_addrs().get(name, []):
        if addr.family == socket.AF_INET:
            return str(addr.address)
    return None


def _first_ipv4() -> str:
    import psutil

    for _name, addrs in sorted(psutil.net_if_addrs().items()):
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                return str(addr.address)
    return "127.0.0.1"


def master_address(all_local: bool) -> str:
    """The IP address rank 0's store listens on (see the module's docstring)."""
    if all_local:
        return "127.0.0.1"
    iface = os.environ.get("GLOO_SOCKET_IFNAME")
    if iface and _interface_ipv4(iface.split(",")[0]):
        return str(_interface_ipv4(iface.split(",")[0]))
    name = os.environ.get(MASTER_ADDR)
    if name:
        try:
            address = socket.getaddrinfo(name, None, socket.AF_INET)[0][4][0]
        except (OSError, IndexError):
            address = None
        # a name that resolves to loopback here (localhost, or Debian's 127.0.1.1 line for
        # this machine) would send the other nodes to themselves; an address literal such
        # as 127.0.0.2 is meant as written
        literal = address == name
        if address and (literal or not ipaddress.ip_address(address).is_loopback):
            return str(address)
    return _first_ipv4()


def interface_towards(address: str) -> str | None:
    """The name of the local interface whose address is used to reach ``address``."""
    import psutil

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))  # UDP: no packet is sent
            local = probe.getsockname()[0]
    except OSError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(addr.family == socket.AF_INET and addr.address == local for addr in addrs):
            return name
    if ipaddress.ip_address(local).is_loopback:
        return next((name for name, addrs in psutil.net_if_addrs().items()
                     if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in addrs)), None)
    return None


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


def _listen(address: str) -> int:
    """A listening socket on ``address`` only, port chosen by the OS; its file descriptor."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, 0))
    sock.listen(1024)
    return sock.detach()  # the store owns it from here


def create_store(info: RankInfo) -> tuple[Any, Topology]:
    """A torch.distributed store private to this job, and the job's topology."""
    from datetime import timedelta

    import torch.distributed as dist

    if info.size == 1:
        return dist.HashStore(), single_topology()
    world, topo = mpi_topology()
    timeout = timedelta(seconds=TIMEOUT_S)
    store = None
    offer = None
    if topo.rank == 0:
        address = master_address(topo.local_size == topo.size)
        fd = _listen(address)
        store = dist.TCPStore(address, 0, topo.size, is_master=True, timeout=timeout, wait_for_workers=False,
                              master_listen_fd=fd)
        offer = (address, store.port, secrets.token_hex(16))
    address, port, key = world.bcast(offer, root=0)
    if store is None:
        store = dist.TCPStore(address, port, topo.size, is_master=False, timeout=timeout)
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        iface = interface_towards(address)
        if iface:
            os.environ["GLOO_SOCKET_IFNAME"] = iface
    return dist.PrefixStore(f"distlaunch/{key}/", store), topo
