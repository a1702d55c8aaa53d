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
- The master's own session runs the node's ONE agent for the whole run (``agent
  serve``): the node check, the sync's prepare, reuse and finish, the cleanup, the
  collection of small folders and the release are a line each way on it instead of an
  ssh session and a Python start each. A session that is gone (or an agent without
  ``serve``) leaves the call to a one-off agent as before, which reports the real
  error. A master outlives its agent while other channels (mpirun's daemons, an
  rsync) are open on it; where the agent could not start at all, the master ends with
  it and that node's ssh connects on its own.
- ``DISTLAUNCH_SSH_SHARE=0`` turns it off (an sshd that refuses sessions on a shared
  connection, ``MaxSessions 1``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import selectors
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional

from ..plan.ssh import CONNECT_TIMEOUT_S, SSHOptions
from .procs import death_signal
from .transport import agent_argv

log = logging.getLogger("distlaunch")

SHARE_ENV = "DISTLAUNCH_SSH_SHARE"
MAX_SOCKET_DIR = 60  # the dir, '/', and ssh's 40-character %C hash stay well under the 108-byte limit
STOP_GRACE_S = 5.0


def _reap(proc: subprocess.Popen[bytes], deadline: float) -> None:
    """Wait for our child ``proc`` until ``deadline`` (monotonic), then SIGKILL it; reaped."""
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


Answer = tuple[Optional[dict[str, Any]], "subprocess.CompletedProcess[str]"]  # no "X | None" here: Python 3.9 runs it


class AgentSession:
    """One node's agent for the whole run (``agent serve`` over the shared connection);
    calls from several threads take turns. ``carries_connection``: the process is the
    node's ssh master itself, which a failed session must not stop (mpirun's daemons and
    rsync ride on it): the session then only closes the agent's input and steps aside,
    and the master is stopped with the others at the end (``SharedConnections``)."""

    def __init__(self, argv: list[str], python: str, carries_connection: bool = False) -> None:
        self.python = python
        self.carries_connection = carries_connection
        self.lock = threading.Lock()
        self.buffer = b""
        self.ready = False
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=death_signal())

    def alive(self) -> bool:
        proc = self.proc
        return proc is not None and proc.poll() is None

    def call(self, args: Sequence[str], stdin: str | None, timeout: float) -> Answer | None:
        """The agent's answer to one command, as a one-off call gives it; None when this
        session cannot take it (gone, or never came up): the caller makes a one-off call."""
        with self.lock:
            proc = self.proc
            if proc is None or proc.poll() is not None:
                return None
            deadline = time.monotonic() + timeout
            if not self.ready:
                if self._line(deadline) is None:
                    self.close()
                    return None
                self.ready = True
            request = json.dumps({"args": list(args), "stdin": stdin or ""}) + "\n"
            try:
                assert proc.stdin is not None
                proc.stdin.write(request.encode("utf-8", "surrogateescape"))
                proc.stdin.flush()
                line = self._line(deadline)
            except OSError:
                self.close()
                return None
            except BaseException:  # Ctrl-C between a request and its answer: never read that answer later
                self.close(grace=0)
                raise
            if line is None:
                timed_out = time.monotonic() >= deadline
                self.close()
                if not timed_out:
                    return None  # the connection or the agent went away: a one-off call says why
                return None, subprocess.CompletedProcess(list(args), 255, "", f"timed out after {timeout:.0f} s")
        try:
            answer = json.loads(line)
        except ValueError:
            return None, subprocess.CompletedProcess(list(args), 1, line, "the agent answered no JSON")
        if not isinstance(answer, dict):
            return None, subprocess.CompletedProcess(list(args), 1, line, "the agent answered no JSON object")
        if "_failed" in answer:
            return None, subprocess.CompletedProcess(list(args), 1, "", str(answer["_failed"]))
        return answer, subprocess.CompletedProcess(list(args), 0, line, "")

    def _line(self, deadline: float) -> str | None:
        """The next line the agent writes, or None at its end or at ``deadline``."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            chunks = [self.buffer]
            while b"\n" not in chunks[-1]:  # a long answer (a packed folder) is read in pieces
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    self.buffer = b"".join(chunks)
                    return None
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    self.buffer = b"".join(chunks)
                    return None
                chunks.append(chunk)
            self.buffer = b"".join(chunks)
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode("utf-8", "surrogateescape")

    def close(self, grace: float = STOP_GRACE_S) -> None:
        """End the session: its agent leaves when its input closes; killed if it does not
        (a session that carries the connection only steps aside)."""
        self.end_input()
        if self.carries_connection:
            self.proc = None
            return
        self.wait(time.monotonic() + grace)

    def end_input(self) -> None:
        """Close the agent's input (it leaves when it has read the rest)."""
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def wait(self, deadline: float) -> None:
        """Until the session's ssh has ended (killed at ``deadline``); then it is gone."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            _reap(proc, deadline)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()


class SharedConnections:
    """``with SharedConnections(options, hosts, python) as shared:`` — ``shared.options``
    are ``options`` pointing at the masters' sockets and ``shared.agents`` the nodes'
    agent sessions (``options`` itself and none when sharing is off or not possible)."""

    def __init__(self, options: SSHOptions, hosts: Sequence[str], python: str) -> None:
        self.options = options
        self.python = python
        self.hosts = list(dict.fromkeys(hosts))
        self.folder: str | None = None
        self.masters: dict[str, subprocess.Popen[bytes]] = {}
        self.agents: dict[str, AgentSession] = {}

    def __enter__(self) -> SharedConnections:
        self.options = self._open()
        return self

    def _open(self) -> SSHOptions:
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
        # started in this (the launching) thread: PR_SET_PDEATHSIG follows the thread, so
        # never start these from a pool thread that ends before the run does
        try:
            for host in self.hosts:  # each master's own session is the node's agent: no channel of its own
                session = AgentSession(shared.master_argv(host, agent_argv(self.python, "serve")), self.python,
                                       carries_connection=True)
                assert session.proc is not None
                self.agents[host], self.masters[host] = session, session.proc
            self._wait_ready()
        except (OSError, subprocess.SubprocessError) as exc:  # no ssh, no file descriptors left, ...
            log.info("ssh connections not shared: %s", exc)
            self.close()
            return self.options
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
        """End the agent sessions, stop the masters (by pid: they are our children) and
        remove their folder; all at once, so that nodes that are gone cost one grace
        period, not one each."""
        agents, masters, self.agents, self.masters = list(self.agents.values()), list(self.masters.values()), {}, {}
        try:
            deadline = time.monotonic() + STOP_GRACE_S
            for agent in agents:
                agent.end_input()
            for agent in agents:
                agent.wait(deadline)
            for proc in masters:
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + STOP_GRACE_S
            for proc in masters:
                _reap(proc, deadline)
        finally:
            for proc in masters:  # a second Ctrl-C above: none is left running all the same
                _reap(proc, 0.0)
                if proc.stdout is not None:  # a master that was its node's agent
                    proc.stdout.close()
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
                self.folder = None
