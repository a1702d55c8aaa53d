"""Multi-node runs on a cluster in a box: simulated nodes with their own hostname, sshd,
loopback address and scratch disk (tests/cluster). Real ssh, rsync and mpirun."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, SCRIPTS, backends, horovod_available

from distlaunch.nodes.procs import python_rank
from tests.cluster.cluster import Cluster, make, missing_tools

pytestmark = pytest.mark.slow
# The simulated nodes share this machine's cores: unbind ranks, or Horovod's busy
# background threads starve each other on the cores both nodes think they own.
UNBIND = ["--mpi-arg", "--bind-to none"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two simulated nodes: started here (root), or the ones DISTLAUNCH_TEST_CLUSTER names
    (started by root for an unprivileged user's run, see .ci/run)."""
    given = os.environ.get("DISTLAUNCH_TEST_CLUSTER")
    if given:
        yield Cluster.load(Path(given))
        return
    missing = missing_tools()
    if missing:
        pytest.skip(f"cluster in a box needs {', '.join(missing)}")
    # the nodes see this machine's files but have a /tmp of their own: share what must
    # stay visible there (the tests' folders, and this Python and checkout if under /tmp)
    shared = [str(tmp_path_factory.getbasetemp()), sys.prefix, str(REPO)]
    box = make(tmp_path_factory.mktemp("cluster"), 2, shared=shared)
    box.up()
    yield box
    box.down()


@pytest.fixture
def project(tmp_path):
    """A small source tree with the example script, an ignored file and a .gitignore."""
    src = tmp_path / "project"
    src.mkdir()
    shutil.copy(REPO / "examples" / "train.py", src / "train.py")
    shutil.copy(SCRIPTS / "rank_file.py", src / "rank_file.py")
    (src / "data.txt").write_text("some data\n")
    (src / ".gitignore").write_text("*.ckpt\nscratch/\n")
    (src / "big.ckpt").write_text("never synced\n")
    (src / "scratch").mkdir()
    (src / "scratch" / "junk").write_text("never synced\n")
    return src


def launch(cluster, cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 240):
    argv = [sys.executable, "-m", "distlaunch", "run", "--hosts", ",".join(f"{h}:2" for h in cluster.hosts),
            "--ssh-config", str(cluster.ssh_config), *UNBIND, *args]
    proc = subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          errors="replace", timeout=timeout)
    runs = sorted((cwd / "runs").iterdir()) if (cwd / "runs").is_dir() else []
    record = json.loads((runs[-1] / "run.json").read_text()) if runs else {}
    return proc, (runs[-1] if runs else None), record


def node_copy(cluster, node_index: int, record: dict) -> Path:
    """The run's working directory as node ``node_index`` sees it, from this machine."""
    return cluster.nodes[node_index].path(record["sync"]["remote_dir"])


@pytest.mark.parametrize("backend", backends())
def test_training_across_two_nodes(cluster, project, tmp_path, backend):
    proc, run_dir, record = launch(cluster, tmp_path, str(project / "train.py"), "--epochs", "2",
                                   env={"DISTLAUNCH_HVD_BACKEND": backend})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"training on 4 rank(s) with the {backend} backend" in proc.stdout
    if backend == "horovod":  # the simulated nodes' names resolve nowhere: Horovod's Gloo would abort there
        assert ("with MPI operations (DISTLAUNCH_HVD_BACKEND=horovod; Horovod's Gloo operations need each host's "
                "name to resolve on that host, and node2, node3 do not" in proc.stdout + proc.stderr), proc.stderr
    assert record["status"] == "completed" and record["nodes"] == 2
    hosts = {r["host"] for r in record["rank_exits"].values()}
    assert hosts == {"node2", "node3"}
    for rank in range(4):  # every rank's log and exit record came back, from the node it ran on
        assert (run_dir / "logs" / f"rank-{rank}.log").exists()
        exit_record = json.loads((run_dir / "ranks" / f"rank-{rank}.json").read_text())
        assert exit_record["exit_code"] == 0 and exit_record["host"] == ("node2" if rank < 2 else "node3")
    assert "training on 4 rank(s)" in (run_dir / "logs" / "rank-0.log").read_text()
    assert (run_dir / "outputs" / "model.pt").is_file()  # rank 0's ./outputs came back
    for index in (0, 1):
        copy = node_copy(cluster, index, record)
        assert (copy / "train.py").read_text() == (project / "train.py").read_text()
        assert (copy / "data.txt").exists()
        assert not (copy / "big.ckpt").exists() and not (copy / "scratch").exists()


@pytest.mark.skipif(not horovod_available(), reason="Horovod is not installed (distlaunch install-horovod)")
def test_gloo_operations_asked_for_where_they_cannot_work_say_why(cluster, project, tmp_path):
    proc, _, _ = launch(cluster, tmp_path, str(project / "train.py"), "--epochs", "1",
                        env={"DISTLAUNCH_HVD_BACKEND": "horovod", "DISTLAUNCH_HVD_OPS": "gloo"})
    assert proc.returncode != 0
    assert ("node2, node3 do not: add it to /etc/hosts there, or use MPI's operations (--hvd-ops mpi)"
            in proc.stdout + proc.stderr), proc.stdout[-2000:] + proc.stderr[-2000:]


def test_resync_sends_only_the_changed_file(cluster, project, tmp_path):
    proc, _, first = launch(cluster, tmp_path, str(project / "rank_file.py"), env={"OUT_DIR": "."})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (project / "data.txt").write_text("changed data\n")
    proc, _, second = launch(cluster, tmp_path, str(project / "rank_file.py"), env={"OUT_DIR": "."})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for node in second["sync"]["nodes"]:
        assert node["sent"] == 1, second["sync"]
        assert node["files"] == first["sync"]["nodes"][0]["files"]
    assert (node_copy(cluster, 1, second) / "data.txt").read_text() == "changed data\n"


