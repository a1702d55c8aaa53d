"""Where a job runs: resolve the host list and place ranks on it.

Host sources, first match wins: ``--hosts``, ``--hostfile``, the scheduler allocation
distlaunch runs inside (Slurm, PBS/Torque, LSF), and finally localhost.
``assign_slots`` turns hosts plus ``--nodes``/``--ppn`` into ``Slots``: a ``RankSlot`` per rank.
Everything here is pure apart from reading the hostfile and scheduler files named.
"""
from __future__ import annotations

import os
import re
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import NamedTuple

from ..errors import HostError

_NAME = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}"
_HOSTNAME = re.compile(_NAME)
_HOSTNAMES = re.compile(rf"{_NAME}(?:\n{_NAME})*")  # names, one per line
LOCALHOST = "localhost"


class Host(NamedTuple):
    """One machine: its name as mpirun will reach it, and what is known of its size.

    ``slots`` is the default rank count and the limit ``--oversubscribe`` lifts; where it
    is unknown, ``cores`` (this machine's usable cores) is that limit. ``max_slots`` is
    a hard limit that holds even with ``--oversubscribe``. A NamedTuple, like
    ``RankSlot``: an allocation of 10,000 nodes makes 10,000 of them.
    """

    name: str
    slots: int | None = None
    max_slots: int | None = None
    cores: int | None = None

    @property
    def soft_limit(self) -> int | None:
        return self.slots or self.cores


@dataclass(frozen=True)
class HostSource:
    """The hosts found and where they came from (for messages and run records)."""

    hosts: tuple[Host, ...]
    origin: str  # "--hosts", "hostfile <path>", "slurm step", "slurm allocation", "pbs", "lsf", "localhost"


class RankSlot(NamedTuple):
    """One rank's place: global rank, host, rank within the host, GPUs it gets (made on
    demand by ``Slots``; a NamedTuple, 2.4x faster to make than a frozen dataclass)."""

    rank: int
    host: str
    local_rank: int
    local_size: int
    gpus: tuple[str, ...] = ()  # CUDA device ids (index or UUID) this rank gets


class Slots(Sequence[RankSlot]):
    """Every rank's ``RankSlot`` in rank order, kept per host (host, ranks on it; GPUs by
    local rank) and made when asked for: an allocation of 80,000 ranks is placed and
    planned without making 80,000 objects (benchmarks/plan_scale.py). Compares equal to
    any sequence of the same slots."""

    __slots__ = ("groups", "gpu_map", "_starts")

    def __init__(self, groups: Sequence[tuple[str, int]], gpu_map: Sequence[tuple[str, ...]] = ()) -> None:
        self.groups = tuple(groups)
        self.gpu_map = tuple(gpu_map)  # the GPUs of local rank i, the same on every host; () on CPU
        self._starts = list(accumulate((count for _, count in self.groups), initial=0))

    def __len__(self) -> int:
        return self._starts[-1]

    def __iter__(self) -> Iterator[RankSlot]:
        gpus = self.gpu_map
        for (host, count), first in zip(self.groups, self._starts):
            for local in range(count):
                yield RankSlot(first + local, host, local, count, gpus[local] if gpus else ())

    def __getitem__(self, index):  # type: ignore[override]  # noqa: ANN001,ANN204
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        rank = index + len(self) if index < 0 else index
        if not 0 <= rank < len(self):
            raise IndexError(f"rank {index} of {len(self)}")
        group = bisect_right(self._starts, rank) - 1
        host, count = self.groups[group]
        local = rank - self._starts[group]
        return RankSlot(rank, host, local, count, self.gpu_map[local] if self.gpu_map else ())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Slots):
            return (self.groups, self.gpu_map) == (other.groups, other.gpu_map)
        if isinstance(other, Sequence) and not isinstance(other, str):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.groups, self.gpu_map))

    def __repr__(self) -> str:
        return f"Slots({len(self)} ranks on {len(self.groups)} host(s))"


def check_hostname(name: str, where: str) -> str:
    """Return ``name`` if it is a plausible host name or IPv4 address, else raise."""
    if not _HOSTNAME.fullmatch(name) or ".." in name:
        raise HostError(
            f"{where}: {name!r} is not a valid host name: use letters, digits, '.', '-' "
            "and '_' only (no spaces or shell characters)"
        )
    return name


def check_hostnames(names: Sequence[str], where: str) -> None:
    """``check_hostname`` for every name, in one pass over them all where every name is
    valid (an allocation of 10,000 nodes), and name by name to find the one that is not."""
    joined = "\n".join(names)
    if joined.count("\n") == len(names) - 1 and _HOSTNAMES.fullmatch(joined) and ".." not in joined:
        return
    for name in names:
        check_hostname(name, where)


