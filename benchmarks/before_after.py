"""Launch wall times of this checkout against an earlier commit, side by side in one run.

The earlier commit is checked out into a temporary git worktree and run with
``PYTHONPATH`` pointing at it: the launcher, and (through mpirun's environment) every
rank's worker, are that commit's code. With --multinode, a no-op also runs on 2 simulated
nodes (root, sshd, rsync, unshare); there the node agent is started over ssh, without
``PYTHONPATH``, so both sides use this checkout's agent. With --first-allreduce, the
launch to the first ``distlaunch.hvd`` allreduce (2 ranks, torch backend, and real
Horovod where it is installed) runs too. The two sides take turns, run by run, and the medians
are printed with their ratio: the machine's noise hits both.

    python benchmarks/before_after.py --before d923f1a --repeats 9 [--multinode] [--first-allreduce]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from perf_table import FIRST_HVD  # noqa: E402

from tests.stopsignals import unwinding  # noqa: E402


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--multinode", action="store_true", help="also a no-op on 2 simulated nodes")
    parser.add_argument("--first-allreduce", action="store_true",
                        help="also the launch to the first hvd allreduce (torch backend; real Horovod if installed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        old = root / "checkout-before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(old), args.before],
                       check=True)
        try:
            run(root, old, args)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=False)


def run(root: Path, old: Path, args: argparse.Namespace) -> None:
    sides = {"before": {**os.environ, "PYTHONPATH": str(old)}, "after": {**os.environ, "PYTHONPATH": str(REPO)}}
    for side in sides:  # a source dir each: each side keeps its own copy on the nodes
        (root / side).mkdir()
        (root / side / "noop.py").write_text("pass\n")
        (root / side / "first_hvd.py").write_text(FIRST_HVD)
    # case: (distlaunch run's options, program, extra environment)
    cases: dict[str, tuple[list[str], list[str], dict[str, str]]] = {
        "no-op, localhost, 2 ranks": (["--ppn", "2"], ["noop.py"], {}),
        "python -c pass, 2 ranks": (["--ppn", "2"], [sys.executable, "-c", "pass"], {})}  # perf_table's no-op
    if args.first_allreduce:
        cases["first allreduce, hvd on torch"] = (["--ppn", "2"], ["first_hvd.py"],
                                                  {"DISTLAUNCH_HVD_BACKEND": "torch"})
        if importlib.util.find_spec("horovod") is not None:
            cases["first allreduce, real Horovod"] = (["--ppn", "2"], ["first_hvd.py"],
                                                      {"DISTLAUNCH_HVD_BACKEND": "horovod"})
    with contextlib.ExitStack() as stack:
        if args.multinode:
            from tests.cluster.cluster import make, missing_tools

            if missing_tools():
                raise SystemExit(f"--multinode needs {', '.join(missing_tools())}")
            (root / "cluster").mkdir()
            box = make(root / "cluster", 2, shared=[str(root), sys.prefix, str(REPO)])
            stack.enter_context(box.running())  # down again however main() ends
            cases["no-op, 2 nodes, 1 rank each"] = (["--hosts", f"{box.hosts[0]}:1,{box.hosts[1]}:1", "--ssh-config",
                                                     str(box.ssh_config)], ["noop.py"], {})
        walls: dict[tuple[str, str], list[float]] = {(case, side): [] for case in cases for side in sides}
        for round_ in range(args.repeats + 1):  # round 0 warms caches and is not counted
            for case, (extra, program, case_env) in cases.items():
                for side, env in sides.items():
                    wall = timed([sys.executable, "-m", "distlaunch", "run", *extra, "--run-dir",
                                  str(root / "runs" / side), *program], root / side, {**env, **case_env})
                    if round_:
                        walls[case, side].append(wall)
            print(f"round {round_}/{args.repeats} done", file=sys.stderr)
    print(f"distlaunch run, {args.before} (before) and this checkout (after) taking turns, "
          f"medians of {args.repeats}:")
    for case in cases:
        before, after = (statistics.median(walls[case, side]) for side in sides)
        print(f"  {case:<30} before {before:.3f} s  after {after:.3f} s  after/before {after / before:.2f} "
              f"({after - before:+.3f} s)")


if __name__ == "__main__":
    with unwinding():  # SIGTERM or SIGHUP: out through every finally, the nodes and daemons stopped
        main()
