"""Copy the source directory to every node, check it arrived whole, bring results back.

Layout on each node (``--remote-dir`` ROOT, node-local scratch by default)::

    ROOT/<name>-<hash of the source path>/runs/<run-id>/   the run's working directory
                                          .../.distlaunch-run/  rank logs and exit records
    ROOT/<name>-<hash>/latest -> runs/<run-id>           the last synced run

Files are chosen like git would (``.gitignore`` files, plus ``.distlaunchignore``; never
``.git/``, ``__pycache__/`` or the top-level ``runs/``), sent by rsync with
``--link-dest`` to the previous run so unchanged files are not sent again, and checked
with a content hash on every node. Nodes are handled in parallel.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import DistlaunchError
from .hosts import is_local
from .remote_agent import tree_hash
from .ssh import SSHOptions, agent_call

ALWAYS_SKIPPED = {".git", "__pycache__", ".distlaunch-run"}
TOP_SKIPPED = {"runs"}
IGNORE_FILES = (".gitignore", ".distlaunchignore")
AGENT_DIR = ".distlaunch-run"
Progress = Callable[[str], None]


class SyncError(DistlaunchError):
    """The code could not be copied to a node, or arrived different."""


@dataclass(frozen=True)
class RemoteLayout:
    base: str  # ROOT/<name>-<hash>
    run_id: str

    @property
    def workdir(self) -> str:
        return f"{self.base}/runs/{self.run_id}"

    @property
    def agent_dir(self) -> str:
        return f"{self.workdir}/{AGENT_DIR}"

    @classmethod
    def for_source(cls, remote_root: str, source: Path, run_id: str) -> RemoteLayout:
        tag = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
        name = re.sub(r"[^A-Za-z0-9._-]", "_", source.resolve().name) or "source"
        return cls(f"{remote_root.rstrip('/')}/{name}-{tag}", run_id)


@dataclass(frozen=True)
class SyncResult:
    host: str
    files: int
    sent: int  # files actually transferred
    sent_bytes: int
    seconds: float


def list_files(source: Path) -> list[str]:
    """Relative paths of the files to send, honouring .gitignore/.distlaunchignore files."""
    import pathspec

    chosen: list[str] = []
    specs: list[tuple[PurePosixPath, pathspec.PathSpec]] = []

    def ignored(rel: PurePosixPath, is_dir: bool) -> bool:
        for base, spec in specs:
            if base == PurePosixPath(".") or base in rel.parents:
                sub = rel.relative_to(base) if base != PurePosixPath(".") else rel
                if spec.match_file(f"{sub}/" if is_dir else str(sub)):
                    return True
        return False

    for top, dirs, files in os.walk(source):
        here = PurePosixPath(Path(top).relative_to(source).as_posix())
        for name in IGNORE_FILES:
            path = Path(top) / name
            if path.is_file():
                lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
                specs.append((here, pathspec.GitIgnoreSpec.from_lines(lines)))
        keep = []
        for name in sorted(dirs):
            rel = here / name if here != PurePosixPath(".") else PurePosixPath(name)
            if name in ALWAYS_SKIPPED or (here == PurePosixPath(".") and name in TOP_SKIPPED):
                continue
            if not ignored(rel, True) and not (Path(top) / name).is_symlink():
                keep.append(name)
        dirs[:] = keep
        for name in sorted(files):
            rel = here / name if here != PurePosixPath(".") else PurePosixPath(name)
            if not ignored(rel, False):
                chosen.append(str(rel))
    return chosen


def _target(host: str, path: str) -> str:
    return path if is_local(host) else f"{host}:{path}"


def _stats(output: str) -> tuple[int, int]:
    files = re.search(r"Number of regular files transferred: ([\d,]+)", output)
    size = re.search(r"Total transferred file size: ([\d,]+)", output)
    return (int(files.group(1).replace(",", "")) if files else 0,
            int(size.group(1).replace(",", "")) if size else 0)


def rsync_push_argv(host: str, source: Path, layout: RemoteLayout, ssh: SSHOptions) -> list[str]:
    argv = ["rsync", "-a", "--mkpath", "--stats", "--files-from=-", f"--link-dest={layout.base}/latest/"]
    if not is_local(host):
        argv += ["-e", ssh.command_string()]
    return [*argv, f"{source}/", _target(host, f"{layout.workdir}/")]


def push(host: str, source: Path, files: Sequence[str], expected: str, layout: RemoteLayout,
         ssh: SSHOptions, python: str) -> SyncResult:
    start = time.monotonic()
    listing = "\n".join(files) + "\n"
    proc = subprocess.run(rsync_push_argv(host, source, layout, ssh), input=listing, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SyncError(f"cannot copy {source} to {host}: rsync exit {proc.returncode}: {last}: "
                        "check ssh access and that rsync is installed there (distlaunch doctor)")
    sent, sent_bytes = _stats(proc.stdout)
    answer, check = agent_call(host, ssh, python, "finish", layout.base, layout.workdir, expected, stdin=listing)
    got = (answer or {}).get("hash")
    if got is None:
        raise SyncError(f"cannot check the copy on {host}: {check.stderr.strip()[-300:]}: "
                        "is distlaunch installed there with the same Python (distlaunch doctor)?") from None
    if got != expected:
        raise SyncError(f"the code on {host} differs from {source} after syncing (hash {got[:12]} != "
                        f"{expected[:12]}): check the disk on {host}, then run again")
    return SyncResult(host, len(files), sent, sent_bytes, time.monotonic() - start)


def sync(hosts: Sequence[str], source: Path, layout: RemoteLayout, ssh: SSHOptions, python: str,
         progress: Progress) -> list[SyncResult]:
    """Send the source tree to every host in parallel; SyncError names the first bad node."""
    files = list_files(source)
    expected = tree_hash(source, files)
    progress(f"syncing {len(files)} files from {source} to {len(hosts)} node(s)")
    results: list[SyncResult] = []
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        futures = [pool.submit(push, host, source, files, expected, layout, ssh, python) for host in hosts]
        for future in futures:
            result = future.result()
            results.append(result)
            progress(f"synced to {result.host}: {result.sent} of {result.files} files sent "
                     f"({result.sent_bytes} bytes) in {result.seconds:.2f} s")
    return results


def pull(host: str, remote: str, local: Path, ssh: SSHOptions) -> bool:
    """Copy remote folder ``remote`` into ``local`` (merging); False if there was nothing."""
    argv = ["rsync", "-a", "--mkpath"]
    if not is_local(host):
        argv += ["-e", ssh.command_string()]
    proc = subprocess.run([*argv, _target(host, f"{remote}/"), f"{local}/"], capture_output=True, text=True)
    return proc.returncode == 0


def collect(hosts: Sequence[str], rank0_host: str, layout: RemoteLayout, run_root: Path, ssh: SSHOptions,
            all_ranks: bool) -> list[str]:
    """Bring rank logs and exit records from every node, and rank 0's ./outputs and ./logs
    (every node's outputs under outputs/<host>/ with ``all_ranks``). Returns what failed."""
    jobs: list[tuple[str, str, Path]] = []
    for host in hosts:
        jobs += [(host, f"{layout.agent_dir}/logs", run_root / "logs"),
                 (host, f"{layout.agent_dir}/ranks", run_root / "ranks"),
                 (host, f"{layout.agent_dir}/metrics", run_root / "metrics")]
        if all_ranks:
            jobs.append((host, f"{layout.workdir}/outputs", run_root / "outputs" / host))
    jobs += [(rank0_host, f"{layout.workdir}/outputs", run_root / "outputs"),
             (rank0_host, f"{layout.workdir}/logs", run_root / "logs")]
    with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as pool:
        done = list(pool.map(lambda job: pull(job[0], job[1], job[2], ssh), jobs))
    return [f"{host}:{remote}" for (host, remote, _), ok in zip(jobs, done) if not ok]
