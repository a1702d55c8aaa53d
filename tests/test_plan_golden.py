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

from distlaunch.hosts import HostSource, assign_slots, parse_hosts_arg, resolve
from distlaunch.mpi import Flavour, MPIInstall
from distlaunch.mpirun import LaunchContext, plan
from distlaunch.spec import JobSpec

GOLDEN = Path(__file__).parent / "golden"
MPIS = {
    "ompi4": MPIInstall("/opt/ompi4/bin/mpirun", Flavour.OPENMPI, "4.1.4"),
    "ompi5": MPIInstall("/opt/ompi5/bin/mpirun", Flavour.OPENMPI, "5.0.11"),
    "mpich": MPIInstall("/opt/mpich/bin/mpirun", Flavour.MPICH, "4.2.0"),
}
CASES = {
    # name: (hosts or None for localhost, ppn, oversubscribe, extra spec fields)
    "local-2": (None, 2, False, {}),
    "local-8-crowded": (None, 8, False, {}),
    "two-nodes": ("node1:4,node2:4", None, False, {"env": (("OMP_NUM_THREADS", "1"),)}),
    "oversubscribed": ("node1:2", 4, True, {"mpi_args": ("--mca", "btl", "tcp,self")}),
}


def render(mpi_name: str, case: str, root: bool) -> str:
    hosts, ppn, over, extra = CASES[case]
    spec = JobSpec(str(REPO / "examples" / "train.py"), ("--epochs", "1"), ppn=ppn, hosts=hosts,
                   oversubscribe=over, python="/usr/bin/python3", **extra)
    source = HostSource(parse_hosts_arg(hosts), "--hosts") if hosts else resolve(env={})
    slots = assign_slots(source, spec.nodes, spec.ppn, spec.oversubscribe)
    ctx = LaunchContext(is_root=root, local_cores=4)
    the_plan = plan(spec, slots, MPIS[mpi_name], "RUNID", "/runs/RUNID", ctx)
    argv = [a.replace(str(REPO), "<repo>") for a in the_plan.argv]
    env = [f"{k}={v}" for k, v in sorted(the_plan.env.items())]
    return "\n".join(["# hostfile", the_plan.hostfile_text.rstrip(), "# argv", *argv, "# env", *env]) + "\n"


@pytest.mark.parametrize("root", [True, False], ids=["root", "user"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mpi_name", sorted(MPIS))
def test_plan_matches_golden(mpi_name, case, root):
    text = render(mpi_name, case, root)
    path = GOLDEN / f"{mpi_name}-{case}-{'root' if root else 'user'}.txt"
    if os.environ.get("DISTLAUNCH_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing {path}: run with DISTLAUNCH_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), (
        f"plan() output differs from {path.name}; if the change is intended, refresh with "
        "DISTLAUNCH_UPDATE_GOLDEN=1 python -m pytest tests/test_plan_golden.py"
    )


def test_user_btl_choice_wins():
    spec = JobSpec(str(REPO / "examples" / "train.py"), mpi_args=("--mca", "btl", "tcp,self"))
    slots = assign_slots(resolve(env={}), None, 2)
    argv = plan(spec, slots, MPIS["ompi5"], "R", "/r", LaunchContext(False, 4)).argv
    assert "^ofi" not in argv
    argv = plan(spec, slots, MPIS["ompi5"], "R", "/r",
                LaunchContext(False, 4, frozenset({"OMPI_MCA_btl"}))).argv
    assert "^ofi" not in argv
