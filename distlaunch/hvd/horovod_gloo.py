"""Real Horovod's Gloo controller and operations under an MPI launcher (``distlaunch
run``, mpirun, srun with a PMI), as ``horovodrun --gloo`` runs them: real Horovod's
default where no rank has CUDA and every host's name resolves, or chosen with
``DISTLAUNCH_HVD_OPS=gloo``.

Horovod's Gloo mode needs what horovodrun provides: its HTTP rendezvous server and the
``HOROVOD_*`` variables that tell each rank its place. Here the ranks provide it
themselves before ``horovod.torch.init()``: the layout comes from MPI (as for the torch
backend), rank 0 serves Horovod's own rendezvous server (``horovod.runner.http``) on
one address (127.0.0.1 when every rank is on this node, never all interfaces) and a
port the OS picks, and MPI tells the others where. The server lives in rank 0's
process as a daemon thread, so nothing outlives the job.

Horovod's store polls: a GET for a key a peer has not put yet answers 404, and the rank
then sleeps 10 ms before asking again. Its init makes six rendezvous (global, local and
cross, then the same for the global process set), and in each one rank is nearly always
first, so a plain server cost every init about 40 ms of sleeps. Here a GET for a key not
there yet waits for its PUT (up to ``LONG_POLL_S``, then 404 as before), so a rendezvous
takes its round trips only. The answers are the same; only when they come differs.
"""
from __future__ import annotations

import os
import socket
import threading
from typing import Any

from .rendezvous import interface_towards, master_address, mpi_topology

SERVER_POLL_S = 0.05
LONG_POLL_S = 1.0  # the longest a GET waits for its key; Horovod's own timeout (30 s) still counts


def _long_poll_server() -> Any:
    """Horovod's rendezvous server class, with GETs that wait for their key (a subclass
    made on first use: horovod is imported only where its Gloo mode runs)."""
    global _server_class
    if _server_class is not None:
        return _server_class
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

    class Handler(RendezvousHandler):
        def _get_value(self, scope: str, key: str) -> bytes | None:
            server = self.server
            with server.arrived:  # holds the store's own lock, as Horovod's GET does
                server.arrived.wait_for(lambda: server.closing or key in server.cache.get(scope, {}),
                                        timeout=LONG_POLL_S)
                return server.cache.get(scope, {}).get(key)

        def _put_value(self, scope: str, key: str, value: bytes) -> None:
            super()._put_value(scope, key, value)
            with self.server.arrived:
                self.server.arrived.notify_all()

    class Server(RendezvousHTTPServer):
        daemon_threads = True  # a GET still waiting never holds up the rank's exit

        def __init__(self, address: tuple[str, int]) -> None:
            super().__init__(address, Handler, 0)
            self.arrived = threading.Condition(self.cache_lock)
            self.closing = False

        def close_waits(self) -> None:
            """Answer every waiting GET now (404 where its key is still missing)."""
            with self.arrived:
                self.closing = True
                self.arrived.notify_all()

    _server_class = Server
    return Server


def _serve(address: str, plan: list[Any]) -> int:
    """Start Horovod's rendezvous server on ``address``; its port."""
    global _server
    server = _long_poll_server()((address, 0))
    server.init(plan)
    # serve_forever notices a shutdown only between polls: its default 0.5 s poll kept
    # every rank 0 waiting up to that long in hvd.shutdown()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": SERVER_POLL_S}, name="horovod-rendezvous",
                     daemon=True).start()
    _server = server  # only once it serves: forget()'s shutdown waits for serve_forever
    return int(server.server_address[1])


def _resolves(host: str) -> bool:
    try:
        return bool(socket.getaddrinfo(host, None))
    except OSError:
        return False


# What the last prepare set, so that a later hvd.init (after hvd.shutdown) starts from
# the environment the process had, not from a rendezvous that is gone.
_before: dict[str, str | None] = {}  # each variable prepare set: its value before
_server: Any = None
_server_class: Any = None


