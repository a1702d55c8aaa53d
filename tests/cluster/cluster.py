"""Simulated nodes with their own hostname, sshd, loopback address, /tmp and processes.

Node i (i = 2, 3, ...) is host 127.0.0.i with hostname ``node<i>``: an sshd inside its
own UTS, mount and PID namespaces (``nodeinit`` is its PID 1), on a port chosen free
when the cluster is made (so a cluster left running by hand does not collide), with its
own /tmp (the per-user scratch is really node-local) in which the cluster's folder and
the given ``shared`` paths stay visible. Its processes are invisible to the launcher's
leftover scan, as on a real machine, so node-side cleanup is tested for real.

Each user in ``users`` may log in with a key of their own; ``ssh_config_for(user)`` is
the config to pass with ``--ssh-config``. Needs root, ``unshare``, ``sshd``,
``ssh-keygen`` and ``rsync``.

By hand:
    python -m tests.cluster.cluster up --nodes 2 --dir /tmp/cib       # prints the ssh config
    distlaunch run --ssh-config /tmp/cib/ssh_config.root --hosts 127.0.0.2:2,127.0.0.3:2 train.py
    python -m tests.cluster.cluster down --dir /tmp/cib
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.stopsignals import held

REPO = Path(__file__).resolve().parents[2]


def missing_tools() -> list[str]:
    need = ["unshare", "ssh", "ssh-keygen", "rsync", "mount"]
    missing = [tool for tool in need if shutil.which(tool) is None]
    if not Path("/usr/sbin/sshd").exists():
        missing.append("sshd")
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def free_port(addresses: list[str]) -> int:
    """A TCP port free on every one of ``addresses``."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = probe.getsockname()[1]
        try:
            for address in addresses[1:]:
                with socket.socket() as other:
                    other.bind((address, port))
            return int(port)
        except OSError:
            continue
    raise RuntimeError("no TCP port free on all simulated node addresses")


@dataclass
class Node:
    index: int
    address: str
    hostname: str
    tmp: Path  # this node's own /tmp, as seen from this machine
    pid: int | None = None
    hide: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def path(self, node_path: str) -> Path:
        """Where a path under the node's /tmp lies on this machine."""
        return self.tmp / Path(node_path).relative_to("/tmp")


