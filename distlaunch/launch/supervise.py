"""Run a ``LaunchPlan``: start mpirun, relay its output, forward signals, leave nothing behind.

``Supervisor`` has a lifecycle: ``start()`` spawns mpirun in a session of its own, told
to take its job down (SIGTERM) if the thread that started it ends without doing so (a
launcher killed outright: ``procs.death_signal``); ``poll()`` watches it once (cancel
requests, ``--timeout``, ``--hang-timeout``, the grace period after a stop, and a
launcher that has not ended the job well after a rank failed, which each rank's worker
tells on stderr the moment it happens); ``stop()`` forwards a signal; ``wait()`` polls
until the end; and ``finish()`` ends it:
whatever is left of the run on this machine is killed (found by mpirun's session and
the run's ``DISTLAUNCH_RUN_ID`` tag, never by name) BEFORE mpirun is reaped, so its
pid cannot be reused meanwhile; then the other nodes are cleaned up and the
``Outcome`` is read from the ranks' exit records. ``run()`` does all of it.

When the run folder fills up, output keeps flowing to the terminal (the job is never
stalled on a full disk) and the run ends as failed with exit code 73, saying so.
"""
from __future__ import annotations

import logging
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from ..errors import ExitCode, RunDirError
from ..nodes.procs import death_signal, dump_stacks, kill_run
from ..plan.mpirun import LaunchPlan, launcher_args
from ..protocol import RANK_FAILED_MARK, RELAY_METRICS, failed_rank, line_rank, metric_payload
from ..records import Failure, RankExit, RunPaths, Status, open_private, read_rank_exits, tail_lines
from .mpisession import LOCAL_BASE, default_base, remove_leftovers, session_env

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PASS_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
LEFTOVER_GRACE_S = 2.0  # after mpirun exits, ranks still finishing get this long
HANG_DUMP_WAIT_S = 1.0  # after asking ranks for their stacks, before stopping them
POLL_S = 0.2
MAX_PENDING = 1 << 20  # an output line without an end is passed on in pieces of this size
# what mpirun --tag-output (also --output tag-detailed or tag-fullname, and with
# --timestamp-output: bracketed in Open MPI 5, a bare ctime in 4), Hydra's -prepend-rank or
# srun --label (padded) put before a rank's line
_LAUNCHER_TAG = re.compile(rb"(?:\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4})?(?:\[[^\]]*\])*<std(?:out|err)>: ?"
                           rb"|\[ *\d+\] ?| *\d+: ?")
SAME_STOP_S = 2.0  # a rank killed by the stop's own signal this soon before it was stopped with the job
ENDS_AFTER_FAILURE_S = 30.0  # once a rank failed, mpirun gets --kill-grace and this long to end the job
# (Slurm's default KillWait): the launcher told to let the job go on after a failure
# (fault-tolerant MPI, Hydra's -disable-auto-cleanup, srun --kill-on-bad-exit=0) gets for ever
KEEPS_GOING = frozenset({"--with-ft", "--enable-recovery", "-disable-auto-cleanup", "--disable-auto-cleanup"})


@dataclass(frozen=True)
class Watch:
    """How the launcher watches a running job."""

    kill_grace: float = 5.0
    timeout: float | None = None
    hang_timeout: float | None = None


@dataclass(frozen=True)
class Console:
    """Where the job's output goes besides the run folder; ``ranks`` filters it."""

    out: IO[bytes] | None = None
    err: IO[bytes] | None = None
    ranks: frozenset[int] | None = None  # show only these ranks' lines (and mpirun's own)


class RemoteSide(Protocol):
    """What the supervisor asks of the other nodes of a multi-node run."""

    def dump(self, run_id: str) -> int:
        """Ask their Python ranks for stacks; how many were asked."""
        ...

    def after_exit(self) -> None:
        """Kill what is left there, bring logs and outputs back."""
        ...


