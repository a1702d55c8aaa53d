"""Training throughput per launcher and runtime, side by side in one sitting:
``distlaunch bench train`` with the results written beside the other benchmarks'.

    python benchmarks/train_throughput.py [--model resnet18|transformer] [--rounds 2] [...]

Takes every option of ``distlaunch bench train`` (see its --help); unless --json/--plot
are given, writes benchmarks/results/train-<model>-<ranks>ranks.{json,png}.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    args = sys.argv[1:]

    def given(option: str, default: str) -> str:
        return args[args.index(option) + 1] if option in args[:-1] else default

    stem = RESULTS / f"train-{given('--model', 'resnet18')}-{given('--ranks', '2')}ranks"
    if "--json" not in args:
        args += ["--json", f"{stem}.json"]
    if "--plot" not in args:
        args += ["--plot", f"{stem}.png"]
    return subprocess.call([sys.executable, "-m", "distlaunch", "bench", "train", *args])


if __name__ == "__main__":
    sys.exit(main())
