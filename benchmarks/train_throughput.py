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


def given(args: list[str], option: str, default: str) -> str:
    """The value of ``option`` in ``args`` (``--opt value`` or ``--opt=value``; the last wins)."""
    value = default
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    return value


def main() -> int:
    args = sys.argv[1:]
    stem = RESULTS / f"train-{given(args, '--model', 'resnet18')}-{given(args, '--ranks', '2')}ranks"
    for option, suffix in (("--json", "json"), ("--plot", "png")):
        if given(args, option, "") == "":
            args += [option, f"{stem}.{suffix}"]
    return subprocess.call([sys.executable, "-m", "distlaunch", "bench", "train", *args])


if __name__ == "__main__":
    sys.exit(main())
