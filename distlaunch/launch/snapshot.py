"""The run's snapshot of the source directory, ``<run folder>/code``: the code that ran.

Every run that is not ``--in-place`` gets one before it starts, with the same file
selection as the sync to other nodes (``treesync.list_files``; never the top-level
``runs/``, ``outputs/`` or ``logs/``). On one host the ranks run in it, so ``./outputs``
and ``./logs`` are the run's own and concurrent runs never meet; with other nodes it is
what is synced to them. A batch job's snapshot is taken at submit time.

Unchanged files are hard-linked from the newest earlier snapshot of the same source dir
under the same runs root (unchanged: the same size, modification and change time, inode
and mode as when that snapshot was taken), the others copied, hashing as they go; files are read-only, like the nodes'
copies. ``code.json`` lists every file with its digest and the tree hash (the hash the
nodes' copies are checked against), so ``restore`` can give the code back, verified.
"""
from __future__ import annotations

import hashlib
import heapq
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RunDirError, RunNotFound, SpecError
from ..nodes.agent import hash_of, tree_hash
from ..nodes.treesync import SourceTree, describe, list_files
from ..plan.units import human_size
from ..records import RunPaths, read_json, write_json

Progress = Callable[[str], None]
SLOW_S = 1.0  # a snapshot that takes longer than this is reported, and how far it got every EVERY_S
EVERY_S = 5.0
LOOK_BACK = 50  # runs searched for an earlier snapshot to hard-link unchanged files from


@dataclass(frozen=True)
class Snapshot:
    root: Path
    source: str
    digests: dict[str, str]  # file name → entry digest (as the node agent computes it)
    nbytes: int
    hash: str
    linked: int = 0
    copied: int = 0

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(sorted(self.digests))

    def tree(self) -> SourceTree:
        """The snapshot as a tree to sync to other nodes."""
        return SourceTree(str(self.root), self.files, self.nbytes, origin=self.source, digest=self.hash)

    def summary(self) -> dict[str, Any]:
        """What run.json keeps of it."""
        return {"source": self.source, "files": len(self.digests), "bytes": self.nbytes, "hash": self.hash,
                "linked": self.linked, "copied": self.copied}


def _previous(runs_root: Path, source: str, this: Path) -> tuple[Path | None, dict[str, Any]]:
    """The newest earlier snapshot of ``source`` under ``runs_root`` (among the last
    ``LOOK_BACK`` runs), and its code.json. Run ids begin with their date and sort by
    time, so the newest are the largest such names (other folders, sweeps/ say, are no
    run's): picked from plain names in one pass (2 ms with 3,000 runs, where sorting them
    all as paths took 24 ms of every launch)."""
    try:
        names = [name for name in os.listdir(runs_root) if name[:1].isdigit()]
    except OSError:
        return None, {}
    newest = (runs_root / name for name in heapq.nlargest(LOOK_BACK + 1, names))
    for folder in [folder for folder in newest if folder != this][:LOOK_BACK]:
        try:
            data = read_json(folder / "code.json")
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("source") == source and (folder / "code").is_dir():
            return folder / "code", data
    return None, {}


def _key(info: os.stat_result) -> list[int]:
    """What says a source file is unchanged since the last snapshot: size, times (the
    change time too, which copying with -p cannot set back), inode, mode."""
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_mode & 0o500]


def _copy(src: Path, dst: Path, info: os.stat_result) -> str:
    """Copy one file, hashing it as it goes; the copy keeps the time, is read-only."""
    digest = hashlib.sha256(b"f")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    with open(src, "rb") as reader, open(os.open(dst, flags, 0o600), "wb") as writer:
        for block in iter(lambda: reader.read(1 << 20), b""):
            digest.update(block)
            writer.write(block)
    os.utime(dst, ns=(info.st_atime_ns, info.st_mtime_ns))
    os.chmod(dst, info.st_mode & 0o500 | 0o400)
    return digest.hexdigest()


def _escapes(source: str, name: str, target: str) -> bool:
    """Whether a relative symlink leaves the source dir (it dangles in the snapshot)."""
    if os.path.isabs(target):
        return False
    resolved = os.path.normpath(os.path.join(source, os.path.dirname(name), target))
    return not (resolved == source or resolved.startswith(source.rstrip("/") + "/"))


