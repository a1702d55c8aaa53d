"""The failure matrix: every way a job can go wrong ends it promptly, names the root
cause, keeps the logs and leaves no process of the run alive.

Set DISTLAUNCH_MATRIX_REPORT=FILE to append one JSON line per cell with the measured
time from fault to clean exit.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import SCRIPTS, oversubscribe

pytestmark = pytest.mark.slow
FAULTS = SCRIPTS / "faults.py"


def survivors(run_id: str) -> list[psutil.Process]:
    """Every live process of the run on this machine, simulated nodes' included."""
    from distlaunch.nodes.procs import run_processes

    return run_processes(run_id, any_namespace=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def report(cell: str, ranks: int, seconds: float, status: str, code: int) -> None:
    path = os.environ.get("DISTLAUNCH_MATRIX_REPORT")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"cell": cell, "ranks": ranks, "fault_to_exit_s": round(seconds, 2),
                                     "status": status, "exit_code": code}) + "\n")


class Job:
    def __init__(self, tmp: Path, ranks: int, fault: str, fault_rank: int, *extra: str, grace: float = 3) -> None:
        self.tmp, self.ranks = tmp, ranks
        env = {**os.environ, "OUT_DIR": str(tmp), "FAULT": fault, "FAULT_RANK": str(fault_rank)}
        argv = [sys.executable, "-m", "distlaunch", "run", "--ppn", str(ranks), *oversubscribe(ranks),
                "--kill-grace", str(grace), *extra,
                str(FAULTS)]
        self.proc = subprocess.Popen(argv, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)

    def wait_ready(self) -> None:
        wait_for(lambda: len(list(self.tmp.glob("ready-*"))) == self.ranks or self.proc.poll() is not None,
                 60, "all ranks to start")
        assert self.proc.poll() is None, self.proc.communicate()

    def finish(self, bound: float) -> tuple[float, dict]:
        try:
            _out, self.err = self.proc.communicate(timeout=bound)
        except subprocess.TimeoutExpired:
            self.proc.terminate()  # distlaunch stops its job itself; the no_leftovers fixture checks
            self.proc.wait(timeout=60)
            raise AssertionError(f"distlaunch did not end within {bound} s") from None
        ended = time.time()
        run_dir = next((self.tmp / "runs").iterdir())
        record = json.loads((run_dir / "run.json").read_text())
        assert survivors(record["id"]) == [], "processes of the run survived"
        for rank in range(self.ranks):
            assert (run_dir / "logs" / f"rank-{rank}.log").exists()
        return ended, record

    def fault_time(self) -> float:
        return float((self.tmp / "fault-time").read_text())


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("fault,code", [("exception", 1), ("exit7", 7)])
def test_rank_failure(tmp_path, ranks, fault, code):
    job = Job(tmp_path, ranks, fault, ranks - 1)
    job.wait_ready()
    ended, record = job.finish(60)
    assert job.proc.returncode == code, job.err
    assert record["status"] == "failed" and record["exit_code"] == code
    first = record["first_failure"]
    assert first["rank"] == ranks - 1 and first["exit_code"] == code
    if fault == "exception":
        exc = record["rank_exits"][str(ranks - 1)]["exception"]
        assert exc["type"] == "RuntimeError" and "injected failure" in exc["message"]
        assert "RuntimeError: injected failure" in first["exception"]
        assert f"rank {ranks - 1} on" in job.err and "raised RuntimeError" in job.err
    elapsed = ended - job.fault_time()
    assert elapsed < 30
    report(fault, ranks, elapsed, record["status"], code)


@pytest.mark.parametrize("ranks", [2, 4])
def test_rank_killed_from_outside(tmp_path, ranks):
    job = Job(tmp_path, ranks, "sigkill", 1)
    job.wait_ready()
    victim = int((tmp_path / "ready-1").read_text())
    killed = time.time()
    os.kill(victim, signal.SIGKILL)
    ended, record = job.finish(60)
    assert job.proc.returncode == 128 + signal.SIGKILL, job.err
    assert record["status"] == "failed"
    assert record["first_failure"]["rank"] == 1 and record["first_failure"]["signal"] == "SIGKILL"
    assert "killed by SIGKILL" in job.err
    report("sigkill", ranks, ended - killed, record["status"], job.proc.returncode)


@pytest.mark.parametrize("ranks", [2, 4])
def test_hang_in_collective(tmp_path, ranks):
    job = Job(tmp_path, ranks, "hang", 0, "--hang-timeout", "3")
    job.wait_ready()
    ready = time.time()  # output stops here
    ended, record = job.finish(60)
    assert job.proc.returncode == 124, job.err
    assert record["status"] == "timeout" and "--hang-timeout" in record["reason"]
    assert ended - ready >= 3, "ended before the hang timeout"
    run_dir = tmp_path / "runs" / record["id"]
    for rank in range(ranks):  # every rank's stack, the hanging one and those waiting for it
        log = (run_dir / "logs" / f"rank-{rank}.log").read_text()
        assert "most recent call first" in log and "faults.py" in log, f"no stack dump from rank {rank}"
    report("hang", ranks, ended - ready - 3, record["status"], 124)


