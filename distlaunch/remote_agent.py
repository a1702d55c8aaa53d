"""What distlaunch runs on a node over ssh: ``python -m distlaunch.remote_agent COMMAND``.

probe                          JSON facts for ``doctor`` and the pre-launch checks
tree-hash DIR                  content hash of the files listed on stdin (one per line)
finish BASE RUN_DIR HASH       tree-hash RUN_DIR; if it equals HASH, point BASE/latest at
                               RUN_DIR and prune old run folders
pip KEY [PIP ARGS...]          pip install PIP ARGS (requirements text on stdin, if any)
                               unless KEY was installed before on this node
sees PATH                      whether PATH exists on this node (shared filesystem check)
cleanup RUN_ID                 SIGKILL this node's processes tagged with RUN_ID
dump RUN_ID                    ask this node's Python ranks of RUN_ID for their stacks

It prints one JSON object on stdout. Kept light: no torch, no mpi4py imports.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

KEEP_RUNS = 5  # run folders kept per project on each node
PACKAGES = ("distlaunch", "torch", "mpi4py", "horovod")


def tree_hash(root: Path, names: list[str]) -> str:
    """sha256 over (path, content) of the listed files, in sorted order."""
    digest = hashlib.sha256()
    for name in sorted(names):
        path = root / name
        digest.update(name.encode() + b"\0")
        try:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            digest.update(b"<missing>")
        digest.update(b"\0")
    return digest.hexdigest()


def probe(remote_root: str | None) -> dict[str, Any]:
    from .gpus import inventory

    facts: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "python": sys.executable,
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "packages": {},
        "rsync": shutil.which("rsync"),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    for name in PACKAGES:
        try:
            facts["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            facts["packages"][name] = None
    try:
        from .mpi import detect, find_mpirun

        mpi = detect(find_mpirun())
        facts["mpi"] = mpi.label
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
    return facts


def point_latest(base: Path, run_dir: Path) -> dict[str, Any]:
    latest = base / "latest"
    tmp = base / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir)
    os.replace(tmp, latest)
    runs = sorted((p for p in (base / "runs").iterdir() if p.is_dir()), key=lambda p: p.name)
    pruned = []
    for old in runs[:-KEEP_RUNS]:
        if old.resolve() != run_dir.resolve():
            shutil.rmtree(old, ignore_errors=True)
            pruned.append(old.name)
    return {"latest": str(run_dir), "pruned": pruned}


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


def tagged(run_id: str, python_ranks_only: bool = False) -> list[Any]:
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if env.get("DISTLAUNCH_RUN_ID") != run_id or proc.pid == os.getpid():
                continue
            if python_ranks_only and not ("DISTLAUNCH_RANK" in env and "distlaunch.bootstrap" in proc.cmdline()):
                continue
            found.append(proc)
        except psutil.Error:
            continue
    return found


def dump_tagged(run_id: str) -> int:
    """Ask this node's Python ranks of ``run_id`` to print their stacks; return how many."""
    from .bootstrap import dump_signal

    procs = tagged(run_id, python_ranks_only=True)
    for proc in procs:
        try:
            proc.send_signal(dump_signal())
        except Exception:  # noqa: BLE001 - already gone
            pass
    return len(procs)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit(__doc__)
    command, rest = args[0], args[1:]
    if command == "probe":
        result: dict[str, Any] = probe(rest[0] if rest else None)
    elif command == "tree-hash":
        names = [line for line in sys.stdin.read().splitlines() if line]
        result = {"hash": tree_hash(Path(rest[0]), names), "files": len(names)}
    elif command == "finish":
        names = [line for line in sys.stdin.read().splitlines() if line]
        result = {"hash": tree_hash(Path(rest[1]), names), "files": len(names)}
        if result["hash"] == rest[2]:
            result.update(point_latest(Path(rest[0]), Path(rest[1])))
    elif command == "pip":
        result = pip_install(rest[0], rest[1:], sys.stdin.read())
    elif command == "sees":
        result = {"exists": os.path.exists(rest[0])}
    elif command == "cleanup":
        procs = tagged(rest[0])
        for proc in procs:
            try:
                proc.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
        result = {"killed": len(procs)}
    elif command == "dump":
        result = {"dumped": dump_tagged(rest[0])}
    else:
        raise SystemExit(f"unknown command {command!r}\n{__doc__}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
