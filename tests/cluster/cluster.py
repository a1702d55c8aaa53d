"""Simulated nodes with their own hostname, sshd, loopback address and scratch disk.

Node i (i = 2, 3, ...) is host 127.0.0.i, hostname ``node<i>``, an sshd on port 2222
inside its own UTS and mount namespaces, and its own directory bound over
``SCRATCH`` (so rsync targets really differ between nodes). Needs root, ``unshare``,
``sshd``, ``ssh-keygen`` and ``rsync``.

By hand:
    python -m tests.cluster.cluster up --nodes 2 --dir /tmp/cib      # prints the ssh config
    distlaunch run --ssh-config /tmp/cib/ssh_config --hosts 127.0.0.2:2,127.0.0.3:2 train.py
    python -m tests.cluster.cluster down --dir /tmp/cib
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PORT = 2222
SCRATCH = "/tmp/distlaunch-scratch"
REPO = Path(__file__).resolve().parents[2]


def missing_tools() -> list[str]:
    need = ["unshare", "ssh", "ssh-keygen", "rsync", "mount"]
    missing = [tool for tool in need if shutil.which(tool) is None]
    if not Path("/usr/sbin/sshd").exists():
        missing.append("sshd")
    if os.geteuid() != 0:
        missing.append("root")
    return missing


@dataclass
class Node:
    index: int
    address: str
    hostname: str
    scratch: Path  # this node's private directory, seen as SCRATCH on the node
    pid: int | None = None
    hide: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Cluster:
    root: Path
    nodes: list[Node]

    @property
    def ssh_config(self) -> Path:
        return self.root / "ssh_config"

    @property
    def hosts(self) -> list[str]:
        return [node.address for node in self.nodes]

    def ssh_argv(self, node: Node, *command: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), node.address, *command]

    # -- lifecycle
    def write_config(self) -> None:
        keys = self.root / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        for name in ("host_key", "client_key"):
            if not (keys / name).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
        (keys / "authorized_keys").write_text((keys / "client_key.pub").read_text())
        lines = []
        for node in self.nodes:
            lines += [f"Host {node.address} {node.hostname}", f"    HostName {node.address}", f"    Port {PORT}",
                      "    User root", f"    IdentityFile {keys / 'client_key'}", "    BatchMode yes",
                      "    StrictHostKeyChecking no", "    UserKnownHostsFile /dev/null", "    LogLevel ERROR",
                      "    ConnectTimeout 5", ""]
        self.ssh_config.write_text("\n".join(lines))

    def sshd_config(self, node: Node) -> Path:
        keys = self.root / "keys"
        path = self.root / f"sshd_{node.hostname}.conf"
        env = " ".join(f"{k}={v}" for k, v in node.env.items())
        path.write_text("\n".join([
            f"Port {PORT}", f"ListenAddress {node.address}", f"HostKey {keys / 'host_key'}",
            f"AuthorizedKeysFile {keys / 'authorized_keys'}", "PermitRootLogin prohibit-password",
            "PasswordAuthentication no", "StrictModes no", "UsePAM no", f"PidFile {self.root}/{node.hostname}.pid",
            "LogLevel ERROR", *( [f"SetEnv {env}"] if env else []), "",
        ]))
        return path

    def start_node(self, node: Node) -> None:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        node.scratch.mkdir(parents=True, exist_ok=True)
        argv = ["unshare", "--uts", "--mount", "--propagation", "private", "--",
                sys.executable, "-m", "tests.cluster.nodeinit", "--hostname", node.hostname,
                "--bind", f"{node.scratch}:{SCRATCH}"]
        for path in node.hide:
            argv += ["--hide", path]
        argv += ["--", "/usr/sbin/sshd", "-D", "-e", "-f", str(self.sshd_config(node))]
        log = open(self.root / f"{node.hostname}.log", "ab")
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
        node.pid = proc.pid
        self.wait_ready(node)

    def wait_ready(self, node: Node, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((node.address, PORT), timeout=1):
                    pass
                probe = subprocess.run(self.ssh_argv(node, "hostname"), capture_output=True, text=True, timeout=10)
                if probe.returncode == 0 and probe.stdout.strip() == node.hostname:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"simulated node {node.hostname} did not come up; see {self.root}/{node.hostname}.log")

    def stop_node(self, node: Node) -> None:
        if node.pid is None:
            return
        try:
            os.killpg(node.pid, signal.SIGTERM)  # sshd and every session it started
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(node.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.killpg(node.pid, signal.SIGKILL)
        node.pid = None

    def restart_node(self, node: Node, hide: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.stop_node(node)
        node.hide = hide or []
        node.env = env or {}
        self.start_node(node)

    def up(self) -> None:
        self.write_config()
        for node in self.nodes:
            self.start_node(node)
        self.save()

    def down(self) -> None:
        for node in self.nodes:
            self.stop_node(node)
        self.save()

    def save(self) -> None:
        state = [{"index": n.index, "pid": n.pid} for n in self.nodes]
        (self.root / "state.json").write_text(json.dumps(state))


def make(root: Path, count: int) -> Cluster:
    nodes = [Node(i, f"127.0.0.{i}", f"node{i}", root / f"scratch-node{i}") for i in range(2, 2 + count)]
    return Cluster(root, nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/distlaunch-cluster"))
    args = parser.parse_args()
    missing = missing_tools()
    if missing:
        raise SystemExit(f"cannot simulate nodes: missing {', '.join(missing)}")
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.action == "up":
        cluster = make(args.dir, args.nodes)
        cluster.up()
        print(f"nodes up: {', '.join(cluster.hosts)}; ssh config: {cluster.ssh_config}")
    else:
        state = json.loads((args.dir / "state.json").read_text())
        cluster = make(args.dir, len(state))
        for node, saved in zip(cluster.nodes, state):
            node.pid = saved["pid"]
        cluster.down()
        print("nodes down")


if __name__ == "__main__":
    main()
