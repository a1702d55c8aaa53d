"""Where a run's code and records live on the nodes (``RemoteLayout``), as plain paths.

On each node, under ``--remote-dir`` ROOT (node-local scratch, one per user)::

    ROOT/<name>-<hash of the source path>/runs/<run-id>/   the run's working directory
                                          .../.distlaunch-run/  rank logs and exit records
                                          .../.distlaunch-run/attempt-<K>/  those of restart K
    ROOT/<name>-<hash>/latest -> runs/<run-id>           the last synced run

Pure: the plan and the node transports both read these paths; nothing here touches a node.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ..protocol import AGENT_DIR


@dataclass(frozen=True)
class RemoteLayout:
    root: str  # --remote-dir
    base: str  # ROOT/<name>-<hash>
    run_id: str
    attempt: int = 0  # restarts so far (--max-restarts): each attempt keeps its records apart

    @property
    def workdir(self) -> str:
        return f"{self.base}/runs/{self.run_id}"

    @property
    def agent_dir(self) -> str:
        return f"{self.workdir}/{AGENT_DIR}" + (f"/attempt-{self.attempt}" if self.attempt else "")

    @classmethod
    def for_source(cls, remote_root: str, source: str, run_id: str, attempt: int = 0) -> RemoteLayout:
        """The layout for an absolute source path: one project folder per source directory."""
        tag = hashlib.sha256(source.encode()).hexdigest()[:8]
        name = re.sub(r"[^A-Za-z0-9._-]", "_", source.rstrip("/").rsplit("/", 1)[-1]) or "source"
        root = remote_root.rstrip("/") or "/"
        return cls(root, f"{root}/{name}-{tag}", run_id, attempt)