def test_failure_on_node_two_still_brings_everything_back(cluster, project, tmp_path):
    script = project / "fail_late.py"
    script.write_text(
        "import os, sys, time\n"
        "rank = int(os.environ['RANK'])\n"
        "os.makedirs('outputs', exist_ok=True); os.makedirs('logs', exist_ok=True)\n"
        "if rank == 0:\n"
        "    open('outputs/partial.txt', 'w').write('rank 0 was here')\n"
        "    open('logs/user.log', 'w').write('user log line')\n"
        "print('rank', rank, 'working', flush=True)\n"
        "if rank == 3:\n"
        "    time.sleep(1)\n"
        "    sys.exit(5)\n"
        "time.sleep(30)\n"
    )
    proc, run_dir, record = launch(cluster, tmp_path, str(script))
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert record["status"] == "failed"
    assert record["first_failure"]["rank"] == 3 and record["first_failure"]["host"] == "node3"
    assert (run_dir / "outputs" / "partial.txt").read_text() == "rank 0 was here"
    assert (run_dir / "logs" / "user.log").read_text() == "user log line"
    for rank in range(4):
        assert f"rank {rank} working" in (run_dir / "logs" / f"rank-{rank}.log").read_text()


def test_collect_all_ranks(cluster, project, tmp_path):
    script = project / "every.py"
    script.write_text("import os\nos.makedirs('outputs', exist_ok=True)\n"
                      "open(f\"outputs/r{os.environ['RANK']}\", 'w').write('x')\n")
    proc, run_dir, _ = launch(cluster, tmp_path, "--collect-all-ranks", str(script))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "outputs" / "127.0.0.2").iterdir()) == ["r0", "r1"]
    assert sorted(p.name for p in (run_dir / "outputs" / "127.0.0.3").iterdir()) == ["r2", "r3"]


def doctor(cluster) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "distlaunch", "doctor", "--hosts", ",".join(cluster.hosts),
                           "--ssh-config", str(cluster.ssh_config)], capture_output=True, text=True, timeout=120)


def test_doctor_passes_on_a_healthy_box(cluster):
    proc = doctor(cluster)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "node2" in proc.stdout and "node3" in proc.stdout and "all 2 node(s) OK" in proc.stdout


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to restart a simulated node")


@needs_root
def test_doctor_finds_missing_rsync(cluster):
    node = cluster.nodes[1]
    cluster.restart_node(node, hide=[shutil.which("rsync")])
    try:
        proc = doctor(cluster)
        assert proc.returncode == 1
        assert "127.0.0.3: rsync is missing: install it there" in proc.stderr
    finally:
        cluster.restart_node(node)


@needs_root
def test_doctor_finds_other_torch_version(cluster, tmp_path):
    fake = tmp_path / "fake-site"
    (fake / "torch-1.0.0.dist-info").mkdir(parents=True)
    (fake / "torch-1.0.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 1.0.0\n")
    node = cluster.nodes[0]
    cluster.restart_node(node, env={"PYTHONPATH": str(fake)})
    try:
        proc = doctor(cluster)
        assert proc.returncode == 1
        assert "127.0.0.2: torch 1.0.0 but" in proc.stderr and "install torch==" in proc.stderr
    finally:
        cluster.restart_node(node)


@needs_root
def test_unreachable_node_is_named_before_launch(cluster, project, tmp_path):
    node = cluster.nodes[1]
    cluster.stop_node(node)
    try:
        proc = doctor(cluster)
        assert proc.returncode == 1 and "127.0.0.3: ssh failed" in proc.stderr
        proc, run_dir, _ = launch(cluster, tmp_path, str(project / "rank_file.py"), timeout=120)
        assert proc.returncode == 2
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("distlaunch: error: node check failed: 127.0.0.3: ssh failed")
        assert run_dir is None  # nothing was created
        # with --max-restarts the sick node is recorded and left out, and the job runs without it
        env = {"DISTLAUNCH_STATE_DIR": str(tmp_path / "state"), "OUT_DIR": "."}
        proc, run_dir, record = launch(cluster, tmp_path, "--max-restarts", "1", "--min-nodes", "1",
                                       str(project / "rank_file.py"), env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "leaving out 127.0.0.3 before the launch: node check failed: 127.0.0.3: ssh failed" in proc.stderr
        assert [slot["host"] for slot in record["slots"]] == ["127.0.0.2", "127.0.0.2"]
        nodes = subprocess.run([sys.executable, "-m", "distlaunch", "nodes"], env={**os.environ, **env},
                               capture_output=True, text=True)
        assert nodes.stdout.splitlines()[1].startswith("127.0.0.3 ") and "ssh failed" in nodes.stdout
    finally:
        cluster.start_node(node)


REMOTE_CELLS = [  # fault, fault rank, extra args, exit code, status
    ("exception", 3, [], 1, "failed"),
    ("exit7", 3, [], 7, "failed"),
    ("sigkill", 3, [], 137, "failed"),
    ("hang", 0, ["--hang-timeout", "4"], 124, "timeout"),
    ("sleep", -1, ["--timeout", "6"], 124, "timeout"),
    ("SIGINT", -1, [], 130, "cancelled"),
    ("SIGTERM", -1, [], 143, "cancelled"),
]


@pytest.mark.parametrize("cell", REMOTE_CELLS, ids=[c[0] for c in REMOTE_CELLS])
def test_failure_matrix_on_two_nodes(cluster, project, tmp_path, cell):
    import signal
    import time

    from test_failures import report, survivors, wait_for

    fault, fault_rank, extra, code, status = cell
    script = project / "faults.py"
    shutil.copy(SCRIPTS / "faults.py", script)
    payload = "sleep" if fault in ("SIGINT", "SIGTERM") else fault
    argv = [sys.executable, "-m", "distlaunch", "run", "--hosts", ",".join(f"{h}:2" for h in cluster.hosts),
            "--ssh-config", str(cluster.ssh_config), *UNBIND, "--kill-grace", "3", *extra,
            "--env", f"OUT_DIR={tmp_path}", "--env", f"FAULT={payload}", "--env", f"FAULT_RANK={fault_rank}",
            str(script)]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(list(tmp_path.glob("ready-*"))) == 4 or proc.poll() is not None, 120, "ranks to start")
    assert proc.poll() is None, proc.communicate()
    fault_at = time.time()
    if fault == "sigkill":  # the pid is node3's own (its PID namespace): kill it there
        pid = (tmp_path / "ready-3").read_text()
        subprocess.run(cluster.ssh_argv(cluster.nodes[1], "kill", "-KILL", pid), check=True, timeout=30)
    elif fault in ("SIGINT", "SIGTERM"):
        proc.send_signal(getattr(signal, fault))
    _out, err = proc.communicate(timeout=120)
    ended = time.time()
    if (tmp_path / "fault-time").exists():
        fault_at = float((tmp_path / "fault-time").read_text())
    run_dir = next((tmp_path / "runs").iterdir())
    record = json.loads((run_dir / "run.json").read_text())
    assert proc.returncode == code, err[-3000:]
    assert record["status"] == status
    if status == "failed":
        assert record["first_failure"]["rank"] == fault_rank and record["first_failure"]["host"] == "node3"
    assert survivors(record["id"]) == [], "processes of the run survived on a node"
    for rank in range(4):
        assert (run_dir / "logs" / f"rank-{rank}.log").exists()
    if fault == "hang":
        assert "most recent call first" in (run_dir / "logs" / "rank-0.log").read_text()
    waited = {"hang": 4, "sleep": 6}.get(fault, 0)
    report(f"{fault} (2 nodes)", 4, ended - fault_at - waited, status, code)


