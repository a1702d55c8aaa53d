"""Test payload for sweeps: a "loss" that is a known function of the parameters.

    loss at step s = (x - 0.3)**2 + (0.5 if kind == "b" else 0) + 1 / (s + 1)

so the best parameters are x = 0.3, kind = a, and the final value (after --steps steps)
is exactly known. Rank 0 logs it each step; each step every rank appends
'<trial> <x> <kind> <step>' to $OUT_DIR/steps (how far a trial really got), after
sleeping --step-time seconds. --fail: exit 3 at once.
"""
import argparse
import os
import sys
import time

import distlaunch

parser = argparse.ArgumentParser()
parser.add_argument("--x", type=float, default=0.0)
parser.add_argument("--kind", default="a")
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--step-time", type=float, default=0.05)
parser.add_argument("--fail", action="store_true")
args = parser.parse_args()
if args.fail:
    print("failing on purpose", file=sys.stderr)
    sys.exit(3)
base = (args.x - 0.3) ** 2 + (0.5 if args.kind == "b" else 0.0)
out = os.environ.get("OUT_DIR")
for step in range(args.steps):
    time.sleep(args.step_time)
    distlaunch.log_metric("loss", base + 1.0 / (step + 1), step=step)
    if out and os.environ.get("DISTLAUNCH_RANK", "0") == "0":
        with open(os.path.join(out, "steps"), "a") as handle:
            handle.write(f"{os.environ.get('DISTLAUNCH_TRIAL')} {args.x!r} {args.kind} {step} {time.time()}\n")
print(f"final loss {base + 1.0 / args.steps!r}")
