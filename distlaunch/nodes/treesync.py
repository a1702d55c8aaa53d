"""Copy the source directory to every node, check it arrived whole, bring results back.

Files are chosen like git would (``.gitignore`` files, plus ``.distlaunchignore``; never
``.git/``, ``__pycache__/``, the top-level ``runs/``, ``outputs/`` and ``logs/``, or the
run folders' root). Files that look like secrets
(``.env``, ``id_*``, ``*.pem``, ``.netrc``, ...) are left out unless a
``.distlaunchignore`` line re-includes them (``!.env``). Symlinks travel as links.
The list goes to rsync NUL-separated (any legal file name works), unchanged files are
hard-linked from the previous run (``--link-dest``) instead of sent, and the copy is
checked with a content hash on every node; a mismatch names the first differing file.
The copy's files are read-only (they are hard links shared between runs); write
to ./outputs and ./logs. Nodes are handled in parallel; where the code goes is
``plan.layout.RemoteLayout``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

from ..errors import DistlaunchError, ExitCode, SpecError
from ..plan.hosts import is_local
from ..plan.layout import RemoteLayout
from ..plan.units import format_size, human_size
from ..protocol import AGENT_DIR
from .agent import copy_key, tree_digests, tree_hash
from .transport import Nodes, for_each, last_error

if TYPE_CHECKING:
    import tarfile

log = logging.getLogger(__name__)

ALWAYS_SKIPPED = {".git", "__pycache__", AGENT_DIR}
TOP_SKIPPED = {"runs", "outputs", "logs"}  # run folders, and what each run writes for itself
IGNORE_FILES = (".gitignore", ".distlaunchignore")
SECRET_PATTERNS = (".env", ".env.*", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.p12",
                   ".netrc", ".pypirc", ".git-credentials", ".pgpass", "credentials.json")
LARGE_BYTES = 100 * 1000 * 1000
LARGE_FILES = 5000
Progress = Callable[[str], None]


class Matcher(Protocol):
    """What an ignore file's patterns are used for: does this path (a folder's ending in /) match?"""

    def match_file(self, file: str) -> bool: ...


class NameGlobs:
    """gitignore patterns that name a file or folder at any depth (no ``/``, no ``!``) and
    are exact, ``prefix*`` or ``*suffix``, matched the way ``pathspec.GitIgnoreSpec``
    matches them (a path matches when any of its parts does, so a matching folder's
    contents match too) without importing pathspec and compiling a regex per pattern: the
    default secret patterns cost nothing on a launch's critical path. ``of`` gives None
    for any other pattern, and the caller then uses pathspec. One difference, on the safe
    side for secrets: a part with a newline inside a path (``a/.env\\n/b``) matches by its
    name here, where pathspec's regular expressions stop at the newline."""

    def __init__(self, exact: frozenset[str], prefixes: tuple[str, ...], suffixes: tuple[str, ...]) -> None:
        self.exact, self.prefixes, self.suffixes = exact, prefixes, suffixes

    @classmethod
    def of(cls, patterns: Sequence[str]) -> NameGlobs | None:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        for pattern in patterns:
            if pattern.startswith("*") and _plain(pattern[1:]):
                suffixes.append(pattern[1:])
            elif pattern.endswith("*") and _plain(pattern[:-1]):
                prefixes.append(pattern[:-1])
            elif _plain(pattern):
                exact.add(pattern)
            else:
                return None
        return cls(frozenset(exact), tuple(prefixes), tuple(suffixes))

    def match_name(self, name: str) -> bool:
        return name in self.exact or name.startswith(self.prefixes) or name.endswith(self.suffixes)

    def match_file(self, path: str) -> bool:
        if path.startswith("/"):  # as pathspec takes a path: one leading / or ./ dropped
            path = path[1:]
        elif path.startswith("./"):
            path = path[2:]
        # a name ending in a newline also matches as without it, as pathspec's regular expressions do
        return any(self.match_name(part) or (part.endswith("\n") and self.match_name(part[:-1]))
                   for part in path.rstrip("/").split("/") if part)


def _plain(text: str) -> bool:
    """No character that gitignore gives a meaning: a name matched as it is."""
    return bool(text) and not (set(text) & set("*?[]\\/!#")) and text == text.strip()


