"""Run a ``LaunchPlan``: start mpirun, relay its output, forward signals, leave nothing behind.

mpirun gets a session of its own; every local rank lives in that session, and every
rank carries ``DISTLAUNCH_RUN_ID`` in its environment. When mpirun ends (or the grace
period after a forwarded Ctrl-C/SIGTERM runs out) whatever is left of the run on this
machine is killed, found by that session id and that tag, never by name.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from .errors import ExitCode, RunDirError
from .mpirun import LaunchPlan
from .records import RunPaths, Status, read_rank_records, tail_lines

log = logging.getLogger(__name__)

RANK_LINE = re.compile(rb"^\[ *\d+\] ")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PASS_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
LEFTOVER_GRACE_S = 2.0  # after mpirun exits, ranks still finishing get this long
HANG_DUMP_WAIT_S = 1.0  # after asking ranks for their stacks, before stopping them


@dataclass(frozen=True)
class Failure:
    """The root cause: the first rank that failed, or mpirun itself (rank None)."""

    rank: int | None
    host: str | None
    exit_code: int
    signal: str | None
    last_lines: tuple[str, ...] = ()
    exception: str | None = None  # "ValueError: bad input" when Python raised

    def describe(self) -> str:
        who = f"rank {self.rank} on {self.host}" if self.rank is not None else "mpirun"
        if self.exception:
            how = f"raised {self.exception}"
        elif self.signal:
            how = f"was killed by {self.signal}"
        else:
            how = f"exited with code {self.exit_code}"
        return f"{who} {how}"


@dataclass(frozen=True)
class Outcome:
    status: Status
    exit_code: int
    mpirun_exit_code: int | None
    started: float
    ended: float
    failure: Failure | None = None
    ranks: dict[int, dict[str, Any]] = field(default_factory=dict)
    leftovers_killed: int = 0
    reason: str = ""  # why the launcher ended the job (cancel, timeout), else ""

    @property
    def duration(self) -> float:
        return self.ended - self.started


class OutputPump(threading.Thread):
    """Copy one of mpirun's streams to a sink; keep mpirun's own lines in mpirun.log."""

    def __init__(self, stream: IO[bytes], sink: IO[bytes] | None, own_log: IO[bytes], lock: threading.Lock,
                 everything: IO[bytes] | None = None):
        super().__init__(daemon=True)
        self.stream, self.sink, self.own_log, self.lock = stream, sink, own_log, lock
        self.everything = everything
        self.last_data = time.monotonic()

    def run(self) -> None:
        pending = b""
        while data := self.stream.read1(65536):  # type: ignore[attr-defined]
            self.last_data = time.monotonic()
            self._to_sink(data)
            *lines, pending = (pending + data).split(b"\n")
            self._keep_own(lines)
            self._keep_all(lines)
        self._keep_own([pending])
        self._keep_all([pending] if pending else [])

    def _keep_all(self, lines: list[bytes]) -> None:
        if self.everything is not None and lines:
            with self.lock:
                self.everything.write(b"".join(line + b"\n" for line in lines))
                self.everything.flush()

    def _to_sink(self, data: bytes) -> None:
        if self.sink is None:
            return
        try:
            self.sink.write(data)
            self.sink.flush()
        except (OSError, ValueError):
            self.sink = None  # the terminal went away; keep draining mpirun

    def _keep_own(self, lines: list[bytes]) -> None:
        own = [line for line in lines if line and not RANK_LINE.match(line)]
        if own:
            with self.lock:
                self.own_log.write(b"".join(line + b"\n" for line in own))
                self.own_log.flush()


def run_processes(session: int, run_id: str) -> list[Any]:
    """Live processes on this machine that belong to the run: in mpirun's session, or
    tagged with its id in their environment. Zombies are dead and left out."""
    import psutil

    found = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            ours = os.getsid(proc.pid) == session or proc.environ().get("DISTLAUNCH_RUN_ID") == run_id
            if ours and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _wait_gone(procs: list[Any], timeout: float) -> list[Any]:
    """Poll until every process has exited (or is a zombie); return those still alive."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in procs:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def kill_leftovers(session: int, run_id: str, grace: float = 0.0) -> int:
    """End whatever of the run is still alive here: give it ``grace`` seconds to finish
    (a rank writing its exit record), then SIGKILL it. Return how many were killed."""
    import psutil

    alive = _wait_gone(run_processes(session, run_id), grace)
    for proc in alive:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    _wait_gone(alive, 5.0)
    return len(alive)


def dump_stacks(run_id: str) -> int:
    """Ask every Python rank of the run on this machine to print its threads' stacks."""
    from .remote_agent import dump_tagged

    return dump_tagged(run_id)


def root_cause(records: dict[int, dict[str, Any]], paths: RunPaths) -> Failure | None:
    """The rank that failed first (by the time it ended), with its last log lines."""
    failed = [r for r in records.values() if r.get("exit_code", 0) != 0]
    if not failed:
        return None
    first = min(failed, key=lambda r: r.get("ended", float("inf")))
    rank = int(first["rank"])
    exc = first.get("exception") or {}
    exception = f"{exc['type']}: {exc.get('message', '')}"[:300] if exc.get("type") else None
    return Failure(
        rank, first.get("host"), int(first["exit_code"]), first.get("signal"),
        tuple(tail_lines(paths.rank_log(rank))), exception,
    )


