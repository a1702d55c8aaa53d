"""tests/stopsignals.py, which the benchmarks that start simulated nodes or Slurm run
under: a stop signal unwinds the script through its teardown (the nodes themselves:
tests/test_multinode.py)."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = """import os, signal, subprocess, sys, time
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
