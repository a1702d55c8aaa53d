"""One ssh connection per node for a whole run.

A multi-node run reaches each node many times: the node check, the code sync (rsync
and the agent), mpirun's daemons, the cleanup and the collection. Each plain ssh pays a
full handshake. ``SharedConnections`` opens one master connection per node before the
first of them and points every later ssh (distlaunch's, rsync's, Open MPI's and
Hydra's, which all take their options from ``SSHOptions``) at its socket, so they open
a channel on it instead.

- The sockets live in a private folder (mode 0700) of this run, under the temporary
  directory: a Unix socket path must stay under about 100 bytes, which a run folder's
  path may not.
- The masters are this launcher's own children, in their own session (a Ctrl-C at the
  terminal must not cut the connections the cleanup still needs), told to die with the
  launcher (``PR_SET_PDEATHSIG``), and stopped by pid at the end with their folder
  removed: no ssh is left behind.
- Clients keep ``ControlMaster=no``: where a master could not start, they connect on
  their own as before, and the error they meet is the one the user sees.
- ``DISTLAUNCH_SSH_SHARE=0`` turns it off (an sshd that refuses sessions on a shared
  connection, ``MaxSessions 1``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence

from ..plan.ssh import CONNECT_TIMEOUT_S, SSHOptions

log = logging.getLogger("distlaunch")

SHARE_ENV = "DISTLAUNCH_SSH_SHARE"
MAX_SOCKET_DIR = 60  # the dir, '/', and ssh's 40-character %C hash stay well under the 108-byte limit
STOP_GRACE_S = 5.0


def _die_with_parent() -> None:
    """In the master: SIGTERM when the launcher dies, whatever kills it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class SharedConnections:
    """``with SharedConnections(options, hosts) as shared:`` — ``shared`` is ``options``
    pointing at the masters' sockets (``options`` itself when sharing is off or not
    possible here)."""

    def __init__(self, options: SSHOptions, hosts: Sequence[str]) -> None:
        self.options = options
        self.hosts = list(dict.fromkeys(hosts))
        self.folder: str | None = None
        self.masters: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> SSHOptions:
        if not self.hosts or os.environ.get(SHARE_ENV, "1") == "0":
            return self.options
        try:
            folder = tempfile.mkdtemp(prefix="distlaunch-ssh-")  # mode 0700, ours
        except OSError as exc:
            log.info("ssh connections not shared: no private folder for their sockets (%s)", exc)
            return self.options
        if len(folder) > MAX_SOCKET_DIR or any(ch.isspace() for ch in folder):
            os.rmdir(folder)
            log.info("ssh connections not shared: %s is too long or has spaces for a socket path", folder)
            return self.options
        self.folder = folder
        shared = dataclasses.replace(self.options, control_path=os.path.join(folder, "%C"))
        try:
            for host in self.hosts:
                self.masters[host] = subprocess.Popen(
                    [*shared.master_argv(), host], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return shared

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _wait_ready(self) -> None:
        """Until every master that still runs has its socket (or the connect timeout)."""
        assert self.folder is not None
        deadline = time.monotonic() + CONNECT_TIMEOUT_S + 1
        while time.monotonic() < deadline:
            alive = sum(proc.poll() is None for proc in self.masters.values())
            sockets = [name for name in os.listdir(self.folder) if "." not in name]  # not ssh's temporary names
            if len(sockets) >= alive:
                break
            time.sleep(0.01)
        failed = [host for host, proc in self.masters.items() if proc.poll() is not None]
        if failed:
            log.info("no shared ssh connection to %s: each ssh there connects on its own", ", ".join(failed))

    def close(self) -> None:
        """Stop the masters (by pid: they are our children) and remove their folder."""
        for proc in self.masters.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.masters.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.masters = {}
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