class Supervisor:
    """Starts mpirun for a plan and watches it to the end."""

    def __init__(
        self,
        plan: LaunchPlan,
        paths: RunPaths,
        run_id: str,
        out: IO[bytes] | None = None,
        err: IO[bytes] | None = None,
        kill_grace: float = 5.0,
        on_start: Callable[[int], None] | None = None,
        timeout: float | None = None,
        hang_timeout: float | None = None,
        after_exit: Callable[[], None] | None = None,
        dump: Callable[[str], int] | None = None,
    ) -> None:
        self.plan, self.paths, self.run_id = plan, paths, run_id
        self.out, self.err, self.kill_grace, self.on_start = out, err, kill_grace, on_start
        self.timeout, self.hang_timeout = timeout, hang_timeout
        self.after_exit = after_exit  # e.g. clean up and collect from other nodes
        self.dump = dump or dump_stacks  # asks the ranks for their stacks; returns how many
        self.stop: tuple[Status, int, str] | None = None  # status, exit code, reason
        self.stop_deadline: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pumps: list[OutputPump] = []

    def request_stop(self, signum: int = signal.SIGTERM, status: Status = Status.CANCELLED,
                     exit_code: int | None = None, reason: str | None = None) -> None:
        """End the job: forward ``signum`` to mpirun, SIGKILL what is left after the grace period."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.stop is not None:  # a second request: no more grace
            self.stop_deadline = time.monotonic()
            return
        name = signal.Signals(signum).name
        self.stop = (status, 128 + signum if exit_code is None else exit_code, reason or f"cancelled by {name}")
        self.stop_deadline = time.monotonic() + self.kill_grace
        log.info("stopping run %s: %s", self.run_id, self.stop[2])
        self.proc.send_signal(signum)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum in PASS_SIGNALS:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signum)
        else:
            self.request_stop(signum)

    def _install_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self._on_signal) for s in (*STOP_SIGNALS, *PASS_SIGNALS)}

    def run(self) -> Outcome:
        try:
            self.paths.hostfile.write_text(self.plan.hostfile_text, encoding="utf-8")
            own_log = open(self.paths.mpirun_log, "ab")
            everything = open(self.paths.output_log, "ab")
        except OSError as exc:
            raise RunDirError(f"cannot write in run folder {self.paths.root}: {exc.strerror or exc}: "
                              "free space or pick another --run-dir") from None
        env = {**os.environ, **self.plan.env}
        started = time.time()
        previous = self._install_handlers()
        lock = threading.Lock()
        try:
            with own_log, everything:
                self.proc = subprocess.Popen(
                    list(self.plan.argv), env=env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                )
                if self.on_start is not None:
                    self.on_start(self.proc.pid)
                assert self.proc.stdout is not None and self.proc.stderr is not None
                self.pumps = [
                    OutputPump(self.proc.stdout, self.out, own_log, lock, everything),
                    OutputPump(self.proc.stderr, self.err, own_log, lock, everything),
                ]
                for pump in self.pumps:
                    pump.start()
                code = self._wait()
                leftovers = kill_leftovers(self.proc.pid, self.run_id, grace=LEFTOVER_GRACE_S)
                for pump in self.pumps:
                    pump.join(timeout=10)
                if self.after_exit is not None:
                    self.after_exit()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self._outcome(code, started, leftovers)

    def _wait(self) -> int:
        assert self.proc is not None
        start = time.monotonic()
        while True:
            try:
                return self.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if self.stop_deadline is not None:
                if now >= self.stop_deadline:
                    log.warning("run %s did not stop within the grace period: killing it", self.run_id)
                    kill_leftovers(self.proc.pid, self.run_id)
                continue
            if self.paths.cancel_marker.exists():
                self.request_stop(signal.SIGTERM, Status.CANCELLED, 128 + signal.SIGTERM,
                                  "cancelled on request (distlaunch cancel / Run.cancel)")
            elif self.timeout is not None and now - start >= self.timeout:
                self.request_stop(signal.SIGTERM, Status.TIMEOUT, ExitCode.TIMEOUT,
                                  f"the job ran longer than --timeout {self.timeout:g} s")
            elif self.hang_timeout is not None:
                quiet = now - max(pump.last_data for pump in self.pumps)
                if quiet >= self.hang_timeout:
                    self._on_hang(quiet)

    def _on_hang(self, quiet: float) -> None:
        dumped = self.dump(self.run_id)
        time.sleep(HANG_DUMP_WAIT_S)  # let the stacks reach the logs
        self.request_stop(signal.SIGTERM, Status.TIMEOUT, ExitCode.TIMEOUT,
                          f"no output from any rank for {quiet:.0f} s (--hang-timeout); "
                          f"{dumped} rank stack(s) dumped into the rank logs")

    def _outcome(self, code: int, started: float, leftovers: int) -> Outcome:
        records = read_rank_records(self.paths)
        failure = root_cause(records, self.paths)
        reason = ""
        if self.stop is not None:
            status, exit_code, reason = self.stop
            failure = None  # the ranks died because we stopped them
        elif failure is not None:
            status, exit_code = Status.FAILED, failure.exit_code
        elif code != 0 or len(records) < self.plan.nranks:
            status, exit_code = Status.FAILED, code if code > 0 else 1
            failure = Failure(None, None, exit_code, None, tuple(tail_lines(self.paths.mpirun_log)))
        else:
            status, exit_code = Status.COMPLETED, 0
        return Outcome(status, exit_code, code, started, time.time(), failure, records, leftovers, reason)
