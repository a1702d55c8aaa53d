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

LINUX_LOOPBACK = "/sys/class/net/lo"  # Linux's loopback interface, whose address is 127.0.0.1
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
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))  # UDP: no packet is sent
            local = probe.getsockname()[0]
    except OSError:
        return None
    if local == "127.0.0.1" and os.path.isdir(LINUX_LOOPBACK):
        return "lo"  # every rank on this node (the common case): no interface table to read
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(addr.family == socket.AF_INET and addr.address == local for addr in addrs):
            return name
    if ipaddress.ip_address(local).is_loopback:
        return next((name for name, addrs in psutil.net_if_addrs().items()
                     if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in addrs)), None)
    return None


class WorldError(RuntimeError):
    """The process was clearly started as one of several, but their world cannot be
    found: one line saying which launcher was seen and what to do."""


def mpi_topology(info: RankInfo | None = None) -> tuple[Any, Topology]:
    """COMM_WORLD and the local/cross layout, from MPI itself (not from rank % ppn);
    WorldError when MPI sees another world than the launcher announced."""
    from mpi4py import MPI

    from ..rank import pmixlink

    try:
        pmixlink.nodelay()  # MPI's finalize at the end: 1-6 ms instead of 40-50
    except Exception:  # noqa: BLE001, S110 - the option left as it was: a slower finalize, nothing else
        pass
    world = MPI.COMM_WORLD
    if info is not None and world.size != info.size:
        library = MPI.Get_library_version().strip().splitlines()[0][:80]
        raise WorldError(
            f"started by {LAUNCHER_NAMES.get(info.source, info.source)} as rank {info.rank} of {info.size}, but "
            f"mpi4py's MPI ({library}) sees {world.size} process(es): start the job with that MPI's mpirun, or point "
            "MPI4PY_LIBMPI at the launcher's libmpi.so (distlaunch run does both)")
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
    world, topo = mpi_topology(info)
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


LAUNCHER_NAMES = {"openmpi": "Open MPI's mpirun", "mpich": "MPICH's mpiexec", "slurm": "srun",
                  "torchrun": "torchrun", "horovodrun": "horovodrun (Gloo mode)", "single": "nothing"}
# launchers whose every child is a rank (not slurmstepd or srun: a batch script is their
# child too, and is rightly a world of one)
PARENT_LAUNCHERS = {"mpirun", "mpiexec", "prterun", "prted", "orterun", "orted", "hydra_pmi_proxy", "torchrun",
                    "horovodrun"}


def parent_launcher() -> str | None:
    """The name of the launcher this process was started by directly, if it is one."""
    try:
        import psutil

        proc = psutil.Process().parent()
        if proc is None:
            return None
        names = {os.path.basename(part) for part in [proc.name(), *proc.cmdline()[:2]]}
        found = names & PARENT_LAUNCHERS
        return sorted(found)[0] if found else None
    except Exception:  # noqa: BLE001 - no answer is no launcher
        return None


def join(backend: str, info: RankInfo | None = None) -> Topology:
    """Join the job's world in torch.distributed (the default process group, ``backend``)
    from whatever launched this process; the topology in Horovod's terms.

    - mpirun (Open MPI, MPICH), srun with a PMI, distlaunch: through MPI (``create_store``);
    - torchrun: its own rendezvous (``env://``: MASTER_ADDR/PORT, its agent's store);
    - srun without a PMI (``--mpi=none``): a store on rank 0's node, the first of the step,
      at a port derived from the job and step ids (like torchrun's, a store any local user
      could reach: prefer --mpi=pmix on a shared cluster);
    - a single process: size 1. Otherwise WorldError, never a silent split."""
    from datetime import timedelta

    import torch.distributed as dist

    from ..rank.rankinfo import from_environ

    info = from_environ() if info is None else info
    timeout = timedelta(seconds=TIMEOUT_S)
    if info.size == 1:
        parent = parent_launcher() if info.source == "single" else None
        if parent is not None:
            raise WorldError(f"started by {parent}, but none of its variables (OMPI_COMM_WORLD_*, PMI_*, "
                             "SLURM_PROCID, RANK/WORLD_SIZE) reached this process: do not clear the environment "
                             "(env -i) between the launcher and Python")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return single_topology()
    if info.source == "horovodrun":
        raise WorldError("started by horovodrun in Gloo mode, whose rendezvous only real Horovod speaks: install "
                         "Horovod (distlaunch install-horovod), or start with 'horovodrun --mpi' or 'distlaunch run'")
    if info.source == "torchrun":
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise WorldError(f"RANK and WORLD_SIZE are set but {name} is not: start with torchrun (which sets "
                                 "all of them), or set MASTER_ADDR and MASTER_PORT too")
        _gloo_towards(os.environ["MASTER_ADDR"])
        dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.size,
                                timeout=timeout)
        return group_topology(info)
    if info.source == "slurm" and not info.pmi:
        store = slurm_store(info, timeout)
        dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.size, timeout=timeout)
        return group_topology(info)
    store, topo = create_store(info)
    dist.init_process_group(backend, store=store, rank=topo.rank, world_size=topo.size, timeout=timeout)
    return topo


