"""Golden files pin the hostfile, mpirun argv and environment that ``plan()`` produces.

After an intended change, refresh them with:
    DISTLAUNCH_UPDATE_GOLDEN=1 python -m pytest tests/test_plan_golden.py
and review the diff of tests/golden/ before committing.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import REPO

from distlaunch.errors import SpecError
from distlaunch.plan.gpus import GPU, Inventory
from distlaunch.plan.inputs import InputSpec
from distlaunch.plan.layout import RemoteLayout
from distlaunch.plan.mpi import Flavour, MPIInstall
from distlaunch.plan.mpirun import LaunchContext, plan
from distlaunch.plan.placement import place
from distlaunch.plan.spec import JobSpec, TargetSpec, resolve_program
from distlaunch.plan.ssh import SSHOptions

GOLDEN = Path(__file__).parent / "golden"
MPIS = {
    "ompi4": MPIInstall("/opt/ompi4/bin/mpirun", Flavour.OPENMPI, "4.1.4"),
    "ompi5": MPIInstall("/opt/ompi5/bin/mpirun", Flavour.OPENMPI, "5.0.11", bundled=True),
    "mpich": MPIInstall("/opt/mpich/bin/mpirun", Flavour.MPICH, "4.2.0"),
}
NO_GPU = Inventory((), "none", problem="no NVML")
FOUR_GPUS = Inventory(tuple(GPU(i, f"GPU-{i}") for i in range(4)), "file test")
CASES = {
    # name: (TargetSpec, GPU inventory, extra JobSpec fields)
    "local-2": (TargetSpec(ppn=2), NO_GPU, {}),
    "local-8-crowded": (TargetSpec(ppn=8), NO_GPU, {}),
    "two-nodes": (TargetSpec(hosts="node1:4,node2:4"), NO_GPU, {"env": (("OMP_NUM_THREADS", "1"),)}),
    "oversubscribed": (TargetSpec(hosts="node1:2", ppn=4, oversubscribe=True), NO_GPU,
                       {"mpi_args": ("--mca", "btl", "tcp,self")}),
    "two-nodes-gpus": (TargetSpec(hosts="node1:4,node2:4", gpus_per_rank=2), FOUR_GPUS, {}),
    "gpus-restricted": (TargetSpec(gpus="1,3"), FOUR_GPUS, {}),
    "synced-nodes": (TargetSpec(hosts="node1:2,node2:2"), NO_GPU,
                     {"ssh": SSHOptions(config="/etc/ssh/ssh_config", port=2222), "env_pass": ("MY_*",)}),
    "local-in-place": (TargetSpec(ppn=2), NO_GPU, {"in_place": True}),
    "inputs": (TargetSpec(ppn=2), NO_GPU,
               {"inputs": (InputSpec("train", "/shared/train"), InputSpec("vocab", str(REPO / "examples"), True)),
                "script_args": ("--data={inputs.train}", "{inputs.vocab}/x", "{inputs.other}")}),
}
INPUT_PATHS = {"train": "/shared/train", "vocab": "/scratch/inputs/vocab-0123456789abcdef/examples"}
AMBIENT = frozenset({"PATH", "HOME", "MY_SETTING", "SSH_AUTH_SOCK", "NCCL_DEBUG", "OMPI_MCA_foo", "API_TOKEN"})


def render(mpi_name: str, case: str, root: bool) -> str:
    target, inv, extra = CASES[case]
    extra = dict(extra)
    args = extra.pop("script_args", ("--epochs", "1"))
    if "{inputs.other}" in args:  # an unknown input in the arguments is refused ...
        with pytest.raises(SpecError, match="no --input other"):
            JobSpec(str(REPO / "examples" / "train.py"), args, target=target, **extra)
        args = args[:-1]  # ... and the rest is replaced
    spec = JobSpec(str(REPO / "examples" / "train.py"), args, target=target, python="/usr/bin/python3", **extra)
    placed = place(target, env={}, inv=inv)
    ctx = LaunchContext(is_root=root, local_cores=4, ambient_env=AMBIENT if case == "synced-nodes" else frozenset(),
                        input_paths=INPUT_PATHS if case == "inputs" else {})
    remote = RemoteLayout("/scratch", "/scratch/examples-12345678", "RUNID") if case == "synced-nodes" else None
    the_plan = plan(spec, placed, MPIS[mpi_name], "RUNID", "/runs/RUNID", ctx, resolve_program(spec), remote)
    argv = [a.replace(str(REPO), "<repo>") for a in the_plan.argv]
    env = [f"{k}={v}" for k, v in sorted(the_plan.env.items())]
    gpus = [f"rank {s.rank} {s.host} local {s.local_rank} gpus {','.join(s.gpus) or '-'}" for s in placed.slots]
    added = [f"{flags}  # {why}" for flags, why in the_plan.added]
    sections = ["# hostfile", the_plan.hostfile_text.rstrip(), "# argv", *argv, "# env", *env, "# placement", *gpus,
                "# added by distlaunch", *added]
    return "\n".join(sections) + "\n"


@pytest.mark.parametrize("root", [True, False], ids=["root", "user"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mpi_name", sorted(MPIS))
def test_plan_matches_golden(mpi_name, case, root):
    check_golden(f"{mpi_name}-{case}-{'root' if root else 'user'}.txt", render(mpi_name, case, root))


def test_user_btl_choice_wins():
    spec = JobSpec(str(REPO / "examples" / "train.py"), mpi_args=("--mca", "btl", "tcp,self"))
    placed = place(TargetSpec(ppn=2), env={}, inv=NO_GPU)
    program = resolve_program(spec)
    argv = plan(spec, placed, MPIS["ompi5"], "R", "/r", LaunchContext(False, 4), program).argv
    assert argv.count("btl") == 1 and "self,sm" not in argv  # the user's choice only
    ours = JobSpec(str(REPO / "examples" / "train.py"))
    argv = plan(ours, placed, MPIS["ompi5"], "R", "/r", LaunchContext(False, 4), program).argv
    assert "self,sm" in argv  # distlaunch's default on one host
    argv = plan(ours, placed, MPIS["ompi5"], "R", "/r",
                LaunchContext(False, 4, frozenset({"OMPI_MCA_btl"})), program).argv
    assert "self,sm" not in argv


def test_ucx_memory_hooks_are_turned_off_only_where_mpi_uses_no_ucx_and_the_user_did_not_say():
    """The wheel's libmpi loads UCX, whose memory hooks cost every rank ~40 ms as it loads:
    distlaunch turns them off where neither MPI's PML (ob1) nor its one-sided component
    (UCX's excluded) can be UCX, and never over the user's own setting."""
    program = resolve_program(JobSpec(str(REPO / "examples" / "train.py")))

    def events(target: TargetSpec, inv: Inventory = NO_GPU, ambient: frozenset[str] = frozenset(),
               mpi: str = "ompi5", **kwargs: object) -> str | None:
        spec = JobSpec(str(REPO / "examples" / "train.py"), **kwargs)  # type: ignore[arg-type]
        the_plan = plan(spec, place(target, env={}, inv=inv), MPIS[mpi], "R", "/r", LaunchContext(False, 4, ambient),
                        program)
        value = the_plan.env.get("UCX_MEM_EVENTS")
        assert value is None or "UCX_MEM_EVENTS" in the_plan.argv  # exported to every rank
        assert (value == "no") == any(flags == "UCX_MEM_EVENTS=no" for flags, _why in the_plan.added)
        return value

    local = TargetSpec(ppn=2)
    assert events(local) == "no"
    assert events(local, mpi="ompi4") is None  # a site's Open MPI may do one-sided over UCX
    assert events(local, FOUR_GPUS) is None  # device buffers: UCX's PML stays in the running
    assert events(TargetSpec(hosts="node1:2,node2:2")) is None
    assert events(local, mpi_args=("--mca", "osc", "ucx")) is None
    assert events(local, mpi_args=("--mca", "pml", "ucx")) is None
    assert events(local, env=(("UCX_MEM_EVENTS", "yes"),)) == "yes"  # the user's own, passed on as theirs
    assert events(local, mpi_args=("-x", "UCX_MEM_EVENTS=yes")) is None
    assert events(local, ambient=frozenset({"UCX_MEM_EVENTS"})) is None  # the launcher's own, exported as it is
    assert events(local, ambient=frozenset({"UCX_RCACHE_ENABLE"})) is None  # UCX tuned: the program may use it
    assert events(local, env=(("UCC_TLS", "ucp"),)) is None
    assert events(local, mpi_args=("-x", "UCX_TLS")) is None


def test_ob1_is_named_only_for_cpu_ranks_on_this_host_and_never_over_the_users_choice():
    """Nor when the user picked an MTL, which only the cm PML drives; nor on one remote
    host, whose GPUs are not known here."""
    program = resolve_program(JobSpec(str(REPO / "examples" / "train.py")))

    def pml(spec: JobSpec, target: TargetSpec, inv: Inventory = NO_GPU, ambient: frozenset[str] = frozenset(),
            mpi: str = "ompi5") -> list[str]:
        ctx = LaunchContext(False, 4, ambient)
        argv = plan(spec, place(target, env={}, inv=inv), MPIS[mpi], "R", "/r", ctx, program).argv
        return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == "pml"]

    def job(**kwargs: object) -> JobSpec:
        return JobSpec(str(REPO / "examples" / "train.py"), **kwargs)  # type: ignore[arg-type]

    local = TargetSpec(ppn=2)
    assert pml(job(), local) == ["ob1"]
    assert pml(job(), local, mpi="ompi4") == ["ob1"]
    assert pml(job(), local, FOUR_GPUS) == []  # device buffers: UCX stays in the running
    assert pml(job(), TargetSpec(hosts="node1:2,node2:2")) == []  # a fabric may serve better than TCP
    assert pml(job(), TargetSpec(hosts="node1:2")) == []  # one remote host: its GPUs are not known here
    for theirs in (("--mca", "pml", "ucx"), ("-mca", "pml", "ucx"), ("--gmca", "pml", "ucx")):
        assert pml(job(mpi_args=theirs), local) == ["ucx"], theirs
    assert pml(job(mpi_args=("-x", "OMPI_MCA_pml=ucx")), local) == []
    assert pml(job(mpi_args=("--mca", "mtl", "ofi")), local) == []  # an MTL needs the cm PML
    assert pml(job(env=(("OMPI_MCA_pml", "ucx"),)), local) == []
    assert pml(job(), local, ambient=frozenset({"OMPI_MCA_pml"})) == []
    assert pml(job(), local, ambient=frozenset({"OMPI_MCA_mtl"})) == []


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("DISTLAUNCH_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"missing {path}: run with DISTLAUNCH_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), (
        f"output differs from {path.name}; if the change is intended, refresh with "
        "DISTLAUNCH_UPDATE_GOLDEN=1 python -m pytest tests/test_plan_golden.py"
    )


def test_srun_plan_matches_golden():
    """--launcher srun in a 2-node allocation: the step's argv, SLURM_HOSTFILE, env."""
    from distlaunch.plan.hosts import Host, HostSource, assign_slots
    from distlaunch.plan.placement import Placement
    from distlaunch.plan.slurm import srun_plan

    spec = JobSpec(str(REPO / "examples" / "train.py"), ("--epochs", "1"), python="/usr/bin/python3",
                   launcher="srun", env=(("OMP_NUM_THREADS", "1"),))
    source = HostSource((Host("gpu01", 2), Host("gpu02", 2)), "slurm allocation")
    placed = Placement(source, tuple(assign_slots(source)))
    ctx = LaunchContext(is_root=False, local_cores=4, ambient_env=AMBIENT)
    remote = RemoteLayout("/scratch", "/scratch/examples-12345678", "RUNID")
    the_plan = srun_plan(spec, placed, "/usr/bin/srun", "RUNID", "/runs/RUNID", ctx, resolve_program(spec),
                         MPIS["ompi5"], remote)
    argv = [a.replace(str(REPO), "<repo>") for a in the_plan.argv]
    env = [f"{k}={v}" for k, v in sorted(the_plan.env.items())]
    added = [f"{flags}  # {why}" for flags, why in the_plan.added]
    check_golden("srun-two-nodes.txt", "\n".join(["# SLURM_HOSTFILE", the_plan.hostfile_text.rstrip(), "# argv",
                                                   *argv, "# env", *env, "# added by distlaunch", *added]) + "\n")


def test_batch_script_matches_golden():
    from distlaunch.plan.slurm import SlurmTarget, batch_lines, batch_script

    target = SlurmTarget(partition="gpu", time="2:00:00", account="proj42")
    lines = batch_lines(target, 2, 4, "/runs/RUNID/logs/sbatch.log", "distlaunch-train", gpus_per_node=4)
    check_golden("sbatch-two-nodes.txt", batch_script("/venv/bin/python", "/runs/RUNID", lines))


def test_master_address_is_never_a_loopback_alias_across_hosts():
    """--hosts localhost:2,node2:2: node2's ranks must be sent to this machine's name."""
    spec = JobSpec(str(REPO / "examples" / "train.py"))
    placed = place(TargetSpec(hosts="localhost:2,node2:2"), env={}, inv=NO_GPU)
    ctx = LaunchContext(False, 4, local_names=frozenset({"localhost", "127.0.0.1", "::1", "login1", "login1.hpc"}))
    env = plan(spec, placed, MPIS["ompi5"], "R", "/r", ctx, resolve_program(spec)).env
    assert env["DISTLAUNCH_MASTER_ADDR"] == "login1"
    alone = place(TargetSpec(ppn=2), env={}, inv=NO_GPU)
    assert plan(spec, alone, MPIS["ompi5"], "R", "/r", ctx, resolve_program(spec)).env["DISTLAUNCH_MASTER_ADDR"] \
        == "127.0.0.1"


CONTAINER_CASES = {
    # name: (TargetSpec, GPU inventory, remote layout?, extra JobSpec fields)
    "local-2": (TargetSpec(ppn=2), NO_GPU, False, {}),
    "two-nodes-gpus": (TargetSpec(hosts="node1:4,node2:4", gpus_per_rank=2), FOUR_GPUS, True,
                       {"inputs": (InputSpec("train", "/shared/train"),)}),
    "in-place": (TargetSpec(ppn=2), NO_GPU, False, {"in_place": True}),
}
CONTAINER_IMAGES = {"charliecloud": "/images/train", "apptainer": "/images/train.sif",
                    "singularity": "/images/train.sif", "podman": "localhost/train:1"}


@pytest.mark.parametrize("case", sorted(CONTAINER_CASES))
@pytest.mark.parametrize("runtime", sorted(CONTAINER_IMAGES))
def test_container_plan_matches_golden(runtime, case):
    """--container: the runtime's argv in front of each rank's worker, binds and all."""
    from distlaunch.plan.container import Container

    target, inv, synced, extra = CONTAINER_CASES[case]
    spec = JobSpec(str(REPO / "examples" / "train.py"), ("--epochs", "1"), target=target, python="/usr/bin/python3",
                   **extra)
    container = Container(runtime, f"/usr/bin/{runtime if runtime != 'charliecloud' else 'ch-run'}",
                          CONTAINER_IMAGES[runtime], ("/shared/cache:/cache",),
                          "/opt/venv/bin/python" if runtime == "podman" else None)
    ctx = LaunchContext(is_root=False, local_cores=4, input_paths={"train": "/shared/train"} if synced else {},
                        container=container, cwd="/home/me/project")
    remote = RemoteLayout("/scratch", "/scratch/examples-12345678", "RUNID") if synced else None
    the_plan = plan(spec, place(target, env={}, inv=inv), MPIS["ompi5"], "RUNID", "/runs/RUNID", ctx,
                    resolve_program(spec), remote)
    argv = [a.replace(str(REPO), "<repo>") for a in the_plan.argv]
    start = argv.index(container.exe)
    check_golden(f"container-{runtime}-{case}.txt", "\n".join(["# mpirun", *argv[:start], "# rank",
                                                                 *argv[start:]]) + "\n")
