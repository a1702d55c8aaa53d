"""ssh options in one place: the argv every ssh distlaunch starts is built here.

distlaunch's own ssh, rsync's and Open MPI's all use these options, with BatchMode
(never a password prompt) and a connect timeout. Open MPI and rsync take the ssh
command as one string that they split on spaces, so option values containing
whitespace cannot travel safely: they are refused with a clear message instead.
"""
from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import SpecError

CONNECT_TIMEOUT_S = 10
ALIVE_INTERVAL_S, ALIVE_COUNT = 5, 3  # a run's master gives up on a silent node after 15 s
_CONTROL_PATH = re.compile(r"(?:^| )-o ControlPath=\S+")


def unshared(text: str) -> str:
    """``text`` (an argv word, a variable's value) without the run's ``-o ControlPath=...``:
    the record says what ran, not where a connection's socket lived for a while."""
    return _CONTROL_PATH.sub("", text)


@dataclass(frozen=True)
class SSHOptions:
    config: str | None = None
    port: int | None = None
    key: str | None = None
    # the socket of this run's shared connection to each node (nodes/sshshare.py); set by
    # the launcher for the run's duration, never part of what the user asked for
    control_path: str | None = field(default=None, compare=False)

    def validate(self) -> None:
        """SpecError for a missing file or a path Open MPI would split apart."""
        for flag, path in (("--ssh-config", self.config), ("--ssh-key", self.key)):
            if path is None:
                continue
            if not os.path.isfile(path):
                raise SpecError(f"{flag} {path!r} does not exist: check the path")
            if any(ch.isspace() for ch in path) or any(ch in path for ch in "'\"\\"):
                raise SpecError(f"{flag} {path!r} contains whitespace or quotes, which Open MPI and rsync "
                                "split apart: link or copy it to a path without them")

    def argv(self) -> list[str]:
        """``ssh`` plus options, without the host."""
        # never a master: a connection-sharing master started by a client would outlive
        # the run and carry its tag; the run's own masters are started apart (sshshare)
        sharing = ["-o", f"ControlPath={self.control_path}"] if self.control_path else ["-o", "ControlPersist=no"]
        return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
                "-o", "ControlMaster=no", *sharing, *self._user_options()]

    def master_argv(self, host: str, command: Sequence[str] | None = None) -> list[str]:
        """``ssh`` to ``host`` as the master of ``control_path``, holding the connection open
        until it is stopped, or running ``command`` there (the master then lasts until that
        command and every channel on it have ended)."""
        assert self.control_path is not None
        # keep-alives: a master on a node that died leaves (and its clients connect on
        # their own, under ConnectTimeout) instead of holding them on a dead connection
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
                "-o", "ControlMaster=yes", "-o", "ControlPersist=no", "-o", f"ControlPath={self.control_path}",
                "-o", f"ServerAliveInterval={ALIVE_INTERVAL_S}", "-o", f"ServerAliveCountMax={ALIVE_COUNT}",
                *self._user_options()]
        # ssh hands the remote shell one string: every word quoted, never pasted together
        return [*argv, host, "--", shlex.join(command)] if command else [*argv, "-N", host]

    def _user_options(self) -> list[str]:
        argv = []
        if self.config:
            argv += ["-F", self.config]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.key:
            argv += ["-i", self.key]
        return argv

    def command_string(self) -> str:
        """The same, as one string for rsync's -e and Open MPI's rsh agent (which split it;
        ``validate`` has made sure no value contains a space)."""
        return shlex.join(self.argv())
