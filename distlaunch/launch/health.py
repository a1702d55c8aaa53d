"""Node health, per user: nodes a run found at fault, kept out of placement for a while.

A failed attempt blames a node when the fault is the node's, not the program's: its ranks
were killed by a signal, or it could not be reached. The blame is kept in
``$DISTLAUNCH_STATE_DIR/nodes.json`` (default ``$XDG_STATE_HOME/distlaunch``, else
``~/.local/state/distlaunch``), private to the user, with the reason, the run and an
expiry (``--quarantine-ttl``, default one hour). ``place`` leaves such a node out while
enough others remain; ``distlaunch nodes`` lists and clears the entries.

Several launches of one user may write at once: every change is a read-modify-write
under an exclusive ``flock`` of ``nodes.lock``, and the file is replaced atomically.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import RunDirError
from ..records import PRIVATE_DIR, PRIVATE_FILE, RankExit, read_json, write_json

DEFAULT_TTL_S = 3600.0
STATE_DIR = "DISTLAUNCH_STATE_DIR"
# a rank whose own process died of one of these, as the root cause, points at its node: the
# OOM killer or a dying node (SIGKILL), bad memory or a vanished file mapping (SIGSEGV, SIGBUS).
# SIGABRT (a library's assert, NCCL's watchdog after a peer died) and the signals people and
# launchers send on purpose are not the node's fault.
NODE_SIGNALS = frozenset({"SIGKILL", "SIGSEGV", "SIGBUS"})


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(STATE_DIR):
        return Path(env[STATE_DIR])
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "distlaunch"


@dataclass(frozen=True)
class Entry:
    """One node kept out of placement until ``until``."""

    host: str
    reason: str
    since: float
    until: float
    run_id: str = ""
    count: int = 1  # how many times it was blamed while kept out

    def left_s(self, now: float | None = None) -> float:
        return max(0.0, self.until - (time.time() if now is None else now))


class NodeHealth:
    """The user's node-health file."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = state_dir() if directory is None else directory
        self.path = self.dir / "nodes.json"

    def entries(self, now: float | None = None) -> dict[str, Entry]:
        """The nodes kept out now, by host (expired entries are not returned)."""
        now = time.time() if now is None else now
        return {host: entry for host, entry in self._read().items() if entry.until > now}

    def blame(self, host: str, reason: str, run_id: str = "", ttl: float = DEFAULT_TTL_S) -> Entry:
        """Keep ``host`` out for ``ttl`` seconds from now, saying why."""
        now = time.time()
        with self._locked() as current:
            old = current.get(host)
            count = old.count + 1 if old is not None and old.until > now else 1
            entry = Entry(host, reason, now, now + ttl, run_id, count)
            current[host] = entry
        return entry

    def clear(self, hosts: Iterable[str] | None = None) -> list[str]:
        """Forget ``hosts`` (every node when None); the ones that were kept out."""
        now = time.time()
        with self._locked() as current:
            names = list(current) if hosts is None else [host for host in hosts if host in current]
            cleared = [host for host in names if current[host].until > now]
            for host in names:
                del current[host]
        return cleared

    # -- the file
    def _read(self) -> dict[str, Entry]:
        try:
            data = read_json(self.path)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise RunDirError(f"cannot read {self.path}: {exc}: remove it (it only lists nodes kept out)") from None
        if not isinstance(data, dict) or not isinstance(data.get("nodes") or {}, dict):
            raise RunDirError(f"{self.path} is not a node-health file: remove it (it only lists nodes kept out)")
        found = {}
        for host, item in (data.get("nodes") or {}).items():
            try:
                found[host] = Entry(**{**item, "host": host})
            except (TypeError, ValueError):
                continue  # written by another version: skip that entry, keep the rest
        return found

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Entry]]:
        """The entries, for a change written back on exit (expired ones dropped)."""
        try:
            self.dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
            lock = os.open(self.dir / "nodes.lock", os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        except OSError as exc:
            raise RunDirError(f"cannot write node health in {self.dir}: {exc.strerror or exc}: "
                              f"set {STATE_DIR} to a writable folder") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self._read()
            yield current
            now = time.time()
            kept = {host: {k: v for k, v in asdict(entry).items() if k != "host"}
                    for host, entry in sorted(current.items()) if entry.until > now}
            write_json(self.path, {"version": 1, "nodes": kept})
        finally:
            os.close(lock)  # releases the lock


def blamed_hosts(ranks: Mapping[int, RankExit], host_of: Mapping[int, str], first: int | None,
                 unreachable: Iterable[str] = ()) -> dict[str, str]:
    """The nodes an attempt's fault points at, with why: the root-cause rank ``first``
    (the first that failed) killed by a signal in ``NODE_SIGNALS``, and the nodes that
    could not be reached after the job (``unreachable``: the node lost). Ranks that mpirun
    tore down after that are consequences and blame nobody. ``host_of``: each rank's
    host as placed (the name the launcher reaches it by)."""
    blamed = {host: "unreachable after the failure (node lost?)" for host in unreachable}
    item = ranks.get(first) if first is not None else None
    host = host_of.get(first) if first is not None else None
    if item is not None and host and item.signal in NODE_SIGNALS and host not in blamed:
        blamed[host] = f"rank {item.rank} was killed by {item.signal}"
    return blamed