def _positive(text: str, what: str, where: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise HostError(f"{where}: {what}={text!r} is not a whole number: write e.g. {what}=4") from None
    if value < 1:
        raise HostError(f"{where}: {what}={value} must be at least 1")
    return value


def _no_duplicates(hosts: Sequence[Host], where: str) -> tuple[Host, ...]:
    seen: set[str] = set()
    for host in hosts:
        if host.name in seen:
            raise HostError(
                f"{where}: host {host.name!r} is listed twice: list each host once "
                "and give its rank count with slots=N (or host:N)"
            )
        seen.add(host.name)
    return tuple(hosts)


def parse_hosts_arg(text: str) -> tuple[Host, ...]:
    """Parse ``--hosts``: ``a:4,b:4`` or ``a,b`` (slots then come from --ppn)."""
    hosts = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise HostError(f"--hosts {text!r}: empty host name: write e.g. --hosts node1:4,node2:4")
        name, sep, slots = part.partition(":")
        check_hostname(name, "--hosts")
        hosts.append(Host(name, _positive(slots, "slots", f"--hosts {part!r}") if sep else None))
    return _no_duplicates(hosts, "--hosts")


def parse_hostfile_text(text: str, where: str) -> tuple[Host, ...]:
    """Parse Open MPI / DeepSpeed (``host slots=N max_slots=M``) or MPICH (``host:N``) lines."""
    hosts = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        at = f"{where}:{number}"
        first, *rest = line.split()
        name, sep, count = first.partition(":")
        slots: int | None = _positive(count, "slots", at) if sep else None
        max_slots: int | None = None
        for item in rest:
            key, eq, value = item.partition("=")
            if not eq:
                raise HostError(f"{at}: cannot read {item!r}: write 'host slots=N'")
            if key in ("slots", "cpu"):
                slots = _positive(value, key, at)
            elif key == "max_slots":
                max_slots = _positive(value, key, at)
            else:
                raise HostError(f"{at}: unknown key {key!r}: use slots=N or max_slots=N")
        check_hostname(name, at)
        hosts.append(Host(name, slots, max_slots))
    if not hosts:
        raise HostError(f"{where}: no hosts in the file: add lines such as 'node1 slots=4'")
    return _no_duplicates(hosts, where)


def parse_hostfile(path: str | os.PathLike[str]) -> tuple[Host, ...]:
    """Read and parse a hostfile; errors name the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HostError(f"cannot read hostfile {str(path)!r}: {exc}: check the path") from None
    return parse_hostfile_text(text, str(path))


def _counted(names: Sequence[str], where: str) -> tuple[Host, ...]:
    """Hosts from one-line-per-slot lists (PBS, LSF): order kept, repeats become slots."""
    counts: dict[str, int] = {}
    for name in names:
        counts[check_hostname(name, where)] = counts.get(name, 0) + 1
    return tuple(Host(name, slots) for name, slots in counts.items())


def expand_hostlist(expr: str, where: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a Slurm hostlist expression such as ``gpu[01-04,07],cpu-[1-2]x``."""
    import hostlist  # python-hostlist, imported lazily

    try:
        names: list[str] = hostlist.expand_hostlist(expr, allow_duplicates=True)
    except hostlist.BadHostlist as exc:
        raise HostError(f"cannot expand hostlist {expr!r}: {exc}: check {where}") from None
    return list(dict.fromkeys(names))  # a repeated name once, first place kept


def compress_hostlist(names: Sequence[str]) -> str:
    """The inverse of ``expand_hostlist`` (order kept as far as the notation allows)."""
    import hostlist

    return str(hostlist.collect_hostlist(list(names)))


def expand_counts(text: str, name: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand a Slurm count list (``2(x3),1``) to one number per node."""
    values: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise HostError(f"cannot read {name}={text!r}: expected forms like 2(x3),1")
        values += [int(match.group(1))] * int(match.group(2) or 1)
    return values


def parse_tasks_per_node(text: str, count: int, name: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """``expand_counts``, checked against the number of nodes in the node list."""
    values = expand_counts(text, name)
    if len(values) != count:
        raise HostError(
            f"{name}={text!r} gives {len(values)} nodes but the node list has "
            f"{count}: check the Slurm environment"
        )
    return values


SLURM_STEP = "slurm step"
SLURM_JOB = "slurm allocation"
SLURM_HOSTS = "--hosts of the slurm allocation"  # some of its nodes, named (a sweep's packed trials)


def from_slurm(env: Mapping[str, str]) -> HostSource:
    """The nodes and task counts of the Slurm step we run in (``srun ... distlaunch``), or
    else of the whole allocation (``salloc``/``sbatch``): never one paired with the other."""
    if env.get("SLURM_STEP_NODELIST"):
        nodelist, list_name = env["SLURM_STEP_NODELIST"], "SLURM_STEP_NODELIST"
        per_node, per_name = env.get("SLURM_STEP_TASKS_PER_NODE"), "SLURM_STEP_TASKS_PER_NODE"
        origin = SLURM_STEP
    else:
        list_name = "SLURM_JOB_NODELIST" if env.get("SLURM_JOB_NODELIST") else "SLURM_NODELIST"
        nodelist = env.get(list_name, "")
        per_name = "SLURM_TASKS_PER_NODE" if env.get("SLURM_TASKS_PER_NODE") else "SLURM_JOB_CPUS_PER_NODE"
        per_node, origin = env.get(per_name), SLURM_JOB
    names = expand_hostlist(nodelist, list_name)
    check_hostnames(names, list_name)
    if not per_node:
        return HostSource(tuple(map(Host, names)), origin)
    slots = parse_tasks_per_node(per_node, len(names), per_name)
    return HostSource(tuple(map(Host, names, slots)), origin)


def from_pbs(env: Mapping[str, str]) -> tuple[Host, ...]:
    path = env["PBS_NODEFILE"]
    try:
        lines = Path(path).read_text(encoding="utf-8").split()
    except OSError as exc:
        raise HostError(f"cannot read PBS_NODEFILE {path!r}: {exc}: check the PBS environment") from None
    return _counted(lines, f"PBS_NODEFILE {path}")


def from_lsf(env: Mapping[str, str]) -> tuple[Host, ...]:
    path = env.get("LSB_DJOB_HOSTFILE")
    if path and Path(path).is_file():
        return _counted(Path(path).read_text(encoding="utf-8").split(), f"LSB_DJOB_HOSTFILE {path}")
    words = env.get("LSB_MCPU_HOSTS", "").split()
    if len(words) % 2:
        raise HostError(f"cannot read LSB_MCPU_HOSTS={env['LSB_MCPU_HOSTS']!r}: expected 'host N' pairs")
    return _no_duplicates(
        [
            Host(check_hostname(name, "LSB_MCPU_HOSTS"), _positive(n, "slots", "LSB_MCPU_HOSTS"))
            for name, n in zip(words[::2], words[1::2])
        ],
        "LSB_MCPU_HOSTS",
    )


def resolve(
    hosts: str | None = None,
    hostfile: str | None = None,
    env: Mapping[str, str] | None = None,
    local_cores: int | None = None,
) -> HostSource:
    """Find the hosts to run on, first source that applies wins. ``local_cores`` (the
    usable cores of this machine) is the slot limit of the localhost default."""
    env = os.environ if env is None else env
    if hosts:
        given = parse_hosts_arg(hosts)
        return HostSource(given, SLURM_HOSTS if _allocation_has(env, given) else "--hosts")
    if hostfile:
        return HostSource(parse_hostfile(hostfile), f"hostfile {hostfile}")
    if env.get("SLURM_JOB_ID") and (env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")):
        return from_slurm(env)
    if env.get("PBS_NODEFILE"):
        return HostSource(from_pbs(env), "pbs")
    if env.get("LSB_DJOB_HOSTFILE") or env.get("LSB_MCPU_HOSTS"):
        return HostSource(from_lsf(env), "lsf")
    return HostSource((Host(LOCALHOST, cores=local_cores),), "localhost")


def _allocation_has(env: Mapping[str, str], hosts: Sequence[Host]) -> bool:
    """Whether we run inside a Slurm allocation and every one of ``hosts`` is its node:
    they are then reached as steps of it, as the whole allocation would be."""
    if not (env.get("SLURM_JOB_ID") and (env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST"))):
        return False
    try:
        nodes = {host.name for host in from_slurm(env).hosts}
    except HostError:
        return False
    return all(host.name in nodes for host in hosts)


def leave_out(source: HostSource, nodes: int | None, avoid: Mapping[str, str],
              min_nodes: int | None = None) -> tuple[HostSource, int | None, tuple[str, ...]]:
    """``source`` without the hosts in ``avoid`` (host -> why), when enough others remain:
    ``nodes`` of them (every host when None), or at least ``min_nodes``; then the node
    count to place on, and the hosts left out. Otherwise ``source`` as it is. Pure."""
    if not avoid:
        return source, nodes, ()
    dropped = tuple(host.name for host in source.hosts if host.name in avoid)
    if not dropped:
        return source, nodes, ()
    kept = tuple(host for host in source.hosts if host.name not in avoid)
    needed = len(source.hosts) if nodes is None else nodes
    if len(kept) >= needed:
        return HostSource(kept, source.origin), nodes, dropped
    if kept and min_nodes is not None and len(kept) >= min_nodes:
        return HostSource(kept, source.origin), len(kept) if nodes is not None else None, dropped
    return source, nodes, ()


def assign_slots(
    source: HostSource,
    nodes: int | None = None,
    ppn: int | None = None,
    oversubscribe: bool = False,
    np: int | None = None,
) -> Slots:
    """Place ranks on the first ``nodes`` hosts: ``ppn`` on each (default: the host's
    slots, else 1), or ``np`` in all, filling each host up to its slots in turn."""
    available = source.hosts
    if nodes is not None and nodes > len(available):
        raise HostError(
            f"--nodes {nodes} asks for more hosts than the {len(available)} found "
            f"({source.origin}): give more hosts or lower --nodes"
        )
    chosen = available[: len(available) if nodes is None else nodes]
    if np is None:
        counts = [ppn or host.slots or 1 for host in chosen]
    elif ppn is not None:
        counts = _even_counts(np, ppn, chosen, source.origin)
    else:
        counts = _filled_counts(np, chosen, oversubscribe, source.origin)
    for host, count in zip(chosen, counts):
        limit = host.slots or host.cores
        if host.max_slots is not None or (limit is not None and count > limit):
            _check_limits(host, count, oversubscribe, source.origin)
    return Slots([(host.name, count) for host, count in zip(chosen, counts)])


def _check_limits(host: Host, count: int, oversubscribe: bool, origin: str) -> None:
    if host.max_slots is not None and count > host.max_slots:
        raise HostError(
            f"{count} ranks on host {host.name} is more than its max_slots={host.max_slots} ({origin}), "
            "which --oversubscribe does not lift: lower --ppn/-n or raise max_slots"
        )
    limit = host.soft_limit
    if limit is not None and count > limit and not oversubscribe:
        what = f"{limit} slots" if host.slots else f"{limit} usable cores"
        raise HostError(
            f"{count} ranks on host {host.name} is more than its {what} ({origin}): "
            "lower --ppn/-n, or add --oversubscribe"
        )


def _even_counts(np: int, ppn: int, hosts: Sequence[Host], origin: str) -> list[int]:
    """``-n np --ppn ppn``: ppn ranks on each host in turn, the last one takes the rest."""
    needed = -(-np // ppn)
    if needed > len(hosts):
        raise HostError(f"-n {np} with --ppn {ppn} needs {needed} hosts but {len(hosts)} are available "
                        f"({origin}): lower -n, raise --ppn or give more hosts")
    return [min(ppn, np - i * ppn) for i in range(needed)]


def _filled_counts(np: int, hosts: Sequence[Host], oversubscribe: bool, origin: str) -> list[int]:
    """``-n np`` alone: fill each host up to its slots (1 when unknown), as mpirun maps by
    slot; with --oversubscribe spread what is left evenly over the hosts."""
    counts = []
    left = np
    for host in hosts:
        take = min(left, host.soft_limit or 1)
        counts.append(take)
        left -= take
    if left and not oversubscribe:
        total = np - left
        raise HostError(f"-n {np} asks for more ranks than the {total} slots of {len(hosts)} host(s) "
                        f"({origin}): lower -n, give more hosts, or add --oversubscribe")
    for i in range(left):
        counts[i % len(counts)] += 1
    while counts and counts[-1] == 0:
        counts.pop()
    return counts


def placement(slots: Sequence[RankSlot]) -> list[tuple[str, int]]:
    """(host, ranks on it) in rank order: what a hostfile needs."""
    if isinstance(slots, Slots):
        merged: dict[str, int] = {}
        for host, count in slots.groups:
            merged[host] = merged.get(host, 0) + count
        return list(merged.items())
    counts: dict[str, int] = {}
    for slot in slots:
        counts[slot.host] = counts.get(slot.host, 0) + 1
    return list(counts.items())


LOCAL_ALIASES = frozenset({LOCALHOST, "127.0.0.1", "::1"})


def hostname() -> str:
    """This machine's name, as ``socket.gethostname()`` gives it (the kernel's node name),
    without importing socket, which a run on this host alone has no other use for."""
    return os.uname().nodename


def this_host_names() -> frozenset[str]:
    """The names that mean this machine: the loopback aliases and its hostname."""
    here = hostname()
    return LOCAL_ALIASES | {here, here.split(".")[0]}


def is_local(name: str, local_names: frozenset[str] | None = None) -> bool:
    """True when ``name`` is this machine (so no ssh or sync is needed). Pure when the
    names are given (the plan passes its context's)."""
    return name in (this_host_names() if local_names is None else local_names)
