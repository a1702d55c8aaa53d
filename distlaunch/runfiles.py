"""Writing and reading the run folder's files, for the launcher and every rank's worker.

Owner-only permissions whatever the umask (``open_private``), JSON replaced atomically
with a disk-full fallback (``write_json``), and the lines a file has gained since the last
look (``AppendedLines``). Paths are ``str`` or ``pathlib.Path``; this module imports
neither pathlib nor dataclasses (nor typing): the worker starts on every rank of every
launch, and those imports were most of its start. ``records`` builds the typed run
record on top of this.
"""
from __future__ import annotations

import json
import os

from .errors import RunDirError

TYPE_CHECKING = False  # not typing's: every rank's worker imports this module
if TYPE_CHECKING:
    from typing import Any
else:
    Any = object  # what ``typing.get_type_hints`` reads these annotations as, typing not imported

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def open_private(path: str | os.PathLike[str], mode: str = "ab") -> Any:
    """Open a run-folder file for appending (``mode`` "ab" or "a") or writing ("wb", "w"),
    created readable by its owner only, whatever the umask."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    return open(os.open(path, flags, PRIVATE_FILE), mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def write_json(path: str | os.PathLike[str], data: Any, reserve: int = 0) -> None:
    """Write ``data`` as JSON atomically (a reader sees the old or the new file, never half),
    readable by its owner only. ``reserve`` bytes of trailing spaces keep room for later
    versions: when the disk is full, a new version that fits is written over the old one
    in place (no new blocks needed), so a run can still record how it ended.

    No fsync: it can take longer than mpirun's 250 ms between SIGTERM and SIGKILL, and
    the rename alone already protects against a crash of the writing process.
    """
    text = (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n" + " " * reserve).encode()
    folder, name = os.path.split(os.fspath(path))
    try:
        # a private temporary beside it (not tempfile: its import is most of a rank worker's start)
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        if not _overwrite_in_place(path, text):
            raise RunDirError(f"cannot write {os.fspath(path)}: {exc.strerror or exc}: "
                              "free space or pick another --run-dir") from None


def _overwrite_in_place(path: str | os.PathLike[str], text: bytes) -> bool:
    """The disk-full fallback of ``write_json``: reuse the old file's blocks if it fits."""
    try:
        size = os.stat(path).st_size
        if len(text.rstrip()) + 1 > size:
            return False
        with open(path, "r+b") as handle:
            handle.write(text.rstrip() + b"\n" + b" " * (size - len(text.rstrip()) - 1))
        return True
    except OSError:
        return False


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


class AppendedLines:
    """The whole lines appended to a file since the last ``read()`` (one still being
    written waits for its end); a file not there yet reads as nothing. ``from_end``:
    what the file holds already is not read."""

    def __init__(self, path: str | os.PathLike[str], from_end: bool = False) -> None:
        self.path = path
        self.offset = 0
        self.rest = b""
        if from_end:
            try:
                self.offset = os.stat(path).st_size
            except OSError:
                pass

    def read(self) -> list[bytes]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return []
        self.offset += len(data)
        *lines, self.rest = (self.rest + data).split(b"\n")
        return lines
