"""Data inputs on the nodes: check the in-place ones, stage the copied ones (``--input``).

A copied input is hashed here (each file's digest is remembered by size, time and inode
in ``~/.cache/distlaunch/inputs``, so unchanged data is not read again), then staged on
every node into ``<remote-dir>/inputs/<NAME>-<hash>/`` unless that entry is already
complete there: rsync sends it (unchanged files hard-linked from the input's previous
entry on that node), the node's agent checks the content hash and only then moves it
into place. A second run with the same data sends nothing; changed data is a new entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DistlaunchError, ExitCode, SpecError
from ..plan.hosts import is_local
from ..plan.inputs import InputSpec, cache_dir, cache_path
from ..plan.units import human_size
from .agent import _entry_digest, hash_of
from .transport import Nodes, for_each, last_error

Progress = Callable[[str], None]


class InputError(DistlaunchError):
    """An input is missing on a node or could not be staged there: the job cannot start."""

    exit_code = ExitCode.LAUNCH


@dataclass(frozen=True)
class ResolvedInput:
    """An input with what the nodes need: its path there and, when copied, its content."""

    spec: InputSpec
    node_path: str
    digest: str | None = None  # content hash of a copied input
    names: tuple[str, ...] = ()  # its entries, relative to the folder that holds it
    nbytes: int = 0

    def record(self) -> dict[str, Any]:
        return {"name": self.spec.name, "source": self.spec.path, "mode": self.spec.mode, "path": self.node_path,
                "hash": self.digest, "files": len(self.names), "bytes": self.nbytes}


def _entries(path: Path, base: str) -> list[tuple[str, Path]]:
    """(name under ``base``, file) for a file or every entry of a folder; ``path`` is the
    input's real path (a symlinked input is what it points to, not the link)."""
    if not path.is_dir():
        return [(base, path)]
    found = []
    for here, dirs, files in os.walk(path):
        rel = os.path.relpath(here, path)
        prefix = base if rel == "." else f"{base}/{rel}"
        for name in sorted(dirs):
            if os.path.islink(os.path.join(here, name)):
                found.append((f"{prefix}/{name}", Path(here, name)))
        for name in sorted(files):
            found.append((f"{prefix}/{name}", Path(here, name)))
    return found


def _memo_file(path: Path) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distlaunch" / "inputs"
    return cache / f"{hashlib.sha256(str(path).encode()).hexdigest()[:24]}.json"


def digest_input(path: Path, base: str, progress: Progress) -> tuple[str, tuple[str, ...], int]:
    """Content hash, entry names and size of a file or folder (a file whose size, times
    and inode are those of the last time is not read again)."""
    memo_path = _memo_file(path)
    try:
        memo: dict[str, list[Any]] = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    digests: dict[str, str] = {}
    fresh: dict[str, list[Any]] = {}
    nbytes = read = 0
    started = last = time.monotonic()
    for name, file in _entries(path, base):
        try:
            info = os.lstat(file)
        except OSError:
            continue
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
            continue
        key = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]  # ctime: cp -p cannot fake it
        known = memo.get(name)
        if known is not None and known[:4] == key:
            digest = known[4]
        else:
            digest = _entry_digest(file).hex()
            read += info.st_size
        digests[name], fresh[name] = digest, [*key, digest]
        nbytes += info.st_size
        if time.monotonic() - last > 5:
            last = time.monotonic()
            progress(f"hashing {path}: {human_size(read)} read in {last - started:.0f} s")
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        memo_path.write_text(json.dumps(fresh), encoding="utf-8")
    except OSError:
        pass  # only a speed-up
    return hash_of(digests), tuple(sorted(digests)), nbytes


def resolve(inputs: Sequence[InputSpec], remote_root: str, progress: Progress) -> tuple[ResolvedInput, ...]:
    """Each input's path on the nodes (copied ones hashed first: the path holds the hash)."""
    found = []
    for item in inputs:
        if not item.copy:
            found.append(ResolvedInput(item, item.path))
            continue
        real = Path(item.path).resolve()  # a symlinked input is copied as what it points to
        digest, names, nbytes = digest_input(real, os.path.basename(item.path.rstrip("/")) or item.name, progress)
        if not names:
            raise SpecError(f"--input {item.name}={item.path}:copy holds no files: check the path")
        found.append(ResolvedInput(item, cache_path(remote_root, item.name, digest, item.path), digest, names,
                                   nbytes))
    return tuple(found)


