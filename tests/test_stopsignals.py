"""tests/stopsignals.py, which the benchmarks that start simulated nodes or Slurm run
under: a stop signal unwinds the script through its teardown (the nodes themselves:
tests/test_multinode.py)."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from conftest import REPO

START = """import signal
for signum in (signal.SIGTERM, signal.SIGHUP):  # as a script started plainly (pytest may run under nohup)
    signal.signal(signum, signal.SIG_DFL)
"""
SCRIPT = START + """import os, signal, subprocess, sys, time
from tests.stopsignals import unwinding
with unwinding():
    pass
print("restored", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
with unwinding():
    try:
        print("ready", flush=True)
        time.sleep(60)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal while it unwinds: dropped
        probe = "import signal; print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)"
        child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
        print("torn down; the default SIGTERM in a child:", child, flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_unwinds_the_script_through_its_teardown(signum):
    """The first SIGTERM or SIGHUP raises where the script is, so its ``finally`` runs to
    the end; one more that comes during that teardown does not break it off; the
    processes the teardown starts get the default disposition, not an ignored signal;
    the script exits with 128 + the first signal; outside the block the handlers are
    what they were."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().split() == ["restored", "True"]
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signum)
        out = proc.stdout.read()
        assert proc.wait(timeout=30) == 128 + signum
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.strip() == "torn down; the default SIGTERM in a child: True", out


HELD = START + """import os, signal, time
from tests.stopsignals import held, unwinding
signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
with unwinding():
    os.kill(os.getpid(), signal.SIGHUP)
    time.sleep(0.2)
    print("SIGHUP still ignored", signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, flush=True)
    try:
        with held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler has run by now: it only noted the signal
            print("held block done", flush=True)
        print("after the held block", flush=True)
    finally:
        print("unwound", flush=True)
"""


def test_a_stop_signal_inside_held_waits_for_the_block_and_an_ignored_one_stays_ignored():
    """A signal that comes inside ``held()`` (starting a node and noting its pid, stopping
    the nodes) is raised only as the block ends, so the block is never cut in two; a
    signal the script was started with ignored (``nohup``) is left ignored."""
    proc = subprocess.run([sys.executable, "-c", HELD], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stdout.splitlines() == ["SIGHUP still ignored True", "held block done", "unwound"], proc.stdout
