"""The per-rank shim: ``python -P -u -m distlaunch.rank.worker --run-dir DIR -- PROGRAM [ARGS...]``.

mpirun starts this on every rank. It works out the rank from the MPI environment,
writes ``ranks/rank-<N>.json`` (the rank has started), starts the user's program as a
child (which dies with it), relays the child's output line by line with a ``[rank]``
prefix while keeping a raw copy in ``logs/rank-<N>.log``, forwards termination
signals, and finally rewrites ``ranks/rank-<N>.json`` saying how the rank ended; a rank
that failed is also told on stderr at once, in one marked line that only the launcher
reads (``protocol.RANK_FAILED_MARK``, where it asks for it: the records of other nodes
come back only at the end). It exits the way the child did (same code, or the same
signal), so mpirun sees the real outcome.

A ``.py`` program is run by the bootstrap in this very interpreter's fork when the
program's command is this interpreter with this worker's own flags, and so are
``python -c CODE`` and ``python -m MODULE`` when ``python`` is this interpreter (the
same file, in the same folder: the same environment; Python 3.10+): one Python start
per rank instead of two, with the same pipes, environment, signals and exit as a new
process would have. ``DISTLAUNCH_FORK_RANKS=0``: a new interpreter runs the bootstrap
instead, so a ``-c`` or ``-m`` rank behaves the same either way. What the fork keeps
from the worker:

- its modules already imported (the standard library's and ours, nothing heavy): a
  project file named like one of them is not imported in its place, where a new
  interpreter would take it;
- its command line in ``ps``, and its ``/proc/PID/environ`` (what a process was started
  with; the program's ``os.environ`` and C's ``getenv`` are right);
- its ``sys.executable`` (``.../python3`` where the rank named ``.../python``) and
  ``sys.orig_argv``;
- its own objects, frozen for the garbage collector (``gc.freeze``) just before the
  fork, so the rank's collections, the last one at exit too, do not walk them; the
  program's objects are collected as in any interpreter (``gc.get_objects()`` lists
  only those, not the worker's). A rank's exit unfreezes them to find the program's
  open files (``bootstrap._flush_files``), so the worker holds no buffered file object
  of its own when it forks: its descriptor would be closed in the rank, and a file of
  the program's could have its number by then.

The worker itself leaves with ``os._exit`` once the exit record is written and its
output flushed: it runs no code of the user's, so its interpreter has nothing to tear
down that anyone would miss (10-20 ms per rank).

Kept free of heavy imports: it runs once per rank on every launch.
"""
from __future__ import annotations

import ctypes
import gc
import os
import selectors
import signal
import sys
import time
from collections.abc import Callable

from .. import protocol
from ..errors import DistlaunchError
from ..protocol import EXCEPTION_FILE, FAILURE_NOTICE, FORK_RANKS, METRIC_MARK, RANK, RANK_FAILED_MARK, RELAY_METRICS
from ..runfiles import AppendedLines, read_json, write_json
from .rankinfo import RankInfo, from_environ

TYPE_CHECKING = False  # typing itself is not imported: its ~3 ms are on every rank's start
if TYPE_CHECKING:
    import subprocess
    from typing import Any
else:
    Any = object  # what ``typing.get_type_hints`` reads these annotations as, typing not imported

STARTED_BY = os.getppid()  # read at import: the process that started this worker (StarterWatch)
ORPHAN_KILL_S = 10.0  # a rank whose worker lost its starter gets SIGTERM, and SIGKILL this much later
BOOTSTRAP = "distlaunch.rank.bootstrap"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
MAX_LINE = 64 * 1024  # a longer line is passed on in pieces of this size
IDLE_FLUSH_S = 1.0  # a partial line (a prompt, a progress bar) is passed on after this


def _die_with_parent() -> None:
    """In the child: receive SIGKILL if the worker dies, so no rank outlives its worker."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BrokenPipeError:
            return


class RankLog:
    """The rank's raw log, best effort: a full disk ends the logging (said once, on the
    rank's stderr), never the rank. Unbuffered, so closing cannot fail late either."""

    def __init__(self, path: str, prefix: bytes) -> None:
        self.prefix = prefix
        try:
            self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            self.fd = None
            self._gone(exc)

    def write(self, data: bytes) -> None:
        if self.fd is None:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:  # disk full: keep relaying, stop logging
            self.close()
            self._gone(exc)

    def _gone(self, exc: OSError) -> None:
        _write_all(sys.stderr.fileno(), self.prefix + f"distlaunch: rank log no longer written: {exc}\n".encode())

    def forget(self) -> None:
        """In a fork: this copy of the descriptor is not ours to write or close."""
        self.fd = None

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError:
                pass


