"""Start a simulated node's process inside fresh UTS and mount namespaces.

    unshare --uts --mount --propagation private -- \\
        python -m tests.cluster.nodeinit --hostname node2 --bind SRC:DST [--hide PATH] -- CMD...

Sets the hostname, bind-mounts each SRC over DST (a node-local disk), hides each PATH
behind an empty file (to simulate a node that lacks a tool), then execs CMD.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--bind", action="append", default=[], metavar="SRC:DST")
    parser.add_argument("--hide", action="append", default=[], metavar="PATH")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    socket.sethostname(args.hostname)
    for pair in args.bind:
        src, dst = pair.split(":", 1)
        os.makedirs(dst, exist_ok=True)
        subprocess.run(["mount", "--bind", src, dst], check=True)
    for path in args.hide:
        empty = tempfile.NamedTemporaryFile(prefix="hidden-", delete=False)
        empty.close()
        subprocess.run(["mount", "--bind", empty.name, path], check=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
