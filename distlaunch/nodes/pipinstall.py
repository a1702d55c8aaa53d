"""``--pip PKG`` / ``--requirements FILE`` / ``Job(pip_packages=...)``: install packages into
the ranks' interpreter on every node before the launch.

Each node installs once per distinct set (a hash of the package list and requirements
text, remembered under ``~/.cache/distlaunch/pip`` on the node), so an unchanged set
costs one ssh round trip. pip's output goes to the run's ``logs/pip.log``.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import LaunchFailed
from ..records import open_private
from .transport import Nodes, for_each


def install_key(python: str, packages: Sequence[str], requirements: str) -> str:
    text = json.dumps([python, sorted(packages), requirements])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_packages(nodes: Nodes, hosts: Sequence[str], packages: Sequence[str], requirements: str,
                    log_path: Path, progress: Callable[[str], None]) -> None:
    """Install on every host in parallel; LaunchFailed names the first host that failed."""
    key = install_key(nodes.python, packages, requirements)
    progress(f"installing {len(packages)} package(s){' and requirements' if requirements else ''} "
             f"on {len(hosts)} node(s)")

    def one(host: str) -> dict[str, Any]:
        answer, proc = nodes.call(host, "pip", key, *packages, stdin=requirements, timeout=1800)
        return answer or {"cached": False, "returncode": proc.returncode or 1, "output": proc.stdout + proc.stderr}

    answers = for_each(hosts, one, max_parallel=16)
    with open_private(log_path, "a") as log:
        for host, answer in zip(hosts, answers):
            state = "already installed" if answer["cached"] else f"pip exit {answer['returncode']}"
            log.write(f"=== {host}: {state}\n{answer['output']}\n")
    for host, answer in zip(hosts, answers):
        if answer["returncode"] != 0:
            last = (answer["output"].strip().splitlines() or ["no output"])[-1]
            raise LaunchFailed(f"pip install failed on {host}: {last}: see {log_path}")
    cached = sum(1 for answer in answers if answer["cached"])
    progress(f"packages ready ({cached} of {len(hosts)} node(s) had them already)")