class LineRelay:
    """Split one stream into lines; send each, prefixed, to ``out_fd`` and raw to ``log``."""

    def __init__(self, prefix: bytes, out_fd: int, log: RankLog) -> None:
        self.prefix, self.out_fd, self.log = prefix, out_fd, log
        self.pending = b""
        self.last_data = time.monotonic()

    def feed(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        while len(self.pending) >= MAX_LINE:
            lines.append(self.pending[:MAX_LINE])
            self.pending = self.pending[MAX_LINE:]
        if lines:
            self._emit(lines)

    def flush(self, idle_only: bool = False) -> None:
        if self.pending and (not idle_only or time.monotonic() - self.last_data >= IDLE_FLUSH_S):
            line, self.pending = self.pending, b""
            self._emit([line])

    def _emit(self, lines: list[bytes]) -> None:
        self.log.write(b"".join(line + b"\n" for line in lines))
        _write_all(self.out_fd, b"".join(self.prefix + line + b"\n" for line in lines))


class MetricsTail:
    """Rank 0 on another node than the launcher's: pass the lines its program appends to
    its metrics file on to the launcher, marked, as they come (a sweep prunes on them);
    the file itself is still collected at the end."""

    EVERY_S = 0.25

    def __init__(self, path: str, prefix: bytes, out_fd: int) -> None:
        self.prefix, self.out_fd = prefix, out_fd
        self.lines = AppendedLines(path, from_end=True)  # lines already there were not logged by this rank
        self.last = 0.0

    def poll(self, now: bool = False) -> None:
        if not now and time.monotonic() - self.last < self.EVERY_S:
            return
        self.last = time.monotonic()
        lines = self.lines.read()
        if lines:
            _write_all(self.out_fd, b"".join(self.prefix + METRIC_MARK + line + b"\n" for line in lines if line))


def python_program(command: list[str]) -> tuple[str, list[str]] | None:
    """What the bootstrap runs for ``command``, where it is a Python program of this very
    interpreter: ``("script", [SCRIPT, ARGS...])`` for the bootstrap itself with the
    worker's own flags (a ``.py`` rank), ``("code", [CODE, ARGS...])`` for ``python -c``
    and ``("module", [MODULE, ARGS...])`` for ``python -m``, ``python`` being this
    interpreter (``-u`` may come first: every rank is unbuffered); None for anything
    else (another Python, other flags, ``python SCRIPT``, not Python at all, Python 3.9)."""
    flags = _own_flags()
    if flags is None or len(command) < 2:
        return None
    if "-m" in command:
        at = command.index("-m")
        if (command[0] == sys.executable and command[at + 1:at + 2] == [BOOTSTRAP] and len(command) >= at + 3
                and command[1:at] == flags):
            return "script", command[at + 2:]
    if not _is_this_python(command[0]):
        return None
    rest = command[2:] if command[1] == "-u" else command[1:]
    if len(rest) >= 2 and rest[0] in ("-c", "-m"):
        return ("code" if rest[0] == "-c" else "module"), rest[1:]
    return None


def bootstrap_command(program: tuple[str, list[str]]) -> list[str]:
    """The new interpreter that runs ``program`` (from ``python_program``) as a fork of
    this worker would: this interpreter, the worker's own flags, the bootstrap."""
    kind, argv = program
    option = {"script": [], "code": ["-c"], "module": ["-m"]}[kind]
    return [sys.executable, *(_own_flags() or []), "-m", BOOTSTRAP, *option, *argv]


def _own_flags() -> list[str] | None:
    """The interpreter flags this worker was started with (``-P -u``); None before Python
    3.10, which does not say."""
    started = getattr(sys, "orig_argv", None)
    return started[1:started.index("-m")] if started and "-m" in started else None


def _is_this_python(path: str) -> bool:
    """Whether ``path`` starts this interpreter in this environment: the worker's own
    executable, or another name for it in the same folder (a venv's ``python`` and
    ``python3``); a Python elsewhere may be another environment, even on the same binary."""
    if path == sys.executable:
        return True
    if os.path.dirname(path) != os.path.dirname(sys.executable):
        return False
    try:
        return os.path.samefile(path, sys.executable)
    except OSError:
        return False


class ForkedRank:
    """The rank as a fork of this worker running the bootstrap, with the parts of
    ``subprocess.Popen`` the worker uses (pid, stdout, stderr, send_signal, poll)."""

    def __init__(self, program: tuple[str, list[str]], env: dict[str, str], in_child: Callable[[], None]) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        worker = os.getpid()
        gc.freeze()  # the worker's own objects: the rank's collections need not walk them
        try:
            pid = os.fork()
        except OSError:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        if pid == 0:  # the rank: never returns into the worker's code
            in_child()
            _become_rank(program, env, out_w, err_w, worker)
        os.close(out_w)
        os.close(err_w)
        self.pid = pid
        self.stdout = open(out_r, "rb", buffering=0)
        self.stderr = open(err_r, "rb", buffering=0)
        self.returncode: int | None = None

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # reaped a moment ago
                pass

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # SIGCHLD ignored where the worker started: reaped already
                self.returncode = 0
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _become_rank(program: tuple[str, list[str]], env: dict[str, str], out_w: int, err_w: int, worker: int) -> None:
    """In the fork: what ``Popen`` and a new interpreter would have given the program (stdin
    from /dev/null, the pipes as stdout and stderr, no other descriptor, its environment,
    death with the worker), then the bootstrap. A program that ends well leaves through
    the interpreter's normal exit (threads joined, atexit run), as a new one would;
    anything else leaves here, never in the worker's code above."""
    try:
        _die_with_parent()
        if os.getppid() != worker:  # the worker died before the line above
            os._exit(1)
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (out_w, 1), (err_w, 2)):
            os.dup2(fd, target)
        _close_inherited()
        os.environ.clear()
        os.environ.update(env)
        from . import bootstrap

        run = {"script": bootstrap.run, "code": bootstrap.run_code, "module": bootstrap.run_module}[program[0]]
    except BaseException as exc:  # noqa: BLE001 - the fork must never go back to the worker's code
        _write_all(2, f"distlaunch: cannot start the rank: {exc}\n".encode())
        os._exit(127)
    try:
        run(program[1])
    except SystemExit:
        raise  # the script ended well (a failing one has left already)
    except BaseException:  # noqa: BLE001 - the bootstrap's own failure (its output gone, say)
        os._exit(1)
    sys.exit(0)