def test_hang_timeout_spares_a_job_that_keeps_printing(tmp_path):
    """A line a second, for 6 s, under --hang-timeout 2.5: quiet for 1 s at most, never 2.5."""
    job = Job(tmp_path, 2, "chatty", -1, "--hang-timeout", "2.5")
    job.wait_ready()
    _ended, record = job.finish(60)
    assert job.proc.returncode == 0, job.err
    assert record["status"] == "completed" and record["duration_s"] >= 6  # ran 3 x the hang timeout


@pytest.mark.parametrize("ranks", [2, 4])
def test_job_timeout(tmp_path, ranks):
    job = Job(tmp_path, ranks, "sleep", -1, "--timeout", "4")
    started = time.time()
    job.wait_ready()
    ended, record = job.finish(60)
    assert job.proc.returncode == 124, job.err
    assert record["status"] == "timeout" and "--timeout" in record["reason"]
    assert ended - started >= 4 and record["duration_s"] >= 4, "ended before --timeout"
    report("timeout", ranks, ended - started - 4, record["status"], 124)


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_distlaunch(tmp_path, ranks, signum):
    job = Job(tmp_path, ranks, "sleep", -1)
    job.wait_ready()
    sent = time.time()
    job.proc.send_signal(signum)
    ended, record = job.finish(60)
    assert job.proc.returncode == 128 + signum, job.err
    assert record["status"] == "cancelled" and record["exit_code"] == 128 + signum
    assert signal.Signals(signum).name in record["reason"]
    report(signal.Signals(signum).name, ranks, ended - sent, record["status"], job.proc.returncode)


@pytest.mark.parametrize("restarts", ["0", "1"])
def test_a_stop_after_a_rank_failed_keeps_that_rank_as_the_first_failure(tmp_path, restarts):
    """Hydra told to keep a job going after a failure (-disable-auto-cleanup): rank 1
    exits 7 and rank 0 sleeps on. The user's Ctrl-C then ends the job, which is cancelled
    as any other, but rank 1 is kept as its first failure and named; no restart."""
    hydra = shutil.which("mpirun.mpich")
    if hydra is None:
        pytest.skip("MPICH's mpirun (mpirun.mpich) is not installed")
    job = Job(tmp_path, 2, "alone7", 1, "--mpirun", hydra, "--mpi-arg", "-disable-auto-cleanup", "--max-restarts",
              restarts)
    job.wait_ready()

    def rank_1_recorded() -> bool:  # its worker tells the launcher right after writing this
        found = list((tmp_path / "runs").glob("*/ranks/rank-1.json"))
        return bool(found) and json.loads(found[0].read_text()).get("exit_code") == 7

    wait_for(rank_1_recorded, 30, "rank 1 to fail")
    time.sleep(1)  # its worker's line reaches distlaunch in milliseconds
    assert job.proc.poll() is None, "premise: the launcher keeps the job going after rank 1 failed"
    job.proc.send_signal(signal.SIGINT)
    _ended, record = job.finish(60)
    assert (record["status"], record["exit_code"], job.proc.returncode) == ("cancelled", 130, 130), job.err
    first = record["first_failure"]
    assert (first["rank"], first["exit_code"]) == (1, 7), first
    said = re.compile(r"cancelled by SIGINT, \d+ s after rank 1 failed")
    if restarts == "0":
        assert said.fullmatch(record["reason"]), record["reason"]
    else:
        attempt = record["attempts"][0]
        assert (attempt["status"], attempt["failure"]["rank"]) == ("cancelled", 1), attempt
        assert said.fullmatch(attempt["reason"]) and attempt["next"] == "no restart after a cancel or Ctrl-C", attempt
    assert said.search(job.err) and "first failure: rank 1 on" in job.err and "rank-1.log" in job.err, job.err


@pytest.mark.parametrize("heard,kept", [
    ((1, 0.3, "SIGTERM"), False),  # scancel: the rank and distlaunch got the same SIGTERM at once
    ((1, 5.0, "SIGTERM"), True),   # killed by SIGTERM long before the stop: its own failure
    ((2, 0.1, "SIGTERM"), True),   # exited 7 just before: whatever the stop's signal
    ((3, 5.0, "SIGINT"), False),   # heard, but its exit record never came (its node went away)
], ids=["same-signal-at-once", "same-signal-earlier", "exit-code", "no-record"])
def test_which_failure_heard_before_a_stop_is_kept(tmp_path, heard, kept):
    from types import SimpleNamespace

    from distlaunch.launch.supervise import Supervisor
    from distlaunch.records import RankExit, RunPaths

    paths = RunPaths(tmp_path / "run")
    paths.logs.mkdir(parents=True)
    records = {0: RankExit(0, host="n1", ended=10.0, exit_code=143, signal="SIGTERM"),
               1: RankExit(1, host="n1", ended=9.0, exit_code=143, signal="SIGTERM"),
               2: RankExit(2, host="n2", ended=9.0, exit_code=7)}
    watching = SimpleNamespace(failed_before_stop=heard, paths=paths)
    failure = Supervisor._failed_before_stop(watching, records)  # type: ignore[arg-type]
    assert (failure is not None) is kept
    if kept:
        assert (failure.rank, failure.exit_code) == (heard[0], records[heard[0]].exit_code)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2])
