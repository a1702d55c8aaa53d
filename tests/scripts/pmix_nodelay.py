"""For rank scripts in the tests: TCP_NODELAY on each of this process's connections to its
PMIx server (Open MPI's runtime; its addresses from the environment, as
``distlaunch.rank.pmixlink`` reads them), read through Python's socket module, independent
of pmixlink's own C calls. Copy it next to the script; ``nodelay()`` keeps what it needs
bound, so it works from a finalizer during the interpreter's teardown too."""
import os
import socket

from distlaunch.rank import pmixlink

SERVERS = pmixlink.server_addresses(os.environ)  # set when the rank starts


def nodelay(servers=SERVERS, os=os, socket=socket) -> list[int]:
    """The option's value on each connection to the PMIx server, in descriptor order."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            duplicate = os.dup(int(name))
        except OSError:
            continue
        try:
            sock = socket.socket(fileno=duplicate)
        except OSError:
            os.close(duplicate)
            continue
        with sock:
            try:
                if tuple(sock.getpeername()[:2]) in servers:
                    found.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            except OSError:
                pass
    return found
