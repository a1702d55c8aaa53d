"""What the per-run code snapshot costs: ``distlaunch run`` with it against ``--in-place``
(side by side, interleaved), and the snapshot itself on a larger tree, first (every file
copied) and again (every file hard-linked from the first).

    python benchmarks/snapshot.py --repeats 5
    python benchmarks/snapshot.py --files 5000 --file-kib 4 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = "import os\nos.makedirs('outputs', exist_ok=True)\nopen('outputs/x', 'w').write('x')\n"


def timed(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"{argv} failed: {proc.stderr[-500:]}")
    return time.perf_counter() - start


def make_tree(root: Path, files: int, kib: int) -> None:
    root.mkdir()
    (root / "job.py").write_text(SCRIPT)
    block = os.urandom(kib * 1024)
    for i in range(files):
        sub = root / f"pkg{i % 50}"
        sub.mkdir(exist_ok=True)
        (sub / f"m{i}.py").write_bytes(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--files", type=int, default=2000, help="files in the larger tree")
    parser.add_argument("--file-kib", type=int, default=4, help="size of each of them")
    args = parser.parse_args()
    from distlaunch.launch import snapshot
    from distlaunch.records import allocate

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        small = work / "small"
        small.mkdir()
        (small / "job.py").write_text(SCRIPT)
        base = [sys.executable, "-m", "distlaunch", "run", "--ppn", str(args.ranks), "--oversubscribe"]
        times: dict[str, list[float]] = {"snapshot": [], "in-place": []}
        for _ in range(args.repeats):  # interleaved: noise hits both alike
            times["snapshot"].append(timed([*base, str(small / "job.py")], work))
            times["in-place"].append(timed([*base, "--in-place", "job.py"], small))
        med = {name: statistics.median(values) for name, values in times.items()}
        print(f"distlaunch run, {args.ranks} ranks, a 1-file source dir, median of {args.repeats}:")
        for name, value in med.items():
            print(f"  {name:9s} {value:.3f} s")
        print(f"  snapshot / in-place: {med['snapshot'] / med['in-place']:.3f}")

        tree = work / "tree"
        make_tree(tree, args.files, args.file_kib)
        runs = work / "runs"
        first, again = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            one = snapshot.take(str(tree), allocate(runs), lambda _m: None)
            first_s = time.perf_counter() - start
            start = time.perf_counter()
            two = snapshot.take(str(tree), allocate(runs), lambda _m: None)
            again.append(time.perf_counter() - start)
            first.append(first_s)
            assert one.hash == two.hash and two.linked == args.files + 1, (two.linked, two.copied)
            for path in sorted(runs.iterdir()):
                subprocess.run(["rm", "-rf", str(path)], check=True)
        size = args.files * args.file_kib / 1024
        print(f"snapshot of {args.files + 1} files ({size:.1f} MiB), median of {args.repeats}:")
        print(f"  first (all copied) {statistics.median(first):.3f} s")
        print(f"  again (all linked) {statistics.median(again):.3f} s")
        print(f"  again / first: {statistics.median(again) / statistics.median(first):.3f}")


if __name__ == "__main__":
    main()
