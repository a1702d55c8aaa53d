"""Every performance ratio distlaunch is held to, measured side by side in one run.

Rows (each against its reference, measured in the same sitting, runs interleaved
A B C A B C so that machine noise hits all alike; medians):

- launch of a no-op, 2 ranks: ``distlaunch run --ppn 2 noop.py`` (the issue's row: a
  script, so a code snapshot and the bootstrap) against bare ``mpirun -n 2 python
  noop.py`` with the flags distlaunch adds; and the same with ``python -c pass`` (a
  program, not a script: it runs in place, no snapshot);
- launch to the first allreduce, 2 ranks, ``distlaunch.hvd`` on torch.distributed
  against ``torchrun --standalone`` + gloo ``init_process_group`` + ``all_reduce``;
- the same with real Horovod (where installed) against ``horovodrun --gloo`` and
  against plain ``mpirun`` starting a Horovod script; and, under the latter, distlaunch
  with Horovod's MPI operations (``--hvd-ops mpi``), as plain mpirun runs it (the default
  on CPU is Gloo's operations, whose start costs more);
- under the hvd-on-torch row and the horovodrun row, bare ``mpirun`` starting the same
  kind of script against the same reference: what mpirun alone costs, with ranks that
  exit as plain python does (distlaunch's ranks skip the collector's last passes at
  exit where those would finalize nothing, as here, so distlaunch can come out below it:
  ``DISTLAUNCH_FULL_EXIT=1`` for like for like);
- under the no-op row, what is left without distlaunch's own code (``launch_floor.py``):
  a Python parent starting the same bare mpirun; the same after importing the modules a
  real ``distlaunch run`` loads that are not distlaunch's (click, the standard library);
  and that starting the mpirun argv and environment of that real run (its MPI flags and
  exports, its rank worker and bootstrap): what distlaunch takes over the last is its own
  code, modules and work;
- placement and plan for 10,000 hosts / 80,000 ranks, in process;
- the shared-memory allreduce against MPI_Allreduce (mpi4py), 2 ranks, time ratio per
  size from 1 to 256 MiB (median and range over --shm-repeats runs, the two backends
  taking turns size by size in each), and its busbw over one-core memcpy at 16 MiB;
- under each shm size, its floor (``shm_chunk.py``): MPI's time over that of the shm
  path's own copies and reductions (the same slices, in the same order, at the default
  chunk) done on rank-private memory with no barrier: about the most that this way of
  staging the data through shared memory could gain over MPI at that size, as measured,
  not a proven bound: at 1 MiB it has come out below shm itself (the reference column:
  shm's own ratio in those same runs);
- with --multinode (root, sshd, rsync, unshare): a no-op on 2 simulated nodes against
  the same on localhost (the same code each run, and changed before each run).

    python benchmarks/perf_table.py                      # about 5 minutes here
    python benchmarks/perf_table.py --repeats 9 --shm-repeats 5 --multinode --json perf.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from launch_overhead import bare_mpirun_argv, timed  # noqa: E402

from tests.stopsignals import unwinding  # noqa: E402

FIRST_HVD = """import torch
import distlaunch.hvd as hvd
hvd.init()
out = hvd.allreduce(torch.ones(4), op=hvd.Sum, name="first")
assert out[0].item() == hvd.size(), out
hvd.shutdown()
"""
FIRST_TORCH = """import torch
import torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(4)
dist.all_reduce(t)
assert t[0].item() == dist.get_world_size(), t
dist.destroy_process_group()
"""
FIRST_HOROVOD = """import torch
import horovod.torch as hvd
hvd.init()
out = hvd.allreduce(torch.ones(4), op=hvd.Sum, name="first")
assert out[0].item() == hvd.size(), out
hvd.shutdown()
"""


def tool(name: str) -> str | None:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    return found if Path(found).exists() else None


def launch_variants(folder: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name: (argv, extra environment) for every launch row that can run here (one real
    ``distlaunch run`` first, for the floor rows' argv and modules)."""
    for name, text in (("first_hvd.py", FIRST_HVD), ("first_torch.py", FIRST_TORCH),
                       ("first_horovod.py", FIRST_HOROVOD), ("noop.py", "pass\n")):
        (folder / name).write_text(text)
    py = sys.executable
    script = Path(py).parent / "distlaunch"  # the command users type: this Python's console script, where it has one
    run = ["run", "--ppn", "2", "--run-dir", str(folder.parent / "runs")]
    dl = [str(script), *run] if script.exists() else [py, "-m", "distlaunch", *run]
    variants = {
        "noop.py: distlaunch": ([*dl, "noop.py"], {}),
        "noop.py: mpirun": (bare_mpirun_argv(2, [py, "noop.py"]), {}),
        **floor_variants(run, folder),
        "noop: distlaunch": ([*dl, py, "-c", "pass"], {}),
        "noop: mpirun": (bare_mpirun_argv(2, [py, "-c", "pass"]), {}),
        "first allreduce: distlaunch, hvd on torch": ([*dl, "first_hvd.py"], {"DISTLAUNCH_HVD_BACKEND": "torch"}),
    }
    torchrun = tool("torchrun")
    if torchrun:
        variants["first allreduce: torchrun + gloo"] = (
            [torchrun, "--standalone", "--nproc-per-node=2", "first_torch.py"], {})
        # what mpirun alone costs, the same script, ranks exiting as plain python does
        variants["first allreduce: mpirun, hvd on torch"] = (bare_mpirun_argv(2, [py, "first_hvd.py"]),
                                                             {"DISTLAUNCH_HVD_BACKEND": "torch"})
    try:
        import horovod.torch
    except ImportError:
        return variants
    variants["first allreduce: distlaunch, real Horovod"] = (
        [*dl, "first_hvd.py"], {"DISTLAUNCH_HVD_BACKEND": "horovod"})
    if horovod.torch.mpi_built():  # like for like with mpirun + Horovod, whose operations are MPI's
        variants["first allreduce: distlaunch, real Horovod, MPI's operations"] = (
            [*dl, "--hvd-ops", "mpi", "first_hvd.py"], {"DISTLAUNCH_HVD_BACKEND": "horovod"})
    horovodrun = tool("horovodrun")
    if horovodrun:
        variants["first allreduce: horovodrun --gloo"] = ([horovodrun, "--gloo", "-np", "2", py, "first_horovod.py"],
                                                          {})
    variants["first allreduce: mpirun + Horovod"] = (bare_mpirun_argv(2, [py, "first_horovod.py"]), {})
    return variants


