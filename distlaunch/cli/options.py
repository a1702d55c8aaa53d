"""Options shared by several commands: where a job runs (hosts, nodes, ranks, GPUs)."""
from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

import click

from ..errors import SpecError
from ..plan.spec import TargetSpec
from ..plan.ssh import SSHOptions

_TARGET_OPTIONS = [
    click.option("--nodes", type=click.IntRange(min=1), help="Number of hosts to use (default: all found)."),
    click.option("--ppn", type=click.IntRange(min=1),
                 help="Ranks per host (default: GPUs per host with GPUs, else the host's slots, else 1)."),
    click.option("-n", "--np", "np", type=click.IntRange(min=1), metavar="N",
                 help="Ranks in all, as mpirun's -n: filling each host's slots in turn (or --ppn per host)."),
    click.option("-H", "--hosts", metavar="H1:N,H2:N", help="Hosts and their slots, e.g. node1:4,node2:4."),
    click.option("--hostfile", metavar="FILE", help="Open MPI (host slots=N) or MPICH (host:N) hostfile."),
    click.option("--oversubscribe", is_flag=True, help="Allow more ranks than slots (or cores)."),
    click.option("--use-gpu/--cpu-only", "use_gpu", default=None,
                 help="Give each rank its own GPU(s) [default: when the node has GPUs]."),
    click.option("--gpus-per-rank", type=click.IntRange(min=1), default=1, show_default=True,
                 help="GPUs given to each rank."),
    click.option("--gpus", metavar="0,1,3", help="Use only these GPUs (indices or UUIDs)."),
]

_SSH_OPTIONS = [
    click.option("--ssh-config", metavar="FILE", help="ssh config file for reaching the nodes."),
    click.option("--ssh-port", type=click.IntRange(1, 65535), help="ssh port of the nodes."),
    click.option("--ssh-key", metavar="FILE", help="ssh private key for the nodes."),
    click.option("--remote-dir", "remote_root", default=None, metavar="DIR",
                 help="Node-local directory the code is synced under, private to you "
                      "[default: /tmp/distlaunch-$USER]."),
]

TARGET_KEYS = ("nodes", "ppn", "np", "hosts", "hostfile", "oversubscribe", "use_gpu", "gpus_per_rank", "gpus")


def target_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the placement options to a click command."""
    for option in reversed(_TARGET_OPTIONS):
        func = option(func)
    return func


def ssh_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options that say how to reach the nodes."""
    for option in reversed(_SSH_OPTIONS):
        func = option(func)
    return func


def pop_ssh(kwargs: dict[str, Any]) -> SSHOptions:
    return SSHOptions(kwargs.pop("ssh_config"), kwargs.pop("ssh_port"), kwargs.pop("ssh_key"))


def pop_remote_root(kwargs: dict[str, Any]) -> dict[str, str]:
    """``remote_root`` as a JobSpec field, only when given (else the per-user default)."""
    root = kwargs.pop("remote_root")
    return {"remote_root": root} if root else {}


def pop_target(kwargs: dict[str, Any]) -> TargetSpec:
    """Take the placement options out of a command's kwargs and build the TargetSpec."""
    return TargetSpec(**{key: kwargs.pop(key) for key in TARGET_KEYS})


_MPI_OPTIONS = [
    click.option("--mpi-arg", "mpi_args", multiple=True, metavar="ARGS",
                 help="Extra mpirun arguments, e.g. \"--mca btl tcp,self\" (repeatable)."),
    click.option("--mpirun", metavar="PATH", help="The mpirun to use (default: beside this Python, then PATH)."),
]


def mpi_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the options that pass through to mpirun."""
    for option in reversed(_MPI_OPTIONS):
        func = option(func)
    return func


def pop_mpi(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``mpi_args`` (each --mpi-arg split into words) and ``mpirun``, as JobSpec fields."""
    return {"mpi_args": split_mpi_args(kwargs.pop("mpi_args")), "mpirun": kwargs.pop("mpirun")}


def split_mpi_args(values: tuple[str, ...]) -> tuple[str, ...]:
    """Each --mpi-arg may carry several words: '--mca btl tcp,self'."""
    words: list[str] = []
    for value in values:
        try:
            words += shlex.split(value)
        except ValueError as exc:
            raise SpecError(f"--mpi-arg {value!r}: {exc}: balance the quotes") from None
    return tuple(words)