def test_usr_signals_reach_every_rank(tmp_path, signum):
    job = Job(tmp_path, 2, "usr", -1)
    job.wait_ready()
    job.proc.send_signal(signum)
    name = signal.Signals(signum).name
    wait_for(lambda: all((tmp_path / f"{name}-{rank}").exists() for rank in range(2)), 20, f"{name} on every rank")
    assert job.proc.poll() is None, "the job must go on after a USR signal"
    job.proc.send_signal(signal.SIGTERM)
    _ended, record = job.finish(60)
    assert record["status"] == "cancelled"


@pytest.mark.parametrize("ranks", [None, frozenset({0, 1})], ids=["all-ranks", "output-ranks"])
def test_a_workers_failure_line_is_heard_and_never_shown(tmp_path, ranks):
    """Either stream, a line of mpirun's own before it (--tag-output), a line cut across
    reads, and a last line without its end: the failure is heard, nothing else is lost."""
    import io

    from distlaunch.launch.supervise import LogFiles, OutputPump
    from distlaunch.protocol import RANK_FAILED_MARK
    from distlaunch.records import RunPaths

    class Reads:  # the stream as mpirun's pipe gives it: these pieces, each one read
        def __init__(self, *pieces: bytes) -> None:
            self.pieces = list(pieces)

        def read1(self, _size: int) -> bytes:
            return self.pieces.pop(0) if self.pieces else b""

    paths = RunPaths(tmp_path / "run")
    paths.logs.mkdir(parents=True)
    logs = LogFiles(paths)
    heard, sink = [], io.BytesIO()
    pump = OutputPump(Reads(b"[0] step 1\n[1] half of ", b"a line\n[1] " + RANK_FAILED_MARK[:6],
                            RANK_FAILED_MARK[6:] + b"\n[job-1,0]<stderr>: [0] " + RANK_FAILED_MARK + b"\n",
                            b"[0] a long line cut by mpirun [1] " + RANK_FAILED_MARK + b"\n[0] , here its end\n",
                            # mpirun --output tag-detailed, --timestamp-output with --tag-output, and
                            # srun --label with more than 10 tasks (padded)
                            b"[1,1][node2:4242]<stderr>: [1] " + RANK_FAILED_MARK + b"\n",
                            b"[Mon Dec  7 08:45:41 2026][1,0]<stdout>: [0] " + RANK_FAILED_MARK + b"\n",
                            b" 1: [ 1] " + RANK_FAILED_MARK + b"\n",
                            b"Mon Dec  7 08:45:41 2026[1,0]<stderr>: [0] " + RANK_FAILED_MARK + b"\n",  # Open MPI 4
                            b"mpirun: its own last words"), sink, ranks, logs, on_failed=heard.append)
    pump.run()
    logs.close()
    assert heard == [1, 0, 1, 1, 0, 1, 0]
    shown = sink.getvalue()
    assert shown.startswith(b"[0] step 1\n[1] half of a line\n") and RANK_FAILED_MARK not in shown
    assert b"[0] a long line cut by mpirun \n" in shown and b"<std" not in shown and b" 1:" not in shown
    assert b"2026" not in shown
    assert shown.rstrip(b"\n").endswith(b"mpirun: its own last words")
    kept = paths.output_log.read_bytes()
    assert b"half of a line" in kept and b"a long line cut by" in kept and b"its own last words" in kept
    assert RANK_FAILED_MARK not in kept


def test_a_pump_still_writing_when_the_logs_close_writes_nothing(tmp_path):
    """finish() closes the logs after waiting a while for the pumps; one still running then
    must find them closed, not write into a closed file (ValueError in its thread)."""
    import threading

    from distlaunch.launch.supervise import LogFiles
    from distlaunch.records import RunPaths

    errors = []
    for attempt in range(20):
        paths = RunPaths(tmp_path / f"run-{attempt}")
        paths.logs.mkdir(parents=True)
        logs = LogFiles(paths)
        writing = threading.Event()

        def pump(logs=logs, writing=writing):
            try:
                for _ in range(2000):
                    logs.keep([b"mpirun: a line of its own", b"[0] a rank's line"])
                    writing.set()
            except Exception as exc:  # noqa: BLE001 - what the test looks for
                errors.append(repr(exc))

        thread = threading.Thread(target=pump)
        thread.start()
        writing.wait()
        logs.close()
        thread.join()
        assert paths.output_log.read_bytes().startswith(b"mpirun: a line of its own\n[0] a rank's line\n")
    assert errors == []