@dataclass(frozen=True)
class Outcome:
    status: Status
    exit_code: int
    mpirun_exit_code: int | None
    started: float
    ended: float
    failure: Failure | None = None
    ranks: dict[int, RankExit] = field(default_factory=dict)
    leftovers_killed: int = 0
    reason: str = ""  # why distlaunch ended the job (cancel, timeout, its launcher not ending it), else ""

    @property
    def duration(self) -> float:
        return self.ended - self.started


class OutputPump(threading.Thread):
    """Copy one of mpirun's streams to the console; keep every line in output.log and
    mpirun's own lines in mpirun.log; with ``relayed``, rank 0's metrics lines relayed from
    another node go to the run's metrics instead; with ``on_failed``, a worker's line
    saying its rank failed is passed to it, and to nothing else. A full disk stops the
    logs, never the draining."""

    def __init__(self, stream: IO[bytes], sink: IO[bytes] | None, ranks: frozenset[int] | None,
                 logs: LogFiles, relayed: bool = False, on_failed: Callable[[int], None] | None = None) -> None:
        super().__init__(daemon=True)
        self.stream, self.sink, self.ranks, self.logs = stream, sink, ranks, logs
        self.relayed, self.on_failed = relayed, on_failed
        self.last_data = time.monotonic()

    def run(self) -> None:
        raw = self.ranks is None and not self.relayed  # whole lines go to the console as they came
        pending = b""
        while data := self.stream.read1(65536):  # type: ignore[attr-defined]
            self.last_data = time.monotonic()
            chunk = pending + data
            *lines, pending = chunk.split(b"\n")  # a line's start waits for its end (workers send whole lines)
            if len(pending) >= MAX_PENDING:  # not a worker's line (theirs are cut shorter): passed on in pieces
                lines.append(pending)
                pending = b""
            if not lines:
                continue
            if self.relayed:
                lines = self._metrics_out(lines)
            marked = self.on_failed is not None and RANK_FAILED_MARK in chunk
            if marked:
                lines = self._failures_out(lines)
            if raw and not marked:
                self._to_sink(chunk[:len(chunk) - len(pending)] if pending else chunk)
            else:
                self._to_sink(b"".join(line + b"\n" for line in lines if self._shown(line)))
            self.logs.keep(lines)
        if pending:  # the last line, without its end
            rest = [pending] if self.on_failed is None else self._failures_out([pending])
            for line in rest:
                if self._shown(line):
                    self._to_sink(line if raw else line + b"\n")
            self.logs.keep(rest)

    def _metrics_out(self, lines: list[bytes]) -> list[bytes]:
        """Keep the relayed metrics lines; the others."""
        rest, metrics = [], []
        for line in lines:
            payload = metric_payload(line)
            if payload is None:
                rest.append(line)
            else:
                metrics.append(payload)
        self.logs.metrics(metrics)
        return rest

    def _failures_out(self, lines: list[bytes]) -> list[bytes]:
        """Pass on the ranks that failed; the other lines, and what another rank's line,
        cut by mpirun's forwarding, left before a notice (not a launcher's tag)."""
        assert self.on_failed is not None
        rest = []
        for line in lines:
            found = failed_rank(line)
            if found is None:
                rest.append(line)
                continue
            rank, before = found
            if before.strip() and not _LAUNCHER_TAG.fullmatch(before):
                rest.append(before)
            self.on_failed(rank)
        return rest

    def _shown(self, line: bytes) -> bool:
        rank = line_rank(line)
        return rank is None or self.ranks is None or rank in self.ranks

    def _to_sink(self, data: bytes) -> None:
        if self.sink is None or not data:
            return
        try:
            self.sink.write(data)
            self.sink.flush()
        except (OSError, ValueError):
            self.sink = None  # the terminal went away; keep draining mpirun