def forget() -> None:
    """Undo the last prepare: its variables leave the environment, its server stops."""
    global _server
    for name, value in _before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _before.clear()
    if _server is not None:
        # serve_forever sees a shutdown only at its next poll: rank 0's hvd.shutdown() waited
        # for that (up to SERVER_POLL_S, ~45 ms measured). Nobody needs the server once
        # Horovod is shut down, so it stops in the background (a daemon: the process's
        # exit does not wait for it either)
        threading.Thread(target=_stop, args=(_server,), name="horovod-rendezvous-stop", daemon=True).start()
        _server = None


def _stop(server: Any) -> None:
    server.close_waits()
    server.shutdown()
    server.server_close()


def prepare(asked: bool, comm: Any = None) -> str | None:
    """Set this rank's Horovod Gloo variables (collective over MPI's world); None when
    done, else why MPI's operations are used instead: only when Gloo was the default and
    not ``asked`` for (then it is an error, raised on every rank alike).

    Gloo is not used when ``hvd.init`` is given a communicator (Horovod runs over that
    MPI communicator), when any rank has CUDA (MPI's for CPU tensors there, as Horovod's
    own default), or when a host's name does not resolve on it (Horovod's Gloo process
    sets, the global set included, make their transport from the host's own name, not
    from HOROVOD_GLOO_IFACE)."""
    import torch
    from horovod.runner.common.util.hosts import SlotInfo

    from ..rank.rankinfo import from_environ

    forget()
    if comm is not None and not (isinstance(comm, (list, tuple)) and not comm):  # [] is the world, as None
        if asked:
            raise ValueError("hvd.init(comm=...) runs Horovod over that MPI communicator, which needs MPI's "
                             "operations: set DISTLAUNCH_HVD_OPS=mpi (distlaunch run --hvd-ops mpi)")
        return "hvd.init was given a communicator, which needs MPI's operations"
    world, topo = mpi_topology(from_environ())
    host = socket.gethostname()
    places = world.allgather((host, topo.rank, topo.local_rank, topo.local_size, topo.cross_rank, topo.cross_size,
                              _resolves(host), torch.cuda.is_available()))
    unresolved = sorted({place[0] for place in places if not place[6]})
    if unresolved:
        why = (f"Horovod's Gloo operations need each host's name to resolve on that host, and "
               f"{', '.join(unresolved)} {'does' if len(unresolved) == 1 else 'do'} not")
        if asked:
            raise RuntimeError(f"{why}: add it to /etc/hosts there, or use MPI's operations (--hvd-ops mpi)")
        return f"{why}; DISTLAUNCH_HVD_OPS=gloo once it does"
    if not asked and any(place[7] for place in places):
        return "the default where a rank has CUDA; DISTLAUNCH_HVD_OPS=gloo for Gloo's"
    places = [place[:6] for place in places]
    all_local = len({place[0] for place in places}) == 1
    where: tuple[str, Any] | None = None
    if topo.rank == 0:
        try:
            address = master_address(all_local)
            plan = [SlotInfo(hostname=h, rank=r, local_rank=lr, cross_rank=cr, size=topo.size, local_size=ls,
                             cross_size=cs) for h, r, lr, ls, cr, cs in places]
            where = (address, _serve(address, plan))
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it, not wait in bcast
            where = ("", f"{type(exc).__name__}: {exc}")
    address, port = world.bcast(where, root=0)
    if not address:
        raise RuntimeError(f"rank 0 could not serve Horovod's Gloo rendezvous ({port}): use MPI's operations "
                           "(--hvd-ops mpi) or fix the cause")
    variables = {
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": address,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": os.environ.get("HOROVOD_CPU_OPERATIONS") or "gloo",  # ccl, say, stays
        "HOROVOD_GLOO_IFACE": os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0] or
        (interface_towards(address) or "lo"),
        "HOROVOD_HOSTNAME": host,
        "HOROVOD_RANK": str(topo.rank),
        "HOROVOD_SIZE": str(topo.size),
        "HOROVOD_LOCAL_RANK": str(topo.local_rank),
        "HOROVOD_LOCAL_SIZE": str(topo.local_size),
        "HOROVOD_CROSS_RANK": str(topo.cross_rank),
        "HOROVOD_CROSS_SIZE": str(topo.cross_size),
    }
    _before.update({name: os.environ.get(name) for name in variables})
    os.environ.update(variables)
    return None