@pytest.mark.parametrize("argv,env,ends", [
    (["mpirun", "-n", "2", "python", "-m", "distlaunch.rank.worker", "--", "train.py", "--enable-recovery"], {},
     True),
    (["mpirun", "--with-ft", "ulfm", "-n", "2", "python", "-m", "distlaunch.rank.worker"], {}, False),
    (["mpirun", "--enable-recovery", "python", "-m", "distlaunch.rank.worker"], {}, False),
    (["mpiexec", "-disable-auto-cleanup", "python", "-m", "distlaunch.rank.worker"], {}, False),
    (["srun", "--kill-on-bad-exit=1", "--kill-on-bad-exit=0", "python", "-m", "distlaunch.rank.worker"], {}, False),
    (["srun", "-K0", "--kill-on-bad-exit=1", "python", "-m", "distlaunch.rank.worker"], {}, True),
    (["mpirun", "--mca", "orte_abort_on_non_zero_status", "0", "python", "-m", "distlaunch.rank.worker"], {}, False),
    (["mpirun", "python", "-m", "distlaunch.rank.worker"], {"PRTE_MCA_prte_abort_on_non_zero_status": "false"},
     False),
], ids=["program-args-not-read", "ulfm", "recovery", "hydra", "srun-K0-last", "srun-K1-last", "mca", "env"])
def test_a_job_told_to_go_on_after_a_failure_is_left_to_it(argv, env, ends):
    from distlaunch.launch.supervise import ends_on_failure

    assert ends_on_failure(argv, env) is ends


def test_a_launcher_killed_outright_takes_its_job_with_it(tmp_path):
    """SIGKILL (the OOM killer, a batch system's hard kill) leaves distlaunch no moment to
    stop its job: mpirun and the ranks must still end, not run on as orphans."""
    job = Job(tmp_path, 2, "sleep", -1)
    job.wait_ready()
    run_id = next((tmp_path / "runs").iterdir()).name
    assert len(survivors(run_id)) >= 3, "premise: mpirun and both ranks are running"
    job.proc.kill()
    job.proc.wait(timeout=10)
    try:
        wait_for(lambda: survivors(run_id) == [], 30, "mpirun and the ranks to end after the launcher's SIGKILL")
    except AssertionError:
        raise AssertionError([(p.pid, p.status(), p.cmdline()[:6]) for p in survivors(run_id)]) from None
    finally:
        pid = json.loads((tmp_path / "runs" / run_id / "run.json").read_text())["mpirun_pid"]
        left_shared = (Path(tempfile.gettempdir()) / f"ompi.{pid}").exists()
        forget_session(tmp_path / "runs" / run_id)
    assert not (left_shared and open_mpi_5()), "mpirun's session folder was left where another user trips on it"


def forget_session(run_dir: Path) -> None:
    """What a killed launcher cannot do: remove the session folder its mpirun may have left
    (``ompi.<pid>``): in this user's own folder (Open MPI 5, launch.mpisession), where the
    next run's end would remove it, or in the shared temporary directory (any other MPI),
    where it would stop another user's mpirun that gets the same pid."""
    import socket
    import tempfile

    from distlaunch.plan.spec import default_remote_root

    pid = json.loads((run_dir / "run.json").read_text()).get("mpirun_pid")
    if pid:
        shared = Path(tempfile.gettempdir())
        host = socket.gethostname().split(".")[0]
        for folder in (shared / Path(default_remote_root()).name / f"mpirun-{host}", shared):
            shutil.rmtree(folder / f"ompi.{pid}", ignore_errors=True)


def open_mpi_5() -> bool:
    from distlaunch.plan.mpi import Flavour, detect, find_mpirun

    try:
        mpi = detect(find_mpirun())
    except Exception:  # noqa: BLE001 - no mpirun: the launch tests say so
        return False
    return mpi.flavour is Flavour.OPENMPI and mpi.major >= 5


