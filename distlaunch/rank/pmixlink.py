"""A rank's connection to its PMIx server (Open MPI's runtime): Nagle's algorithm off.

PMIx clients talk to their node's server (mpirun's, prted's) over loopback TCP without
``TCP_NODELAY``. ``MPI_Finalize`` sends it two small messages back to back: the second
waits for the first one's acknowledgement, which the server's kernel delays by its
delayed-ACK timer (40 ms on Linux), in every rank that finalizes MPI. ``nodelay()``
switches the algorithm off on this process's connections to the server named in
``PMIX_SERVER_URI*``, and on no other socket: with it, Open MPI 5's finalize took 1-6 ms
instead of 42-49 ms. Nothing else changes: PMIx frames its own messages, only their
packets go out sooner.

The connections are found and changed through C's socket calls on this process's own
descriptors (``getsockopt``, ``getpeername``, ``setsockopt``: Linux with glibc), among
those ``/proc/self/fd`` shows as sockets: wrapping one in a Python socket would apply
``socket.setdefaulttimeout``'s non-blocking mode to it, and the kernel's table of TCP
sockets (``/proc/net/tcp``) lists the whole host's, not this process's.
"""
from __future__ import annotations

import _socket  # its constants only: the socket module's classes are not used
import ipaddress
import os
import sys
from collections.abc import Mapping

URI_PREFIX = "PMIX_SERVER_URI"  # PMIX_SERVER_URI4, ...41, ...3, ...2, ...21: the same server, per protocol version


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
                address = ipaddress.ip_address(host.strip("[]").partition("%")[0])  # no scope: getpeername has none
            except ValueError:  # a name, not an address: PMIx writes addresses
                continue
            found.add((str(address), int(port)))
    return found


def _address(raw: bytes) -> tuple[str, int] | None:
    """A ``sockaddr`` as ``getpeername`` fills it, as (host, port): IPv4, or IPv6 (an
    IPv4 address mapped into it as IPv4, without a scope); None for any other family."""
    family = int.from_bytes(raw[:2], sys.byteorder)
    if family == _socket.AF_INET and len(raw) >= 8:
        return str(ipaddress.IPv4Address(raw[4:8])), int.from_bytes(raw[2:4], "big")
    if family == _socket.AF_INET6 and len(raw) >= 24:
        address = ipaddress.IPv6Address(raw[8:24])
        return str(address.ipv4_mapped or address), int.from_bytes(raw[2:4], "big")
    return None


def connections_to(servers: set[tuple[str, int]]) -> list[int]:
    """This process's descriptors of connected TCP (stream) sockets whose peer is one of
    ``servers``; none where ``/proc`` or glibc is not there."""
    import ctypes

    try:
        names = os.listdir("/proc/self/fd")
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return []
    raw = ctypes.create_string_buffer(128)
    length = ctypes.c_uint32()
    kind = ctypes.c_int()
    kind_length = ctypes.c_uint32()
    found = []
    for name in names:
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
        except OSError:  # closed meanwhile
            continue
        fd = int(name)
        length.value, kind_length.value = len(raw), ctypes.sizeof(kind)
        if libc.getsockopt(fd, _socket.SOL_SOCKET, _socket.SO_TYPE, ctypes.byref(kind), ctypes.byref(kind_length)) \
                or kind.value != _socket.SOCK_STREAM or libc.getpeername(fd, raw, ctypes.byref(length)):
            continue  # not a stream socket, not connected, or gone
        if _address(raw.raw[:length.value]) in servers:
            found.append(fd)
    return found


def nodelay(environ: Mapping[str, str] | None = None) -> int:
    """Switch Nagle's algorithm off on this process's TCP connections to its PMIx server
    (``server_addresses``, ``connections_to``); how many it did. Nothing where no server
    is named, or ``/proc`` or glibc is not there."""
    servers = server_addresses(os.environ if environ is None else environ)
    descriptors = connections_to(servers) if servers else []
    if not descriptors:
        return 0
    import ctypes

    setsockopt = ctypes.CDLL(None, use_errno=True).setsockopt
    one = ctypes.c_int(1)
    return sum(setsockopt(fd, _socket.IPPROTO_TCP, _socket.TCP_NODELAY, ctypes.byref(one), ctypes.sizeof(one)) == 0
               for fd in descriptors)
