"""A real Slurm cluster on this one machine: munged, slurmctld and two slurmd.

Slurm's MULTIPLE_SLURMD build (Debian's) lets two slurmd share one host: node
``<hostname>`` and node ``<hostname>-n2`` (in a UTS namespace of its own, so its tasks see that
hostname), both at 127.0.0.1 on their own ports.
Everything (slurm.conf, munge key and socket, state, spool, logs, pid files) lives
under one root directory; the daemons are our child processes, each in its own
session, and are stopped by the pids we started -- never by name. Ports are picked
free at start, so two boxes do not clash. Needs root and the Debian packages in
``INSTALL_HINT``. Jobs may run as any user that can reach ``root`` (everything the
box writes is world-readable except the munge key; ``root`` itself is made 0755).

By hand:
    python -m tests.slurmbox.box up --dir /tmp/sbox      # prints: export SLURM_CONF=...
    SLURM_CONF=/tmp/sbox/slurm.conf salloc -N2 -n4 srun hostname
    python -m tests.slurmbox.box down --dir /tmp/sbox
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
from typing import Any, Callable

import psutil

from tests.stopsignals import held

INSTALL_HINT = "apt-get install -y slurmctld slurmd slurm-client munge libpmix-dev"
BINARIES = ("slurmctld", "slurmd", "munged", "sinfo", "srun", "salloc", "sbatch", "squeue", "scancel")
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
HOSTS = Path("/etc/hosts")
SET_HOSTNAME = "import os, socket, sys; socket.sethostname(sys.argv[1]); os.execv(sys.argv[2], sys.argv[2:])"
MARK = "SLURMBOX_ROOT"  # last in the daemons' environment; slurmstepd inherits it


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/usr/local/sbin")


def missing() -> list[str]:
    """What is missing to run a SlurmBox here (empty list: nothing)."""
    lack = [] if os.geteuid() == 0 else ["root"]
    lack += [name for name in BINARIES if _which(name) is None]
    if not any(Path(d, "libpmix.so").exists() for d in LIB_DIRS):
        lack.append("libpmix")
    return lack


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class SlurmBox:
    root: Path
    cluster: str = "slurmbox"
    min_job_age: int = 300  # seconds that scontrol still shows a finished job
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    pids: dict[str, list[float]] = field(default_factory=dict)  # name -> [pid, create_time]
    hosts_line: str | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root).absolute()

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def state_file(self) -> Path:
        return self.root / "box.json"

    @property
    def nodes(self) -> list[str]:
        return [self.host, f"{self.host}-n2"]

    @property
    def env(self) -> dict[str, str]:
        """Merge into os.environ for sinfo, srun, salloc, sbatch, squeue, scancel, sacct."""
        return {"SLURM_CONF": str(self.conf)}

    def log(self, name: str) -> Path:
        return self.root / "log" / f"{name}.log"  # slurmctld, slurmd-<node>, munged, jobcomp

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env, **kwargs.pop("env", {})}
        kwargs.setdefault("timeout", 120)
        return subprocess.run(argv, env=env, capture_output=True, text=True, **kwargs)

    # -- start
    def _write_files(self) -> None:
        r = self.root
        dirs = ["", "munge", "key", "ctld", "log", "run", "spool", "tmp", *(f"{d}/{n}" for d in ("spool", "tmp")
                                                                              for n in self.nodes)]
        for sub in dirs:  # world-readable: jobs of other users need the conf and the munge socket
            (r / sub).mkdir(parents=True, exist_ok=True)
            (r / sub).chmod(0o700 if sub == "key" else 0o1777 if sub.startswith("tmp/") else 0o755)
        (r / "key" / "munge.key").write_bytes(os.urandom(1024))
        (r / "key" / "munge.key").chmod(0o600)
        ctld, p1, p2 = free_ports(3)
        node = f"NodeHostname={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN"
        self.conf.write_text("\n".join([
            f"ClusterName={self.cluster}", f"SlurmctldHost={self.host}", f"SlurmctldPort={ctld}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge", f"StateSaveLocation={r}/ctld", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid", f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={self.log('slurmctld')}", f"SlurmdLogFile={r}/log/slurmd-%n.log",
            # per-node TmpFS: else a 2-node --mpi=pmix step fails on a shared /tmp/spmix_appdir_*
            f"TmpFS={r}/tmp/%n", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "ReturnToService=2", f"MinJobAge={self.min_job_age}", "KillWait=5", "MailProg=/bin/true",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={self.log('jobcomp')}",
            "AccountingStorageType=accounting_storage/none",
            f"NodeName={self.nodes[0]} Port={p1} {node}", f"NodeName={self.nodes[1]} Port={p2} {node}",
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP", ""]))
        self.conf.chmod(0o644)

    def _add_hosts_line(self) -> None:
        text = HOSTS.read_text()
        if self.nodes[1] not in {w for line in text.splitlines() for w in line.split("#")[0].split()[1:]}:
            self.hosts_line = f"127.0.0.1 {self.nodes[1]}"
            HOSTS.write_text(text + ("\n" if text and not text.endswith("\n") else "") + self.hosts_line + "\n")

    def _start(self, name: str, argv: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k != MARK} | self.env | {MARK: str(self.root)}
        with open(self.root / "log" / f"{name}.out", "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=self.root, start_new_session=True)
        self.procs[name] = proc
        self.pids[name] = [proc.pid, psutil.Process(proc.pid).create_time()]
        self._save()

    def _save(self) -> None:
        self.state_file.write_text(json.dumps({"pids": self.pids, "hosts_line": self.hosts_line}))

    def _wait(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; read {self.root}/log/{name}.out"
                                       + ("" if name == "munged" else f" and {self.log(name)}"))
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}; read {self.root}/log/*.log and *.out")
            time.sleep(0.1)

    def up(self, timeout: float = 60) -> SlurmBox:
        if lack := missing():
            raise RuntimeError(f"cannot start Slurm, missing {lack}; install: {INSTALL_HINT}")
        if closed := [str(d) for d in self.root.parents if d.exists() and not d.stat().st_mode & 0o001]:
            raise RuntimeError(f"{closed[0]} is not o+x: munged refuses such a socket path and other users could "
                               "not reach slurm.conf; use e.g. tempfile.mkdtemp(prefix='slurmbox-'), not tmp_path")
        deadline, key = time.monotonic() + timeout, self.root / "key"
        try:
            self._write_files()
            self._start("munged", [_which("munged") or "munged", "-F", f"--socket={self.munge_socket}",
                                   f"--key-file={key / 'munge.key'}", f"--seed-file={key / 'munged.seed'}",
                                   f"--pid-file={self.root / 'run' / 'munged.pid'}",
                                   f"--log-file={self.log('munged')}"])
            self._wait(self.munge_socket.is_socket, deadline, "munged made no socket")
            self._add_hosts_line()
            self._save()
            self._start("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-c", "-f", str(self.conf)])
            for name in self.nodes:
                argv = [_which("slurmd") or "slurmd", "-D", "-N", name, "-f", str(self.conf)]
                if name != self.host:  # its own hostname, as a second machine would have (Open MPI needs that)
                    argv = ["unshare", "--uts", "--", sys.executable, "-c", SET_HOSTNAME, name, *argv]
                self._start(f"slurmd-{name}", argv)
            self._wait(lambda: self.node_states() == {n: "idle" for n in self.nodes}, deadline,
                       f"nodes not idle after {timeout}s ({self.node_states()})")
        except BaseException:
            self.down()
            raise
        return self

    def node_states(self) -> dict[str, str]:
        try:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=10).stdout
        except subprocess.TimeoutExpired:
            return {}
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    # -- stop
    def _alive(self, name: str) -> psutil.Process | None:
        pid, created = self.pids[name]
        try:
            proc = psutil.Process(int(pid))
            return proc if abs(proc.create_time() - created) < 0.01 and proc.status() != "zombie" else None
        except psutil.NoSuchProcess:
            return None

    def _marked(self, proc: psutil.Process) -> bool:
        """slurmstepd is reparented to init and overwrites the start of its environ with its
        title, so look for the mark anywhere in the raw environ, or for a slurmd log fd."""
        try:
            if f"{MARK}={self.root}\0".encode() in Path(f"/proc/{proc.pid}/environ").read_bytes():
                return True
            return any(f.path.startswith(f"{self.root}/log/") for f in proc.open_files())
        except (OSError, psutil.Error):
            return False

    def leftovers(self) -> list[psutil.Process]:
        """Live processes of this box: daemons, marked ones (slurmstepd), their descendants."""
        found = {p.pid: p for name in self.pids if (p := self._alive(name))}
        mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        found |= {p.pid: p for p in psutil.process_iter() if p.pid not in mine and self._marked(p)}
        for proc in list(found.values()):
            try:
                found |= {c.pid: c for c in proc.children(recursive=True)}
            except psutil.Error:
                pass
        return [p for p in found.values() if p.is_running() and p.status() != "zombie"]

    def _stop(self, names: list[str], grace: float) -> None:
        live = [proc for name in names if (proc := self._alive(name))]
        for proc in live:
            os.killpg(proc.pid, signal.SIGTERM)  # own session: pgid == pid
        for proc in psutil.wait_procs(live, timeout=grace)[1]:
            os.killpg(proc.pid, signal.SIGKILL)
        for name in names:
            if name in self.procs:
                self.procs.pop(name).wait(timeout=10)

    def down(self, grace: float = 10) -> None:
        """Cancel every job, stop the daemons, kill what is left, undo /etc/hosts. Idempotent.
        A stop signal that comes meanwhile waits for the end (``tests.stopsignals.held``)."""
        with held():
            self._down(grace)

    def _down(self, grace: float) -> None:
        if not self.pids and self.state_file.exists():
            saved = json.loads(self.state_file.read_text())
            self.pids, self.hosts_line = saved["pids"], saved["hosts_line"]
        try:
            if "slurmctld" in self.pids and self._alive("slurmctld"):
                squeue = ["squeue", "-h", "-o", "%i"]
                if jobs := self.run(squeue, timeout=15).stdout.split():
                    self.run(["scancel", *jobs], timeout=15)
                    end = time.monotonic() + 20
                    while self.run(squeue, timeout=15).stdout.split() and time.monotonic() < end:
                        time.sleep(0.25)
            doomed = self.leftovers()
            self._stop([n for n in self.pids if n.startswith("slurm")], grace)
            self._stop([n for n in self.pids if n == "munged"], grace)
            for proc in psutil.wait_procs([p for p in doomed if p.is_running()], timeout=2)[1]:
                proc.kill()
            psutil.wait_procs(doomed, timeout=5)
            if left := self.leftovers():
                raise RuntimeError(f"slurmbox left processes behind: {[(p.pid, p.name()) for p in left]}")
        finally:
            if self.hosts_line:
                lines = HOSTS.read_text().splitlines(keepends=True)
                hits = [i for i, line in enumerate(lines) if line.rstrip("\n") == self.hosts_line]
                if hits:
                    del lines[hits[-1]]
                    HOSTS.write_text("".join(lines))
                self.hosts_line = None
        self.pids = {}
        self.state_file.unlink(missing_ok=True)

    def __enter__(self) -> SlurmBox:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.slurmbox.box", description="Real Slurm on one machine.")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args(argv)
    box = SlurmBox(args.dir)
    if args.action == "up":
        box.up(timeout=args.timeout)
        print("\n".join(f"export {k}={v}" for k, v in box.env.items()))
    else:
        box.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