class LogFiles:
    """output.log and mpirun.log, shared by both pumps, and rank 0's relayed metrics;
    remembers a full disk."""

    def __init__(self, paths: RunPaths) -> None:
        self.lock = threading.Lock()
        self.problem: str | None = None
        self.paths = paths
        self.relayed: IO[bytes] | None = None
        self.relay_ended = False
        self.closed = False
        try:
            self.everything: IO[bytes] | None = open_private(paths.output_log)
            self.own: IO[bytes] | None = open_private(paths.mpirun_log)
        except OSError as exc:
            raise RunDirError(f"cannot write in run folder {paths.root}: {exc.strerror or exc}: "
                              "free space or pick another --run-dir") from None

    def keep(self, lines: list[bytes]) -> None:
        if not lines:
            return
        own = [line for line in lines if line and line_rank(line) is None]
        with self.lock:
            try:
                if self.everything is not None:
                    self.everything.write(b"".join(line + b"\n" for line in lines))
                    self.everything.flush()
                if own and self.own is not None:
                    self.own.write(b"".join(line + b"\n" for line in own))
                    self.own.flush()
            except OSError as exc:
                self.problem = exc.strerror or str(exc)
                self._close_held()

    def metrics(self, lines: list[bytes]) -> None:
        """Rank 0's metrics lines, relayed from its node: appended to its metrics file here
        (the collection at the end adds only what the node has beyond them)."""
        if not lines:
            return
        with self.lock:
            if self.closed or self.relay_ended:
                return  # the job has ended: the node's own file is collected now
            try:
                if self.relayed is None:
                    self.paths.metrics.mkdir(mode=0o700, parents=True, exist_ok=True)
                    self.relayed = open_private(self.paths.rank_metrics(0), "ab")
                self.relayed.write(b"".join(line + b"\n" for line in lines))
                self.relayed.flush()
            except OSError as exc:
                self.problem = exc.strerror or str(exc)
                self._close_held()

    def end_relay(self) -> None:
        """No relayed metrics line is written from now on (the collection adds the rest)."""
        with self.lock:
            self.relay_ended = True
            if self.relayed is not None:
                try:
                    self.relayed.close()
                except OSError:
                    pass
                self.relayed = None

    def close(self) -> None:
        """Close every file; a pump still writing (one that did not end in time) then writes nothing."""
        with self.lock:
            self._close_held()

    def _close_held(self) -> None:
        self.closed = True
        for handle in (self.everything, self.own, self.relayed):
            try:
                if handle is not None:
                    handle.close()
            except OSError:
                pass
        self.everything = self.own = self.relayed = None


# what a rank's MPI prints when it aborts because a PEER went away: a consequence, not a cause
CASCADE_MARKERS = ("peer process has unexpectedly disconnected", "*** An error occurred in Socket closed")


# Open MPI shows those messages through mpirun as often as in the rank's own output; there
# they name the rank: "*** reported by process [JOB,RANK]" under the first, "Local host: H"
# and "Local PID: P" in the second's block
_REPORTED_BY = re.compile(r"An error occurred in Socket closed[^\n]*\n[^\n]*reported by process \[\d+,(\d+)\]")
_LOCAL_PEER = re.compile(r"peer process has unexpectedly disconnected.{0,1500}?Local host:\s*(\S+)\s*"
                         r"Local PID:\s*(\d+)", re.DOTALL)  # within its own block, never the next one's


def _cascaded(record: RankExit, paths: RunPaths, named: set[int]) -> bool:
    if record.rank in named and record.signal is None and not record.exception:
        return True  # named by mpirun, and nothing says it failed on its own
    text = "\n".join(tail_lines(paths.rank_log(record.rank), 60))
    return any(marker in text for marker in CASCADE_MARKERS)


def _cascades_named_by_mpirun(records: dict[int, RankExit], paths: RunPaths) -> set[int]:
    """The ranks that mpirun's log says aborted because a peer went away (``CASCADE_MARKERS``
    shown through mpirun, naming the rank or its host and pid)."""
    text = "\n".join(tail_lines(paths.mpirun_log, 400, 65536))
    named = {int(match.group(1)) for match in _REPORTED_BY.finditer(text)}
    # by the short host name: the record's is the node's own (maybe with its domain), Open MPI's may be short
    by_process = {(r.host.split(".")[0], r.pid): r.rank for r in records.values() if r.pid}
    for match in _LOCAL_PEER.finditer(text):
        rank = by_process.get((match.group(1).split(".")[0], int(match.group(2))))
        if rank is not None:
            named.add(rank)
    return named