@pytest.mark.parametrize("case", ["fresh", "leftovers", "planted", "chosen", "param-file"])
def test_mpiruns_session_folder_is_this_users_own(distlaunch, tmp_path, case):
    """Open MPI 5's mpirun keeps its session in $TMPDIR/ompi.<pid>; one killed with its
    launcher leaves it there, and it stops another user's mpirun that later gets the same
    pid. distlaunch gives mpirun $TMPDIR/distlaunch-<user>/mpirun (0700, this user's), and
    each run's end removes what killed mpiruns left in it, but no live one's. A folder
    another user could write is refused (mpirun keeps its default, with a warning), and a
    session base the user chose, or that a parameter file sets, is theirs (PRRTE refuses
    a local base beside it). --dry-run shows what is to be added, and makes nothing."""
    import socket

    from distlaunch.plan.spec import default_remote_root

    if not open_mpi_5():
        pytest.skip("the session folder of Open MPI 5's mpirun (PRRTE)")
    shared = tmp_path / "tmp"
    shared.mkdir(mode=0o700)
    root = shared / Path(default_remote_root()).name
    base = root / f"mpirun-{socket.gethostname().split('.')[0]}"
    env = {"TMPDIR": str(shared)}
    if case == "leftovers":  # what killed mpiruns left, and a live one's (this test's own pid)
        root.mkdir(mode=0o700)
        base.mkdir(mode=0o700)
        gone = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process can have it
        (base / f"ompi.{gone}" / "0").mkdir(parents=True)
        (base / f"ompi.{os.getpid()}").mkdir()
    elif case == "planted":
        root.mkdir()
        root.chmod(0o777)  # as though another user made it for us
    elif case == "chosen":
        env["PRTE_MCA_prte_tmpdir_base"] = str(tmp_path / "mine")
        (tmp_path / "mine").mkdir()
    elif case == "param-file":  # the user's own PRRTE parameter file
        (tmp_path / "home" / ".prte").mkdir(parents=True)
        (tmp_path / "home" / ".prte" / "mca-params.conf").write_text(f"prte_tmpdir_base = {tmp_path / 'mine'}\n")
        (tmp_path / "mine").mkdir()
        env["HOME"] = str(tmp_path / "home")
    script = tmp_path / "session.py"
    script.write_text("import os\nprint('session in', os.environ['PMIX_SERVER_TMPDIR'])\n")
    # --dry-run shows the variable, where it is to be added (not beside a chosen base, nor
    # in an unsafe folder), among the environment and with why among what distlaunch
    # added; it makes no folder
    dry = distlaunch("run", "--dry-run", "--ppn", "2", str(script), env=env)
    assert dry.returncode == 0, dry.stderr
    shown = f"PRTE_MCA_prte_local_tmpdir_base={base}"
    lines = dry.stdout.splitlines()
    assert lines.count(shown) == (1 if case in ("fresh", "leftovers") else 0), dry.stdout
    assert len([line for line in lines if line.startswith(f"{shown}  Open MPI 5: mpirun's session folder")]) == \
        lines.count(shown), dry.stdout
    assert root.exists() == (case in ("leftovers", "planted"))
    result = distlaunch("run", "--ppn", "2", str(script), env=env)
    assert result.returncode == 0, result.stderr
    pid = result.record()["mpirun_pid"]
    where = {"fresh": base, "leftovers": base, "planted": shared}.get(case, tmp_path / "mine")
    assert result.stdout.count(f"session in {where / f'ompi.{pid}'}\n") == 2, result.stdout
    if case == "fresh":
        assert oct(root.stat().st_mode & 0o777) == oct(base.stat().st_mode & 0o777) == "0o700"
    if case == "leftovers":
        assert sorted(path.name for path in base.iterdir()) == [f"ompi.{os.getpid()}"]
    if case in ("chosen", "param-file"):
        assert not root.exists()
    if case == "planted":
        assert "can be written by other users" in result.stderr and "as usual" in result.stderr, result.stderr
    else:
        assert "session folder" not in result.stderr, result.stderr
    assert not (shared / f"ompi.{pid}").exists() and not (where / f"ompi.{pid}").exists()


@pytest.mark.parametrize("closes_output", [False, True], ids=["relaying", "output-closed"])
def test_a_worker_whose_launcher_died_ends_its_rank(tmp_path, closes_output):
    """The process that started a rank's worker (mpirun's daemon) dies without ending it:
    SIGKILLed, or by the SIGPIPE a killed launcher's closed pipes give mpirun. The worker
    ends its rank and itself, as on a stop; also when the program closed its output (the
    worker no longer relays then, only waits)."""
    program = ("import os, time; open(os.environ['PID_FILE'], 'w').write(str(os.getpid()))"
               + ("; os.close(1); os.close(2)" if closes_output else "") + "; time.sleep(600)")
    starter = "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(600)"
    env = {**os.environ, "PID_FILE": str(tmp_path / "rank-pid"), "DISTLAUNCH_RUN_ID": f"parent-death-{os.getpid()}"}
    parent = subprocess.Popen([sys.executable, "-c", starter, sys.executable, "-m", "distlaunch.rank.worker",
                               "--run-dir", str(tmp_path / "run"), "--", sys.executable, "-c", program],
                              cwd=tmp_path, env=env, start_new_session=True)
    wait_for(lambda: (tmp_path / "rank-pid").exists(), 60, "the rank to start")
    assert len(survivors(env["DISTLAUNCH_RUN_ID"])) == 3, "premise: the starter, the worker and the rank run"
    time.sleep(0.5)  # the worker passes signals on to its rank a moment after starting it
    parent.kill()
    parent.wait(timeout=10)
    wait_for(lambda: survivors(env["DISTLAUNCH_RUN_ID"]) == [], 30, "the worker and its rank to end")
    record = json.loads((tmp_path / "run" / "ranks" / "rank-0.json").read_text())
    assert record["signal"] == "SIGTERM", record