def take(source: str, paths: RunPaths, progress: Progress, exclude: tuple[str, ...] = (), max_files: int = 0,
         max_bytes: int = 0) -> Snapshot:
    """Snapshot ``source`` into ``paths.code`` and write ``code.json``; SpecError for a
    source file that cannot be read or a source dir over ``max_files``/``max_bytes``
    (0: no limit; nothing is copied then), RunDirError when the run folder cannot take it.
    A snapshot that takes more than ``SLOW_S`` says how far it got every ``EVERY_S``."""
    start = time.monotonic()
    tree = list_files(source, exclude=exclude, max_files=max_files, max_bytes=max_bytes)
    for line in describe(tree):
        progress(f"warning: {line}")
    runs_root = paths.root.parent
    before, old = _previous(runs_root, source, paths.root)
    known, keys = old.get("files", {}), old.get("stat", {})
    digests: dict[str, str] = {}
    stats: dict[str, list[int]] = {}
    escaping: list[str] = []
    linked = copied = done_bytes = 0
    said = start + SLOW_S - EVERY_S  # when progress was last shown
    try:
        paths.code.mkdir(mode=0o700)
        for done, name in enumerate(tree.files):
            if time.monotonic() - said >= EVERY_S:
                said = time.monotonic()
                progress(f"code snapshot: {done:,} of {len(tree.files):,} files ({human_size(done_bytes)} of "
                         f"{human_size(tree.nbytes)}) in {said - start:.0f} s")
            src, dst = Path(source, name), paths.code / name
            dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                info = os.lstat(src)
            except FileNotFoundError:
                continue  # removed since it was listed
            done_bytes += info.st_size
            if stat.S_ISLNK(info.st_mode):
                target = os.readlink(src)
                os.symlink(target, dst)
                digests[name] = hashlib.sha256(b"l" + target.encode("utf-8", "surrogateescape")).hexdigest()
                if _escapes(source, name, target):
                    escaping.append(name)
                continue
            stats[name] = _key(info)
            if before is not None and name in known and keys.get(name) == stats[name]:
                try:
                    os.link(before / name, dst)
                    digests[name], linked = known[name], linked + 1
                    continue
                except OSError:
                    pass  # gone, another filesystem, too many links: copy it
            try:
                digests[name], copied = _copy(src, dst, info), copied + 1
            except PermissionError as exc:
                if exc.filename == str(src):
                    raise SpecError(f"cannot read {src} for the run's code snapshot: permission denied: make it "
                                    "readable, or leave it out with a .distlaunchignore line") from None
                raise
        snap = Snapshot(paths.code, source, digests, tree.nbytes, hash_of(digests), linked, copied)
        write_json(paths.code_digests, {"source": source, "hash": snap.hash, "bytes": snap.nbytes, "files": digests,
                                        "stat": stats})
    except OSError as exc:
        raise RunDirError(f"cannot snapshot {source} into {paths.code}: {exc.strerror or exc}: free space, pick "
                          "another --run-dir, or run with --in-place") from None
    if escaping:
        shown = ", ".join(escaping[:3]) + (" ..." if len(escaping) > 3 else "")
        progress(f"warning: {len(escaping)} symlink(s) point outside {source} and dangle in the run's copy "
                 f"({shown}): use absolute links, an --input, or --in-place")
    took = time.monotonic() - start
    if took > SLOW_S:
        progress(f"code snapshot: {len(digests)} files ({human_size(tree.nbytes)}), {copied} copied, {linked} "
                 f"unchanged, in {took:.1f} s")
    return snap


def load(paths: RunPaths) -> Snapshot | None:
    """The snapshot a run folder holds (None for an --in-place run, or a run before snapshots)."""
    try:
        data = read_json(paths.code_digests)
    except (OSError, ValueError):
        return None
    return Snapshot(paths.code, data.get("source", ""), dict(data.get("files", {})), int(data.get("bytes", 0)),
                    data.get("hash", ""))


def gather(paths: RunPaths) -> None:
    """After a run on one host: its ``./outputs`` and ``./logs`` move from the snapshot into
    the run folder (merged; a file the job wrote wins), leaving the snapshot as it was."""
    for name, into in (("outputs", paths.outputs), ("logs", paths.logs)):
        _merge(paths.code / name, into)


def _merge(src: Path, dst: Path) -> None:
    if not src.is_dir() or src.is_symlink():
        return
    dst.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in list(src.iterdir()):
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir() and not target.is_symlink():
            _merge(entry, target)
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    try:
        src.rmdir()
    except OSError:
        pass


def restore(paths: RunPaths, dest: Path) -> Snapshot:
    """Copy a run's snapshot into ``dest``, a new folder (made 0700) or an empty one of
    ours, writable again; the snapshot is checked against the recorded hash first."""
    snap = load(paths)
    if snap is None or not paths.code.is_dir():
        raise RunNotFound(f"run {paths.run_id} has no code snapshot (it ran in place, or before snapshots existed)")
    got = tree_hash(paths.code, list(snap.files))
    if got != snap.hash:
        raise RunDirError(f"the snapshot of run {paths.run_id} was changed after the run (hash {got[:12]}, "
                          f"recorded {snap.hash[:12]}): it is no longer the code that ran")
    try:
        try:
            dest.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            info = os.lstat(dest)
            if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022
                    or any(dest.iterdir())):
                raise RunDirError(f"{dest} exists and is not an empty folder of yours that only you can write: "
                                  "name a new folder to restore into") from None
        for name in snap.files:
            src, dst = paths.code / name, dest / name
            for folder in reversed(dst.relative_to(dest).parents[:-1]):
                (dest / folder).mkdir(mode=0o700, exist_ok=True)
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            else:
                info = os.stat(src)
                _copy(src, dst, info)
                os.chmod(dst, info.st_mode & 0o700 | 0o600)
    except OSError as exc:
        raise RunDirError(f"cannot restore run {paths.run_id} into {dest}: {exc.strerror or exc} "
                          f"({exc.filename or dest}): pick another folder") from None
    return snap