SECRET_NAMES = NameGlobs.of(SECRET_PATTERNS)


class SourceTooLarge(SpecError):
    """The source dir holds more than the snapshot limits allow (a run started from $HOME
    or /tmp, say): said while listing, before anything is copied."""


class SyncError(DistlaunchError):
    """The code could not be copied to a node, or arrived different: the job cannot start."""

    exit_code = ExitCode.LAUNCH


@dataclass(frozen=True)
class SourceTree:
    """The files that travel, and what was left out as a likely secret."""

    root: str
    files: tuple[str, ...]
    nbytes: int
    secrets_left_out: tuple[str, ...] = ()
    origin: str = ""  # the source dir a snapshot was taken of (root is then the snapshot)
    digest: str = ""  # its tree hash, when known already


@dataclass(frozen=True)
class SyncResult:
    host: str
    files: int
    sent: int  # files actually transferred
    sent_bytes: int
    seconds: float
    reused: bool = False  # linked from the node's copy of the same tree, not sent


def list_files(source: str | Path, exclude: Sequence[str] = (), max_files: int = 0, max_bytes: int = 0) -> SourceTree:
    """The files (and symlinks) to send, honouring .gitignore/.distlaunchignore files;
    never inside the absolute folders of ``exclude`` (a --run-dir within the source).
    SourceTooLarge as soon as they pass ``max_files`` or ``max_bytes`` (0: no limit).
    pathspec is imported only where an ignore file is found."""
    root = Path(source)
    skipped = {os.path.abspath(path) for path in exclude}
    chosen: list[str] = []
    secrets: list[str] = []
    nbytes = 0
    secret_spec = SECRET_NAMES or _gitignore(SECRET_PATTERNS)
    largest = (0, "")
    # the ignore files that apply in each directory: its own and its parents', each with
    # the prefix of the folder it lies in ("" at the top, "a/b/" below), which its patterns
    # are relative to; worked out once per directory, not per file
    in_force: dict[str, list[tuple[str, Matcher]]] = {}

    def matches(specs: list[tuple[str, Matcher]], rel: str, is_dir: bool) -> bool:
        return any(spec.match_file(rel[len(prefix):] + ("/" if is_dir else "")) for prefix, spec in specs)

    for here_path, dirs, files in os.walk(root):
        here = Path(here_path).relative_to(root).as_posix()
        prefix = "" if here == "." else here + "/"
        specs = list(in_force.pop(here, []))
        for name in IGNORE_FILES:
            path = os.path.join(here_path, name)
            if os.path.isfile(path):
                lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
                if not prefix and name == ".distlaunchignore":
                    lines = [*SECRET_PATTERNS, *lines]  # its '!' lines can bring a secret back
                specs.append((prefix, _gitignore(lines)))
        if not prefix and not (root / ".distlaunchignore").is_file():
            specs.append(("", secret_spec))
        keep = []
        for name in sorted(dirs):
            rel = prefix + name
            if name in ALWAYS_SKIPPED or (not prefix and name in TOP_SKIPPED) or matches(specs, rel, True):
                continue
            if skipped and os.path.abspath(os.path.join(here_path, name)) in skipped:
                continue
            if os.path.islink(os.path.join(here_path, name)):
                chosen.append(rel)  # a directory symlink travels as a link, not followed
            else:
                keep.append(name)
                in_force[rel] = specs
        dirs[:] = keep
        for name in sorted(files):
            rel = prefix + name
            if matches(specs, rel, False):
                if secret_spec.match_file(rel):
                    secrets.append(rel)
                continue
            try:
                info = os.lstat(os.path.join(here_path, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):  # never a FIFO, socket or device
                chosen.append(rel)
                nbytes += info.st_size
                largest = max(largest, (info.st_size, rel))
                if (max_files and len(chosen) > max_files) or (max_bytes and nbytes > max_bytes):
                    raise _too_large(root, len(chosen), nbytes, largest, max_files, max_bytes)
    return SourceTree(str(root), tuple(sorted(chosen)), nbytes, tuple(secrets))


def _gitignore(lines: Sequence[str]) -> Matcher:
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(lines)


def _too_large(root: Path, files: int, nbytes: int, largest: tuple[int, str], max_files: int,
               max_bytes: int) -> SourceTooLarge:
    if max_files and files > max_files:
        what, option = f"more than {max_files:,} files", "--max-source-files"
    else:
        limit = format_size(max_bytes)
        what, option = f"more than {limit if limit.endswith('iB') else f'{max_bytes:,} bytes'}", "--max-source-size"
    return SourceTooLarge(
        f"the source dir {root} holds {what} to copy into the run folder (stopped listing at {files:,} files, "
        f"{human_size(nbytes)}; largest so far {largest[1]}, {human_size(largest[0])}): point --source-dir at the "
        f"code only, leave data out with .distlaunchignore, run with --in-place, or raise {option} (0: no limit)")


def _stats(output: str) -> tuple[int, int]:
    files = re.search(r"Number of regular files transferred: ([\d,]+)", output)
    size = re.search(r"Total transferred file size: ([\d,]+)", output)
    return (int(files.group(1).replace(",", "")) if files else 0,
            int(size.group(1).replace(",", "")) if size else 0)


def _target(nodes: Nodes, host: str, path: str) -> str:
    return path if is_local(host, nodes.transport.local_names) else f"{host}:{path}"


def rsync_push_argv(nodes: Nodes, host: str, source: str, layout: RemoteLayout) -> list[str]:
    # files read-only: unchanged ones are hard links shared with earlier runs (--link-dest),
    # so a job writing into its code in place must fail rather than change another run's
    argv = ["rsync", "-a", "--stats", "--from0", "--files-from=-", f"--link-dest={layout.base}/latest/",
            "--chmod=go-rwx,Fu-w"]
    if not is_local(host, nodes.transport.local_names):
        argv += ["-e", nodes.transport.rsync_shell()]
    return [*argv, f"{source}/", _target(nodes, host, f"{layout.workdir}/")]


def first_difference(source: str, files: Sequence[str], theirs: dict[str, str]) -> str:
    """The first file whose digest differs between here and a node's answer."""
    ours = tree_digests(Path(source), list(files))
    for name in sorted(set(ours) | set(theirs)):
        if ours.get(name) != theirs.get(name):
            return name
    return "(none found: the file list itself differs)"


def push(nodes: Nodes, host: str, tree: SourceTree, expected: str, layout: RemoteLayout,
         key: str | None = None) -> SyncResult:
    """The tree into the run's folder on ``host``: hard-linked from the node's latest copy
    when that holds the same tree (``key``, its ``copy_key``; worked out here if not
    given), else by rsync; checked by content hash on the node either way."""
    start = time.monotonic()
    key = key or copy_key(expected, Path(tree.root), list(tree.files))
    answer, proc = nodes.call(host, "prepare", layout.root, layout.base, key)
    if answer is None or not answer.get("ok"):
        why = (answer or {}).get("error") or last_error(proc)
        raise SyncError(f"cannot prepare {layout.root} on {host}: {why}")
    listing = "\0".join(tree.files) + "\0"
    if answer.get("latest_same"):
        reused, _ = nodes.call(host, "reuse", layout.base, layout.workdir, expected, key, stdin=listing)
        if (reused or {}).get("reused"):
            return SyncResult(host, len(tree.files), 0, 0, time.monotonic() - start, reused=True)
    # rsync skips --files-from names that start with '#' or ';' as comments: './' keeps them
    rsync_list = "".join(f"./{name}\0" for name in tree.files)
    rsync = subprocess.run(rsync_push_argv(nodes, host, tree.root, layout), env=nodes.transport.environment(),
                           input=rsync_list.encode("utf-8", "surrogateescape"), capture_output=True)
    if rsync.returncode != 0:
        last = (rsync.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise SyncError(f"cannot copy {tree.root} to {host}: rsync exit {rsync.returncode}: {last}: "
                        "check access and that rsync is installed there (distlaunch doctor)")
    sent, sent_bytes = _stats(rsync.stdout.decode(errors="replace"))
    answer, check = nodes.call(host, "finish", layout.base, layout.workdir, expected, key, stdin=listing)
    got = (answer or {}).get("hash")
    if got is None:
        raise SyncError(f"cannot check the copy on {host}: {last_error(check)}: "
                        "is distlaunch installed there with the same Python (distlaunch doctor)?")
    if got != expected:
        detail, _ = nodes.call(host, "tree-digests", layout.workdir, stdin=listing)
        name = first_difference(tree.root, tree.files, (detail or {}).get("digests", {}))
        raise SyncError(f"the code on {host} differs from {tree.root} after syncing, first at {name!r}: "
                        f"check the disk on {host} (or whether the file changed meanwhile), then run again")
    return SyncResult(host, len(tree.files), sent, sent_bytes, time.monotonic() - start)


def describe(tree: SourceTree) -> list[str]:
    """Warnings worth a line before syncing: secrets left out, a large source tree."""
    lines = []
    if tree.secrets_left_out:
        shown = ", ".join(tree.secrets_left_out[:5]) + (" ..." if len(tree.secrets_left_out) > 5 else "")
        lines.append(f"left out {len(tree.secrets_left_out)} file(s) that look like secrets ({shown}); to sync "
                     "one anyway, add a line '!NAME' to .distlaunchignore")
    if tree.nbytes > LARGE_BYTES or len(tree.files) > LARGE_FILES:
        lines.append(f"the source dir {tree.root} is large ({len(tree.files)} files, {human_size(tree.nbytes)}): "
                     "leave data and checkpoints out with .distlaunchignore, or point --source-dir at the code only")
    return lines


def sync(nodes: Nodes, hosts: Sequence[str], tree: SourceTree, layout: RemoteLayout,
         progress: Progress) -> list[SyncResult]:
    """Send the tree (the run's snapshot) to every host in parallel; SyncError names the
    first bad node. What ``describe`` warns about was said when the tree was listed."""
    expected = tree.digest or tree_hash(Path(tree.root), list(tree.files))
    key = copy_key(expected, Path(tree.root), list(tree.files))  # once, not per node
    progress(f"syncing {len(tree.files)} files ({human_size(tree.nbytes)}) from {tree.origin or tree.root} to "
             f"{len(hosts)} node(s)")
    done: list[str] = []
    finished = threading.Event()

    def tick() -> None:
        started = time.monotonic()
        while not finished.wait(5.0):
            progress(f"still syncing after {time.monotonic() - started:.0f} s: {len(done)} of {len(hosts)} "
                     "node(s) done")

    def one(host: str) -> SyncResult:
        result = push(nodes, host, tree, expected, layout, key)
        done.append(host)
        if result.reused:
            progress(f"synced to {host}: the same {result.files} files as its last copy, linked in "
                     f"{result.seconds:.2f} s")
        else:
            progress(f"synced to {host}: {result.sent} of {result.files} files sent "
                     f"({human_size(result.sent_bytes)}) in {result.seconds:.2f} s")
        return result

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        return for_each(hosts, one, max_parallel=16)
    finally:
        finished.set()


def hand_over(nodes: Nodes, host: str, local: Path, remote: str, exclude: Sequence[str] = ()) -> bool:
    """Copy local folder ``local`` into ``remote`` on ``host`` (merging; owner-only), leaving
    out the top-level names in ``exclude``: the way back of ``pull``. True when it arrived."""
    argv = ["rsync", "-a", "--mkpath", "--chmod=go-rwx", *(f"--exclude=/{name}" for name in exclude)]
    if not is_local(host, nodes.transport.local_names):
        argv += ["-e", nodes.transport.rsync_shell()]
    proc = subprocess.run([*argv, f"{local}/", _target(nodes, host, f"{remote}/")], capture_output=True,
                          env=nodes.transport.environment())
    return proc.returncode == 0


COLLECT_IO_TIMEOUT_S = 120  # a node that stops answering mid-collection fails it, not the launcher
# rsync's word for a source that is not there (the job never made that folder)
ABSENT = re.compile(rb'(?:link_stat|change_dir) "([^"]*)" failed: No such file or directory')


def pull_into(nodes: Nodes, host: str, sources: Sequence[tuple[str, str]], local: Path) -> list[str]:
    """Copy each remote folder ``base/name`` into ``local/name`` (merging; name "": its
    contents into ``local``), all in ONE rsync (``--relative``, each source cut at
    ``/./``). Returns the remote folders that did not come back; one the job never made
    is not among them."""
    argv = ["rsync", "-a", "--relative", "--mkpath", "--chmod=go-rwx", f"--timeout={COLLECT_IO_TIMEOUT_S}"]
    if not is_local(host, nodes.transport.local_names):
        argv += ["-e", nodes.transport.rsync_shell()]
    wanted = [f"{base}/./{name}/" if name else f"{base}/./" for base, name in sources]
    proc = subprocess.run([*argv, *(_target(nodes, host, path) for path in wanted), f"{local}/"],
                          capture_output=True, env=nodes.transport.environment())
    if proc.returncode == 0:
        return []
    absent = {os.path.normpath(path.decode(errors="replace")) for path in ABSENT.findall(proc.stderr)}
    errors = [line for line in proc.stderr.splitlines() if line.startswith(b"rsync")
              and not ABSENT.search(line) and b"some files/attrs were not transferred" not in line]
    if proc.returncode == 23 and not errors:  # only absent folders: the rest came back
        return []
    return [f"{base}/{name}".rstrip("/") for base, name in sources
            if os.path.normpath(f"{base}/{name}") not in absent]


INLINE_MAX_BYTES = 4 << 20  # folders up to this size come back in the agent's answer, larger ones by rsync


def _bring(nodes: Nodes, host: str, sources: Sequence[tuple[str, str]], local: Path) -> list[str]:
    """``pull_into``'s result: in the answer of the node's agent session when there is one
    and the folders are small (no rsync started), else by rsync."""
    if nodes.in_session(host) and not is_local(host, nodes.transport.local_names) and \
            unpack_into(nodes, host, sources, local):
        return []
    return pull_into(nodes, host, sources, local)


def _checked(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """A member fit to unpack into ``dest``: a plain file or folder (no link, no special
    file: the agent packs none, and rsync brings those) whose path stays inside ``dest``,
    also through links already there; made owner-only, as rsync --chmod=go-rwx makes
    it, and owned by whoever collects. ValueError otherwise."""
    name = member.name
    root = os.path.realpath(dest)
    target = os.path.realpath(os.path.join(root, name))
    if not (member.isfile() or member.isdir()) or os.path.isabs(name) or ".." in PurePosixPath(name).parts or \
            not (target == root or target.startswith(root + os.sep)):
        raise ValueError(f"{name!r} is not a plain file or folder inside {dest}")
    member.mode = 0o700 if member.isdir() else member.mode & 0o700
    member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
    return member


def _extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Every member through ``_checked``; on a Python with tarfile's "data" filter, that
    filter too (the folders kept owner-only, nothing chowned)."""
    import tarfile

    if not hasattr(tarfile, "data_filter"):  # Python before 3.12 / 3.11.4 / 3.10.12 / 3.9.17
        tar.extractall(dest, members=[_checked(member, str(dest)) for member in tar.getmembers()])
        return

    def owned(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        member = tarfile.data_filter(_checked(member, path), path)
        mode = 0o700 if member.isdir() else None if member.mode is None else member.mode & 0o700
        return member.replace(mode=mode, uid=None, gid=None, uname=None, gname=None, deep=False)

    tar.extractall(dest, filter=owned)


def unpack_into(nodes: Nodes, host: str, sources: Sequence[tuple[str, str]], local: Path) -> bool:
    """``pull_into`` by the agent: its ``pack`` answer unpacked into ``local``. False when
    the agent leaves it to rsync (too big, a link, not a folder) or the answer cannot be
    unpacked (``_checked`` refuses a member); rsync then merges over what came."""
    import base64
    import io
    import json
    import tarfile

    answer, _proc = nodes.call(host, "pack", str(INLINE_MAX_BYTES), stdin=json.dumps([list(s) for s in sources]),
                               timeout=COLLECT_IO_TIMEOUT_S)
    if not answer or not isinstance(answer.get("tar"), str):
        return False
    try:
        local.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(answer["tar"])), mode="r:") as tar:
            _extract(tar, local)
    except (tarfile.TarError, OSError, ValueError):
        return False
    return True


def metrics_sizes(folder: Path) -> dict[str, int]:
    """The size of each metrics file in ``folder`` now (before an attempt: ``add_metrics``)."""
    try:
        return {entry.name: entry.stat().st_size for entry in folder.iterdir() if entry.is_file()}
    except OSError:
        return {}


def add_metrics(staged: Path, folder: Path, before: Mapping[str, int]) -> None:
    """Add an attempt's metrics files, collected into ``staged``, to the run's in ``folder``:
    the run's metrics are its history over every attempt, and a node holds only its
    attempt's lines (each attempt writes in a folder of its own there). ``before``: each
    file's size when the attempt started (``metrics_sizes``); beyond it, a file may hold
    the attempt's lines relayed live (rank 0's from another node): only what they lack
    is added, or, where they are not the node file's beginning, the node's file replaces
    them. A file's missing last line end is added first. Staging goes once all are in;
    where one cannot be added, it stays there and a warning says so."""
    if not staged.is_dir():
        return
    failed = []
    for came in sorted(staged.iterdir()):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            _add_attempt(folder / came.name, before.get(came.name, 0), came.read_bytes())
        except OSError as exc:
            failed.append(f"{came.name} ({exc.strerror or exc})")
    if failed:
        log.warning("could not add this attempt's metrics to %s: %s; they are in %s", folder, ", ".join(failed),
                    staged)
    else:
        shutil.rmtree(staged, ignore_errors=True)


def _add_attempt(target: Path, start: int, attempt: bytes) -> None:
    with open(os.open(target, os.O_RDWR | os.O_CREAT, 0o600), "r+b") as handle:
        start = min(start, handle.seek(0, os.SEEK_END))
        handle.seek(max(start - 1, 0))
        torn = start > 0 and handle.read(1) != b"\n"  # then relayed lines went onto the torn one
        relayed = handle.read()
        if torn or not attempt.startswith(relayed):  # the node's file tells the whole attempt
            handle.truncate(start)
            relayed = b""
        rest, end = attempt[len(relayed):], start + len(relayed)
        if not rest:
            return
        if end:
            handle.seek(end - 1)
            if handle.read(1) != b"\n":
                rest = b"\n" + rest
        handle.seek(end)
        handle.write(rest)


def collect(nodes: Nodes, hosts: Sequence[str], rank0_host: str, layout: RemoteLayout, run_root: Path,
            all_ranks: bool, metrics_before: Mapping[str, int] | None = None) -> list[str]:
    """Bring rank logs, exit records and metrics from every node, and rank 0's ./outputs and
    ./logs (every node's outputs under outputs/<host>/ with ``all_ranks``): one rsync per
    node (two with ``all_ranks``), all nodes at once. The metrics come into a staging
    folder of the run folder and are added to the run's (``add_metrics``, with
    ``metrics_before``). Returns what failed, as ``host:folder`` (a folder the job never
    made is not a failure)."""
    staged = f"{os.path.relpath(layout.agent_dir, layout.workdir)}/metrics"  # as rsync --relative names it here
    jobs: list[tuple[str, list[tuple[str, str]], Path]] = []
    for host in hosts:
        sources = [(layout.agent_dir, "logs"), (layout.agent_dir, "ranks"), (layout.workdir, staged)]
        if host == rank0_host:
            sources += [(layout.workdir, "outputs"), (layout.workdir, "logs")]
        jobs.append((host, sources, run_root))
        if all_ranks:
            jobs.append((host, [(f"{layout.workdir}/outputs", "")], run_root / "outputs" / host))
    failed = for_each(jobs, lambda job: _bring(nodes, *job), max_parallel=16)
    add_metrics(run_root / staged, run_root / "metrics", metrics_before or {})
    for folder in PurePosixPath(staged).parents:  # the staging folder's parents, where empty
        if folder != PurePosixPath("."):
            with contextlib.suppress(OSError):
                (run_root / folder).rmdir()
    return [f"{host}:{remote}" for (host, _, _), missing in zip(jobs, failed) for remote in missing]