def _gloo_towards(address: str) -> None:
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        try:
            resolved = socket.getaddrinfo(address, None, socket.AF_INET)[0][4][0]
        except (OSError, IndexError):
            return
        iface = interface_towards(str(resolved))
        if iface:
            os.environ["GLOO_SOCKET_IFNAME"] = iface


SLURM_PORT_BASE, SLURM_PORTS = 29600, 20000


def slurm_port(env: Any) -> int:
    """The store's port for a step: the same on every task, different between steps."""
    job, step = int(env.get("SLURM_JOB_ID", "0")), int(env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "0")))
    return SLURM_PORT_BASE + (job * 131 + step) % SLURM_PORTS


def slurm_store(info: RankInfo, timeout: Any) -> Any:
    """The store of an srun step without a PMI, on the step's first node (rank 0's)."""
    import hostlist
    import torch.distributed as dist

    env = os.environ
    try:
        nodes = hostlist.expand_hostlist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
    except hostlist.BadHostlist as exc:
        raise WorldError(f"started by srun without a PMI, and its node list cannot be read ({exc}): run srun "
                         "--mpi=pmix, or distlaunch run --launcher srun") from None
    if not nodes:
        raise WorldError("started by srun without a PMI, and SLURM_STEP_NODELIST is not set: run srun --mpi=pmix, "
                         "or distlaunch run --launcher srun")
    if info.rank == 0 and env.get("SLURM_NODEID", "0") != "0":
        raise WorldError("started by srun with rank 0 off the step's first node (a --distribution other than "
                         "block): use srun --mpi=pmix, or the default distribution")
    port = slurm_port(env)
    master = nodes[0]
    all_local = len(nodes) == 1
    try:
        address = "127.0.0.1" if all_local else socket.getaddrinfo(master, None, socket.AF_INET)[0][4][0]
        if not all_local:
            _gloo_towards(address)
        if info.rank == 0:
            return dist.TCPStore(address, port, info.size, is_master=True, timeout=timeout,
                                 wait_for_workers=False, master_listen_fd=_listen_on(address, port))
        return dist.TCPStore(address, port, info.size, is_master=False, timeout=timeout)
    except (OSError, RuntimeError) as exc:
        raise WorldError(f"srun step without a PMI: cannot meet at {master}:{port} ({exc}): use srun --mpi=pmix, "
                         "or distlaunch run --launcher srun") from None


def _listen_on(address: str, port: int) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(1024)
    return sock.detach()


def group_topology(info: RankInfo) -> Topology:
    """Horovod's topology of a group that was not made through MPI: every rank's host
    and local rank gathered over the group itself."""
    import torch.distributed as dist

    mine = (socket.gethostname(), info.local_rank)
    everyone: list[Any] = [None] * info.size
    dist.all_gather_object(everyone, mine)
    local_size = sum(1 for host, _ in everyone if host == mine[0])
    peers = [rank for rank, (_host, local) in enumerate(everyone) if local == info.local_rank]
    return Topology(info.rank, info.size, info.local_rank, local_size, peers.index(info.rank), len(peers))