def root_cause(records: dict[int, RankExit], paths: RunPaths) -> Failure | None:
    """The rank that failed first (by the time it ended), with its last log lines. A rank
    whose MPI aborted because a peer disconnected (said in its own log or in mpirun's) is
    the cause only when no other failed: it can end a hair before the peer it lost (its
    own exit record is written sooner)."""
    failed = [r for r in records.values() if r.failed]
    if not failed:
        return None
    named = _cascades_named_by_mpirun(records, paths)
    primary = [r for r in failed if not _cascaded(r, paths, named)] or failed
    first = min(primary, key=lambda r: r.ended if r.ended is not None else float("inf"))
    return failure_of(first, paths)


def failure_of(record: RankExit, paths: RunPaths) -> Failure:
    """A failed rank's exit record as a Failure, with its last log lines."""
    exc = record.exception or {}
    exception = f"{exc['type']}: {exc.get('message', '')}"[:300] if exc.get("type") else None
    return Failure(record.rank, record.host, int(record.exit_code or 0), record.signal,
                   tuple(tail_lines(paths.rank_log(record.rank))), exception)


def ends_on_failure(argv: Sequence[str], env: Mapping[str, str]) -> bool:
    """Whether the launcher of ``argv`` ends the whole job when one rank fails, as
    distlaunch's plans have it, unless the user's own launcher arguments (before the
    worker's command: the program's own are not looked at) or environment say otherwise."""
    own = launcher_args(argv)
    if KEEPS_GOING & set(own) or any(arg.startswith("--with-ft=") for arg in own):
        return False
    kill_on_bad_exit = [arg for arg in own if arg.startswith(("--kill-on-bad-exit", "-K"))]
    if kill_on_bad_exit and kill_on_bad_exit[-1] in ("--kill-on-bad-exit=0", "-K0"):
        return False
    settings = [(arg, value) for arg, value in zip(own, own[1:])] + list({**os.environ, **env}.items())
    return not any("abort_on_non_zero_status" in name and value.strip().lower() in ("0", "false", "no", "off")
                   for name, value in settings)