def session_folders(cluster) -> set[str]:
    """Open MPI's session folders in the nodes' /tmp (a node daemon's is prted.<pid>)."""
    return {f"{node.address}:{path.name}" for node in cluster.nodes for path in node.path("/tmp").iterdir()
            if path.name.startswith(("prted.", "ompi.", "prte."))}


@pytest.mark.parametrize("ended_by", ["guard", "ctrl-c"])
def test_a_job_whose_mpirun_hangs_after_a_failure_is_ended_with_the_rank_as_cause(cluster, project, tmp_path,
                                                                                 ended_by):
    """Node 3's Open MPI daemon stops answering (SIGSTOP), then rank 1 on node 2 is killed:
    mpirun never ends the job by itself. distlaunch ends it --kill-grace plus
    ENDS_AFTER_FAILURE_S after rank 1's worker said it failed (guard), or when the user
    gives up waiting first (ctrl-c); either way it records rank 1 as the cause and leaves
    no process of the run."""
    import contextlib

    import psutil
    from test_failures import survivors, wait_for

    from distlaunch.launch.supervise import ENDS_AFTER_FAILURE_S

    before = session_folders(cluster)
    script = project / "faults.py"
    shutil.copy(SCRIPTS / "faults.py", script)
    argv = [sys.executable, "-m", "distlaunch", "run", "--hosts", ",".join(f"{h}:2" for h in cluster.hosts),
            "--ssh-config", str(cluster.ssh_config), *UNBIND, "--kill-grace", "2", "--env", f"OUT_DIR={tmp_path}",
            "--env", "FAULT=sigkill", "--env", "FAULT_RANK=1", str(script)]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(list(tmp_path.glob("ready-*"))) == 4 or proc.poll() is not None, 120, "ranks to start")
    assert proc.poll() is None, proc.communicate()
    run_id = next((tmp_path / "runs").iterdir()).name

    def program_of(rank: int) -> psutil.Process:
        for item in psutil.process_iter():
            try:
                environ = item.environ()
            except psutil.Error:
                continue
            if environ.get("DISTLAUNCH_RUN_ID") == run_id and environ.get("OMPI_COMM_WORLD_RANK") == str(rank) \
                    and python_rank(item):
                return item
        raise AssertionError(f"rank {rank}'s program not found")

    assert len(session_folders(cluster) - before) == 2, "premise: a daemon's session folder on each node"
    daemon = next(p for p in program_of(2).parents() if p.name() in ("prted", "orted"))  # node 3's
    daemon.suspend()
    try:
        program_of(1).kill()
        killed = time.monotonic()
        if ended_by == "ctrl-c":
            time.sleep(3)  # rank 1's worker's word reaches distlaunch in milliseconds
            assert proc.poll() is None, "premise: mpirun does not end the job by itself"
            proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=2 + ENDS_AFTER_FAILURE_S + 90)
        took = time.monotonic() - killed
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            daemon.resume()
        if proc.poll() is None:
            proc.terminate()  # it stops its job itself
            proc.communicate(timeout=60)
    record = json.loads((tmp_path / "runs" / run_id / "run.json").read_text())
    status, code = ("failed", 137) if ended_by == "guard" else ("cancelled", 130)
    assert proc.returncode == code, err[-3000:]
    assert record["status"] == status and record["exit_code"] == code
    assert (record["first_failure"]["rank"], record["first_failure"]["signal"]) == (1, "SIGKILL")
    said = r"had not ended the job" if ended_by == "guard" else r"cancelled by SIGINT, \d+ s after rank 1 failed"
    assert re.search(said, record["reason"]), record["reason"]
    assert "rank 1 on" in err and "first failure" in err and re.search(said, err), err[-3000:]
    if ended_by == "guard":
        assert 2 + ENDS_AFTER_FAILURE_S <= took < 2 + ENDS_AFTER_FAILURE_S + 60, took
    else:
        assert took < 2 + ENDS_AFTER_FAILURE_S, took
    assert "distlaunch-rank-failed" not in err + (tmp_path / "runs" / run_id / "logs" / "output.log").read_text()
    wait_for(lambda: survivors(run_id) == [], 60, "every process of the run to end")
    wait_for(lambda: session_folders(cluster) - before == set(), 30, "the node daemons' session folders to go")


