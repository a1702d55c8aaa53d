"""A rank's connection to its PMIx server (Open MPI's runtime): Nagle's algorithm off.

PMIx clients talk to their node's server (mpirun's, prted's) over loopback TCP without
``TCP_NODELAY``. ``MPI_Finalize`` sends it two small messages back to back: the second
waits for the first one's acknowledgement, which the server's kernel delays by its
delayed-ACK timer (40 ms on Linux), in every rank that finalizes MPI. ``nodelay()``
switches the algorithm off on this process's connections to the server named in
``PMIX_SERVER_URI*``, and on no other socket: with it, Open MPI 5's finalize took 1-6 ms
instead of 42-49 ms. Nothing else changes: PMIx frames its own messages, only their
packets go out sooner.

The connections are found without touching any socket: the kernel's table of this
network namespace's TCP sockets (``/proc/self/net/tcp``, ``tcp6``) gives each one's peer
and inode, and ``/proc/self/fd`` says which inodes are this process's. The option is then
set with C's ``setsockopt`` on the descriptor itself: wrapping it in a Python socket
would apply ``socket.setdefaulttimeout``'s non-blocking mode to it (Linux with glibc).
"""
from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping

URI_PREFIX = "PMIX_SERVER_URI"  # PMIX_SERVER_URI4, ...41, ...3, ...2, ...21: the same server, per protocol version
IPPROTO_TCP, TCP_NODELAY = 6, 1  # Linux's numbers (netinet/in.h, netinet/tcp.h)


def server_addresses(environ: Mapping[str, str]) -> set[tuple[str, int]]:
    """The (host, port) of every TCP address among ``environ``'s PMIx server URIs, e.g.
    ``prterun-node-123@0.0;tcp4://127.0.0.1:41719`` or ``...;tcp6://[::1]:41719``; the
    host as ``ipaddress`` writes it."""
    found = set()
    for name, uri in environ.items():
        if not name.startswith(URI_PREFIX):
            continue
        for part in uri.split(";")[1:]:
            scheme, sep, where = part.partition("://")
            host, colon, port = where.rpartition(":")
            if not (sep and colon and scheme in ("tcp", "tcp4", "tcp6") and port.isascii() and port.isdigit()):
                continue
            try:
                found.add((str(ipaddress.ip_address(host.strip("[]"))), int(port)))
            except ValueError:  # a name, not an address: PMIx writes addresses
                continue
    return found


def _peer(field: str) -> tuple[str, int]:
    """A ``/proc/net/tcp`` address field (``0100007F:A2A7``: the address's 32-bit words in
    this machine's byte order, then the port) as (host, port)."""
    words, _, port = field.partition(":")  # well formed: the kernel writes it
    raw = b"".join(int(words[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(words), 8))
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(port, 16)


def connections_to(servers: set[tuple[str, int]]) -> list[int]:
    """This process's descriptors of TCP sockets whose peer is one of ``servers``."""
    inodes: dict[str, list[int]] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:[") and name.isdigit():
            inodes.setdefault(link[8:-1], []).append(int(name))
    found = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows, None)  # the header
                for row in rows:
                    fields = row.split()
                    if len(fields) > 9 and fields[9] in inodes and _peer(fields[2]) in servers:
                        found += inodes[fields[9]]
        except OSError:  # no IPv6, no /proc
            continue
    return found


def nodelay(environ: Mapping[str, str] | None = None) -> int:
    """Switch Nagle's algorithm off on this process's TCP connections to its PMIx server
    (``server_addresses``, ``connections_to``); how many it did. Nothing where no server
    is named, or ``/proc`` or glibc is not there."""
    servers = server_addresses(os.environ if environ is None else environ)
    if not servers:
        return 0
    try:
        descriptors = connections_to(servers)
        if not descriptors:
            return 0
        import ctypes

        setsockopt = ctypes.CDLL(None, use_errno=True).setsockopt
    except (OSError, AttributeError):
        return 0
    one = ctypes.c_int(1)
    return sum(setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, ctypes.byref(one), ctypes.sizeof(one)) == 0
               for fd in descriptors)