def test_detached_children_do_not_outlive_the_run(tmp_path):
    """Ranks that leave a child behind in a session of its own (out of mpirun's reach):
    the run still ends with nothing of it alive."""
    job = Job(tmp_path, 2, "orphan", -1)
    job.wait_ready()
    _ended, record = job.finish(60)  # asserts that no process of the run survived
    assert job.proc.returncode == 0, job.err
    assert record["status"] == "completed" and record["leftovers_killed"] >= 2


def test_a_rank_that_lost_its_peer_is_not_the_root_cause(tmp_path):
    """Rank 3 exits 7; rank 1's MPI notices the lost peer and aborts (exit 14), and its
    exit record can be written a hair sooner. The cause is rank 3 all the same; a cascade
    alone is still reported."""
    from distlaunch.launch.supervise import root_cause
    from distlaunch.records import RankExit, RunPaths

    paths = RunPaths(tmp_path)
    paths.logs.mkdir()
    paths.rank_log(1).write_text("ready 1\nAn MPI communication peer process has unexpectedly disconnected.  This\n"
                                 "[node2:00000] *** An error occurred in Socket closed\n")
    paths.rank_log(3).write_text("ready 3\n")
    records = {1: RankExit(1, host="node2", ended=100.0, exit_code=14),
               3: RankExit(3, host="node3", ended=100.02, exit_code=7),
               0: RankExit(0, host="node2", ended=100.5, exit_code=0)}
    cause = root_cause(records, paths)
    assert cause is not None and (cause.rank, cause.exit_code) == (3, 7)
    alone = root_cause({1: records[1]}, paths)
    assert alone is not None and alone.rank == 1


@pytest.mark.parametrize("fork", ["1", "0"])
def test_python_c_and_m_ranks_fail_and_hang_as_script_ranks_do(distlaunch, tmp_path, fork):
    """``python -c`` and ``python -m`` of the launcher's own Python run under the bootstrap,
    in a fork of the worker or (DISTLAUNCH_FORK_RANKS=0) in a new interpreter alike: an
    uncaught exception is in the run record, and --hang-timeout dumps the rank's stack."""
    env = {"DISTLAUNCH_FORK_RANKS": fork}
    raising = "import os\nif os.environ['RANK'] == '1':\n    raise ValueError('from python -c')\n"
    failed = distlaunch("run", "--ppn", "2", "--run-dir", "failed", sys.executable, "-c", raising, env=env)
    assert failed.returncode == 1 and "raised ValueError" in failed.stderr, failed.stderr
    record = json.loads(next((tmp_path / "failed").glob("*/run.json")).read_text())
    exc = record["rank_exits"]["1"]["exception"]
    assert exc["type"] == "ValueError" and 'File "<string>", line 3' in exc["traceback"]

    (tmp_path / "sleeper.py").write_text("import time\nprint('ready', flush=True)\ntime.sleep(60)\n")
    hung = distlaunch("run", "--ppn", "2", "--run-dir", "hung", "--hang-timeout", "2",
                      sys.executable, "-m", "sleeper", env=env)
    assert hung.returncode == 124, hung.stderr
    run_dir = next((tmp_path / "hung").iterdir())
    for rank in range(2):
        log = (run_dir / "logs" / f"rank-{rank}.log").read_text()
        assert "most recent call first" in log and "sleeper.py" in log, f"no stack dump from rank {rank}: {log}"


@pytest.mark.parametrize("fork", ["1", "0"])
@pytest.mark.parametrize("raised, code", [("ValueError('boom')", 1), ("KeyboardInterrupt", 130)])
def test_a_failing_script_is_reported_though_its_folder_shadows_traceback_and_json(distlaunch, tmp_path, fork,
                                                                                   raised, code):
    """The bootstrap imports traceback and json only when a script fails, when the script's
    folder comes first on sys.path: a traceback.py and json.py there (which break on
    import) are not what reports the failure. The rank prints the real traceback, the
    record has it, and the exit code is the exception's."""
    project = tmp_path / "project"  # not distlaunch's working directory: that would break the launcher itself
    project.mkdir()
    for name in ("traceback", "json"):  # each says so when imported, and breaks
        (project / f"{name}.py").write_text(f"import sys\nprint('the project\\'s {name}.py', file=sys.stderr)\n"
                                            "raise ImportError('not the stdlib')\n")
    (project / "fails.py").write_text(f"import os\nif os.environ['RANK'] == '1':\n    raise {raised}\n")
    failed = distlaunch("run", "--ppn", "2", "--run-dir", "runs", "project/fails.py",
                        env={"DISTLAUNCH_FORK_RANKS": fork})
    assert failed.returncode == code, failed.stderr
    assert "the project's" not in failed.stdout + failed.stderr, failed.stderr
    name = raised.split("(")[0]
    assert "[1] Traceback (most recent call last):" in failed.stderr and f"[1] {name}" in failed.stderr, failed.stderr
    record = json.loads(next((tmp_path / "runs").glob("*/run.json")).read_text())
    exc = record["rank_exits"]["1"]["exception"]
    assert exc is not None, failed.stderr
    assert exc["type"] == name and 'fails.py", line 3' in exc["traceback"], exc