@pytest.mark.parametrize("share", ["1", "0"], ids=["shared-ssh", "plain-ssh"])
def test_a_launcher_killed_outright_leaves_nothing_on_the_nodes(cluster, project, tmp_path, share):
    """SIGKILL gives distlaunch no moment to clean up: mpirun still takes the ranks on
    both nodes down, and no ssh master or node agent of the run is left, nor a session
    folder of its node daemons in the nodes' /tmp. With shared connections, the masters'
    ending alone would cut mpirun off from its daemons; with plain ssh, only mpirun's own
    death signal ends the job."""
    import psutil
    from test_failures import forget_session, survivors, wait_for

    before = session_folders(cluster)

    script = project / "faults.py"
    shutil.copy(SCRIPTS / "faults.py", script)
    argv = [sys.executable, "-m", "distlaunch", "run", "--hosts", ",".join(f"{h}:2" for h in cluster.hosts),
            "--ssh-config", str(cluster.ssh_config), *UNBIND, "--env", f"OUT_DIR={tmp_path}",
            "--env", "FAULT=sleep", "--env", "FAULT_RANK=-1", str(script)]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DISTLAUNCH_SSH_SHARE": share})
    wait_for(lambda: len(list(tmp_path.glob("ready-*"))) == 4 or proc.poll() is not None, 120, "ranks to start")
    assert proc.poll() is None, proc.communicate()
    run_id = next((tmp_path / "runs").iterdir()).name
    assert len(survivors(run_id)) >= 5, "premise: mpirun and the four ranks are running"
    assert len(session_folders(cluster) - before) == 2, "premise: a daemon's session folder on each node"
    proc.kill()
    proc.communicate(timeout=30)
    try:
        wait_for(lambda: survivors(run_id) == [], 60, "every process of the run to end after the launcher's SIGKILL")
    finally:
        forget_session(tmp_path / "runs" / run_id)

    def of_the_run() -> list[str]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            line = " ".join(p.info["cmdline"] or [])
            if "distlaunch-ssh-" in line or "distlaunch.nodes.agent serve" in line:
                found.append(line[:150])
        return found

    wait_for(lambda: of_the_run() == [], 30, "the run's ssh masters and node agents to end")
    wait_for(lambda: session_folders(cluster) - before == set(), 30, "the node daemons' session folders to go")


def test_shared_source_is_detected_and_not_synced(cluster, project, tmp_path):
    # the simulated nodes share this machine's /tmp (all but their scratch directory)
    proc, run_dir, record = launch(cluster, tmp_path, "--remote-dir", str(project.parent),
                                   str(project / "rank_file.py"), "shared")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is on a filesystem the nodes share: running there, not syncing" in proc.stderr
    assert record["sync"] is None  # nothing was synced
    assert {r["host"] for r in record["rank_exits"].values()} == {"node2", "node3"}
    assert not list(project.glob(".distlaunch-shared-check-*"))


