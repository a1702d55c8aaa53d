"""What distlaunch runs on a node: ``python -P -m distlaunch.nodes.agent COMMAND ...``.

probe [ROOT [RUNTIME EXE IMAGE PYTHON]]
                               JSON facts for ``doctor`` and the pre-launch checks (with
                               a container: its runtime, image and the Python inside)
prepare ROOT BASE [KEY]        make (or check) the user's private scratch ROOT and the
                               project folder BASE/runs in it, refusing any path another
                               user could have planted or can write; with KEY (a tree's
                               copy_key), also whether BASE/latest is a copy of that tree
tree-hash DIR                  content hash of the files listed on stdin (NUL-separated)
tree-digests DIR               one digest per listed file (to name the first that differs)
finish BASE RUN_DIR HASH [KEY] tree-hash RUN_DIR; if it equals HASH, point BASE/latest at
                               RUN_DIR (remembering KEY) and prune old run folders that
                               are safe to delete
reuse BASE RUN_DIR HASH KEY    a new RUN_DIR of the listed files hard-linked from
                               BASE/latest (a copy with KEY), checked against HASH, then
                               as finish; a RUN_DIR that exists is never touched
pack LIMIT                     the folders listed on stdin (JSON [[BASE, NAME], ...]) as
                               one tar, base64, when they hold at most LIMIT bytes and
                               no link (rsync brings those)
pip KEY [PIP ARGS...]          pip install PIP ARGS (requirements text on stdin, if any)
                               unless KEY was installed before on this node
sees PATH                      whether PATH exists on this node (shared filesystem check)
input-entry ROOT ENTRY BASE    make ROOT/inputs private; whether the cached input ENTRY is
                               complete, else the newest complete entry of the same input
                               that holds BASE (to hard-link unchanged files from)
input-done TMP ENTRY HASH      tree-hash TMP over the names on stdin; if it equals HASH,
                               make it read-only, mark it complete and move it to ENTRY
input-discard ROOT TMP         remove a partial copy TMP of an input (in ROOT/inputs)
cleanup RUN_ID                 SIGKILL this node's processes of RUN_ID
release RUN_DIR                mark RUN_DIR collected, so that a later prune may delete it
dump RUN_ID                    ask this node's Python ranks of RUN_ID for their stacks
serve                          all of the above for a whole run over one connection: a
                               JSON request per line in, a JSON answer per line out

It prints one JSON object on stdout. Kept light: no torch, no mpi4py imports.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..protocol import AGENT_DIR

KEEP_RUNS = int(os.environ.get("DISTLAUNCH_KEEP_RUNS", "5"))  # run folders kept per project on a node
ABANDONED_S = 7 * 86400  # a run folder never marked done may be pruned after this long
DONE_MARKER = ".distlaunch-done"  # the launcher has collected what it needs from the run folder
SYNCED_MARKER = ".distlaunch-synced"  # when the copy was made (rsync gives the folder the source's times)
PACKAGES = ("distlaunch", "torch", "mpi4py", "horovod")


class Unsafe(Exception):
    """A scratch path another user could control."""


def _entry_digest(path: Path) -> bytes:
    """A symlink by its link text, a file by its content, anything else by what it is."""
    digest = hashlib.sha256()
    try:
        if path.is_symlink():
            digest.update(b"l" + os.readlink(path).encode("utf-8", "surrogateescape"))
        else:
            digest.update(b"f")
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    except OSError:
        digest.update(b"<missing>")
    return digest.digest()


def tree_digests(root: Path, names: list[str]) -> dict[str, str]:
    return {name: _entry_digest(root / name).hex() for name in names}


def tree_hash(root: Path, names: list[str]) -> str:
    """sha256 over (path, entry digest) of the listed entries, in sorted order."""
    return hash_of(tree_digests(root, names))


def hash_of(digests: dict[str, str]) -> str:
    """The tree hash of entries whose digests are known (``tree_digests``'s answer)."""
    digest = hashlib.sha256()
    for name in sorted(digests):
        digest.update(name.encode("utf-8", "surrogateescape") + b"\0" + bytes.fromhex(digests[name]))
    return digest.hexdigest()


def _stdin() -> str:
    return sys.stdin.buffer.read().decode("utf-8", "surrogateescape")


def _names(stdin: str) -> list[str]:
    return [name for name in stdin.split("\0") if name]


def probe(remote_root: str | None, container: list[str] | None = None) -> dict[str, Any]:
    from ..plan.gpus import inventory
    from ..plan.hosts import hostname
    from ..plan.installed import versions

    facts: dict[str, Any] = {
        "hostname": hostname(),
        "python": sys.executable,
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "user": _user(),
        "packages": versions(PACKAGES),
        "rsync": shutil.which("rsync"),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    try:
        from ..plan.mpi import detect, find_mpirun

        facts["mpi"] = detect(find_mpirun()).label
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        facts["mpi"] = None
        facts["mpi_problem"] = str(exc)
    try:
        inv = inventory()
        facts["gpus"] = len(inv.gpus)
        facts["gpu_driver"] = inv.driver
    except Exception as exc:  # noqa: BLE001
        facts["gpus"], facts["gpu_driver"] = 0, f"error: {exc}"
    if remote_root:
        existing = Path(remote_root)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        facts["free_bytes"] = shutil.disk_usage(existing).free
    if container:
        facts["container"] = probe_container(*container)
    return facts


def probe_container(runtime: str, exe: str, image: str, python: str) -> dict[str, Any]:
    """Whether this node can run the image: the runtime's executable at the path the ranks
    will start it by, the image, and (for an image directory) the Python inside."""
    from .imagecheck import image_problem, python_in_image

    found: dict[str, Any] = {"exe": exe, "problem": None}
    if not os.access(exe, os.X_OK):
        elsewhere = shutil.which(os.path.basename(exe))
        found["problem"] = (f"{exe} is missing: install {runtime} there at that path" if elsewhere is None else
                            f"{exe} is missing (it is at {elsewhere} there): install {runtime} at the same path "
                            "on every node")
    else:
        found["problem"] = image_problem(runtime, exe, image)
    if found["problem"] is None and not python_in_image(image, python):
        found["problem"] = f"image {image} has no {python}: install Python with distlaunch in it there"
    return found


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):
        return str(os.getuid())


def _owner(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return f"uid {uid}"


def check_ancestors(path: Path) -> None:
    """Every folder above ``path`` (and every symlink on the way) must be owned by root or
    us, and writable by others only with the sticky bit (like /tmp)."""
    me = os.getuid()
    for folder in reversed(path.parents):
        link = os.lstat(folder)
        if stat.S_ISLNK(link.st_mode) and link.st_uid not in (0, me):
            raise Unsafe(f"{folder} is a symbolic link of {_owner(link.st_uid)}'s")
        info = os.stat(folder)
        if info.st_uid not in (0, me):
            raise Unsafe(f"{folder} belongs to {_owner(info.st_uid)}")
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise Unsafe(f"{folder} can be written by other users and has no sticky bit")


def private_dir(path: Path) -> None:
    """Make ``path`` (mode 0700) or accept it only if it is a real folder of ours that no
    one else can write. Unsafe says what is wrong."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check_private(path)


def check_private(path: Path) -> None:
    """``path`` is a real folder of ours that no one else can write; else Unsafe says what
    is wrong (OSError where it cannot be looked at)."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise Unsafe(f"{path} is a symbolic link (to {os.readlink(path)})")
    if not stat.S_ISDIR(info.st_mode):
        raise Unsafe(f"{path} is not a directory")
    if info.st_uid != os.getuid():
        raise Unsafe(f"{path} belongs to {_owner(info.st_uid)}, not {_user()}")
    if info.st_mode & 0o022:
        raise Unsafe(f"{path} can be written by other users (mode {stat.S_IMODE(info.st_mode):o})")


def prepare(root: str, base: str, key: str | None = None) -> dict[str, Any]:
    """The scratch root and the project folder, safe to sync into; or why not. With
    ``key`` (``copy_key``), whether the copy ``latest`` points at holds that tree."""
    root_path, base_path = Path(root), Path(base)
    if root_path not in base_path.parents:
        return {"ok": False, "error": f"{base} is not inside {root}"}
    try:
        check_ancestors(root_path)
        private_dir(root_path)
        for folder in (base_path, base_path / "runs"):
            private_dir(folder)
    except Unsafe as exc:
        return {"ok": False, "error": f"{exc}: remove it, or choose another --remote-dir"}
    except OSError as exc:
        return {"ok": False, "error": f"{exc.strerror or exc} ({exc.filename}): choose another --remote-dir"}
    if key is None:
        return {"ok": True}
    return {"ok": True, "latest_same": _latest_copy(base_path, key) is not None}


def copy_key(expected: str, root: Path, names: list[str]) -> str:
    """What a node's copy of a tree must match to be reused for it: its content hash and
    which files are executable (a ``chmod +x`` changes no content, and rsync would
    bring it)."""
    digest = hashlib.sha256(expected.encode() + b"\0")
    for name in sorted(names):
        try:
            info = os.lstat(root / name)
        except OSError:
            continue
        executable = not stat.S_ISLNK(info.st_mode) and info.st_mode & 0o100
        digest.update(name.encode("utf-8", "surrogateescape") + (b"\0x\0" if executable else b"\0-\0"))
    return digest.hexdigest()


def _latest_copy(base: Path, key: str) -> Path | None:
    """The run folder ``base/latest`` points at, when a finished sync left a tree with copy
    key ``key`` there (its marker holds the key) and it is a real folder of this user in
    base/runs."""
    try:
        target = Path(os.readlink(base / "latest"))
        info = os.lstat(target)
        marker = (target / AGENT_DIR / SYNCED_MARKER).read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return None
    if target.parent != base / "runs" or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return None
    return target if key and marker == key else None


def finish(base: Path, run_dir: Path, expected: str, names: list[str], key: str = "") -> dict[str, Any]:
    """Check a fresh copy against ``expected``; a good one becomes ``latest`` (its marker
    keeps ``key``, for ``reuse``) and old run folders are pruned."""
    result: dict[str, Any] = {"hash": tree_hash(run_dir, names), "files": len(names)}
    if result["hash"] == expected:
        result["pruned"] = _synced(base, run_dir, key)
    return result


def _synced(base: Path, run_dir: Path, key: str) -> list[str]:
    records = run_dir / AGENT_DIR
    records.mkdir(mode=0o700, exist_ok=True)
    (records / SYNCED_MARKER).write_text(key + "\n", encoding="utf-8")
    point_latest(base, run_dir)
    return prune(base, run_dir)


REUSE_PART = ".reuse-"  # a copy being linked: base/runs/.RUN_ID.reuse-PID


def reuse(base: Path, run_dir: Path, expected: str, key: str, names: list[str]) -> dict[str, Any]:
    """The same tree as the latest copy: its files hard-linked (as rsync's --link-dest
    would for files that did not change) into a folder of its own, checked as ``finish``
    checks an rsync, then renamed to ``run_dir``. ``{"reused": False}`` when that cannot
    be done; a ``run_dir`` that exists already (an rsync started meanwhile, a restart) is
    never touched, and a partial copy is removed."""
    runs = base / "runs"
    previous = _latest_copy(base, key)
    if previous is None or run_dir.parent != runs:
        return {"reused": False}
    if previous == run_dir:  # a restart on a node that has this run's copy already
        result = finish(base, run_dir, expected, names, key)
        return {"reused": result["hash"] == expected, **result}
    now = time.time()
    for stale in runs.glob(f".*{REUSE_PART}*"):  # left by an agent killed while linking, a day ago
        try:
            if not stale.is_symlink() and now - stale.lstat().st_mtime > 86400:
                _remove_tree(stale)
        except OSError:
            pass
    part = runs / f".{run_dir.name}{REUSE_PART}{os.getpid()}"
    try:
        part.mkdir(mode=0o700)
        for name in names:
            src, dst = previous / name, part / name
            dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            else:
                os.link(src, dst, follow_symlinks=False)
        got = tree_hash(part, names)
        if got != expected:
            _remove_tree(part)
            return {"reused": False, "hash": got}
        os.rename(part, run_dir)  # fails if run_dir is there by now: it is not ours
    except OSError as exc:
        _remove_tree(part)
        return {"reused": False, "error": str(exc)}
    return {"reused": True, "hash": got, "files": len(names), "pruned": _synced(base, run_dir, key)}


def pack(sources: list[list[str]], limit: int) -> dict[str, Any]:
    """``base/name`` for each source (name "": base's contents), as one tar in base64 with
    names relative to base: what ``rsync --relative base/./name`` brings. Folders that do
    not exist are listed as absent. ``{"rsync": WHY}`` when rsync should bring them: the
    tar would pass ``limit`` bytes, a source is not a folder, or a link is among them
    (rsync copies links as they are; no link is ever unpacked from a tar)."""
    import base64
    import io
    import tarfile

    present, absent, total = [], [], 0
    for base, name in sources:
        top = os.path.join(base, name) if name else base
        if not os.path.lexists(top):
            absent.append(top)
            continue
        if os.path.islink(top) or not os.path.isdir(top):
            return {"rsync": f"{top} is not a folder"}
        for folder, dirs, files in os.walk(top):
            for entry in (*dirs, *files):
                try:
                    info = os.lstat(os.path.join(folder, entry))
                except OSError:
                    continue
                if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                    return {"rsync": f"{os.path.join(folder, entry)} is a link or special file"}
                total += 1024 + -(-info.st_size // 512) * 512  # its headers and blocks in the tar
            if total > limit:
                return {"rsync": f"more than {limit} bytes"}
        present.append((top, name or "."))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for top, arcname in present:
            tar.add(top, arcname=arcname)
    return {"tar": base64.b64encode(buffer.getvalue()).decode("ascii"), "absent": absent, "bytes": total}


def point_latest(base: Path, run_dir: Path) -> None:
    latest = base / "latest"
    tmp = base / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir)
    os.replace(tmp, latest)


def prunable(folder: Path, now: float) -> bool:
    """A run folder of ours whose run is over: marked done (collected) or long abandoned,
    and with no process of that run alive here."""
    from .procs import run_processes

    try:
        info = os.lstat(folder)
    except OSError:
        return False
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return False
    if not (folder / AGENT_DIR / DONE_MARKER).exists():
        try:
            synced = os.lstat(folder / AGENT_DIR / SYNCED_MARKER).st_mtime
        except OSError:
            return False  # not ours to judge: never marked as synced by this agent
        if now - synced < ABANDONED_S:
            return False
    return not run_processes(folder.name)


def prune(base: Path, keep: Path) -> list[str]:
    """Delete old run folders beyond the newest KEEP_RUNS that are safe to delete."""
    runs = base / "runs"
    if runs.is_symlink():
        return []
    folders = sorted((p for p in runs.iterdir() if p.name != keep.name), key=lambda p: p.name)
    now = time.time()
    pruned = []
    for old in folders[: max(0, len(folders) - (KEEP_RUNS - 1))]:
        if prunable(old, now):
            shutil.rmtree(old, ignore_errors=True)
            pruned.append(old.name)
    return pruned


def pip_install(key: str, args: list[str], requirements: str) -> dict[str, Any]:
    """pip install into this interpreter, once per KEY per node (a marker file remembers)."""
    import subprocess
    import tempfile

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    marker = Path(base) / "distlaunch" / "pip" / f"{key}.done"
    if marker.exists():
        return {"cached": True, "returncode": 0, "output": ""}
    argv = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    with tempfile.TemporaryDirectory() as tmp:
        if requirements:
            path = Path(tmp) / "requirements.txt"
            path.write_text(requirements, encoding="utf-8")
            argv += ["-r", str(path)]
        proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(" ".join(args) + "\n" + requirements, encoding="utf-8")
    return {"cached": False, "returncode": proc.returncode, "output": (proc.stdout + proc.stderr)[-20000:]}


INPUT_MARKER = ".distlaunch-complete"


def input_entry(root: str, entry: str, base: str) -> dict[str, Any]:
    """Whether the cache already holds ``entry`` (an input at one content hash); if not,
    the newest complete entry of the same input, to hard-link unchanged files from."""
    root_path, entry_path = Path(root), Path(entry)
    cache = root_path / "inputs"
    if entry_path.parent != cache:
        return {"ok": False, "error": f"{entry} is not inside {cache}"}
    try:
        check_ancestors(root_path)
        private_dir(root_path)
        private_dir(cache)
    except Unsafe as exc:
        return {"ok": False, "error": f"{exc}: remove it, or choose another --remote-dir"}
    except OSError as exc:
        return {"ok": False, "error": f"{exc.strerror or exc} ({exc.filename}): choose another --remote-dir"}
    now = time.time()
    for stale in cache.glob("*.part-*"):  # partial copies of runs that died a day ago
        try:
            if stale.is_dir() and not stale.is_symlink() and now - stale.stat().st_mtime > 86400:
                _remove_tree(stale)
        except OSError:
            pass
    if (entry_path / INPUT_MARKER).is_file():
        os.utime(entry_path / INPUT_MARKER)  # last used: now
        return {"ok": True, "cached": True}
    name = entry_path.name.rsplit("-", 1)[0]
    others = [p for p in cache.glob(f"{name}-*") if (p / INPUT_MARKER).is_file() and p.name.rsplit("-", 1)[0] == name
              and (p / base).exists()]
    newest = max(others, key=lambda p: (p / INPUT_MARKER).stat().st_mtime, default=None)
    return {"ok": True, "cached": False, "previous": str(newest) if newest else None}


def input_done(tmp: str, entry: str, expected: str, names: list[str]) -> dict[str, Any]:
    tmp_path, entry_path = Path(tmp), Path(entry)
    got = tree_hash(tmp_path, names)
    if got != expected:
        _remove_tree(tmp_path)
        return {"hash": got}
    (tmp_path / INPUT_MARKER).touch()
    for folder, dirs, _files in os.walk(tmp_path):  # a job cannot change the cache for later runs
        for name in dirs:
            path = Path(folder, name)
            if not path.is_symlink():
                path.chmod(path.stat().st_mode & ~0o222)
    tmp_path.chmod(tmp_path.stat().st_mode & ~0o222)
    try:
        os.rename(tmp_path, entry_path)
    except OSError:  # another run put it there first
        if not (entry_path / INPUT_MARKER).is_file():
            raise
        _remove_tree(tmp_path)
    return {"hash": got}


def _remove_tree(path: Path) -> None:
    """rmtree of a tree whose folders may be read-only."""
    for folder, _dirs, _files in os.walk(path):
        if not Path(folder).is_symlink():
            os.chmod(folder, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def input_discard(root: str, tmp: str) -> dict[str, Any]:
    tmp_path = Path(tmp)
    if tmp_path.parent != Path(root) / "inputs" or ".part-" not in tmp_path.name or tmp_path.is_symlink():
        return {"removed": False}
    _remove_tree(tmp_path)
    return {"removed": True}


def release(run_dir: str) -> dict[str, Any]:
    """Mark a run folder collected (the launcher has everything it needs from it)."""
    records = Path(run_dir) / AGENT_DIR
    if records.is_dir() and not records.is_symlink() and records.stat().st_uid == os.getuid():
        (records / DONE_MARKER).touch()
        return {"released": True}
    return {"released": False}


def dispatch(command: str, rest: list[str], stdin: Callable[[], str]) -> dict[str, Any]:
    """Carry out one command; ``stdin()`` gives its input text where it takes one."""
    if command == "probe":
        result: dict[str, Any] = probe(rest[0] if rest else None, rest[1:5] if len(rest) >= 5 else None)
    elif command == "prepare":
        result = prepare(rest[0], rest[1], rest[2] if len(rest) > 2 else None)
    elif command == "tree-hash":
        names = _names(stdin())
        result = {"hash": tree_hash(Path(rest[0]), names), "files": len(names)}
    elif command == "tree-digests":
        result = {"digests": tree_digests(Path(rest[0]), _names(stdin()))}
    elif command == "finish":
        result = finish(Path(rest[0]), Path(rest[1]), rest[2], _names(stdin()), rest[3] if len(rest) > 3 else "")
    elif command == "reuse":
        result = reuse(Path(rest[0]), Path(rest[1]), rest[2], rest[3], _names(stdin()))
    elif command == "pack":
        result = pack(json.loads(stdin()), int(rest[0]))
    elif command == "pip":
        result = pip_install(rest[0], rest[1:], stdin())
    elif command == "input-entry":
        result = input_entry(rest[0], rest[1], rest[2])
    elif command == "input-done":
        result = input_done(rest[0], rest[1], rest[2], _names(stdin()))
    elif command == "input-discard":
        result = input_discard(rest[0], rest[1])
    elif command == "sees":
        result = {"exists": os.path.exists(rest[0])}
    elif command == "cleanup":
        from .procs import kill_run

        result = {"killed": kill_run(rest[0])}
    elif command == "release":
        result = release(rest[0])
    elif command == "dump":
        from .procs import dump_stacks

        result = {"dumped": dump_stacks(rest[0])}
    else:
        raise SystemExit(f"unknown command {command!r}\n{__doc__}")
    return result


def serve() -> None:
    """One session for a whole run: a JSON request per line on stdin (``{"args": [COMMAND,
    ...], "stdin": TEXT}``), a JSON answer per line on stdout, until stdin closes. A
    command that fails answers ``{"_failed": "its last line"}``; whatever a command or its
    children print goes to stderr, never into the answers."""
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8", errors="surrogateescape")
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # fd 1 (pip, a child process) is stderr from now on
    nothing = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nothing, 0)  # and no child reads the requests meant for this loop
    os.close(nothing)
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in requests:
        try:
            request = json.loads(line)
            args = [str(arg) for arg in request["args"]]
            text = str(request.get("stdin") or "")
            result = dispatch(args[0], args[1:], lambda text=text: text)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - answered, the session goes on
            result = {"_failed": f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]}
        print(json.dumps(result), file=answers, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit(__doc__)
    if args[0] == "serve":
        serve()
        return
    print(json.dumps(dispatch(args[0], args[1:], _stdin)))


if __name__ == "__main__":
    main()
