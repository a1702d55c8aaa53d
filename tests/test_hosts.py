"""Host sources (--hosts, hostfiles, Slurm, PBS, LSF, localhost) and rank placement."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

from distlaunch.errors import HostError
from distlaunch.plan.hosts import (
    Host,
    HostSource,
    assign_slots,
    check_hostname,
    check_hostnames,
    compress_hostlist,
    expand_hostlist,
    hostname,
    parse_hostfile,
    parse_hostfile_text,
    parse_hosts_arg,
    parse_tasks_per_node,
    resolve,
    this_host_names,
)

HOSTLISTS = [
    ("node01", ["node01"]),
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("gpu[01-02],cpu-[1-2]x", ["gpu01", "gpu02", "cpu-1x", "cpu-2x"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("n[008-010]", ["n008", "n009", "n010"]),
    ("login1,compute[1,3,5]", ["login1", "compute1", "compute3", "compute5"]),
    ("r1i0n[0-1],r1i1n0", ["r1i0n0", "r1i0n1", "r1i1n0"]),
]
TASKS = [
    ("4", 1, [4]),
    ("2(x3),1", 4, [2, 2, 2, 1]),
    ("8(x2)", 2, [8, 8]),
    ("1,2,3", 3, [1, 2, 3]),
    ("4(x1),2(x2)", 3, [4, 2, 2]),
]


def test_this_hosts_name_is_socket_s_without_importing_it():
    """hostname() is the kernel's node name, which is what socket.gethostname() returns,
    so a run on this host alone never imports socket (test_light_import checks that)."""
    import socket

    assert hostname() == socket.gethostname()
    assert {hostname(), hostname().split(".")[0], "localhost"} <= this_host_names()


@pytest.mark.parametrize("expr,names", HOSTLISTS)
def test_expand_hostlist(expr, names):
    assert expand_hostlist(expr) == names


@pytest.mark.parametrize("text,count,values", TASKS)
def test_tasks_per_node(text, count, values):
    assert parse_tasks_per_node(text, count) == values


@pytest.mark.parametrize("text", ["", "x", "2(x)", "2(3)", "-1", "2(x3"])
def test_tasks_per_node_junk_is_a_clear_error(text):
    with pytest.raises(HostError, match="SLURM_TASKS_PER_NODE"):
        parse_tasks_per_node(text, 1)


_name = st.from_regex(r"[a-z]{1,4}(-[a-z]{1,3})?[0-9]{0,3}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(_name, min_size=1, max_size=30, unique=True))
def test_expand_compress_round_trip(names):
    assert sorted(expand_hostlist(compress_hostlist(names))) == sorted(names)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_expand_hostlist_junk_never_crashes_unexpectedly(text):
    try:
        result = expand_hostlist(text)
    except HostError as exc:
        assert "hostlist" in str(exc)
    else:
        assert isinstance(result, list)


@pytest.mark.parametrize("path", sorted((REPO / "hostfiles").glob("*.txt")), ids=lambda p: p.name)
def test_every_example_hostfile_parses(path):
    hosts = parse_hostfile(path)
    assert hosts and all(isinstance(h, Host) for h in hosts)


def test_hostfile_syntaxes():
    text = "# comment\n\nbig slots=8 max_slots=16\nsmall slots=2  # trailing\nbare\nmpich:3\n"
    assert parse_hostfile_text(text, "f") == (
        Host("big", 8, 16), Host("small", 2), Host("bare"), Host("mpich", 3),
    )


@pytest.mark.parametrize("text,message", [
    ("a slots=0\n", "f:1: slots=0 must be at least 1"),
    ("a slots=abc\n", "f:1: slots='abc' is not a whole number"),
    ("a slots=2\nb\na slots=1\n", "f: host 'a' is listed twice"),
    ("a\nb gpus=4\n", "f:2: unknown key 'gpus'"),
    ("a slots\n", "f:1: cannot read 'slots'"),
    ("# only comments\n\n", "f: no hosts in the file"),
    ("bad;host slots=1\n", "f:1: 'bad;host' is not a valid host name"),
    ("$(reboot) slots=1\n", "is not a valid host name"),
    ("a:0\n", "f:1: slots=0 must be at least 1"),
])
def test_bad_hostfiles_name_file_and_line(text, message):
    with pytest.raises(HostError) as info:
        parse_hostfile_text(text, "f")
    assert message in str(info.value)


def test_unreadable_hostfile(tmp_path):
    with pytest.raises(HostError, match="cannot read hostfile"):
        parse_hostfile(tmp_path / "missing")
    binary = tmp_path / "bin"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(HostError, match="cannot read hostfile"):
        parse_hostfile(binary)


@pytest.mark.parametrize("text,hosts", [
    ("a:4,b:4", (Host("a", 4), Host("b", 4))),
    ("a,b", (Host("a"), Host("b"))),
    ("10.0.0.1:2", (Host("10.0.0.1", 2),)),
])
def test_hosts_argument(text, hosts):
    assert parse_hosts_arg(text) == hosts


@pytest.mark.parametrize("text", ["a:0", "a:x", "a,,b", "a b:2", "a:2,a:2", "a;rm -rf /:2", "`x`"])
def test_bad_hosts_argument(text):
    with pytest.raises(HostError):
        parse_hosts_arg(text)


def test_slurm_allocation(tmp_path):
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_TASKS_PER_NODE": "4(x2),2"}
    source = resolve(env=env)
    assert source.origin == "slurm allocation"
    assert source.hosts == (Host("gpu01", 4), Host("gpu02", 4), Host("gpu03", 2))
    assert len(assign_slots(source)) == 10


def test_slurm_step_places_from_the_step():
    """``srun -N1 -n1 distlaunch run`` inside ``salloc -N2 -n4``: the job lists two nodes but
    SLURM_TASKS_PER_NODE is the step's; the step's own list and counts are used together."""
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "vm,vm-n2", "SLURM_NODELIST": "vm,vm-n2",
           "SLURM_TASKS_PER_NODE": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "vm",
           "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_JOB_CPUS_PER_NODE": "2(x2)"}
    source = resolve(env=env)
    assert source.origin == "slurm step" and source.hosts == (Host("vm", 1),)


def test_slurm_mismatch_is_explained():
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x2)"}
    with pytest.raises(HostError, match="gives 2 nodes but the node list has 3"):
        resolve(env=env)


def test_a_bad_name_deep_in_a_big_allocation_is_named():
    """The node names are checked in one pass when all are valid; one bad name among
    10,000 is still found and named, as the name-by-name check would."""
    names = [f"node{i:05d}" for i in range(10_000)]
    check_hostnames(names, "SLURM_JOB_NODELIST")
    for bad in ("node..x", "-node", "node;rm", "node\n", "a\nb", "x" * 254, ""):
        broken = names[:7000] + [bad] + names[7000:]
        with pytest.raises(HostError, match="SLURM_JOB_NODELIST: .* is not a valid host name"):
            check_hostnames(broken, "SLURM_JOB_NODELIST")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="ab.-_;\n9 ", max_size=6), max_size=5))
def test_the_one_pass_check_agrees_with_the_name_by_name_check(names):
    def one_by_one() -> bool:
        try:
            for name in names:
                check_hostname(name, "x")
        except HostError:
            return False
        return True

    try:
        check_hostnames(names, "x")
    except HostError:
        assert not one_by_one()
    else:
        assert one_by_one()


def test_a_name_repeated_in_a_slurm_node_list_is_placed_once():
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n[1-3],n2", "SLURM_TASKS_PER_NODE": "2(x3)"}
    assert resolve(env=env).hosts == (Host("n1", 2), Host("n2", 2), Host("n3", 2))


def test_pbs_nodefile(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n1\nn1\nn2\nn2\nn1\n")
    source = resolve(env={"PBS_NODEFILE": str(nodefile)})
    assert source.origin == "pbs" and source.hosts == (Host("n1", 3), Host("n2", 2))


def test_lsf_hostfile_and_mcpu_hosts(tmp_path):
    hostfile = tmp_path / "lsf"
    hostfile.write_text("a\na\nb\n")
    assert resolve(env={"LSB_DJOB_HOSTFILE": str(hostfile)}).hosts == (Host("a", 2), Host("b", 1))
    assert resolve(env={"LSB_MCPU_HOSTS": "a 4 b 2"}).hosts == (Host("a", 4), Host("b", 2))
    with pytest.raises(HostError, match="LSB_MCPU_HOSTS"):
        resolve(env={"LSB_MCPU_HOSTS": "a 4 b"})


def test_precedence(tmp_path):
    hostfile = tmp_path / "hf"
    hostfile.write_text("fromfile slots=2\n")
    slurm = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "s1", "SLURM_TASKS_PER_NODE": "1"}
    assert resolve("cli:1", str(hostfile), slurm).origin == "--hosts"
    assert resolve(None, str(hostfile), slurm).hosts == (Host("fromfile", 2),)
    assert resolve(None, None, slurm).origin == "slurm allocation"
    assert resolve(None, None, {}).origin == "localhost"


def test_nodes_and_ppn():
    source = HostSource((Host("a", 4), Host("b", 4), Host("c", 4)), "test")
    slots = assign_slots(source, nodes=2, ppn=2)
    assert [(s.rank, s.host, s.local_rank) for s in slots] == [
        (0, "a", 0), (1, "a", 1), (2, "b", 0), (3, "b", 1)]
    with pytest.raises(HostError, match="--nodes 4 asks for more hosts than the 3 found"):
        assign_slots(source, nodes=4)
    with pytest.raises(HostError, match="5 ranks on host a is more than its 4 slots .* add --oversubscribe"):
        assign_slots(source, ppn=5)
    assert len(assign_slots(source, ppn=5, oversubscribe=True)) == 15


def test_max_slots_holds_even_with_oversubscribe():
    source = HostSource((Host("a", 2, 3),), "test")
    with pytest.raises(HostError, match="more than its 2 slots"):
        assign_slots(source, ppn=3)
    assert len(assign_slots(source, ppn=3, oversubscribe=True)) == 3
    with pytest.raises(HostError, match="max_slots=3 .* --oversubscribe does not lift"):
        assign_slots(source, ppn=4, oversubscribe=True)


def test_localhost_slots_are_its_usable_cores():
    source = resolve(env={}, local_cores=2)
    assert len(assign_slots(source)) == 1  # one rank unless asked for more
    assert len(assign_slots(source, ppn=2)) == 2
    with pytest.raises(HostError, match="3 ranks on host localhost is more than its 2 usable cores"):
        assign_slots(source, ppn=3)
    assert len(assign_slots(source, ppn=3, oversubscribe=True)) == 3


def test_np_fills_hosts_by_slots_in_order():
    source = HostSource((Host("a", 4), Host("b", 2), Host("c", 4)), "test")
    slots = assign_slots(source, np=5)
    assert [(s.host, s.local_rank, s.local_size) for s in slots] == [
        ("a", 0, 4), ("a", 1, 4), ("a", 2, 4), ("a", 3, 4), ("b", 0, 1)]
    assert [s.host for s in assign_slots(source, np=6, ppn=2)] == ["a", "a", "b", "b", "c", "c"]
    assert [s.host for s in assign_slots(source, np=5, ppn=2)] == ["a", "a", "b", "b", "c"]
    with pytest.raises(HostError, match="-n 11 asks for more ranks than the 10 slots of 3 host"):
        assign_slots(source, np=11)
    spread = assign_slots(source, np=13, oversubscribe=True)
    assert [sum(1 for s in spread if s.host == h) for h in "abc"] == [5, 3, 5]
    with pytest.raises(HostError, match="needs 4 hosts but 3 are available"):
        assign_slots(source, np=7, ppn=2)


def test_hostfile_placement_from_cli(distlaunch, tmp_path):
    hostfile = Path(tmp_path / "hf")
    hostfile.write_text("alpha slots=2\nbeta slots=2\n")
    result = distlaunch("hosts", "--hostfile", str(hostfile), "--cpu-only")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# 4 rank(s) on 2 host(s) from hostfile")
    assert lines[2].split() == ["0", "alpha", "0", "-"]
    assert lines[5].split() == ["3", "beta", "1", "-"]
    bad = distlaunch("hosts", "--hostfile", str(hostfile), "--nodes", "3")
    assert bad.returncode == 2
    assert bad.stderr.startswith("distlaunch: error: --nodes 3 asks for more hosts than the 2 found")


def test_only_files_and_links_travel(tmp_path):
    """A named pipe (or socket, or device) in the source dir is left out: hashing or
    copying one would block."""
    from distlaunch.nodes.treesync import list_files

    (tmp_path / "train.py").write_text("pass\n")
    (tmp_path / "link.py").symlink_to("train.py")
    os.mkfifo(tmp_path / "pipe")
    assert list_files(tmp_path).files == ("link.py", "train.py")


def test_slots_made_on_demand_are_the_ranks_in_order():
    """Slots keeps (host, ranks) per host and makes each RankSlot when asked: by index
    (negative too), slice and iteration alike, GPUs by local rank, equal to the tuple."""
    from distlaunch.plan.hosts import RankSlot, Slots, placement

    slots = Slots([("a", 2), ("b", 3)], [("0",), ("1",), ("2",)])
    expected = (RankSlot(0, "a", 0, 2, ("0",)), RankSlot(1, "a", 1, 2, ("1",)), RankSlot(2, "b", 0, 3, ("0",)),
                RankSlot(3, "b", 1, 3, ("1",)), RankSlot(4, "b", 2, 3, ("2",)))
    assert len(slots) == 5 and tuple(slots) == expected and slots == expected and list(expected) == slots
    assert [slots[i] for i in range(-5, 5)] == list(expected) * 2
    assert slots[1:4] == expected[1:4] and slots[::-2] == expected[::-2]
    with pytest.raises(IndexError):
        slots[5]
    with pytest.raises(IndexError):
        slots[-6]
    assert placement(slots) == [("a", 2), ("b", 3)] == placement(expected)
    assert Slots([("a", 2)]) != Slots([("a", 1), ("a", 1)]) and hash(slots) == hash(Slots(slots.groups, slots.gpu_map))
    assert Slots([]) == () and len(Slots([])) == 0