def test_shm_allreduce_is_hierarchical_across_nodes(cluster, tmp_path):
    """The shared-memory allreduce on 2 nodes x 2 ranks: shared memory inside each node,
    MPI between them; the same correctness suite as on one node."""
    src = tmp_path / "suite"
    src.mkdir()
    shutil.copy(REPO / "tests" / "mpi" / "test_allreduce_backends.py", src)
    proc, _run_dir, record = launch(cluster, tmp_path, "--source-dir", str(src), sys.executable, "-m", "pytest",
                                    "--with-mpi", "-q", "-p", "no:cacheprovider", "test_allreduce_backends.py",
                                    "-k", "shm", env={"OMPI_MCA_osc": "^ucx"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert record["nodes"] == 2
    passed = re.findall(r"^\[(\d)\] (\d+) passed", proc.stdout, re.M)
    assert sorted(rank for rank, _ in passed) == ["0", "1", "2", "3"] and int(passed[0][1]) > 100


def test_odd_names_secrets_and_links_sync_as_they_should(cluster, project, tmp_path):
    """Any legal file name travels (NUL-separated list), symlinks travel as links (also one
    that leaves the tree, and one to a folder), files that look like secrets stay home
    with a warning, and a project module named like one of ours shadows nothing of ours."""
    odd = ["#notes.py#", ";semicolon", "new\nline", "sep\u2028arator", "space name.txt", "\udcff-bytes"]
    for name in odd:
        (project / name).write_text(f"content of {name!r}\n", errors="surrogateescape")
    (project / "up.txt").symlink_to("../outside.txt")  # a relative link leaving the tree
    (project / "pkg").mkdir()
    (project / "pkg" / "mod.py").write_text("VALUE = 42\n")
    (project / "pkglink").symlink_to("pkg")  # a link to a folder
    (project / ".env").write_text("TOKEN=do-not-send\n")
    (project / "id_ed25519").write_text("a private key\n")
    (project / "json.py").write_text("raise SystemExit('the project json.py was imported')\n")
    (project / "helper.py").write_text("WHO = 'helper next to the script'\n")
    script = project / "check.py"
    script.write_text("import helper, os\nfrom pkg.mod import VALUE\n"
                      "print(helper.WHO, VALUE, os.path.exists('.env'))\n")
    proc, run_dir, record = launch(cluster, tmp_path, str(script))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("helper next to the script 42 False") == 4
    assert "left out 2 file(s) that look like secrets (.env, id_ed25519)" in proc.stderr
    assert "add a line '!NAME' to .distlaunchignore" in proc.stderr
    copy = node_copy(cluster, 1, record)
    for name in odd:
        assert (copy / name).read_text(errors="surrogateescape") == f"content of {name!r}\n"
    assert os.readlink(copy / "up.txt") == "../outside.txt" and os.readlink(copy / "pkglink") == "pkg"
    assert not (copy / ".env").exists() and not (copy / "id_ed25519").exists()
    (project / ".distlaunchignore").write_text("!.env\n")  # bring one back on purpose
    proc, _run_dir, record = launch(cluster, tmp_path, str(script))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("helper next to the script 42 True") == 4
    assert (node_copy(cluster, 1, record) / ".env").exists()


def test_sync_reports_progress_and_warns_about_a_large_source(cluster, tmp_path):
    src = tmp_path / "big"
    src.mkdir()
    for i in range(5001):
        (src / f"f{i}.txt").write_text("x")
    (src / "job.py").write_text("print('ran')\n")
    proc, _run_dir, record = launch(cluster, tmp_path, str(src / "job.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "syncing 5002 files (" in proc.stderr and "from " + str(src) in proc.stderr
    assert "is large (5002 files" in proc.stderr and ".distlaunchignore" in proc.stderr
    assert "--source-dir" in proc.stderr
    assert re.search(r"synced to 127\.0\.0\.3: 5002 of 5002 files sent \([\d.]+ (KiB|B)\)", proc.stderr)
    assert record["sync"]["nodes"][0]["files"] == 5002


def test_a_clean_two_node_run_prints_nothing_else(cluster, project, tmp_path):
    from test_run_local import CHATTER, noise

    proc, _run_dir, _record = launch(cluster, tmp_path, str(project / "train.py"), "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert noise(proc.stdout, proc.stderr) == []
    chatter = [line for line in (proc.stdout + proc.stderr).splitlines()
               if line.startswith("[") and any(word in line for word in CHATTER)]
    assert chatter == [], chatter


def test_each_node_is_reached_over_one_ssh_connection_and_none_is_left(cluster, project, tmp_path):
    """Node check, sync, mpirun's daemons, cleanup and collection all ride on one login per
    node (the agent's calls on one session); afterwards no master ssh, no socket folder and
    no agent session is left. Without the sharing the
    same run logs in several times per node, so the count is not one by chance."""
    import psutil

    folders = set(Path(tempfile.gettempdir()).glob("distlaunch-ssh-*"))
    before = cluster.logins()
    proc, run_dir, record = launch(cluster, tmp_path, str(project / "train.py"), "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [after - was for after, was in zip(cluster.logins(), before)] == [1, 1]
    assert (run_dir / "outputs").is_dir() and (run_dir / "ranks" / "rank-3.json").is_file()  # collected
    assert set(Path(tempfile.gettempdir()).glob("distlaunch-ssh-*")) == folders  # the sockets' folder is gone
    assert "ControlPath" not in json.dumps(record)  # the record says what ran, not where a socket lived
    masters = [p.pid for p in psutil.process_iter(["cmdline"])
               if "distlaunch-ssh-" in " ".join(p.info["cmdline"] or [])]
    assert masters == []
    time.sleep(1)  # the nodes' agents leave as their input closes
    agents = [p.pid for p in psutil.process_iter(["cmdline"]) if "distlaunch.nodes.agent serve" in " ".join(
        p.info["cmdline"] or [])]
    assert agents == []  # every node's agent session ended with the run (seen from here: root sees every node)

    before = cluster.logins()
    proc, _run_dir, record = launch(cluster, tmp_path, str(project / "train.py"), "--epochs", "1",
                                    env={"DISTLAUNCH_SSH_SHARE": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(after - was >= 4 for after, was in zip(cluster.logins(), before)), (cluster.logins(), before)
    assert "ControlPath" not in " ".join(record["argv"])


@pytest.mark.parametrize("flavour", ["ompi5", "ompi4", "mpich"])
def test_env_policy_on_other_nodes(cluster, tmp_path, flavour):
    """What reaches ranks on other nodes: --env, the allow list (OMP_*), --env-pass; never
    an unlisted variable of the launcher's (with each MPI distlaunch drives)."""
    from test_mpi_flavours import mpirun_args

    src = tmp_path / "envcheck"
    src.mkdir()
    (src / "job.py").write_text("import os, socket\nnames = ['FROM_ENV', 'OMP_NUM_THREADS', 'MYAPP_LEVEL', "
                                "'UNLISTED_VARIABLE']\n"
                                "print(socket.gethostname(), [os.environ.get(n) for n in names])\n")
    proc, _run_dir, _record = launch(cluster, tmp_path, *mpirun_args(flavour), "--env", "FROM_ENV=given",
                                     "--env-pass", "MYAPP_*", str(src / "job.py"),
                                     env={"OMP_NUM_THREADS": "3", "MYAPP_LEVEL": "7", "UNLISTED_VARIABLE": "leak"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    remote = [line for line in proc.stdout.splitlines() if "node3" in line]
    assert len(remote) == 2, proc.stdout
    for line in remote:
        assert "['given', '3', '7', None]" in line, line


@needs_root
def test_a_cluster_left_running_does_not_get_in_the_way(cluster, tmp_path):
    """A simulated cluster someone left running (here: the module's) and a new one side by
    side: each picks a free port, and both answer as their own nodes."""
    second = make(tmp_path / "second", 1, shared=[str(tmp_path)])
    second.up()
    try:
        assert second.port != cluster.port
        for box in (cluster, second):
            node = box.nodes[0]
            answer = subprocess.run(box.ssh_argv(node, "hostname"), capture_output=True, text=True, timeout=30)
            assert answer.returncode == 0 and answer.stdout.strip() == node.hostname
    finally:
        second.down()


needs_root_for_nodes = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start simulated nodes")
STAY_UP = """import os, signal, sys, time
for signum in (signal.SIGTERM, signal.SIGHUP):  # as a script started plainly (pytest may run under nohup)
    signal.signal(signum, signal.SIG_DFL)
from pathlib import Path
from tests.cluster.cluster import make
from tests.stopsignals import unwinding
root = Path(sys.argv[1])
box = make(root / "box", 2, shared=[str(root), sys.prefix, sys.argv[2]])
with unwinding(), box.running():  # as the benchmarks bring nodes up
    (root / "pids.new").write_text(" ".join(str(node.pid) for node in box.nodes))
    os.replace(root / "pids.new", root / "pids")
    time.sleep(300)
"""


@needs_root_for_nodes
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_benchmark_stopped_by_a_signal_stops_its_simulated_nodes(tmp_path, signum):
    """The benchmarks bring their nodes up with ``Cluster.running()`` inside
    ``tests.stopsignals.unwinding()``. The nodes run in sessions of their own, so
    SIGTERM's or SIGHUP's default action would end the script and leave them running;
    there the signal ends the script through its ``finally`` instead: every node is gone,
    nothing answers on their port, and the script exits with 128 + the signal."""
    if missing_tools():
        pytest.skip(f"cluster in a box needs {', '.join(missing_tools())}")
    (tmp_path / "box").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", STAY_UP, str(tmp_path), str(REPO)], cwd=REPO,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "pids").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "pids").exists(), f"the nodes did not come up (exit {proc.poll()})"
        pids = [int(word) for word in (tmp_path / "pids").read_text().split()]
        box = Cluster.load(tmp_path / "box")
        assert len(pids) == 2 and all(Path(f"/proc/{pid}").exists() for pid in pids)
        for address in box.hosts:
            socket.create_connection((address, box.port), timeout=5).close()  # sshd answers
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 128 + signum
        assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
        for address in box.hosts:  # the node's sshd dies with its namespace, just after its init
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection((address, box.port), timeout=5).close()
                except OSError:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"something still answers on {address}:{box.port}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if (tmp_path / "box" / "state.json").exists():
            for node in Cluster.load(tmp_path / "box").nodes:  # whatever the script left
                if node.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(node.pid, signal.SIGKILL)


@needs_root_for_nodes
def test_a_cluster_whose_second_node_fails_to_start_stops_the_first(tmp_path):
    """``up()`` that fails half-way (here node3's start raises, as ``wait_ready`` does when
    a node does not come up) stops the nodes it had started before it raises."""
    if missing_tools():
        pytest.skip(f"cluster in a box needs {', '.join(missing_tools())}")
    box = make(tmp_path / "box", 2, shared=[str(tmp_path)])
    started = []
    start_node = box.start_node

    def start(node):
        if node is box.nodes[1]:
            raise RuntimeError("simulated node node3 did not come up")
        start_node(node)
        started.append(node.pid)

    box.start_node = start
    try:
        with pytest.raises(RuntimeError, match="did not come up"):
            box.up()
        assert len(started) == 1
        assert not Path(f"/proc/{started[0]}").exists(), "node2 was left running"
        assert [node.pid for node in box.nodes] == [None, None]
    finally:
        for node in box.nodes:
            box.stop_node(node)  # whatever up() left (it kills the group and reaps)


def test_detached_children_on_the_nodes_are_cleaned_up_there(cluster, project, tmp_path):
    """Every rank leaves a child in a session of its own on its node: only the node agent
    (in the node's own process space) can find it; nothing of the run may survive."""
    from test_failures import survivors

    shutil.copy(SCRIPTS / "faults.py", project / "faults.py")
    proc, _run_dir, record = launch(cluster, tmp_path, "--env", f"OUT_DIR={tmp_path}", "--env", "FAULT=orphan",
                                    str(project / "faults.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert record["status"] == "completed"
    assert survivors(record["id"]) == [], "a rank's child survived on a node"


def test_the_estimators_promise_holds_on_two_nodes(cluster, tmp_path):
    """The same script, with the same input, run by the CLI here and on two nodes, and by
    the Python API on two nodes: the same run folder every time (tests/test_estimator.py
    checks what it holds)."""
    from test_estimator import cli_args, folder_view, make_project

    from distlaunch.launch.api import Job

    src, data = make_project(tmp_path)
    hosts = ",".join(f"{h}:1" for h in cluster.hosts)
    local = subprocess.run([sys.executable, "-m", "distlaunch",
                            *cli_args(src, data, tmp_path / "scratch", "--ppn", "2", "--run-dir", "here")],
                           cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert local.returncode == 0, local.stderr
    nodes = subprocess.run([sys.executable, "-m", "distlaunch",
                            *cli_args(src, data, None, "--hosts", hosts, "--ssh-config", str(cluster.ssh_config),
                                      *UNBIND, "--run-dir", "nodes")],
                           cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert nodes.returncode == 0, nodes.stderr
    run = Job("job.py", str(src), {"--data": "{inputs.data}"}, hosts=hosts, ssh_config=str(cluster.ssh_config),
              mpi_args=["--bind-to", "none"], inputs={"data": f"{data}:copy"}, runs_root=str(tmp_path / "api")).submit()
    assert run.result(timeout=240).status.value == "completed"
    views = [folder_view(next(p for p in (tmp_path / folder).iterdir() if (p / "run.json").is_file()))
             for folder in ("here", "nodes", "api")]
    assert views[0] == views[1] == views[2]
    assert views[0]["x"] == "data=first helper=helper file\n"
    # the API's run staged nothing new: the CLI's run left the input in each node's cache
    assert [item["cached"] for item in run.record.inputs[0]["nodes"]] == [True, True]


def test_an_input_only_this_machine_has_is_named_before_launch(cluster, tmp_path):
    src = tmp_path / "proj"
    shutil.copytree(SCRIPTS / "estimator", src)
    only_here = Path(f"/tmp/distlaunch-only-here-{os.getpid()}")  # the nodes have a /tmp of their own
    only_here.mkdir(exist_ok=True)
    try:
        proc, _run_dir, record = launch(cluster, tmp_path, "--input", f"data={only_here}", str(src / "job.py"),
                                        "--data", "{inputs.data}")
    finally:
        only_here.rmdir()
    assert proc.returncode == 70, proc.stderr
    assert f"--input data={only_here} does not exist on {cluster.hosts[0]}" in proc.stderr
    assert ":copy" in proc.stderr and record["status"] == "failed"


def train_and_kill(cluster, tmp_path: Path, args: list[str], ranks: tuple[str, ...]):
    """``distlaunch run`` of the example with ``args``; once rank 0 (on node 1) has saved
    epoch 2's checkpoint, SIGKILL the given ranks' processes (the user's program, not the
    worker shim). Returns the finished process, stdout, stderr, and when they were killed."""
    import psutil

    env = {**os.environ, "DISTLAUNCH_STATE_DIR": str(tmp_path / "state")}
    argv = [sys.executable, "-m", "distlaunch", "run", "--ssh-config", str(cluster.ssh_config), *UNBIND,
            "--restart-delay", "0.5", *args]
    out_file, err_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_file, "w") as out_handle, open(err_file, "w") as err_handle:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out_handle, stderr=err_handle, text=True)
    try:
        def victims() -> list[psutil.Process]:
            runs = list((tmp_path / "runs").glob("*/run.json"))
            if not runs:
                return []
            record = json.loads(runs[0].read_text())
            if not record.get("sync"):
                return []
            saved = sorted((node_copy(cluster, 0, record) / "outputs" / "checkpoints").glob("ckpt-*.pt"))
            if not saved or int(saved[-1].stem.split("-")[1]) < 2:
                return []
            found = []
            for item in psutil.process_iter(["pid"]):
                try:
                    environ = item.environ()
                except psutil.Error:
                    continue
                # a forked rank shows its worker's environment there: its rank as MPI gave it
                rank = environ.get("DISTLAUNCH_RANK", environ.get("OMPI_COMM_WORLD_RANK"))
                if environ.get("DISTLAUNCH_RUN_ID") == record["id"] and rank in ranks and python_rank(item):
                    found.append(item)
            return found if len(found) == len(ranks) else []

        deadline = time.monotonic() + 180
        chosen: list[psutil.Process] = []
        while not chosen:
            assert proc.poll() is None and time.monotonic() < deadline, err_file.read_text()[-3000:]
            time.sleep(0.05)
            chosen = victims()
        killed_at = time.time()
        for victim in chosen:
            victim.kill()
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    return proc, out_file.read_text(), err_file.read_text(), killed_at


def test_a_node_killed_mid_run_is_left_out_and_training_resumes(cluster, project, tmp_path):
    """Node 2's ranks are SIGKILLed mid-training: the job restarts on node 1 alone (node 2
    kept out, --min-nodes 1), resumes from the last checkpoint and completes; 'distlaunch
    nodes' names node 2 and why. Sets DISTLAUNCH_MATRIX_REPORT's fault-to-resume time."""
    state = tmp_path / "state"
    env = {**os.environ, "DISTLAUNCH_STATE_DIR": str(state)}
    proc, out, err, killed_at = train_and_kill(
        cluster, tmp_path, ["--hosts", ",".join(f"{h}:2" for h in cluster.hosts), "--max-restarts", "2",
                            "--min-nodes", "1", str(project / "train.py"), "--epochs", "12", "--samples", "16384"],
        ("2", "3"))
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    first, second = record["attempts"]
    assert first["status"] == "failed" and first["hosts"] == cluster.hosts and first["ranks"] == 4
    assert first["failure"]["signal"] == "SIGKILL" and first["failure"]["rank"] in (2, 3)
    assert list(first["blamed"]) == [cluster.hosts[1]]
    assert second["status"] == "completed" and second["hosts"] == [cluster.hosts[0]] and second["ranks"] == 2
    assert f"without {cluster.hosts[1]}" in first["next"]
    resumed = re.search(r"resumed from epoch (\d+)", out)
    assert resumed and int(resumed.group(1)) >= 2, out[-3000:]
    assert "training on 2 rank(s)" in out and "epoch 12: loss" in out
    assert f"epoch {int(resumed.group(1))}: loss" not in out.split("resumed from epoch")[1]  # not trained again
    metrics = [json.loads(line) for line in (run_dir / "metrics" / "rank-0.jsonl").read_text().splitlines()]
    resumed_at = min(item["time"] for item in metrics if item["name"] == "loss" and item["time"] > killed_at)
    before_kill = [item for item in metrics if item["name"] == "loss" and item["time"] < killed_at]
    assert len(before_kill) >= 2, "the first attempt's metrics must stay in the run's history"
    report = os.environ.get("DISTLAUNCH_MATRIX_REPORT")
    if report:
        with open(report, "a") as handle:
            handle.write(json.dumps({"cell": "node killed -> resumed", "fault_to_first_epoch_s":
                                     round(resumed_at - killed_at, 2)}) + "\n")
    nodes = subprocess.run([sys.executable, "-m", "distlaunch", "nodes"], env=env, capture_output=True, text=True)
    assert nodes.stdout.splitlines()[1].startswith(f"{cluster.hosts[1]} ") and "killed by SIGKILL" in nodes.stdout
    assert record["id"] in nodes.stdout
    # kept out now: a new run over both hosts, node 2 named first, still goes to node 1
    dry = subprocess.run([sys.executable, "-m", "distlaunch", "run", "--dry-run", "--hosts",
                          ",".join(reversed(cluster.hosts)), "--nodes", "1", "--ssh-config", str(cluster.ssh_config),
                          str(project / "rank_file.py")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert dry.returncode == 0 and f"leaving out {cluster.hosts[1]}" in dry.stderr, dry.stderr
    hostfile = dry.stdout.split("# command")[0]
    assert cluster.hosts[0] in hostfile and cluster.hosts[1] not in hostfile


def test_a_restart_moves_to_a_spare_node_never_used_before(cluster, tmp_path):
    """--nodes 1 of two hosts: the first attempt's node is at fault (a rank SIGKILLed), so the
    restart runs on the spare, which gets the node check and the code first."""
    script = tmp_path / "src" / "restarts.py"
    script.parent.mkdir()
    shutil.copy(SCRIPTS / "restarts.py", script)
    env = {"DISTLAUNCH_STATE_DIR": str(tmp_path / "state"), "OUT_DIR": str(tmp_path), "FAULT": "sigkill"}
    proc, run_dir, record = launch(cluster, tmp_path, "--nodes", "1", "--max-restarts", "1", "--restart-delay", "0.2",
                                   "--env", "OUT_DIR", "--env", "FAULT", str(script), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first, second = record["attempts"]
    assert first["hosts"] == [cluster.hosts[0]] and second["hosts"] == [cluster.hosts[1]]
    assert first["blamed"] == {cluster.hosts[0]: "rank 1 was killed by SIGKILL"}
    assert f"setting up {cluster.hosts[1]} for the restart" in proc.stderr
    starts = sorted(line.split()[0::2] for line in (tmp_path / "starts").read_text().splitlines())
    assert starts == [["0", "node2"], ["0", "node2"], ["1", "node3"], ["1", "node3"]]
    assert (run_dir / "attempts" / "1" / "logs" / "rank-1.log").is_file()
    assert "done" in (run_dir / "logs" / "rank-1.log").read_text()


def test_rank_0_moved_to_a_spare_node_takes_the_checkpoints_along(cluster, project, tmp_path):
    """--nodes 1 of two hosts, rank 1 SIGKILLed on node 1: the restart runs on node 2 (never
    used, set up first), where rank 0 finds node 1's checkpoints and resumes."""
    proc, out, err, killed_at = train_and_kill(
        cluster, tmp_path, ["--hosts", ",".join(f"{h}:2" for h in cluster.hosts), "--nodes", "1",
                            "--max-restarts", "1", str(project / "train.py"), "--epochs", "6", "--samples", "32768"],
        ("1",))
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    first, second = json.loads((run_dir / "run.json").read_text())["attempts"]
    assert first["hosts"] == [cluster.hosts[0]] and second["hosts"] == [cluster.hosts[1]]
    assert f"rank 0 moves from {cluster.hosts[0]} to {cluster.hosts[1]}: the last attempt's ./outputs went" in err
    resumed = re.search(r"resumed from epoch (\d+)", out)
    assert resumed and int(resumed.group(1)) >= 2 and "epoch 6: loss" in out, out[-3000:]
    assert (run_dir / "outputs" / "model.pt").is_file()
    metrics = [json.loads(line) for line in (run_dir / "metrics" / "rank-0.jsonl").read_text().splitlines()]
    times = [item["time"] for item in metrics if item["name"] == "loss"]
    assert times == sorted(times) and len(set(times)) == len(times), "each attempt's metrics once, in order"
    assert any(at < killed_at for at in times) and any(at > killed_at for at in times), "both attempts' metrics"
    assert not (run_dir / ".distlaunch-run").exists()  # the metrics' staging folders are gone


def test_a_sweep_of_two_node_trials_stops_bad_ones_live(cluster, tmp_path):
    """Each trial spans both nodes and rank 0 runs on another node than the sweep: its
    metrics are relayed as they are logged, so median pruning still cuts trials short."""
    hosts = ",".join(f"{h}:1" for h in cluster.hosts)
    argv = [sys.executable, "-m", "distlaunch", "sweep", "run", "--name", "two", "--sampler", "random", "--seed",
            "0", "--param", "x=uniform(0, 1)", "--metric", "loss", "--max-trials", "6", "--early-stop", "median",
            "--hosts", hosts, "--nodes", "2", "--ppn", "1", "--ssh-config", str(cluster.ssh_config), *UNBIND,
            "--env", "OUT_DIR", str(SCRIPTS / "sweep_target.py"), "--steps", "10", "--step-time", "0.3"]
    proc = subprocess.run(argv, cwd=tmp_path, env={**os.environ, "OUT_DIR": str(tmp_path)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = subprocess.run([sys.executable, "-m", "distlaunch", "sweep", "show", "two", "--json"], cwd=tmp_path,
                           capture_output=True, text=True, check=True)
    found = json.loads(shown.stdout)
    assert len(found) == 6 and {row["state"] for row in found} <= {"completed", "stopped early"}
    ran: dict[str, int] = {}
    for line in (tmp_path / "steps").read_text().splitlines():
        ran[line.split()[0]] = ran.get(line.split()[0], 0) + 1
    pruned = [row for row in found if row["state"] == "stopped early"]
    assert pruned, found
    assert all(ran[row["trial"]] < 10 for row in pruned)  # cut short while running on the nodes
    assert all(ran[row["trial"]] == 10 and row["steps"] == "10" for row in found if row["state"] == "completed")
    for row in found:
        run_dir = tmp_path / "runs" / row["run"]
        record = json.loads((run_dir / "run.json").read_text())
        assert record["nodes"] == 2 and {r["host"] for r in record["rank_exits"].values()} == {"node2", "node3"}
        assert record["rank_exits"]["0"]["host"] == "node2"
        assert record["env_added"]["DISTLAUNCH_RELAY_METRICS"] == "1"
        logged = [json.loads(line) for line in (run_dir / "metrics" / "rank-0.jsonl").read_text().splitlines()]
        assert [item["step"] for item in logged] == list(range(len(logged))) and logged  # no line twice
        assert "distlaunch-metric" not in (run_dir / "logs" / "output.log").read_text()


def test_ranks_inside_a_container_on_two_nodes(cluster, project, tmp_path, tmp_path_factory):
    """--container across nodes: every node runs its ranks in the image (the same path on
    each), the nodes' probe checks the runtime and the image first."""
    import shutil as _shutil

    from containerimage import build

    if _shutil.which("ch-run") is None:
        pytest.fail("Charliecloud is missing: apt-get install -y charliecloud")
    image = build(tmp_path_factory.mktemp("images") / "train")
    shutil.copy(SCRIPTS / "where_am_i.py", project)
    from test_containers import HOST_ONLY

    proc, run_dir, record = launch(cluster, tmp_path, "--container", str(image), str(project / "where_am_i.py"),
                                   HOST_ONLY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = [json.loads(line.split("WHERE ", 1)[1]) for line in proc.stdout.splitlines() if "WHERE " in line]
    assert len(seen) == 4 and all(item["marker"] and not item["host_file"] and item["sum"] == 10 for item in seen)
    assert {r["host"] for r in record["rank_exits"].values()} == {"node2", "node3"}
    assert record["container"]["runtime"] == "charliecloud"
    proc, run_dir, record = launch(cluster, tmp_path, "--container", str(image), str(project / "train.py"),
                                   "--epochs", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training on 4 rank(s)" in proc.stdout and (run_dir / "outputs" / "model.pt").is_file()
    # an image this machine has but the nodes do not (their /tmp is their own): the nodes'
    # check names it before anything starts
    import tempfile

    here_only = Path(tempfile.mkdtemp(prefix="image-here-only-", dir="/tmp"))
    try:
        python = here_only / sys.executable.lstrip("/")
        python.parent.mkdir(parents=True)
        python.symlink_to(sys.executable)
        (here_only / "usr").mkdir()
        proc, _run_dir, record = launch(cluster, tmp_path, "--container", str(here_only), str(project / "train.py"))
    finally:
        shutil.rmtree(here_only)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"node check failed: {cluster.hosts[0]}: image {here_only} does not exist: check the path" in last, last