def _close_inherited() -> None:
    """Close every descriptor above 2, as ``Popen(close_fds=True)`` does: the ones listed in
    /proc/self/fd (never a loop over the descriptor limit, which can be a billion)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        os.closerange(3, 65536)
        return
    for fd in fds:
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, closed already


class StarterWatch:
    """Once the process that started this worker (``started_by``: mpirun's daemon, srun's
    step) is gone, end the child as a stop would, SIGKILL after ``ORPHAN_KILL_S``: a
    launcher killed outright takes mpirun with it, and mpirun, its pipes closed, can die
    before it ends the ranks. Seen by the parent pid changing, checked while relaying and
    while waiting (no PR_SET_PDEATHSIG here: that fires when the *thread* that forked the
    worker ends, not the process)."""

    def __init__(self, started_by: int) -> None:
        self.started_by: int | None = started_by
        self.orphaned: float | None = None

    def check(self, child: subprocess.Popen[bytes] | ForkedRank) -> None:
        if self.started_by is None or os.getppid() == self.started_by:
            return
        if self.orphaned is None:
            self.orphaned = time.monotonic()
            child.send_signal(signal.SIGTERM)
        elif time.monotonic() - self.orphaned >= ORPHAN_KILL_S:
            child.send_signal(signal.SIGKILL)
            self.started_by = None


def wait_watching(child: subprocess.Popen[bytes] | ForkedRank, watch: StarterWatch | None) -> int:
    """Wait for the child's end, seeing the starter gone meanwhile too (a program that closed its
    output goes on after the relay ends); its exit is seen within a millisecond or two."""
    delay = 0.0005
    while (code := child.poll()) is None:
        if watch is not None:
            watch.check(child)
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return code


def relay(child: subprocess.Popen[bytes] | ForkedRank, info: RankInfo, log: RankLog,
          tail: MetricsTail | None = None, watch: StarterWatch | None = None) -> None:
    """Pump the child's stdout and stderr until both close (and its metrics, with a tail),
    checking ``watch`` at least once a second."""
    assert child.stdout is not None and child.stderr is not None
    selector = selectors.DefaultSelector()
    relays = {
        child.stdout.fileno(): LineRelay(info.prefix, sys.stdout.fileno(), log),
        child.stderr.fileno(): LineRelay(info.prefix, sys.stderr.fileno(), log),
    }
    for fd in relays:
        selector.register(fd, selectors.EVENT_READ)
    while relays:
        events = selector.select(timeout=IDLE_FLUSH_S)
        if watch is not None:
            watch.check(child)
        for key, _ in events:
            fd = key.fd
            data = os.read(fd, 65536)
            if data:
                relays[fd].feed(data)
            else:
                relays.pop(fd).flush()
                selector.unregister(fd)
        for line_relay in relays.values():
            line_relay.flush(idle_only=True)
        if tail is not None:
            tail.poll()
    selector.close()


def pick_gpus(info: RankInfo, per_rank: int, restricted: str | None) -> tuple[str, ...]:
    """This rank's CUDA devices on this node, from the node's own inventory."""
    from ..plan.gpus import allowed_devices, devices_for, inventory

    inv = inventory()
    allowed = allowed_devices(inv, restricted, None)
    if not allowed:
        if info.local_rank == 0:
            message = f"distlaunch: no GPU on {os.uname().nodename} ({inv.problem}): running on CPU\n"
            _write_all(sys.stderr.fileno(), info.prefix + message.encode())
        return ()
    return devices_for(info.local_rank, per_rank, allowed)


def child_env(info: RankInfo, run_dir: str, gpus: tuple[str, ...] = ()) -> dict[str, str]:
    """The user's program sees the usual rank variables, whatever the MPI flavour."""
    env = dict(os.environ)
    env[RANK] = str(info.rank)  # also marks the rank's own process for the launcher
    env[EXCEPTION_FILE] = protocol.rank_exception(run_dir, info.rank)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    if "SLURM_JOB_ID" in env and info.source != "slurm":
        # started by mpirun inside an allocation: the step's per-task variables describe
        # mpirun's daemon, not this rank; tell the truth or nothing
        env.update(SLURM_PROCID=str(info.rank), SLURM_LOCALID=str(info.local_rank), SLURM_NTASKS=str(info.size),
                   SLURM_NPROCS=str(info.size))
        for name in ("SLURM_NODEID", "SLURM_TASK_PID", "SLURM_GTIDS"):
            env.pop(name, None)
    env.setdefault("RANK", str(info.rank))
    env.setdefault("WORLD_SIZE", str(info.size))
    env.setdefault("LOCAL_RANK", str(info.local_rank))
    env.setdefault("LOCAL_WORLD_SIZE", str(info.local_size))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def new_exit_record(info: RankInfo, gpus: tuple[str, ...]) -> dict[str, Any]:
    """The rank's exit record as it starts: the fields of ``records.RankExit`` (a test
    keeps them the same), as a dict, so that the worker needs neither that module's
    dataclasses nor pathlib."""
    return {"rank": info.rank, "local_rank": info.local_rank, "size": info.size, "host": os.uname().nodename,
            "worker_pid": os.getpid(), "started": time.time(), "gpus": list(gpus), "pid": None, "ended": None,
            "exit_code": None, "signal": None, "exception": None, "error": None}