def check_in_place(nodes: Nodes, hosts: Sequence[str], inputs: Sequence[ResolvedInput]) -> None:
    """InputError naming the first node that does not see an in-place input."""
    for item in inputs:
        if item.spec.copy:
            continue
        for host in hosts:
            if is_local(host, nodes.transport.local_names):
                if not os.path.exists(item.node_path):
                    raise InputError(f"--input {item.spec.name}={item.node_path} does not exist here: check the "
                                     "path, or add ':copy' to stage it onto the nodes")
        remote = nodes.remote(hosts)
        for host, (answer, proc) in zip(remote, nodes.call_all(remote, "sees", item.node_path, timeout=60)):
            if answer is None:
                raise InputError(f"cannot check --input {item.spec.name} on {host}: {last_error(proc)}")
            if not answer.get("exists"):
                raise InputError(f"--input {item.spec.name}={item.node_path} does not exist on {host}: put it on a "
                                 f"filesystem every node shares, or write --input {item.spec.name}="
                                 f"{item.spec.path}:copy to copy it to each node")


def _rsync(nodes: Nodes, host: str, item: ResolvedInput, tmp: str, previous: str | None) -> tuple[int, int, str]:
    """Copy the input (as what it points to) into ``tmp/<its name>`` on ``host``."""
    argv = ["rsync", "-a", "--no-D", "--stats", "--mkpath", "--chmod=go-rwx,Fu-w"]
    real = os.path.realpath(item.spec.path)
    base = item.node_path.rsplit("/", 1)[-1]
    if os.path.isdir(real):
        source, target = f"{real}/", f"{tmp}/{base}/"
        if previous:
            argv.append(f"--link-dest={previous}/{base}/")
    else:
        source, target = real, f"{tmp}/{base}"
        if previous:
            argv.append(f"--link-dest={previous}/")
    if not is_local(host, nodes.transport.local_names):
        argv += ["-e", nodes.transport.rsync_shell()]
        target = f"{host}:{target}"
    proc = subprocess.run([*argv, source, target], capture_output=True, text=True,
                          env=nodes.transport.environment(), stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        return -1, 0, last_error(proc)
    from .treesync import _stats

    sent, sent_bytes = _stats(proc.stdout)
    return sent, sent_bytes, ""


def stage(nodes: Nodes, hosts: Sequence[str], inputs: Sequence[ResolvedInput], remote_root: str, run_id: str,
          progress: Progress) -> list[dict[str, Any]]:
    """Put every copied input on every host (in parallel); what each host got, for run.json."""
    copied = [item for item in inputs if item.spec.copy]
    if copied and shutil.which("rsync") is None:
        raise InputError("--input ...:copy needs rsync here: install it (apt-get install rsync)")
    report: list[dict[str, Any]] = []
    for item in copied:
        assert item.digest is not None
        entry = cache_dir(remote_root, item.spec.name, item.digest)
        progress(f"input {item.spec.name}: {len(item.names)} file(s), {human_size(item.nbytes)}, to "
                 f"{len(hosts)} node(s)")

        def one(host: str, item: ResolvedInput = item, entry: str = entry) -> dict[str, Any]:
            start = time.monotonic()
            answer, proc = nodes.call(host, "input-entry", remote_root, entry, item.node_path.rsplit("/", 1)[-1])
            if answer is None or not answer.get("ok"):
                why = (answer or {}).get("error") or last_error(proc)
                raise InputError(f"cannot stage --input {item.spec.name} on {host}: {why}")
            if answer.get("cached"):
                return {"host": host, "name": item.spec.name, "cached": True, "sent": 0, "sent_bytes": 0}
            tmp = f"{entry}.part-{run_id}"
            sent, sent_bytes, error = _rsync(nodes, host, item, tmp, answer.get("previous"))
            if sent < 0:
                nodes.call(host, "input-discard", remote_root, tmp)
                raise InputError(f"cannot copy --input {item.spec.name} to {host}: {error}")
            done, proc = nodes.call(host, "input-done", tmp, entry, item.digest or "", stdin="\0".join(item.names))
            if (done or {}).get("hash") != item.digest:
                _memo_file(Path(item.spec.path).resolve()).unlink(missing_ok=True)  # hash it afresh next time
                why = "it arrived different (did it change meanwhile?)" if done else last_error(proc)
                raise InputError(f"cannot stage --input {item.spec.name} on {host}: {why}: run again")
            took = time.monotonic() - start
            progress(f"input {item.spec.name} on {host}: {sent} file(s) sent ({human_size(sent_bytes)}) in "
                     f"{took:.2f} s")
            return {"host": host, "name": item.spec.name, "cached": False, "sent": sent, "sent_bytes": sent_bytes}

        results = for_each(hosts, one, max_parallel=16)
        cached = [r["host"] for r in results if r["cached"]]
        if cached:
            progress(f"input {item.spec.name}: already on {len(cached)} node(s), nothing sent there")
        report += results
    return report