SOCKET_CLOSED = """[node2:00000] *** An error occurred in Socket closed
[node2:00000] *** reported by process [2045706241,1]
[node2:00000] *** on a NULL communicator
[node2:00000] *** MPI_ERRORS_ARE_FATAL (processes in this communicator will now abort,
"""
PEER_GONE = """--------------------------------------------------------------------------
An MPI communication peer process has unexpectedly disconnected.  This
usually indicates a failure in the peer process (e.g., a crash or
otherwise exiting without calling MPI_FINALIZE first).
  Local host: node2
  Local PID:  8408
  Peer host:  node3
--------------------------------------------------------------------------
"""


@pytest.mark.parametrize("said", ["socket closed, with the rank", "peer gone, with host and pid"])
def test_a_rank_whose_lost_peer_only_mpirun_reported_is_not_the_root_cause(tmp_path, said):
    """Node 3's ranks are SIGKILLed; rank 1 on node 2 aborts in MPI (exit 14) and its
    record ends a hair before theirs. Open MPI printed why through mpirun, not in rank 1's
    own log (as seen in CI): mpirun's log names rank 1, by its rank or by its host and
    pid, so the cause is the first rank killed."""
    from distlaunch.launch.supervise import root_cause
    from distlaunch.records import RankExit, RunPaths

    paths = RunPaths(tmp_path)
    paths.logs.mkdir()
    for rank in range(4):
        paths.rank_log(rank).write_text("")
    paths.mpirun_log.write_text(SOCKET_CLOSED if said.startswith("socket") else PEER_GONE)
    records = {0: RankExit(0, host="node2", pid=8407, ended=100.2, exit_code=143, signal="SIGTERM"),
               1: RankExit(1, host="node2", pid=8408, ended=100.0, exit_code=14),
               2: RankExit(2, host="node3", pid=8408, ended=100.003, exit_code=137, signal="SIGKILL"),
               3: RankExit(3, host="node3", pid=8409, ended=100.0001, exit_code=137, signal="SIGKILL")}
    cause = root_cause(records, paths)
    assert cause is not None and (cause.rank, cause.signal) == (3, "SIGKILL")
    paths.mpirun_log.write_text("prterun has exited due to process rank 1 with PID 0 on node node2\n")
    unexplained = root_cause(records, paths)  # nothing says why rank 1 ended: the first to end is the cause
    assert unexplained is not None and unexplained.rank == 1


def test_what_mpirun_says_of_a_lost_peer_names_the_right_rank(tmp_path):
    """mpirun's log names a rank that lost its peer by its host's short name (the record
    may hold the full one); a lost-peer block without its host and pid does not borrow the
    next block's; and a named rank that died of a signal of its own is still a cause."""
    from distlaunch.launch.supervise import root_cause
    from distlaunch.records import RankExit, RunPaths

    paths = RunPaths(tmp_path)
    paths.logs.mkdir()
    for rank in range(3):
        paths.rank_log(rank).write_text("")
    paths.mpirun_log.write_text(PEER_GONE)
    records = {0: RankExit(0, host="node2.cluster.example", pid=8408, ended=100.0, exit_code=14),
               1: RankExit(1, host="node3.cluster.example", pid=8500, ended=100.01, exit_code=137, signal="SIGKILL")}
    assert root_cause(records, paths).rank == 1  # rank 0 named by its short host name
    headless = PEER_GONE.split("  Local host")[0] + "-" * 74 + "\n" + ("x" * 79 + "\n") * 25
    other = "A process failed to open a device (another message).\n  Local host: node3\n  Local PID:  8500\n"
    paths.mpirun_log.write_text(headless + other)
    records = {0: RankExit(0, host="node2", pid=8408, ended=100.0, exit_code=14),
               1: RankExit(1, host="node3", pid=8500, ended=99.99, exit_code=14)}
    assert root_cause(records, paths).rank == 1  # another message's host and pid name nobody
    paths.mpirun_log.write_text(SOCKET_CLOSED)
    records = {1: RankExit(1, host="node2", pid=8408, ended=100.0, exit_code=139, signal="SIGSEGV"),
               2: RankExit(2, host="node3", pid=8500, ended=100.01, exit_code=137, signal="SIGKILL")}
    assert root_cause(records, paths).rank == 1  # it crashed itself: being named does not excuse it


