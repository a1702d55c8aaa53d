"""Sync and launch costs on simulated nodes (the cluster in a box of tests/cluster).

Needs root, sshd, rsync and unshare. Brings up 2 nodes, then measures:
- sync of a 1,000-file tree to both nodes: first time, and again with nothing changed;
- wall time of ``distlaunch run`` for a trivial 2-rank job on localhost, on 1 node (2
  ranks) and on 2 nodes (1 rank each), with ssh connections shared (one per node, the
  default) and not (DISTLAUNCH_SSH_SHARE=0), and with the script changed before each
  run (the code sent by rsync, not linked from the nodes' last copy), interleaved,
  medians of --repeats;
- with --allreduce: ``distlaunch bench allreduce`` on 2 nodes x 2 ranks, every backend
  (shm being hierarchical there), each backend's time as a ratio to mpi4py's.

The nodes share this machine's cores, so the allreduce figures say how the backends
compare under the same conditions, not what a real network would give. Open MPI is told
to yield when idle (mpi_yield_when_idle): four busy-polling ranks on two cores would
otherwise measure the scheduler (4 KiB took 20 ms that way).

    python benchmarks/multinode.py --repeats 5 [--allreduce]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distlaunch.nodes.transport import Nodes, SSHTransport  # noqa: E402
from distlaunch.nodes.treesync import list_files, sync  # noqa: E402
from distlaunch.plan.hosts import this_host_names  # noqa: E402
from distlaunch.plan.layout import RemoteLayout  # noqa: E402
from distlaunch.plan.spec import default_remote_root  # noqa: E402
from distlaunch.plan.ssh import SSHOptions  # noqa: E402
from distlaunch.plan.units import format_size  # noqa: E402
from tests.cluster.cluster import make, missing_tools  # noqa: E402
from tests.stopsignals import unwinding  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--allreduce", action="store_true", help="also allreduce on 2 nodes x 2 ranks")
    parser.add_argument("--sizes", default="4KiB:16MiB", help="allreduce sizes (with --allreduce)")
    args = parser.parse_args()
    if missing_tools():
        raise SystemExit(f"needs {', '.join(missing_tools())}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "cluster").mkdir()
        box = make(root / "cluster", 2, shared=[str(root), sys.prefix, str(REPO)])
        with box.running():  # down again however main() ends
            src = root / "src"
            for i in range(args.files):
                sub = src / f"pkg{i % 20}"
                sub.mkdir(parents=True, exist_ok=True)
                (sub / f"mod{i}.py").write_text(f"VALUE = {i}\n" + "# padding\n" * 50)
            nodes = Nodes(SSHTransport(SSHOptions(config=str(box.ssh_config)), this_host_names()), sys.executable)
            times = []
            for run_id in ("r1", "r2"):
                start = time.perf_counter()
                layout = RemoteLayout.for_source(default_remote_root(), str(src), run_id)
                results = sync(nodes, box.hosts, list_files(src), layout, lambda _m: None)
                times.append((time.perf_counter() - start, sum(r.sent for r in results)))
            print(f"sync {args.files} files to 2 nodes: first {times[0][0]:.2f} s ({times[0][1]} files sent), "
                  f"no-change re-sync {times[1][0]:.2f} s ({times[1][1]} files sent)")
            med = launch_times(box, root, src, args.repeats)
            for name, value in med.items():
                print(f"distlaunch run, {name}: {value:.2f} s (median of {args.repeats})")
            local, one, both, plain = (med[name] for name in ("localhost x 2 ranks", "1 node x 2 ranks",
                                                               "2 nodes x 1 rank", "2 nodes, ssh not shared"))
            print(f"2-node / 1-node = {both / one:.2f} (+{both - one:.2f} s); 2-node / localhost = {both / local:.2f} "
                  f"(+{both - local:.2f} s); shared / not shared ssh = {both / plain:.2f} ({both - plain:+.2f} s)")
            if args.allreduce:
                allreduce_across(box, root, args.sizes)


def launch_times(box, root: Path, src: Path, repeats: int) -> dict[str, float]:
    """Medians of ``distlaunch run`` of a no-op script: localhost, 1 node, 2 nodes with
    ssh shared and not, and 2 nodes with the script changed before every run (so the
    code is sent, not linked from the nodes' last copy); interleaved."""
    script = src / "noop.py"
    script.write_text("pass\n")
    changing = src.parent / f"{src.name}-changing" / "noop.py"
    changing.parent.mkdir(exist_ok=True)
    two = ["--hosts", f"{box.hosts[0]}:1,{box.hosts[1]}:1"]
    variants = {  # name: (hosts, extra environment, script)
        "localhost x 2 ranks": (["--ppn", "2"], {}, script),
        "1 node x 2 ranks": (["--hosts", f"{box.hosts[0]}:2"], {}, script),
        "2 nodes x 1 rank": (two, {}, script),
        "2 nodes, code changed": (two, {}, changing),
        "2 nodes, ssh not shared": (two, {"DISTLAUNCH_SSH_SHARE": "0"}, script),
    }
    walls: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats):
        for name, (hosts, extra, path) in variants.items():
            if path == changing:
                path.write_text(f"# round {round_}\npass\n")
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "distlaunch", "run", *hosts, "--ssh-config",
                                   str(box.ssh_config), "--run-dir", str(root / "runs"), str(path)],
                                  capture_output=True, text=True, env={**os.environ, **extra})
            walls[name].append(time.perf_counter() - start)
            if proc.returncode:
                raise SystemExit(proc.stderr[-2000:])
    return {name: statistics.median(values) for name, values in walls.items()}


def allreduce_across(box, root: Path, sizes: str) -> None:
    out = root / "allreduce.json"
    mpi_args = "--bind-to none --mca mpi_yield_when_idle 1"  # the simulated nodes share the cores
    hosts = ",".join(f"{host}:2" for host in box.hosts)
    proc = subprocess.run([sys.executable, "-m", "distlaunch", "bench", "allreduce", "--hosts", hosts,
                           "--ssh-config", str(box.ssh_config), "--mpi-arg", mpi_args, "--backend", "all",
                           "--sizes", sizes, "--factor", "4", "--iters", "10", "--warmup", "3",
                           "--json", str(out), "--run-dir", str(root / "runs")],
                          capture_output=True, text=True, env={**os.environ, "OMPI_MCA_osc": "^ucx"})
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    rows = json.loads(out.read_text())["rows"]
    backends = list(dict.fromkeys(row["backend"] for row in rows))
    times = {(row["backend"], row["size"]): row["time_us"] for row in rows}
    print(f"allreduce float32 sum, 2 nodes x 2 ranks (median us, ratio to mpi4py): {', '.join(backends)}")
    for size in sorted({row["size"] for row in rows}):
        base = times[("mpi4py", size)]
        print(f"{format_size(size):>8} " + "  ".join(f"{b} {times[(b, size)]:9.1f} ({times[(b, size)] / base:.2f})"
                                                  for b in backends))


if __name__ == "__main__":
    with unwinding():  # SIGTERM or SIGHUP: out through every finally, the nodes and daemons stopped
        main()
