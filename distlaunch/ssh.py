"""ssh options in one place, and the argv that runs a command on a node.

Every ssh distlaunch starts (its own, rsync's and Open MPI's) uses these options, with
BatchMode (never a password prompt) and a connect timeout. A remote command is an
argv list; ssh hands the remote shell one string, so it is built with ``shlex.join``
(every word quoted), never by pasting text together.
"""
from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .hosts import is_local

CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class SSHOptions:
    config: str | None = None
    port: int | None = None
    key: str | None = None

    def argv(self) -> list[str]:
        """``ssh`` plus options, without the host."""
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}"]
        if self.config:
            argv += ["-F", self.config]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.key:
            argv += ["-i", self.key]
        return argv

    def command_string(self) -> str:
        """The same, as one string for rsync's -e and Open MPI's rsh agent (which split it)."""
        return shlex.join(self.argv())


def on_host(host: str, argv: Sequence[str], ssh: SSHOptions) -> list[str]:
    """argv that runs ``argv`` on ``host``: directly when the host is this machine."""
    if is_local(host):
        return list(argv)
    return [*ssh.argv(), host, "--", shlex.join(argv)]


def agent_argv(python: str, *args: str) -> list[str]:
    return [python, "-m", "distlaunch.remote_agent", *args]


def agent_call(host: str, ssh: SSHOptions, python: str, *args: str, stdin: str | None = None,
               timeout: float = 120) -> tuple[dict[str, Any] | None, subprocess.CompletedProcess[str]]:
    """Run ``python -m distlaunch.remote_agent ARGS`` on ``host``: its JSON answer (None if it
    gave none) and the finished process, for the error message."""
    proc = run_on(host, agent_argv(python, *args), ssh, timeout=timeout, stdin=stdin)
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, proc
    return (answer if isinstance(answer, dict) else None), proc


def run_on(host: str, argv: Sequence[str], ssh: SSHOptions, timeout: float = 120,
           stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` on ``host`` and capture its output (never raises for a failed command)."""
    try:
        return subprocess.run(on_host(host, argv, ssh), input=stdin, capture_output=True, text=True,
                              timeout=timeout, stdin=None if stdin is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), 255, "", f"timed out after {timeout:.0f} s")
    except OSError as exc:
        return subprocess.CompletedProcess(list(argv), 255, "", str(exc))