def run_rank(command: list[str], run_dir: str, info: RankInfo, gpus: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the user's program for this rank; return its exit record (``new_exit_record``)."""
    record = new_exit_record(info, gpus)
    for folder in (protocol.LOGS, protocol.RANKS):
        try:
            os.makedirs(os.path.join(run_dir, folder), mode=0o700, exist_ok=True)
        except OSError:
            pass  # a full disk: the log and the record say so themselves, the rank runs on
    _save(record, run_dir, info)  # the rank has started: mpirun got this far
    log = RankLog(protocol.rank_log(run_dir, info.rank), info.prefix)
    try:
        env = child_env(info, run_dir, gpus)
        program = python_program(command)
        try:
            if program is not None and os.environ.get(FORK_RANKS) != "0":
                child: subprocess.Popen[bytes] | ForkedRank = ForkedRank(program, env, in_child=log.forget)
            else:
                import subprocess  # only here: a forked rank never needs it

                child = subprocess.Popen(
                    command if program is None else bootstrap_command(program),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    preexec_fn=_die_with_parent,
                )
        except OSError as exc:
            message = f"distlaunch: cannot start {command[0]}: {exc.strerror or exc}\n".encode()
            log.write(message)
            _write_all(sys.stderr.fileno(), info.prefix + message)
            record.update(ended=time.time(), exit_code=127, error=str(exc))
            return record
        record["pid"] = child.pid

        def forward(signum: int, _frame: object) -> None:
            if child.returncode is None:
                child.send_signal(signum)

        for signum in FORWARDED:
            signal.signal(signum, forward)
        tail = None
        if info.rank == 0 and os.environ.get(RELAY_METRICS) == "1":
            tail = MetricsTail(protocol.rank_metrics(run_dir, 0), info.prefix, sys.stdout.fileno())
        watch = StarterWatch(STARTED_BY)
        relay(child, info, log, tail, watch)
        code = wait_watching(child, watch)
        if tail is not None:
            tail.poll(now=True)  # the last lines
    finally:
        log.close()
    record["ended"] = time.time()
    record["exception"] = _read_exception(protocol.rank_exception(run_dir, info.rank))
    if code < 0:
        record["exit_code"], record["signal"] = 128 - code, signal.Signals(-code).name
    else:
        record["exit_code"] = code
    return record


def _save(record: dict[str, Any], run_dir: str, info: RankInfo) -> None:
    """Write the exit record; if the disk is full, say so and carry on (the rank's own
    result still reaches mpirun through the exit code)."""
    try:
        write_json(protocol.rank_record(run_dir, record["rank"]), record)
    except DistlaunchError as exc:
        _write_all(sys.stderr.fileno(), info.prefix + f"distlaunch: error: {exc}\n".encode())


def _read_exception(path: str) -> dict[str, Any] | None:
    """What the bootstrap recorded about an uncaught exception (None if nothing)."""
    try:
        data: dict[str, Any] = read_json(path)
    except (OSError, ValueError):
        return None
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return data


def _exit_like(record: dict[str, Any]) -> None:
    """Leave the way the child left: same signal, or same exit code."""
    if record["signal"]:
        signum = signal.Signals[record["signal"]]
        if signum not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be handled anyway
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        time.sleep(1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: the exit code is what matters now
            pass
    os._exit(int(record["exit_code"] or 0))


OPTIONS = ("--run-dir", "--gpus-per-rank", "--gpus")


def parse_args(argv: list[str]) -> tuple[str, int, str | None, list[str]]:
    """(run folder, GPUs per rank, devices or None, program) from the worker's arguments.

    The form the launcher writes (``--OPTION VALUE`` pairs, ``--``, the program) is read
    here directly; anything else (``--help``, ``--run-dir=DIR``, a mistake) goes to
    argparse, which gives its usual help and errors. Importing argparse, and the
    terminal-size lookup behind its help formatter, would cost every rank's start ~5 ms."""
    values: dict[str, str] = {}
    at = 0
    while (at + 1 < len(argv) and argv[at] in OPTIONS and argv[at] not in values
           and not argv[at + 1].startswith("-")):  # argparse would take "-x" for an option
        values[argv[at]] = argv[at + 1]
        at += 2
    per_rank = values.get("--gpus-per-rank", "0")
    if (argv[at:at + 1] == ["--"] and len(argv) > at + 1 and "--run-dir" in values
            and per_rank.isascii() and per_rank.isdigit() and len(per_rank) < 10):
        return values["--run-dir"], int(per_rank), values.get("--gpus"), argv[at + 1:]
    return _parse_with_argparse(argv)


def _parse_with_argparse(argv: list[str]) -> tuple[str, int, str | None, list[str]]:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m distlaunch.rank.worker", description=__doc__)
    parser.add_argument("--run-dir", required=True, help="the run folder (created if missing)")
    parser.add_argument("--gpus-per-rank", type=int, default=0, help="give each rank this many GPUs")
    parser.add_argument("--gpus", default=None, help="only these devices (indices or UUIDs)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no program given after --")
    return args.run_dir, args.gpus_per_rank, args.gpus, command


def main(argv: list[str] | None = None) -> None:
    run_dir, gpus_per_rank, devices, command = parse_args(sys.argv[1:] if argv is None else argv)
    info = from_environ()
    gpus: tuple[str, ...] = ()
    if gpus_per_rank:
        try:
            gpus = pick_gpus(info, gpus_per_rank, devices)
        except DistlaunchError as exc:
            _write_all(sys.stderr.fileno(), info.prefix + f"distlaunch: error: {exc}\n".encode())
            sys.exit(exc.exit_code)
    record = run_rank(command, run_dir, info, gpus)
    _save(record, run_dir, info)
    if record["exit_code"] and os.environ.get(FAILURE_NOTICE) == "1":  # heard now, from any node (supervise)
        _write_all(sys.stderr.fileno(), info.prefix + RANK_FAILED_MARK + b"\n")
    _exit_like(record)


if __name__ == "__main__":
    main()
