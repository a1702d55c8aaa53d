"""Real Horovod's Gloo controller and operations under an MPI launcher (``distlaunch
run``, mpirun, srun with a PMI), as ``horovodrun --gloo`` runs them, chosen with
``DISTLAUNCH_HVD_OPS=gloo``.

Horovod's Gloo mode needs what horovodrun provides: its HTTP rendezvous server and the
``HOROVOD_*`` variables that tell each rank its place. Here the ranks provide it
themselves before ``horovod.torch.init()``: the layout comes from MPI (as for the torch
backend), rank 0 serves Horovod's own rendezvous server (``horovod.runner.http``) on
one address (127.0.0.1 when every rank is on this node, never all interfaces) and a
port the OS picks, and MPI tells the others where. The server lives in rank 0's
process as a daemon thread, so nothing outlives the job.
"""
from __future__ import annotations

import os
import socket
import threading
from typing import Any

from .rendezvous import interface_towards, master_address, mpi_topology


def _serve(address: str, plan: list[Any]) -> int:
    """Start Horovod's rendezvous server on ``address``; its port."""
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

    server = RendezvousHTTPServer((address, 0), RendezvousHandler, 0)
    server.init(plan)
    threading.Thread(target=server.serve_forever, name="horovod-rendezvous", daemon=True).start()
    return int(server.server_address[1])


def _resolves(host: str) -> bool:
    try:
        return bool(socket.getaddrinfo(host, None))
    except OSError:
        return False


def prepare(asked: bool) -> str | None:
    """Set this rank's Horovod Gloo variables (collective over MPI's world); None when
    done, else why Gloo cannot be used here and MPI's operations are (only when Gloo was
    the default, not ``asked`` for: then that is an error, the same on every rank).

    Horovod's Gloo process sets (the global set included) make their transport from this
    host's own name, not from HOROVOD_GLOO_IFACE, so every host's name must resolve on it."""
    from horovod.runner.common.util.hosts import SlotInfo

    world, topo = mpi_topology()
    host = socket.gethostname()
    places = world.allgather((host, topo.rank, topo.local_rank, topo.local_size, topo.cross_rank, topo.cross_size,
                              _resolves(host)))
    unresolved = sorted({place[0] for place in places if not place[6]})
    if unresolved:
        why = (f"Horovod's Gloo operations need each host's name to resolve on that host, and "
               f"{', '.join(unresolved)} {'does' if len(unresolved) == 1 else 'do'} not")
        if asked:
            raise RuntimeError(f"{why}: add it to /etc/hosts there, or use MPI's operations (--hvd-ops mpi)")
        return why
    places = [place[:6] for place in places]
    all_local = len({place[0] for place in places}) == 1
    where: tuple[str, int] | None = None
    if topo.rank == 0:
        address = master_address(all_local)
        plan = [SlotInfo(hostname=h, rank=r, local_rank=lr, cross_rank=cr, size=topo.size, local_size=ls,
                         cross_size=cs) for h, r, lr, ls, cr, cs in places]
        where = (address, _serve(address, plan))
    address, port = world.bcast(where, root=0)
    os.environ.update({
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": address,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_IFACE": os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0] or
        (interface_towards(address) or "lo"),
        "HOROVOD_HOSTNAME": host,
        "HOROVOD_RANK": str(topo.rank),
        "HOROVOD_SIZE": str(topo.size),
        "HOROVOD_LOCAL_RANK": str(topo.local_rank),
        "HOROVOD_LOCAL_SIZE": str(topo.local_size),
        "HOROVOD_CROSS_RANK": str(topo.cross_rank),
        "HOROVOD_CROSS_SIZE": str(topo.cross_size),
    })
    return None
