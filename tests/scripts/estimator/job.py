"""Test payload for the estimator's promise: writes ./outputs and ./logs, reads an input
(by $DISTLAUNCH_INPUT_DATA and by {inputs.data} in its arguments), reads a file beside
it by a relative path, logs a metric. Run unchanged on every target."""
import os
import sys
import time

import distlaunch

rank = int(os.environ["RANK"])
data = sys.argv[sys.argv.index("--data") + 1]
if data != os.environ["DISTLAUNCH_INPUT_DATA"]:
    sys.exit(f"{{inputs.data}} gave {data}, DISTLAUNCH_INPUT_DATA {os.environ['DISTLAUNCH_INPUT_DATA']}")
text = open(os.path.join(data, "a.txt")).read().strip()
helper = open("helper.txt").read().strip()  # relative to the working copy of the source dir
os.makedirs("outputs", exist_ok=True)
os.makedirs("logs", exist_ok=True)
if rank == 0:
    with open("outputs/x.txt", "w") as handle:
        handle.write(f"data={text} helper={helper}\n")
    with open("logs/extra.log", "w") as handle:
        handle.write("written by the job\n")
    with open(os.path.join(os.environ["DISTLAUNCH_OUTPUT_DIR"], "y.txt"), "w") as handle:
        handle.write("through DISTLAUNCH_OUTPUT_DIR\n")
    with open("outputs/run-id.txt", "w") as handle:
        handle.write(os.environ["DISTLAUNCH_RUN_ID"])
distlaunch.log_metric("loss", 1.0 / (rank + 1))
time.sleep(float(os.environ.get("SLEEP", "0")))
if rank == 0 and open("outputs/run-id.txt").read() != os.environ["DISTLAUNCH_RUN_ID"]:
    sys.exit("another run wrote into this run's ./outputs")
print(f"rank {rank} read {text}", flush=True)
