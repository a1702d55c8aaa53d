"""Test payload: leaves one file per rank, echoes its arguments, fails on request.

Environment knobs (all optional): OUT_DIR (where rank-<N>.txt goes), FAIL_RANK and
FAIL_CODE (that rank exits with that code, at once), SLEEP (seconds the other ranks
sleep before exiting).
"""
import json
import os
import sys
import time

rank = int(os.environ["RANK"])
out = os.environ.get("OUT_DIR", ".")
with open(os.path.join(out, f"rank-{rank}.txt"), "w") as handle:
    json.dump({"rank": rank, "size": int(os.environ["WORLD_SIZE"]),
               "local_rank": int(os.environ["LOCAL_RANK"]), "argv": sys.argv[1:]}, handle)
print(f"rank {rank} argv {sys.argv[1:]!r}", flush=True)
print(f"rank {rank} on stderr", file=sys.stderr, flush=True)
if os.environ.get("FAIL_RANK") == str(rank):
    print(f"rank {rank} failing", flush=True)
    sys.exit(int(os.environ.get("FAIL_CODE", "3")))
time.sleep(float(os.environ.get("SLEEP", "0")))
