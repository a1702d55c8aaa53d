"""How the launcher reaches the nodes, and the one helper that does X on every node.

A ``Transport`` turns "run this argv on that host" into a local argv: ``SSHTransport``
outside a scheduler allocation, ``SrunTransport`` inside a Slurm allocation (one
``srun --overlap`` task on the node, so no sshd is needed), and the host itself when
it is this machine. Node checks, code sync, package installs, cleanup and collection
all go through ``Nodes``, which also runs the node agent (``python -m
distlaunch.nodes.agent``) and reads its one-line JSON answer.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from ..plan.hosts import is_local
from ..plan.spec import SAFE_PATH
from ..plan.ssh import SSHOptions

T = TypeVar("T")
R = TypeVar("R")
MAX_PARALLEL = 32


def for_each(items: Iterable[T], fn: Callable[[T], R], max_parallel: int = MAX_PARALLEL) -> list[R]:
    """``fn`` on every item at once (up to ``max_parallel`` threads); results in item order.
    The first exception raised is raised here, after every call has finished."""
    items = list(items)
    if len(items) <= 1:
        return [fn(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor  # not needed by a one-host run

    with ThreadPoolExecutor(max_workers=min(max_parallel, len(items))) as pool:
        return list(pool.map(fn, items))


class Transport(Protocol):
    """Runs commands on other hosts."""

    name: str
    local_names: frozenset[str]

    def remote_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """The local argv that runs ``argv`` on (remote) ``host``."""
        ...

    def rsync_shell(self) -> str:
        """rsync's ``-e`` value: a command that takes the host, then the remote command."""
        ...

    def environment(self) -> dict[str, str] | None:
        """The environment for the commands that reach other hosts (None: ours as it is)."""
        ...


@dataclass(frozen=True)
class SSHTransport:
    options: SSHOptions
    local_names: frozenset[str]
    name: str = "ssh"
    # host -> the run's agent session on it (nodes/sshshare.py), while the run lasts
    agents: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def remote_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        # ssh hands the remote shell one string: every word quoted, never pasted together
        return [*self.options.argv(), host, "--", shlex.join(argv)]

    def rsync_shell(self) -> str:
        return self.options.command_string()

    def environment(self) -> dict[str, str] | None:
        return None


@dataclass(frozen=True)
class SrunTransport:
    """Inside a Slurm allocation: a one-task step on the node, beside the job's own step."""

    job_id: str
    local_names: frozenset[str]
    name: str = "srun"

    def srun(self, host: str | None = None) -> list[str]:
        # --unbuffered: rsync's protocol streams both ways and stalls on srun's line buffering
        argv = ["srun", "--overlap", f"--jobid={self.job_id}", "--nodes=1", "--ntasks=1", "--quiet",
                "--kill-on-bad-exit=1", "--input=all", "--unbuffered"]
        return [*argv, f"--nodelist={host}"] if host else argv

    def remote_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return [*self.srun(host), *argv]

    def rsync_shell(self) -> str:
        # rsync appends the host and then its own command: srun takes the host via -w
        return shlex.join([*self.srun(), "--nodelist"])

    def environment(self) -> dict[str, str] | None:
        """Ours without the SLURM_* of the step we may run in (srun would take the step's
        task counts from them); the job is named with --jobid instead."""
        return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}


def argv_on(transport: Transport, host: str, argv: Sequence[str]) -> list[str]:
    """argv that runs ``argv`` on ``host``: directly when the host is this machine."""
    if is_local(host, transport.local_names):
        return list(argv)
    return transport.remote_argv(host, argv)


def run_on(transport: Transport, host: str, argv: Sequence[str], timeout: float = 120,
           stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` on ``host`` and capture its output (never raises for a failed command)."""
    try:
        remote = not is_local(host, transport.local_names)
        return subprocess.run(argv_on(transport, host, argv), input=stdin, capture_output=True,
                              encoding="utf-8", errors="surrogateescape", timeout=timeout,
                              env=transport.environment() if remote else None,
                              stdin=None if stdin is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), 255, "", f"timed out after {timeout:.0f} s")
    except OSError as exc:
        return subprocess.CompletedProcess(list(argv), 255, "", str(exc))


def agent_argv(python: str, *args: str) -> list[str]:
    return [python, *SAFE_PATH, "-m", "distlaunch.nodes.agent", *args]


@dataclass(frozen=True)
class Nodes:
    """The node agent on every host, through one transport."""

    transport: Transport
    python: str

    def call(self, host: str, *args: str, stdin: str | None = None,
             timeout: float = 120) -> tuple[dict[str, Any] | None, subprocess.CompletedProcess[str]]:
        """The agent's JSON answer (None if it gave none) and the finished process: from
        the run's agent session on ``host`` where there is one, else a one-off agent."""
        session = getattr(self.transport, "agents", {}).get(host)
        if session is not None and session.python == self.python:
            answered = session.call(args, stdin, timeout)
            if answered is not None:
                return answered
        proc = run_on(self.transport, host, agent_argv(self.python, *args), timeout=timeout, stdin=stdin)
        try:
            answer = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return None, proc
        return (answer if isinstance(answer, dict) else None), proc

    def in_session(self, host: str) -> bool:
        """Whether ``host`` has a live agent session for this run (a call costs a round trip,
        not an ssh login and an interpreter)."""
        session = getattr(self.transport, "agents", {}).get(host)
        return session is not None and session.python == self.python and session.alive()

    def call_all(self, hosts: Sequence[str], *args: str, stdin: str | None = None,
                 timeout: float = 120) -> list[tuple[dict[str, Any] | None, subprocess.CompletedProcess[str]]]:
        return for_each(hosts, lambda host: self.call(host, *args, stdin=stdin, timeout=timeout))

    def remote(self, hosts: Iterable[str]) -> list[str]:
        return [host for host in hosts if not is_local(host, self.transport.local_names)]


def last_error(proc: subprocess.CompletedProcess[str], limit: int = 300) -> str:
    """The last line a failed command printed on stderr (or its exit code)."""
    lines = proc.stderr.strip().splitlines()
    return lines[-1][-limit:] if lines else f"exit {proc.returncode}"