def test_a_failure_is_still_printed_when_the_traceback_module_cannot_be_had(monkeypatch, capsys):
    """When even the standard library's traceback cannot be imported, the interpreter's own
    printer shows the user's exception (and nothing is recorded, rather than a crash)."""
    from distlaunch.rank import bootstrap

    def unavailable(name):
        raise ImportError(f"no {name} here")

    monkeypatch.setattr(bootstrap, "_stdlib", unavailable)
    monkeypatch.setenv("DISTLAUNCH_EXCEPTION_FILE", "/nonexistent/never-written.json")
    try:
        raise ValueError("the user's own error")
    except ValueError as exc:
        bootstrap._report(exc)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err and "ValueError: the user's own error" in err, err
    assert "no traceback here" not in err


FULL_PIPE = """import fcntl, os
r, w = os.pipe()
fcntl.fcntl(w, fcntl.F_SETFL, os.O_NONBLOCK)
try:
    while True:
        os.write(w, b"x" * 65536)
except BlockingIOError:
    pass
fcntl.fcntl(w, fcntl.F_SETFL, 0)  # blocking again: flushing into it waits for a reader that never reads
stuck = open(w, "w")
stuck.write("pending")
raise ValueError("left a full pipe open")
"""


def test_a_failing_rank_leaves_though_a_pipe_it_left_open_cannot_take_its_text(distlaunch, tmp_path):
    """A failing rank flushes only the regular files it left open before it leaves: text
    pending for a full pipe (nobody reads it) would hold the exit forever."""
    (tmp_path / "full_pipe.py").write_text(FULL_PIPE)
    result = distlaunch("run", "--ppn", "2", "--timeout", "60", "full_pipe.py", timeout=90)
    assert result.returncode == 1, result.stderr
    assert "raised ValueError" in result.stderr and "left a full pipe open" in result.stdout + result.stderr


FORKED_WRITER = """import io, os, sys, threading, time
entered = threading.Event()


class Stuck(io.FileIO):
    def write(self, data):  # the thread stays in here, holding the buffered file's lock
        entered.set()
        time.sleep(3600)


def writer():  # the file is only this thread's: the program's own exit never flushes it
    # in OUT_DIR: a rank's working folder is the code's read-only copy
    out = io.BufferedWriter(Stuck(os.path.join(os.environ["OUT_DIR"], f"stream-{os.environ['RANK']}.bin"), "w"))
    out.write(b"x" * (1 << 20))  # more than its buffer: written through, under its lock


threading.Thread(target=writer, daemon=True).start()
if not entered.wait(60):
    sys.exit("the writer thread never started writing")
pid = os.fork()
if pid == 0:
    sys.exit(3)  # the child fails; no thread there will ever give that lock back
print("child exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def test_a_failing_fork_of_a_rank_leaves_though_a_file_lock_is_held_for_ever(distlaunch, tmp_path):
    """The flush before a failing rank leaves waits ``FLUSH_WAIT_S`` at most: in a fork of
    a program whose thread was writing to a file, that file's lock stays held for ever
    (no thread there gives it back); plain python's exit would not ask for it."""
    (tmp_path / "forked_writer.py").write_text(FORKED_WRITER)
    plain = subprocess.run([sys.executable, "forked_writer.py"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=90, env={**os.environ, "OUT_DIR": str(tmp_path), "RANK": "plain"})
    assert plain.stdout == "child exit 3\n", plain
    result = distlaunch("run", "--ppn", "1", "--timeout", "60", "forked_writer.py", timeout=90)
    assert result.returncode == 0, result.stderr
    assert "[0] child exit 3" in result.stdout, result.stdout


def test_a_failing_ranks_flush_leaves_pipes_alone(tmp_path):
    """What a failing rank flushes are the regular files open for writing: text pending
    for a pipe stays where it is (its reader may be gone or slow), a file's is written, and
    so is /dev/null's (nothing can block there); the pipe is noted as left to Python's
    exit (a rank that ends well takes it then)."""
    import _thread
    import weakref

    from distlaunch.rank import bootstrap

    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    pipe = open(write_end, "w")
    regular = open(tmp_path / "regular.txt", "w")
    reader = open(tmp_path / "regular.txt")
    null = open(os.devnull, "w")
    done = _thread.allocate_lock()
    done.acquire()
    try:
        pipe.write("pending for the pipe")
        regular.write("pending for the file")
        null.write("pending for nothing")
        left = []
        bootstrap._flush_each([weakref.ref(null), weakref.ref(regular), weakref.ref(reader)], done, left)
        assert not done.locked() and left == []
        assert [bootstrap._is_null(os.fstat(handle.fileno())) for handle in (null, pipe, regular)] == \
            [True, False, False]
        done.acquire()
        bootstrap._flush_each([weakref.ref(pipe), weakref.ref(regular), weakref.ref(reader)], done, left)
        assert not done.locked() and left == [True]
        with pytest.raises(BlockingIOError):
            os.read(read_end, 100)
        assert (tmp_path / "regular.txt").read_text() == "pending for the file"
    finally:
        for handle in (pipe, regular, reader, null):
            handle.close()
        os.close(read_end)