def floor_variants(run: list[str], folder: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """launch_floor.py's three rows: a Python parent starting bare mpirun; the same after
    importing the modules a real ``distlaunch run`` loads that are not distlaunch's; and
    that starting the mpirun argv and environment that run used (its MPI flags and
    exports, rank worker, bootstrap), with the session folder distlaunch adds for Open MPI 5."""
    from distlaunch.launch.mpisession import session_env
    from distlaunch.plan.mpi import Flavour, detect, find_mpirun
    from distlaunch.records import RunPaths, RunRecord

    listing = folder.parent / "modules.txt"
    code = ("import atexit, sys\n"
            "def listing():\n"
            "    names = ','.join(list(sys.modules))\n"
            f"    with open({str(listing)!r}, 'w') as out:\n"
            "        out.write(names)\n"
            "atexit.register(listing)\n"
            f"sys.argv = ['distlaunch', *{[*run, 'noop.py']!r}]\nfrom distlaunch.cli.main import main\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"distlaunch run failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    loaded = listing.read_text().split(",") if listing.exists() else []
    if "click" not in loaded:
        raise SystemExit(f"the modules of a distlaunch run were not listed in {listing}")
    modules = ",".join(sorted(name for name in loaded if name != "__main__" and name.split(".")[0] != "distlaunch"))
    runs = [path for path in (folder.parent / "runs").iterdir() if (path / "run.json").exists()]
    if len(runs) != 1:
        raise SystemExit(f"expected the one run folder of that run in {folder.parent / 'runs'}, found {len(runs)}")
    record = RunRecord.load(RunPaths(runs[0]))  # its folder serves every round (ranks write there again)
    env = dict(record.env_added)
    mpi = detect(find_mpirun())
    if mpi.flavour is Flavour.OPENMPI and mpi.major >= 5:  # as the plan's private_session
        env.update(session_env(record.argv, {**os.environ, **env}))
    floor = [sys.executable, str(REPO / "benchmarks" / "launch_floor.py")]
    bare = bare_mpirun_argv(2, [sys.executable, "noop.py"])
    return {
        "noop.py: floor, a Python parent": ([*floor, "", *bare], {}),
        "noop.py: floor, its imports": ([*floor, modules, *bare], {}),
        "noop.py: floor, its imports and mpirun argv": ([*floor, modules, *record.argv], env),
    }


def measure_launches(repeats: int, folder: Path) -> dict[str, list[float]]:
    variants = launch_variants(folder)
    print(f"distlaunch started as {variants['noop.py: distlaunch'][0][0]}", file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 1):  # round 0 warms the page cache and is dropped
        for name, (argv, extra) in variants.items():
            os.environ.update(extra)
            try:
                elapsed = timed(argv, str(folder))
            finally:
                for key in extra:
                    os.environ.pop(key, None)
            if elapsed is None:
                raise SystemExit(f"{name} failed: see above")
            if round_:
                times[name].append(elapsed)
        print(f"launch round {round_}/{repeats} done", file=sys.stderr)
    return times


def measure_shm(repeats: int, sizes: str, folder: Path) -> dict:
    """Per size: shm/mpi4py time ratio in each run, and MPI's time over the shm path's own
    traffic floor (``shm_chunk.py`` at the default chunk); busbw fraction of memcpy at 16 MiB."""
    from distlaunch.hvd.shm_allreduce import CHUNK

    ratios: dict[int, list[float]] = {}
    floors: dict[int, list[float]] = {}  # MPI's time / the staged traffic's (shm_chunk.py), per size
    beside: dict[int, list[float]] = {}  # MPI's time / shm's in those same shm_chunk.py runs
    fractions = []
    for i in range(repeats):
        out = folder / f"shm-{i}.json"
        proc = subprocess.run([sys.executable, "-m", "distlaunch", "run", "--ppn", "2", "--run-dir",
                               str(folder / "runs"), sys.executable, "-m", "distlaunch.hvd.bench", "allreduce",
                               "--backends", "mpi4py,shm", "--sizes", sizes, "--iters", "10", "--warmup", "3",
                               "--out", str(out)],
                              capture_output=True, text=True, env={**os.environ, "OMPI_MCA_osc": "^ucx"})
        if proc.returncode:
            raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
        result = json.loads(out.read_text())
        times = {(row["backend"], row["size"]): row for row in result["rows"]}
        for (backend, size), row in times.items():
            if backend == "shm":
                ratios.setdefault(size, []).append(times[("mpi4py", size)]["time_us"] / row["time_us"])
        if ("shm", 16 << 20) in times:
            fractions.append(times[("shm", 16 << 20)]["busbw_GBps"] / result["memcpy_one_core_GBps"])
        out = folder / f"floor-{i}.json"
        proc = subprocess.run([sys.executable, "-m", "distlaunch", "run", "--ppn", "2", "--run-dir",
                               str(folder / "runs"), sys.executable, str(REPO / "benchmarks" / "shm_chunk.py"),
                               "--chunks", str(CHUNK), "--sizes", sizes, "--iters", "10", "--warmup", "3",
                               "--json", str(out)],
                              capture_output=True, text=True, env={**os.environ, "OMPI_MCA_osc": "^ucx"})
        if proc.returncode:
            raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
        for row in json.loads(out.read_text())["rows"]:
            floors.setdefault(row["size"], []).append(row["mpi_us"] / row["floor_us"])
            beside.setdefault(row["size"], []).append(row["mpi_us"] / row["shm_us"])
        print(f"shm run {i + 1}/{repeats} done", file=sys.stderr)
    return {"speedup_by_size": ratios, "busbw_over_memcpy_16MiB": fractions, "floor_speedup_by_size": floors,
            "floor_run_shm_speedup_by_size": beside}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved launch rounds")
    parser.add_argument("--shm-repeats", type=int, default=3, help="allreduce runs")
    parser.add_argument("--sizes", default="1MiB:256MiB", help="allreduce sizes, LOW:HIGH doubling")
    parser.add_argument("--multinode", action="store_true", help="also 2 simulated nodes (root)")
    parser.add_argument("--json", default=None, help="write every raw figure here")
    args = parser.parse_args()
    from plan_scale import measure as plan_measure

    from distlaunch.plan.units import format_size

    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "payload"
        folder.mkdir()
        launches = measure_launches(args.repeats, folder)
        report["launch"] = launches
        report["plan_10k"] = plan_measure(10_000, 5)
        report["shm"] = measure_shm(args.shm_repeats, args.sizes, Path(tmp))
        if args.multinode:
            report["multinode"] = multinode(Path(tmp), args.repeats)

    med = {name: statistics.median(values) for name, values in launches.items()}
    rows = [("what", "distlaunch", "reference", "ratio", "target")]
    for what, name in (("noop.py, 2 ranks, vs mpirun", "noop.py"), ("python -c pass, 2 ranks, vs mpirun", "noop")):
        rows.append((what, f"{med[f'{name}: distlaunch']:.3f} s", f"{med[f'{name}: mpirun']:.3f} s",
                     f"+{med[f'{name}: distlaunch'] - med[f'{name}: mpirun']:.3f} s", "<= +0.10 s"))
        if name != "noop.py":
            continue
        for floor, label in (("a Python parent", "  without distlaunch: a Python parent starting that mpirun"),
                             ("its imports", "  ... after importing the run's other modules (click, stdlib)"),
                             ("its imports and mpirun argv",
                              "  ... starting the run's mpirun argv and env (flags, rank shims)")):
            mine = med[f"noop.py: floor, {floor}"]
            rows.append((label, f"{mine:.3f} s", f"{med['noop.py: mpirun']:.3f} s",
                         f"+{mine - med['noop.py: mpirun']:.3f} s", ""))

    def pair(what: str, mine: str, theirs: str, target: str) -> None:
        if mine in med and theirs in med:
            rows.append((what, f"{med[mine]:.2f} s", f"{med[theirs]:.2f} s", f"{med[mine] / med[theirs]:.2f}x",
                         target))

    pair("first allreduce, hvd on torch, vs torchrun + gloo", "first allreduce: distlaunch, hvd on torch",
         "first allreduce: torchrun + gloo", "<= 0.40x")
    pair("  bare mpirun (not distlaunch), the same script, vs torchrun", "first allreduce: mpirun, hvd on torch",
         "first allreduce: torchrun + gloo", "")
    pair("first allreduce, real Horovod, vs horovodrun --gloo", "first allreduce: distlaunch, real Horovod",
         "first allreduce: horovodrun --gloo", "<= 0.45x")
    pair("  bare mpirun (not distlaunch) + Horovod, vs horovodrun --gloo", "first allreduce: mpirun + Horovod",
         "first allreduce: horovodrun --gloo", "")
    pair("first allreduce, real Horovod, vs mpirun + Horovod", "first allreduce: distlaunch, real Horovod",
         "first allreduce: mpirun + Horovod", "<= 1.05x")
    pair("  the same, --hvd-ops mpi (like for like)",
         "first allreduce: distlaunch, real Horovod, MPI's operations", "first allreduce: mpirun + Horovod", "")
    if "multinode" in report:
        nodes = report["multinode"]
        rows.append(("noop on 2 simulated nodes vs localhost", f"{nodes['2 nodes x 1 rank']:.2f} s",
                     f"{nodes['localhost x 2 ranks']:.2f} s",
                     f"+{nodes['2 nodes x 1 rank'] - nodes['localhost x 2 ranks']:.2f} s", "2 nodes <= 1.5 s"))
        rows.append(("  the same, the code changed before each run", f"{nodes['2 nodes, code changed']:.2f} s", "",
                     "", ""))
        rows.append(("  the same, ssh connections not shared", f"{nodes['2 nodes, ssh not shared']:.2f} s", "", "",
                     ""))
    plan_ms = report["plan_10k"]["total"] * 1e3
    rows.append(("place + plan, 10,000 hosts / 80,000 ranks", f"{plan_ms:.0f} ms", "", "", "< 50 ms"))
    floors = report["shm"]["floor_speedup_by_size"]
    for size, values in sorted(report["shm"]["speedup_by_size"].items()):
        rows.append((f"shm allreduce speed-up over MPI, {format_size(size)}", f"{statistics.median(values):.2f}x",
                     "", f"{min(values):.2f}-{max(values):.2f}", ">= 1.3x"))
        if floors.get(size):  # the reference column: shm itself in those runs, beside its floor
            beside = report["shm"]["floor_run_shm_speedup_by_size"][size]
            rows.append(("  floor: its copies and reductions alone (shm_chunk.py), over MPI",
                         f"{statistics.median(floors[size]):.2f}x", f"shm there {statistics.median(beside):.2f}x",
                         f"{min(floors[size]):.2f}-{max(floors[size]):.2f}", ""))
    fractions = report["shm"]["busbw_over_memcpy_16MiB"]
    if fractions:
        rows.append(("shm busbw / one-core memcpy, 16 MiB", f"{statistics.median(fractions):.2f}", "",
                     f"{min(fractions):.2f}-{max(fractions):.2f}", ">= 0.5"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    print(f"{args.repeats} interleaved launch rounds, {args.shm_repeats} allreduce runs; medians "
          "(the ratio column of the shm rows is the range over runs; an shm floor row gives MPI's time over the "
          "floor's, and shm's ratio in those same runs; the rows under the no-op row are without distlaunch's own "
          "code, launch_floor.py)")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


def multinode(tmp: Path, repeats: int) -> dict[str, float]:
    from multinode import launch_times

    from tests.cluster.cluster import make, missing_tools

    if missing_tools():
        raise SystemExit(f"--multinode needs {', '.join(missing_tools())}")
    (tmp / "cluster").mkdir()
    box = make(tmp / "cluster", 2, shared=[str(tmp), sys.prefix, str(REPO)])
    with box.running():  # down again however main() ends
        src = tmp / "src"
        src.mkdir()
        return launch_times(box, tmp, src, repeats)


if __name__ == "__main__":
    with unwinding():  # SIGTERM or SIGHUP: out through every finally, the nodes and daemons stopped
        main()