def _exited(pid: int) -> int | None:
    """mpirun's return code once it has exited, WITHOUT reaping it (its pid stays ours)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


class ExitWait:
    """Sleep between polls, but wake the moment a child process exits: its pidfd turns
    readable then (Linux 5.3+); a plain sleep where there is none."""

    def __init__(self, pid: int) -> None:
        self.poller = select.poll()  # not select.select: it refuses descriptors past 1023
        try:
            self.fd: int | None = os.pidfd_open(pid)
            self.poller.register(self.fd, select.POLLIN)
        except (AttributeError, OSError):
            self.fd = None

    def sleep(self, seconds: float) -> None:
        if self.fd is None:
            time.sleep(seconds)
        else:
            self.poller.poll(seconds * 1000)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Supervisor:
    """Starts mpirun for a plan and watches it to the end."""

    def __init__(self, plan: LaunchPlan, paths: RunPaths, watch: Watch | None = None, console: Console | None = None,
                 remote: RemoteSide | None = None) -> None:
        self.plan, self.paths, self.remote = plan, paths, remote
        self.watch, self.console = watch or Watch(), console or Console()
        self.run_id = paths.run_id
        self.stopping: tuple[Status, int, str] | None = None  # status, exit code, reason
        self.stop_deadline: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pumps: list[OutputPump] = []
        self.logs: LogFiles | None = None
        self.started = 0.0
        self.code: int | None = None
        self.ended = False  # mpirun has exited: stop requests come too late from here on
        self.late_stop: int | None = None  # a stop signal that came as the job ended, or while it was being
        # stopped for another reason (--hang-timeout, the failure guard): no restart then
        self.failed: tuple[int, float] | None = None  # the first rank heard to fail, and when (monotonic)
        self.forced: str | None = None  # why distlaunch ended a job its launcher did not end after a failure
        # the rank heard to fail before a stop came, how long before, and the stop's signal
        self.failed_before_stop: tuple[int, float, str] | None = None
        self.guards_failures = ends_on_failure(plan.argv, plan.env)  # else the job may go on after one
        # Open MPI 5: the folder mpirun keeps its session in, and whether it is this user's own
        self.session_folder: tuple[str, bool] | None = None
        self._handlers: dict[int, Any] = {}

    # -- lifecycle
    def start(self) -> int:
        """Write the hostfile, start mpirun and the output pumps; mpirun's pid."""
        try:
            with open_private(self.paths.hostfile, "w") as handle:
                handle.write(self.plan.hostfile_text)
        except OSError as exc:
            raise RunDirError(f"cannot write in run folder {self.paths.root}: {exc.strerror or exc}: "
                              "free space or pick another --run-dir") from None
        env = {**os.environ, **self.plan.env}
        if self.plan.private_session:
            added = session_env(self.plan.argv, env)
            env.update(added)
            self.session_folder = (added.get(LOCAL_BASE) or default_base(env), LOCAL_BASE in added)
        self.logs = LogFiles(self.paths)
        self.started = time.time()
        self._install_handlers()
        try:
            self.proc = subprocess.Popen(
                list(self.plan.argv), env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                preexec_fn=death_signal(),  # a launcher killed outright: mpirun ends the job itself,
                restore_signals=False,  # with SIGPIPE still ignored, so its closed pipes cannot kill it first
            )
        except BaseException:
            self._restore_handlers()
            self.logs.close()
            raise
        assert self.proc.stdout is not None and self.proc.stderr is not None
        relayed = self.plan.env.get(RELAY_METRICS) == "1"
        self.pumps = [OutputPump(self.proc.stdout, self.console.out, self.console.ranks, self.logs, relayed,
                                 on_failed=self._rank_failed),  # stderr may be merged into stdout (--output merge)
                      OutputPump(self.proc.stderr, self.console.err, self.console.ranks, self.logs,
                                 on_failed=self._rank_failed)]
        for pump in self.pumps:
            pump.start()
        return self.proc.pid

    def poll(self) -> int | None:
        """Watch once; mpirun's return code when it has ended (not yet reaped), else None."""
        assert self.proc is not None
        self.code = _exited(self.proc.pid)
        if self.code is not None:
            self.ended = True
            return self.code
        now = time.monotonic()
        if self.stop_deadline is not None:
            if now >= self.stop_deadline:
                log.warning("run %s did not stop within the grace period: killing it", self.run_id)
                kill_run(self.run_id, self.proc.pid)
            return None
        if self.paths.cancel_marker.exists():
            self.stop(signal.SIGTERM, Status.CANCELLED, 128 + signal.SIGTERM,
                      "cancelled on request (distlaunch cancel / Run.cancel)")
        elif self.watch.timeout is not None and time.time() - self.started >= self.watch.timeout:
            self.stop(signal.SIGTERM, Status.TIMEOUT, ExitCode.TIMEOUT,
                      f"the job ran longer than --timeout {self.watch.timeout:g} s")
        elif self.failed is not None and now - self.failed[1] >= self.watch.kill_grace + ENDS_AFTER_FAILURE_S \
                and self.guards_failures:
            self._end_after_failure(now - self.failed[1])
        elif self.watch.hang_timeout is not None:
            quiet = time.monotonic() - max(pump.last_data for pump in self.pumps)
            if quiet >= self.watch.hang_timeout:
                self._on_hang(quiet)
        return None

    def stop(self, signum: int = signal.SIGTERM, status: Status = Status.CANCELLED,
             exit_code: int | None = None, reason: str | None = None) -> None:
        """End the job: forward ``signum`` to mpirun, SIGKILL what is left after the grace
        period; a second request skips what is left of the grace."""
        if self.proc is None or self.ended or _exited(self.proc.pid) is not None:
            return  # too late: the job ended on its own, and that is what it reports
        if self.stopping is not None:
            self.stop_deadline = time.monotonic()
            if status is Status.CANCELLED:
                self.late_stop = signum  # Ctrl-C during a --hang-timeout stop: no restart after it either
            return
        if self.forced is not None:  # ending already: the failed rank stays the cause, and no restart follows
            self.late_stop = signum
            self.stop_deadline = time.monotonic()
            return
        name = signal.Signals(signum).name
        self.stopping = (status, 128 + signum if exit_code is None else exit_code, reason or f"cancelled by {name}")
        if self.failed is not None:  # a rank had failed already: kept as the first failure (``_outcome``)
            self.failed_before_stop = (self.failed[0], time.monotonic() - self.failed[1], name)
        self.stop_deadline = time.monotonic() + self.watch.kill_grace
        log.info("stopping run %s: %s", self.run_id, self.stopping[2])
        if signum == signal.SIGINT and self.plan.interrupt_as is not None:
            signum = self.plan.interrupt_as  # srun reads one SIGINT as "print the status"
        os.kill(self.proc.pid, signum)  # not Popen.send_signal: that may reap mpirun before our scan

    def finish(self) -> Outcome:
        """After mpirun ended: kill leftovers, reap mpirun, drain output, clean up the
        other nodes, and say how the job ended."""
        assert self.proc is not None and self.logs is not None
        self.ended = True
        try:
            leftovers = kill_run(self.run_id, self.proc.pid, grace=LEFTOVER_GRACE_S)
            if self.session_folder is not None:  # what a killed mpirun left (mpisession), while its pid is ours
                remove_leftovers(self.proc.pid, *self.session_folder)
            code = self.proc.wait()  # reaped only now: its pid was ours during the scan
            for pump in self.pumps:
                pump.join(timeout=10)
            self.logs.end_relay()  # a pump still running must not write what the collection adds to
            if self.remote is not None:
                self.remote.after_exit()
        finally:
            self._restore_handlers()
            self.logs.close()
        return self._outcome(code, leftovers)

    def wait(self) -> Outcome:
        """Poll until mpirun ends, then ``finish``; an exception here (Ctrl-C twice, a bug)
        still takes the whole job down with it."""
        assert self.proc is not None
        waiter = ExitWait(self.proc.pid)
        try:
            while self.poll() is None:
                waiter.sleep(POLL_S)
        except BaseException:
            self._restore_handlers()
            self._kill_now()
            raise
        finally:
            waiter.close()
        return self.finish()

    def run(self) -> Outcome:
        self.start()
        return self.wait()

    # -- internals
    def _kill_now(self) -> None:
        """The launcher itself is going down: take the job with it, here and on the nodes."""
        if self.proc is None:
            return
        self.ended = True
        if _exited(self.proc.pid) is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        kill_run(self.run_id, self.proc.pid)  # before reaping: the session id is still ours
        self.proc.wait()
        if self.logs is not None:
            self.logs.end_relay()
        if self.remote is not None:
            self.remote.after_exit()

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum in PASS_SIGNALS:
            if self.proc is not None and not self.ended and _exited(self.proc.pid) is None:
                os.kill(self.proc.pid, signum)
        elif self.ended or (self.proc is not None and _exited(self.proc.pid) is not None):
            self.late_stop = signum  # the job has ended already; whoever restarts it must not
        else:
            self.stop(signum)

    def _install_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._handlers = {s: signal.signal(s, self._on_signal) for s in (*STOP_SIGNALS, *PASS_SIGNALS)}

    def _restore_handlers(self) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}

    def _rank_failed(self, rank: int) -> None:
        """From the stderr pump: a rank's worker says its rank failed."""
        if self.failed is None:
            self.failed = (rank, time.monotonic())

    def _failed_before_stop(self, records: dict[int, RankExit]) -> Failure | None:
        """A stopped job's ranks died because it was stopped, except one heard to fail before
        the stop came (its launcher had not ended the job yet, or was told to go on): that
        one is kept as the first failure. Not a rank killed by the very signal of the stop
        a moment before it (scancel signals the ranks and distlaunch at once)."""
        if self.failed_before_stop is None:
            return None
        rank, waited, stop_signal = self.failed_before_stop
        record = records.get(rank)
        if record is None or not record.failed or (record.signal == stop_signal and waited < SAME_STOP_S):
            return None
        return failure_of(record, self.paths)

    def _end_after_failure(self, waited: float) -> None:
        """The launcher ends a job when one rank fails (mpirun, srun --kill-on-bad-exit,
        Hydra); when it does not (a node's daemon that stopped answering), end it as a
        stop would, while the failed rank stays the root cause."""
        assert self.proc is not None and self.failed is not None
        launcher = os.path.basename(self.plan.argv[0])
        self.forced = f"{launcher} had not ended the job {waited:.0f} s later: distlaunch stopped it"
        log.warning("run %s: rank %d failed %.0f s ago and %s has not ended the job: stopping it", self.run_id,
                    self.failed[0], waited, launcher)
        self.stop_deadline = time.monotonic() + self.watch.kill_grace
        os.kill(self.proc.pid, signal.SIGTERM)

    def _on_hang(self, quiet: float) -> None:
        assert self.proc is not None
        dumped = dump_stacks(self.run_id) + (self.remote.dump(self.run_id) if self.remote else 0)
        time.sleep(HANG_DUMP_WAIT_S)  # let the stacks reach the logs
        self.stop(signal.SIGTERM, Status.TIMEOUT, ExitCode.TIMEOUT,
                  f"no output from any rank for {quiet:.0f} s (--hang-timeout); "
                  f"{dumped} rank stack(s) dumped into the rank logs")

    def _outcome(self, code: int, leftovers: int) -> Outcome:
        records = read_rank_exits(self.paths)
        failure = root_cause(records, self.paths)
        reason = ""
        ended = [r for r in records.values() if r.exit_code is not None]
        launcher = os.path.basename(self.plan.argv[0])
        assert self.logs is not None
        if self.stopping is not None:
            status, exit_code, reason = self.stopping
            failure = self._failed_before_stop(records)
            if failure is not None and self.failed_before_stop is not None:
                reason += f", {self.failed_before_stop[1]:.0f} s after rank {failure.rank} failed"
        elif self.logs.problem is not None:
            status, exit_code = Status.FAILED, ExitCode.RUN_DIR
            reason = (f"cannot write to the run folder {self.paths.root} ({self.logs.problem}): its logs and "
                      "records are incomplete; free space or pick another --run-dir")
        elif failure is not None:
            status, exit_code = Status.FAILED, failure.exit_code
        elif code != 0 and not records:
            status, exit_code = Status.FAILED, ExitCode.LAUNCH
            reason = (f"{launcher} could not start the job (no rank started): see its message above or in "
                      "logs/mpirun.log")
            failure = Failure(None, None, code if code > 0 else 128 - code, None,
                              tuple(tail_lines(self.paths.mpirun_log)), launcher=launcher)
        elif code != 0 or len(ended) < self.plan.nranks:
            status, exit_code = Status.FAILED, code if code > 0 else 1
            failure = Failure(None, None, exit_code, None, tuple(tail_lines(self.paths.mpirun_log)),
                              launcher=launcher)
        else:
            status, exit_code = Status.COMPLETED, 0
        if self.forced is not None and self.stopping is None and not reason:
            reason = self.forced
        return Outcome(status, exit_code, code, self.started, time.time(), failure, records, leftovers, reason)
