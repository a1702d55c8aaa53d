"""A shared login node and shared compute nodes: no user can hijack, read or break
another user's runs. Two real unprivileged users (dl-alice, dl-bob) on simulated nodes,
and the same job's private rendezvous, sockets and secrets on one node."""
from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import REPO

from tests.cluster.cluster import Cluster, make, missing_tools

pytestmark = pytest.mark.slow
ALICE, BOB = "dl-alice", "dl-bob"


@dataclass
class People:
    shared: Path  # a folder every user and every node sees (the users' venv lives here)
    python: Path
    cluster: Cluster

    def run(self, user: str, *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 240, background: bool = False) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
        home = Path(pwd.getpwnam(user).pw_dir)
        clean = {"PATH": f"{self.python.parent}:/usr/bin:/bin", "HOME": str(home), "USER": user, "LOGNAME": user,
                 "LANG": "C.UTF-8", **(env or {})}
        command = ["runuser", "-u", user, "--", "env", "-i", *[f"{k}={v}" for k, v in clean.items()], *argv]
        if background:
            return subprocess.Popen(command, cwd=cwd or home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return subprocess.run(command, cwd=cwd or home, capture_output=True, text=True, timeout=timeout)

    def distlaunch(self, user: str, *args: str, **kwargs):  # noqa: ANN201
        hosts = ",".join(f"{host}:1" for host in self.cluster.hosts)
        return self.run(user, str(self.python), "-m", "distlaunch", "run", "--hosts", hosts, "--ssh-config",
                        str(self.cluster.ssh_config_for(user)), "--mpi-arg", "--bind-to none", *args, **kwargs)

    def on_node(self, index: int, user: str, *command: str) -> subprocess.CompletedProcess[str]:
        remote = shlex.join(command)  # ssh hands the node's shell one string
        return subprocess.run(self.cluster.ssh_argv(self.cluster.nodes[index], remote, user=user),
                              capture_output=True, text=True, timeout=60)

    def project(self, user: str, name: str, script: str) -> Path:
        """A project folder owned by ``user`` in their home, with ``job.py``."""
        entry = pwd.getpwnam(user)
        folder = Path(entry.pw_dir) / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "job.py").write_text(script)
        for path in (folder, folder / "job.py"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        return folder


def ensure_user(name: str) -> None:
    """A login user with no password: '*', not useradd's locked '!', which sshd refuses."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    subprocess.run(["usermod", "--password", "*", name], check=True)


@pytest.fixture(scope="module")
def people():
    if os.geteuid() != 0:
        pytest.skip("needs root: creates users and simulated nodes")
    missing = missing_tools()
    if missing:
        pytest.skip(f"cluster in a box needs {', '.join(missing)}")
    for user in (ALICE, BOB):
        ensure_user(user)
    shared = Path(tempfile.mkdtemp(prefix="distlaunch-users-"))
    shared.chmod(0o755)
    venv = shared / "venv"
    base = "/usr/bin/python3"  # the machine's Python, which every user may run
    subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True)
    build = shared / "src"
    shutil.copytree(REPO, build, ignore=shutil.ignore_patterns(".git", "runs", "*.egg-info", "build", ".venv"))
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(build)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    cluster = make(shared / "cluster", 2, users=["root", ALICE, BOB], shared=[str(shared), sys.prefix, str(REPO)])
    cluster.up()
    yield People(shared, venv / "bin" / "python", cluster)
    cluster.down()
    shutil.rmtree(shared, ignore_errors=True)


def node_scratch(people: People, index: int, user: str) -> Path:
    """/tmp/distlaunch-<user> of node ``index``, seen from this machine."""
    return people.cluster.nodes[index].path(f"/tmp/distlaunch-{user}")


HELLO = "import os\nprint('hello from rank', os.environ['RANK'], flush=True)\n"


def test_alice_runs_and_nobody_else_can_read_her_run(people):
    project = people.project(ALICE, "hello", HELLO)
    proc = people.distlaunch(ALICE, str(project / "job.py"), cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hello from rank 1" in proc.stdout
    run_dir = next((project / "runs").iterdir())
    for path in [run_dir, *run_dir.rglob("*")]:
        mode = path.lstat().st_mode & 0o777
        if path.is_dir():
            assert mode == 0o700, f"{path} is {mode:o}"
        elif not path.is_symlink():
            assert mode & 0o077 == 0, f"{path} is {mode:o}"
    peek = people.run(BOB, "cat", str(run_dir / "run.json"))
    assert peek.returncode != 0 and "Permission denied" in peek.stderr
    for index in (0, 1):  # her scratch on each node: hers alone
        scratch = node_scratch(people, index, ALICE)
        info = scratch.stat()
        assert info.st_uid == pwd.getpwnam(ALICE).pw_uid and info.st_mode & 0o777 == 0o700
        assert people.on_node(index, BOB, "ls", f"/tmp/distlaunch-{ALICE}").returncode != 0


@pytest.mark.parametrize("plant", ["folder", "symlink"])
def test_scratch_planted_by_another_user_is_refused(people, plant):
    """bob creates alice's scratch path on node 3 before she ever ran there (a world-writable
    folder, or a symlink to one of his): her launch refuses it with one line, syncs
    nothing there, and runs nothing."""
    for index in (0, 1):
        shutil.rmtree(node_scratch(people, index, ALICE), ignore_errors=True)
    target = f"/tmp/distlaunch-{ALICE}"
    if plant == "folder":
        made = people.on_node(1, BOB, "mkdir", "-m", "777", target)
    else:
        made = people.on_node(1, BOB, "sh", "-c",
                              f"mkdir -p /tmp/bobs && chmod 777 /tmp/bobs && ln -s /tmp/bobs {target}")
    assert made.returncode == 0, made.stderr
    try:
        project = people.project(ALICE, "planted", HELLO)
        proc = people.distlaunch(ALICE, str(project / "job.py"), cwd=project)
        assert proc.returncode == 70, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"distlaunch: error: cannot prepare {target} on 127.0.0.3: "), last
        assert ("is a symbolic link" if plant == "symlink" else f"belongs to {BOB}") in last
        assert "hello from rank" not in proc.stdout
        if plant == "symlink":  # nothing of hers went through bob's link
            assert not list(people.cluster.nodes[1].path("/tmp/bobs").iterdir())
        record = json.loads(next((project / "runs").iterdir()).joinpath("run.json").read_text())
        assert record["status"] == "failed" and "cannot prepare" in record["error"]
    finally:
        scratch = node_scratch(people, 1, ALICE)
        if scratch.is_symlink():
            scratch.unlink()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(people.cluster.nodes[1].path("/tmp/bobs"), ignore_errors=True)


def test_prune_spares_a_live_run(people):
    """Each node keeps few run folders (here DISTLAUNCH_KEEP_RUNS=1); a run still going
    there is never pruned by a newer launch, and keeps its outputs."""
    for node in people.cluster.nodes:
        people.cluster.restart_node(node, env={"DISTLAUNCH_KEEP_RUNS": "1"})
    try:
        slow = people.project(ALICE, "prune", "import os, time\nos.makedirs('outputs', exist_ok=True)\n"
                                              "print('long run started', flush=True)\ntime.sleep(15)\n"
                                              "open(f\"outputs/done-{os.environ['RANK']}\", 'w').write('yes')\n")
        long_run = people.distlaunch(ALICE, str(slow / "job.py"), cwd=slow, background=True)
        deadline = time.monotonic() + 120
        while not list(node_scratch(people, 1, ALICE).glob("prune-*/runs/*/.distlaunch-run/ranks/rank-1.json")):
            assert time.monotonic() < deadline and long_run.poll() is None, "the long run did not start"
            time.sleep(0.2)
        (slow / "quick.py").write_text(HELLO)
        os.chown(slow / "quick.py", pwd.getpwnam(ALICE).pw_uid, pwd.getpwnam(ALICE).pw_gid)
        for _ in range(2):  # each sync prunes what it may
            quick = people.distlaunch(ALICE, str(slow / "quick.py"), cwd=slow)
            assert quick.returncode == 0, quick.stderr[-2000:]
        out, err = long_run.communicate(timeout=120)
        assert long_run.returncode == 0, err[-3000:]
        runs = sorted((slow / "runs").iterdir())
        assert (runs[0] / "outputs" / "done-0").read_text() == "yes"  # its outputs came back whole
        on_node = sorted(p.name for p in node_scratch(people, 1, ALICE).glob("prune-*/runs/*"))
        assert runs[0].name in on_node, "the live run's folder was pruned"
        assert runs[1].name not in on_node, "a finished, collected run was kept beyond DISTLAUNCH_KEEP_RUNS"
    finally:
        for node in people.cluster.nodes:
            people.cluster.restart_node(node)


# -- one node: the job's own rendezvous, sockets and secrets

def test_rendezvous_keys_are_out_of_reach(tmp_path):
    """A process outside the job that finds rank 0's store and writes the job's key does not
    change what the ranks read: every key lives under a random per-run prefix. The store
    listens on 127.0.0.1 only when every rank is on this machine."""
    script = tmp_path / "store.py"
    script.write_text(
        "import os, time\n"
        "from distlaunch.hvd.rendezvous import create_store\n"
        "from distlaunch.rank.rankinfo import from_environ\n"
        "store, topo = create_store(from_environ())\n"
        "out = os.environ['OUT_DIR']\n"
        "if topo.rank == 0:\n"
        "    store.set('weights', 'from rank 0')\n"
        "    open(f'{out}/.listening', 'w').write(str(os.getpid()))\n"
        "    os.replace(f'{out}/.listening', f'{out}/listening')  # seen whole, or not yet\n"
        "store.wait(['weights'])\n"
        "while not os.path.exists(f'{out}/attacked'):\n"
        "    time.sleep(0.05)\n"
        "print('rank', topo.rank, 'reads', store.get('weights').decode(), flush=True)\n"
    )
    env = {**os.environ, "OUT_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "distlaunch", "run", "--ppn", "2", str(script)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "listening").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        rank0 = psutil.Process(int((tmp_path / "listening").read_text()))
        listening = [c for c in rank0.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening), listening
        from datetime import timedelta

        import torch.distributed as dist

        for conn in listening:  # the attacker writes the key on every socket rank 0 listens on
            try:
                outsider = dist.TCPStore("127.0.0.1", conn.laddr.port, is_master=False, timeout=timedelta(seconds=5))
                outsider.set("weights", "from the attacker")
            except RuntimeError:
                continue  # gloo's own listeners do not speak the store protocol
        (tmp_path / "attacked").write_text("")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.terminate()  # distlaunch stops its job itself
            proc.wait(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("reads from rank 0") == 2 and "attacker" not in out


def test_ranks_on_one_host_open_no_network_listener(tmp_path):
    script = tmp_path / "listen.py"
    script.write_text("import os, time\nfrom mpi4py import MPI\nMPI.COMM_WORLD.Barrier()\n"
                      "up = os.path.join(os.environ['OUT_DIR'], 'up-' + os.environ['RANK'])\n"
                      "open(up + '~', 'w').write(str(os.getpid()))\nos.replace(up + '~', up)  # seen whole\n"
                      "time.sleep(3)\nMPI.COMM_WORLD.Barrier()\n")
    proc = subprocess.Popen([sys.executable, "-m", "distlaunch", "run", "--ppn", "2", str(script)], cwd=tmp_path,
                            env={**os.environ, "OUT_DIR": str(tmp_path)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("up-[0-9]"))) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    listening = []
    for marker in tmp_path.glob("up-[0-9]"):
        rank = psutil.Process(int(marker.read_text()))
        listening += [(rank.pid, c.laddr) for c in rank.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN and c.laddr.ip not in ("127.0.0.1", "::1")]
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert listening == [], f"ranks listen on the network: {listening}"


def test_secret_value_is_in_no_record_no_log_and_no_command_line(tmp_path):
    value = "hunter2-" + os.urandom(6).hex()
    script = tmp_path / "uses_secret.py"
    script.write_text("import os, time\nassert os.environ['AWS_SECRET_ACCESS_KEY']\n"
                      "open(os.path.join(os.environ['OUT_DIR'], f\"up-{os.environ['RANK']}\"), 'w').write('')\n"
                      "time.sleep(2)\nprint('used it', flush=True)\n")
    env = {**os.environ, "OUT_DIR": str(tmp_path), "AWS_SECRET_ACCESS_KEY": value}
    proc = subprocess.Popen([sys.executable, "-m", "distlaunch", "run", "--ppn", "2", "--env", "AWS_SECRET_ACCESS_KEY",
                             str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("up-[0-9]"))) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    command_lines = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.count("used it") == 2
    assert not [line for line in command_lines if value in line], "the secret is on a command line"
    assert value not in out + err
    dry = subprocess.run([sys.executable, "-m", "distlaunch", "run", "--dry-run", "--env", "AWS_SECRET_ACCESS_KEY",
                          str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert dry.returncode == 0 and value not in dry.stdout + dry.stderr and "<redacted>" in dry.stdout
    for path in (tmp_path / "runs").rglob("*"):
        if path.is_file():
            assert value not in path.read_text(errors="replace"), f"the secret is in {path}"
    warned = subprocess.run([sys.executable, "-m", "distlaunch", "run", "--dry-run", "--env",
                             f"AWS_SECRET_ACCESS_KEY={value}", str(script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert "puts a secret on the command line" in warned.stderr


def test_full_run_folder_never_stalls_the_job(tiny_tmpfs, tmp_path):
    """The job prints far more than the run folder holds: the output keeps flowing to the
    terminal, the job ends on its own, and run.json says why the run failed (exit 73)."""
    script = tmp_path / "talk.py"
    script.write_text("import os\nfor i in range(20000):\n    print('line', i, 'x' * 60)\nprint('the end')\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "distlaunch", "run", "--ppn", "2", "--run-dir",
                           str(tiny_tmpfs / "runs"), "--timeout", "100", str(script)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=150)
    assert time.monotonic() - started < 60, "the job stalled on the full disk"
    assert proc.returncode == 73, proc.stderr[-2000:]
    assert proc.stdout.count("the end") == 2 and proc.stdout.count(" line 19999 ") == 2  # nothing lost on screen
    record = json.loads(next((tiny_tmpfs / "runs").iterdir()).joinpath("run.json").read_text())
    assert record["status"] == "failed" and record["exit_code"] == 73
    assert "No space left on device" in record["reason"]
    assert "cannot write to the run folder" in proc.stderr
    assert "Traceback" not in proc.stderr, "a worker crashed on the full disk"

