"""The first process of a simulated node: hostname, private /tmp and /dev/shm, then a tiny init.

    unshare --uts --mount --pid --fork --mount-proc --propagation private -- \\
        python -m tests.cluster.nodeinit --hostname node2 --tmp DIR [--share PATH] [--hide PATH] -- CMD...

Inside its own UTS, mount and PID namespaces it sets the hostname, makes DIR the node's
/tmp (a node-local disk) with each ``--share`` PATH still visible at the same place,
hides each ``--hide`` PATH behind an empty file (a node that lacks a tool), then runs
CMD as its child and stays PID 1 of the node: it reaps orphans, passes SIGTERM on,
and leaves when CMD does. Killing it ends every process of the node, as a real
machine going down would.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import tempfile


def mount_bind(src: str, dst: str, recursive: bool = False) -> None:
    subprocess.run(["mount", "--rbind" if recursive else "--bind", src, dst], check=True)


def private_tmp(folder: str, shared: list[str]) -> None:
    """``folder`` becomes /tmp, with each shared path bound into it at the same place
    (paths outside /tmp stay visible anyway; one inside another shared path is covered)."""
    done: list[str] = []
    for path in sorted(os.path.abspath(p) for p in shared):
        if not path.startswith("/tmp/") or any(path.startswith(d + "/") or path == d for d in done):
            continue
        done.append(path)
        inside = os.path.join(folder, os.path.relpath(path, "/tmp"))
        os.makedirs(inside, exist_ok=True)
        mount_bind(path, inside)
    os.chmod(folder, 0o1777)
    mount_bind(folder, "/tmp", recursive=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--tmp", required=True, help="this node's own /tmp")
    parser.add_argument("--share", action="append", default=[], metavar="PATH", help="a /tmp path the node sees too")
    parser.add_argument("--hide", action="append", default=[], metavar="PATH")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    socket.sethostname(args.hostname)
    for path in args.hide:
        empty = tempfile.NamedTemporaryFile(prefix="hidden-", delete=False)
        empty.close()
        mount_bind(empty.name, path)
    private_tmp(args.tmp, args.share)
    # and a /dev/shm of its own, as a real node has (shared-memory segments, and
    # Charliecloud's --join peer groups, must not meet another node's)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777,size=1g", "tmpfs", "/dev/shm"], check=True)
    child = subprocess.Popen(command)
    signal.signal(signal.SIGTERM, lambda signum, _frame: child.send_signal(signum))
    while True:  # PID 1: reap every orphan until the command itself is gone
        try:
            pid, _status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child.pid:
            break


if __name__ == "__main__":
    main()
