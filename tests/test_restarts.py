"""--max-restarts on localhost: a failed job is relaunched whole, each attempt keeps its
logs and exit records, the budget and the stop rules hold, and node health (the pure
parts and the per-user file) behaves. Real distlaunch, mpirun and ranks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SCRIPTS
from test_failures import survivors, wait_for

from distlaunch.launch.health import Entry, NodeHealth, blamed_hosts
from distlaunch.plan.hosts import Host, HostSource, leave_out
from distlaunch.records import RankExit

RESTARTS = str(SCRIPTS / "restarts.py")


def run(tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    full = {**os.environ, "OUT_DIR": str(tmp_path), "DISTLAUNCH_STATE_DIR": str(tmp_path / "state"), **(env or {})}
    argv = [sys.executable, "-m", "distlaunch", "run", "--ppn", "2", "--env", "OUT_DIR", "--env", "FAIL_UNTIL",
            "--env", "FAULT", *args, RESTARTS]
    full.setdefault("FAIL_UNTIL", "1")
    full.setdefault("FAULT", "exit3")
    proc = subprocess.run(argv, cwd=tmp_path, env=full, capture_output=True, text=True, timeout=timeout)
    (run_dir,) = (tmp_path / "runs").iterdir()
    return proc, run_dir, json.loads((run_dir / "run.json").read_text())


def starts(tmp_path: Path) -> list[tuple[int, int]]:
    lines = (tmp_path / "starts").read_text().split("\n")
    return sorted((int(count), int(rank)) for count, rank, _host in (line.split() for line in lines if line))


def test_a_failed_job_is_relaunched_and_each_attempt_keeps_its_logs(tmp_path):
    proc, run_dir, record = run(tmp_path, "--max-restarts", "2", "--restart-delay", "0.2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert starts(tmp_path) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # DISTLAUNCH_RESTART_COUNT 0, then 1
    assert "restart 1 of 2 in 0.2 s" in proc.stderr and "completed" in proc.stderr and "after 1 restart" in proc.stderr
    first, second = record["attempts"]
    assert (first["number"], first["status"], first["exit_code"]) == (1, "failed", 3)
    assert first["failure"]["rank"] == 1 and first["next"] == "restarted after 0.2 s"
    assert (second["number"], second["status"], second["next"]) == (2, "completed", "completed")
    assert second["started"] >= first["ended"] + 0.2
    assert record["status"] == "completed" and record["exit_code"] == 0
    assert record["started"] == first["started"] and record["ended"] == second["ended"]
    # attempt 1's logs and exit records moved aside; the top level is the last attempt's
    old = run_dir / "attempts" / "1"
    assert "attempt 1: rank 1" in (old / "logs" / "rank-1.log").read_text()
    assert json.loads((old / "ranks" / "rank-1.json").read_text())["exit_code"] == 3
    assert (old / "hostfile").is_file() and (run_dir / "hostfile").is_file()
    now = (run_dir / "logs" / "rank-1.log").read_text()
    assert "attempt 2: rank 1" in now and "attempt 1" not in now
    assert json.loads((run_dir / "ranks" / "rank-1.json").read_text())["exit_code"] == 0
    shown = subprocess.run([sys.executable, "-m", "distlaunch", "runs", "show", record["id"]], cwd=tmp_path,
                           capture_output=True, text=True)
    assert "attempt   1 failed after" in shown.stdout and "rank 1 on" in shown.stdout
    assert "attempt   2 completed after" in shown.stdout
    assert not (tmp_path / "state" / "nodes.json").exists()  # one host, an exit code: nothing blamed


def test_a_restart_budget_of_zero_keeps_the_first_failure(tmp_path):
    proc, run_dir, record = run(tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert starts(tmp_path) == [(0, 0), (0, 1)]
    assert record["attempts"] == [] and not (run_dir / "attempts").exists()
    assert record["first_failure"]["rank"] == 1 and "restart 1 of" not in proc.stderr


def test_the_budget_ends_restarts_and_the_delay_doubles(tmp_path):
    proc, _run_dir, record = run(tmp_path, "--max-restarts", "2", "--restart-delay", "0.3",
                                 env={"FAIL_UNTIL": "9", "FAULT": "sigkill"})
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr[-3000:]
    assert [item["next"] for item in record["attempts"]] == [
        "restarted after 0.3 s", "restarted after 0.6 s", "no restart left (--max-restarts 2)"]
    assert {count for count, _rank in starts(tmp_path)} == {0, 1, 2}
    assert all(item["failure"]["signal"] == "SIGKILL" for item in record["attempts"])
    assert record["attempts"][0]["blamed"] == {"localhost": "rank 1 was killed by SIGKILL"}  # said, not kept
    assert not (tmp_path / "state" / "nodes.json").exists()  # one host: nothing to keep out
    assert record["attempts"][2]["started"] - record["attempts"][1]["ended"] >= 0.6


def test_timeout_is_not_restarted(tmp_path):
    proc, _run_dir, record = run(tmp_path, "--max-restarts", "3", "--timeout", "3s",
                                 env={"FAIL_UNTIL": "9", "FAULT": "hang"})
    assert proc.returncode == 124, proc.stderr[-3000:]
    assert record["status"] == "timeout" and len(record["attempts"]) == 1
    assert record["attempts"][0]["next"] == "no restart after --timeout"


def test_ctrl_c_while_waiting_to_restart_ends_the_run_and_leaves_nothing(tmp_path):
    env = {**os.environ, "OUT_DIR": str(tmp_path), "FAIL_UNTIL": "9", "FAULT": "exit3",
           "DISTLAUNCH_STATE_DIR": str(tmp_path / "state")}
    argv = [sys.executable, "-m", "distlaunch", "run", "--ppn", "2", "--env", "OUT_DIR", "--env", "FAIL_UNTIL",
            "--env", "FAULT", "--max-restarts", "3", "--restart-delay", "60", RESTARTS]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    attempts = tmp_path / "runs"

    def first_over() -> bool:
        found = list(attempts.glob("*/run.json"))
        return proc.poll() is not None or bool(found and json.loads(found[0].read_text()).get("attempts"))

    wait_for(first_over, 60, "the first attempt to end")
    time.sleep(0.5)  # inside the 60 s wait now
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err[-3000:]
    (run_dir,) = attempts.iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "cancelled" and record["reason"] == "cancelled by SIGINT while waiting to restart"
    assert survivors(record["id"]) == []
    assert starts(tmp_path) == [(0, 0), (0, 1)]  # the restart never started
    assert record["attempts"][0]["next"] == "cancelled by SIGINT while waiting to restart"
    assert not (run_dir / "attempts").exists()  # the top level keeps the only attempt's logs
    assert record["first_failure"]["rank"] == 1 and (run_dir / "logs" / "rank-1.log").is_file()


def test_blame_points_at_the_node_and_not_at_the_program():
    def exit_of(rank, code=None, sig=None):
        return RankExit(rank, host=f"name-{rank}", exit_code=code, signal=sig)

    host_of = {0: "a", 1: "a", 2: "b", 3: "b"}
    killed = {0: exit_of(0, 143, "SIGTERM"), 1: exit_of(1, 143, "SIGTERM"), 2: exit_of(2, 137, "SIGKILL"),
              3: exit_of(3, 143, "SIGTERM")}
    assert blamed_hosts(killed, host_of, first=2) == {"b": "rank 2 was killed by SIGKILL"}
    # the ranks mpirun tore down (no end record, or SIGKILL after its grace) are consequences
    torn_down = {0: exit_of(0, 1), 1: exit_of(1), 2: exit_of(2), 3: exit_of(3, 137, "SIGKILL")}
    assert blamed_hosts(torn_down, host_of, first=0) == {}
    aborted = {0: exit_of(0, 134, "SIGABRT"), 2: exit_of(2, 137, "SIGKILL")}
    assert blamed_hosts(aborted, host_of, first=0) == {}  # an assert in a library: the program's own
    assert blamed_hosts({}, host_of, first=None, unreachable=["b"]) == {
        "b": "unreachable after the failure (node lost?)"}


def test_leave_out_keeps_enough_hosts():
    source = HostSource((Host("a", 2), Host("b", 2), Host("c", 2)), "--hosts")
    names = lambda src: [h.name for h in src.hosts]  # noqa: E731
    kept, nodes, dropped = leave_out(source, 2, {"b": "bad"})
    assert (names(kept), nodes, dropped) == (["a", "c"], 2, ("b",))
    kept, nodes, dropped = leave_out(source, None, {"b": "bad"})  # all hosts asked: too few without b
    assert (names(kept), nodes, dropped) == (["a", "b", "c"], None, ())
    kept, nodes, dropped = leave_out(source, None, {"b": "bad"}, min_nodes=2)
    assert (names(kept), nodes, dropped) == (["a", "c"], None, ("b",))
    kept, nodes, dropped = leave_out(source, 3, {"b": "bad", "c": "bad"}, min_nodes=1)
    assert (names(kept), nodes, dropped) == (["a"], 1, ("b", "c"))
    kept, nodes, dropped = leave_out(source, 3, {"b": "bad", "c": "bad"}, min_nodes=2)
    assert (names(kept), nodes, dropped) == (["a", "b", "c"], 3, ())


def test_node_health_file_blames_expires_and_clears(tmp_path):
    health = NodeHealth(tmp_path / "state")
    assert health.entries() == {}
    first = health.blame("node3", "rank 2 was killed by SIGKILL", "run-1", ttl=600)
    again = health.blame("node3", "its ranks ended without an exit record", "run-2", ttl=600)
    health.blame("node4", "short", "run-2", ttl=0.2)
    assert isinstance(first, Entry) and again.count == 2 and again.run_id == "run-2"
    assert set(NodeHealth(tmp_path / "state").entries()) == {"node3", "node4"}  # read back from the file
    assert oct(health.path.stat().st_mode & 0o777) == "0o600"
    time.sleep(0.3)
    assert set(health.entries()) == {"node3"}  # node4's time ran out
    assert health.clear(["node4", "node3"]) == ["node3"] and health.entries() == {}


def test_a_collection_adds_an_attempts_metrics_to_the_runs_history(tmp_path):
    """A node holds only its attempt's metrics: they are added to what the run folder has,
    in order. Rank 0's lines relayed live during the attempt are not doubled; what the
    relay missed, at the end or at the start, is there too; a torn last line is ended."""
    from distlaunch.nodes.treesync import add_metrics, metrics_sizes

    folder, staged = tmp_path / "run" / "metrics", tmp_path / "run" / ".distlaunch-run" / "attempt-1" / "metrics"
    folder.mkdir(parents=True)
    staged.mkdir(parents=True)
    first, second = b"a1\na2\n", b"b1\nb2\n"
    files = {"rank-0.jsonl": first, "rank-1.jsonl": first, "rank-2.jsonl": b"r2 attempt 1\n",
             "rank-4.jsonl": b"torn", "rank-5.jsonl": first, "rank-6.jsonl": b"a1\ntorn"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    before = metrics_sizes(folder)  # as the attempt starts; then its relayed lines come
    with open(folder / "rank-0.jsonl", "ab") as handle:
        handle.write(second)  # relayed whole
    with open(folder / "rank-1.jsonl", "ab") as handle:
        handle.write(b"b1\n")  # the relay missed the last line
    with open(folder / "rank-5.jsonl", "ab") as handle:
        handle.write(b"b2\n")  # the relay missed the first line
    with open(folder / "rank-6.jsonl", "ab") as handle:
        handle.write(second)  # relayed onto a torn line
    for name in ("rank-0.jsonl", "rank-1.jsonl", "rank-5.jsonl", "rank-6.jsonl"):
        (staged / name).write_bytes(second)
    (staged / "rank-2.jsonl").write_bytes(b"r2 attempt 2\n")
    (staged / "rank-3.jsonl").write_bytes(b"r3 attempt 2\n")
    (staged / "rank-4.jsonl").write_bytes(b"next\n")
    add_metrics(staged, folder, before)
    for name in ("rank-0.jsonl", "rank-1.jsonl", "rank-5.jsonl"):
        assert (folder / name).read_bytes() == first + second, name
    assert (folder / "rank-2.jsonl").read_bytes() == b"r2 attempt 1\nr2 attempt 2\n"
    assert (folder / "rank-3.jsonl").read_bytes() == b"r3 attempt 2\n"
    assert (folder / "rank-4.jsonl").read_bytes() == b"torn\nnext\n"
    assert (folder / "rank-6.jsonl").read_bytes() == b"a1\ntorn\n" + second
    assert not staged.exists()


def test_metrics_that_cannot_be_added_stay_staged_and_are_named(tmp_path, caplog):
    from distlaunch.nodes.treesync import add_metrics

    folder, staged = tmp_path / "metrics", tmp_path / "staged"
    (folder / "rank-1.jsonl").mkdir(parents=True)  # in the way of the file
    staged.mkdir()
    (staged / "rank-0.jsonl").write_bytes(b"r0\n")
    (staged / "rank-1.jsonl").write_bytes(b"r1\n")
    add_metrics(staged, folder, {})
    assert (folder / "rank-0.jsonl").read_bytes() == b"r0\n"
    assert (staged / "rank-1.jsonl").read_bytes() == b"r1\n"
    assert "rank-1.jsonl" in caplog.text and str(staged) in caplog.text


def test_nodes_command_lists_and_clears(tmp_path):
    env = {**os.environ, "DISTLAUNCH_STATE_DIR": str(tmp_path / "state")}

    def nodes(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "distlaunch", "nodes", *args], env=env, capture_output=True,
                              text=True)

    assert nodes().stdout == "no node is kept out\n"
    NodeHealth(tmp_path / "state").blame("node3", "rank 2 was killed by SIGKILL", "run-9", ttl=3600)
    listed = nodes("list").stdout.splitlines()
    assert listed[0].split() == ["HOST", "SINCE", "LEFT", "TIMES", "RUN", "WHY"]
    assert listed[1].startswith("node3 ") and "60 min" in listed[1] and listed[1].endswith("killed by SIGKILL")
    bad = nodes("clear")
    assert bad.returncode == 2 and "name the hosts" in bad.stderr
    cleared = nodes("clear", "node3", "nodeX")
    assert cleared.stdout == "taken back: node3\n" and "not kept out: nodeX" in cleared.stderr
    assert nodes().stdout == "no node is kept out\n"


@pytest.mark.parametrize("args, message", [
    (["--max-restarts", "-1"], "--max-restarts"),
    (["--min-nodes", "0"], "--min-nodes"),
    (["--nodes", "1", "--min-nodes", "2"], "--min-nodes 2 is more than --nodes 1"),
    (["--quarantine-ttl", "soon"], "--quarantine-ttl"),
    (["--restart-delay", "-1"], "--restart-delay"),
])
def test_bad_restart_options_are_one_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "distlaunch", "run", *args, RESTARTS], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
        proc.stderr