@dataclass
class Cluster:
    root: Path
    nodes: list[Node]
    port: int = 0
    users: list[str] = field(default_factory=lambda: ["root"])
    shared: list[str] = field(default_factory=list)  # /tmp paths every node sees too

    @property
    def ssh_config(self) -> Path:
        return self.ssh_config_for(pwd.getpwuid(os.geteuid()).pw_name)

    def ssh_config_for(self, user: str) -> Path:
        return self.root / f"ssh_config.{user}"

    @property
    def hosts(self) -> list[str]:
        return [node.address for node in self.nodes]

    def ssh_argv(self, node: Node, *command: str, user: str | None = None) -> list[str]:
        config = self.ssh_config_for(user) if user else self.ssh_config
        return ["ssh", "-F", str(config), node.address, *command]

    # -- set-up
    def write_config(self) -> None:
        keys = self.root / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(keys, 0o755)
        if not (keys / "host_key").exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host_key")], check=True)
        for user in self.users:
            entry = pwd.getpwnam(user)
            key = keys / f"client_key.{user}"
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
            os.chown(key, entry.pw_uid, entry.pw_gid)
            (keys / f"authorized_keys.{user}").write_text((keys / f"client_key.{user}.pub").read_text())
            lines = []
            for node in self.nodes:
                lines += [f"Host {node.address} {node.hostname}", f"    HostName {node.address}",
                          f"    Port {self.port}", f"    User {user}", f"    IdentityFile {key}",
                          "    BatchMode yes", "    StrictHostKeyChecking no", "    UserKnownHostsFile /dev/null",
                          "    LogLevel ERROR", "    ConnectTimeout 5", ""]
            config = self.ssh_config_for(user)
            config.write_text("\n".join(lines))
            os.chmod(config, 0o644)

    def sshd_config(self, node: Node) -> Path:
        keys = self.root / "keys"
        path = self.root / f"sshd_{node.hostname}.conf"
        env = " ".join(f"{k}={v}" for k, v in node.env.items())
        path.write_text("\n".join([
            f"Port {self.port}", f"ListenAddress {node.address}", f"HostKey {keys / 'host_key'}",
            f"AuthorizedKeysFile {keys}/authorized_keys.%u", "PermitRootLogin prohibit-password",
            "PasswordAuthentication no", "StrictModes no", "UsePAM no", f"PidFile {self.root}/{node.hostname}.pid",
            "LogLevel INFO", *([f"SetEnv {env}"] if env else []), "",  # INFO: one line per login (logins())
        ]))
        return path

    def logins(self) -> list[int]:
        """How many ssh logins each node's sshd has accepted so far (from its log)."""
        counts = []
        for node in self.nodes:
            try:
                counts.append((self.root / f"{node.hostname}.log").read_text(errors="replace").count("Accepted "))
            except OSError:
                counts.append(0)
        return counts

    # -- lifecycle
    def start_node(self, node: Node) -> None:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        node.tmp.mkdir(parents=True, exist_ok=True)
        argv = ["unshare", "--uts", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private", "--",
                sys.executable, "-m", "tests.cluster.nodeinit", "--hostname", node.hostname, "--tmp", str(node.tmp)]
        for path in [str(self.root), *self.shared]:
            argv += ["--share", path]
        for path in node.hide:
            argv += ["--hide", path]
        argv += ["--", "/usr/sbin/sshd", "-D", "-e", "-f", str(self.sshd_config(node))]
        log = open(self.root / f"{node.hostname}.log", "ab")
        with held():  # a node started is a node noted (here and in state.json), so down() finds it
            proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
            node.pid = proc.pid
            self.save()
        self.wait_ready(node)

    def wait_ready(self, node: Node, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((node.address, self.port), timeout=1):
                    pass
                probe = subprocess.run(self.ssh_argv(node, "hostname", user="root" if "root" in self.users
                                                     else self.users[0]),
                                       capture_output=True, text=True, timeout=10)
                if probe.returncode == 0 and probe.stdout.strip() == node.hostname:
                    return
            except (OSError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"simulated node {node.hostname} did not come up; see {self.root}/{node.hostname}.log")

    def stop_node(self, node: Node) -> None:
        """Power the node off: its PID 1 dies, and with it every process of the node."""
        if node.pid is None:
            return
        try:
            os.killpg(node.pid, signal.SIGKILL)  # unshare and the node's init (same group)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(node.pid, 0)
        except ChildProcessError:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and Path(f"/proc/{node.pid}").exists():
                time.sleep(0.05)
        node.pid = None

    def restart_node(self, node: Node, hide: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.stop_node(node)
        node.hide = hide or []
        node.env = env or {}
        self.start_node(node)

    def up(self) -> None:
        """Start every node; where one fails to start, the ones started are stopped again."""
        if not self.port:
            self.port = free_port(self.hosts)
        self.write_config()
        try:
            for node in self.nodes:
                self.start_node(node)
            self.save()
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        with held():  # every node stopped, even if a stop signal comes half-way
            for node in self.nodes:
                self.stop_node(node)
            self.save()

    @contextlib.contextmanager
    def running(self) -> Iterator[Cluster]:
        """The nodes up for a ``with`` block and down after it, however it ends (``up()``
        that fails half-way too). A script that may be stopped by a signal enters
        ``tests.stopsignals.unwinding()`` first: the nodes run in sessions of their own,
        and a signal's default action would leave them running."""
        try:
            self.up()
            yield self
        finally:
            self.down()  # again where up() failed: it skips the nodes not running

    def save(self) -> None:
        state = {"port": self.port, "users": self.users, "shared": self.shared,
                 "nodes": [{"index": n.index, "pid": n.pid} for n in self.nodes]}
        (self.root / "state.json").write_text(json.dumps(state))
        os.chmod(self.root / "state.json", 0o644)

    @classmethod
    def load(cls, root: Path) -> Cluster:
        """A cluster another process started (e.g. CI, as root, for an unprivileged user)."""
        state = json.loads((root / "state.json").read_text())
        cluster = make(root, len(state["nodes"]), state["users"], state["shared"])
        cluster.port = state["port"]
        for node, saved in zip(cluster.nodes, state["nodes"]):
            node.pid = saved["pid"]
        return cluster


def make(root: Path, count: int, users: list[str] | None = None, shared: list[str] | None = None) -> Cluster:
    nodes = [Node(i, f"127.0.0.{i}", f"node{i}", root / f"tmp-node{i}") for i in range(2, 2 + count)]
    return Cluster(root, nodes, users=users or ["root"], shared=shared or [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/distlaunch-cluster"))
    parser.add_argument("--user", action="append", default=[], help="a user who may log in (default: root)")
    parser.add_argument("--share", action="append", default=[], help="a /tmp path the nodes see too")
    args = parser.parse_args()
    missing = missing_tools()
    if missing:
        raise SystemExit(f"cannot simulate nodes: missing {', '.join(missing)}")
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.action == "up":
        cluster = make(args.dir, args.nodes, args.user or ["root"], args.share)
        cluster.up()
        configs = ", ".join(str(cluster.ssh_config_for(user)) for user in cluster.users)
        print(f"nodes up: {', '.join(cluster.hosts)} (port {cluster.port}); ssh config: {configs}")
    else:
        Cluster.load(args.dir).down()
        print("nodes down")


if __name__ == "__main__":
    main()
