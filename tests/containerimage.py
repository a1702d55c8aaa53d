"""A small container image for the tests, built from this machine's files (no registry is
reachable here): a root tree holding the C libraries, this Python (its base install and
the venv, at the same paths) and distlaunch's package, hard-linked where the files are
ours to link and copied otherwise. Charliecloud runs such a directory as it is.

    python -m tests.containerimage DEST     builds one (for trying by hand)
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

import distlaunch

MARKER = "etc/distlaunch-test-image"  # only the image has it: a rank that reads it ran inside
BIG = 30 << 20  # libraries larger than this (LLVM, MPICH) are left out: the ranks need none of them


def _place(src: Path, dest: Path) -> None:
    """``src`` at ``dest``: a symlink as a symlink, a file hard-linked (or copied)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        os.symlink(os.readlink(src), dest)
        return
    try:
        os.link(src, dest)
    except OSError:  # not ours to link (protected_hardlinks), or another filesystem
        shutil.copy2(src, dest)


def _tree(src: Path, root: Path) -> None:
    """Every file of ``src`` at the same path under ``root``."""
    for folder, dirs, files in os.walk(src):
        here = Path(folder)
        target = root / here.relative_to("/")
        target.mkdir(parents=True, exist_ok=True)
        for name in files + [d for d in dirs if (here / d).is_symlink()]:
            if not (target / name).exists() and not (target / name).is_symlink():
                try:
                    _place(here / name, target / name)
                except OSError:
                    pass  # unreadable: not needed


def build(dest: Path) -> Path:
    """The image at ``dest`` (a directory); returns it."""
    dest.mkdir(parents=True)
    for name in ("proc", "sys", "dev", "tmp", "home", "run", "mnt", "root", "var/tmp", "usr/bin", "usr/lib64",
                 "usr/sbin"):
        (dest / name).mkdir(parents=True, exist_ok=True)
    for name in ("bin", "sbin", "lib", "lib64"):  # Debian's merged /usr
        os.symlink(f"usr/{name}", dest / name)
    libs = Path("/usr/lib/x86_64-linux-gnu")
    for entry in libs.iterdir():
        if entry.is_symlink() or (entry.is_file() and entry.stat().st_size <= BIG):
            _place(entry, dest / entry.relative_to("/"))
    for entry in Path("/usr/lib64").iterdir():
        _place(entry, dest / entry.relative_to("/"))
    for name in ("sh", "dash", "bash", "env", "cat", "ls", "sleep", "true"):
        if Path("/usr/bin", name).exists():
            _place(Path("/usr/bin", name), dest / "usr/bin" / name)
    for entry in Path("/usr/bin").glob("python3*"):
        _place(entry, dest / entry.relative_to("/"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for tree in {Path(sys.base_prefix), Path(sys.prefix), stdlib, Path(distlaunch.__file__).parent}:
        if tree == Path("/usr"):
            continue
        _tree(tree, dest)
    if str(stdlib).startswith("/usr/"):
        _tree(stdlib, dest)
    for name in ("passwd", "group", "hosts", "nsswitch.conf", "ld.so.cache", "ld.so.conf"):
        if Path("/etc", name).exists():
            _place(Path("/etc", name), dest / "etc" / name)
    if Path("/etc/ld.so.conf.d").is_dir():
        _tree(Path("/etc/ld.so.conf.d"), dest)
    (dest / MARKER).write_text("inside the test image\n")
    return dest


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
