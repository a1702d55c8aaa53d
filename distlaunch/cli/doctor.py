"""``distlaunch doctor``: check every node before a multi-node run."""
from __future__ import annotations

import shutil
import sys
from typing import Any

import click

from ..launch.launcher import choose_transport, local_cores
from ..nodes.doctor import run_doctor
from ..nodes.transport import Nodes
from ..plan.container import RUNTIMES, ContainerSpec, choose_runtime, image_arg
from ..plan.hosts import placement
from ..plan.placement import place
from ..plan.spec import default_remote_root
from .options import pop_ssh, pop_target, ssh_options, target_options
from .table import format_table

HELP = """Check that every node can run a job, and say what to fix.

Probes all hosts in parallel over ssh and compares each with this machine: ssh
login, unique hostname, Python path and version, distlaunch/torch/mpi4py/horovod
versions, MPI, rsync, GPUs and driver, free disk under --remote-dir. Exits 1 when
something would break a run, with one line per problem saying what to do.

\\b
Examples:
  distlaunch doctor --hosts node1,node2
  distlaunch doctor --hostfile hostfiles/two-nodes-4-gpus.txt --ssh-key ~/.ssh/cluster
  distlaunch doctor --hosts node1,node2 --container /shared/images/train   # the runtime and image too
"""


def _row(host: str, facts: dict[str, Any] | None) -> list[str]:
    if facts is None:
        return [host, "unreachable", "-", "-", "-", "-", "-", "-"]
    pkgs = facts["packages"]
    versions = "/".join(str(pkgs.get(p) or "-") for p in ("distlaunch", "torch", "mpi4py", "horovod"))
    free = facts.get("free_bytes")
    return [host, facts["hostname"], f"{facts['python']} {facts['python_version']}", versions,
            str(facts.get("mpi") or "-"), "yes" if facts.get("rsync") else "NO",
            f"{facts.get('gpus', 0)} {facts.get('gpu_driver') or ''}".strip(),
            f"{free / (1 << 30):.1f} GiB" if free is not None else "-"]


@click.command("doctor", help=HELP)
@target_options
@ssh_options
@click.option("--container", metavar="IMAGE", help="Also check that every node can run this image.")
@click.option("--container-runtime", type=click.Choice(list(RUNTIMES)),
              help="The image's runtime [default: by the image, as distlaunch run chooses].")
@click.option("--container-python", metavar="PATH", help="The Python inside the image [default: this one's path].")
def doctor_command(**kwargs: Any) -> None:
    container: tuple[str, ...] = ()
    image = kwargs.pop("container")
    runtime, python = kwargs.pop("container_runtime"), kwargs.pop("container_python")
    if image is not None:
        image = image_arg(image)
        spec = ContainerSpec(image, runtime, (), python)
        container = (*choose_runtime(spec, shutil.which), image, python or sys.executable)
    ssh = pop_ssh(kwargs)
    remote_root = kwargs.pop("remote_root") or default_remote_root()
    placed = place(pop_target(kwargs), local_cores=local_cores())
    hosts = [host for host, _ in placement(placed.slots)]
    ssh.validate()
    nodes = Nodes(choose_transport(ssh, origin=placed.source.origin), sys.executable)
    local, reports = run_doctor(nodes, hosts, remote_root, container=container)
    header = ["host", "hostname", "python", "distlaunch/torch/mpi4py/horovod", "mpi", "rsync", "gpus", "free"]
    rows = [header, _row("(this host)", local)] + [_row(r.host, r.facts) for r in reports]
    if container:
        header.append(f"{container[0]} image")
        for row, facts in zip(rows[1:], [local, *(r.facts for r in reports)]):
            found = (facts or {}).get("container")
            row.append("-" if found is None else "NO" if found["problem"] else "yes")
    click.echo(format_table(rows), nl=False)
    problems = [line for report in reports for line in report.problems]
    if local.get("container", {}).get("problem"):
        problems.insert(0, f"this host: {local['container']['problem']}")
    if problems:
        click.echo(f"\n{len(problems)} problem(s):", err=True)
        for line in problems:
            click.echo(f"  {line}", err=True)
        sys.exit(1)
    click.echo(f"\nall {len(reports)} node(s) OK")
