"""Test payload: says whether this rank runs inside the test image (its marker file is
there, the host's checkout is not), with MPI working across the ranks."""
import json
import os
import sys

from mpi4py import MPI

comm = MPI.COMM_WORLD
total = comm.allreduce(comm.Get_rank() + 1)
print("WHERE " + json.dumps({"rank": comm.Get_rank(), "size": comm.Get_size(), "sum": total,
                             "marker": os.path.exists("/etc/distlaunch-test-image"),
                             "host_file": os.path.exists(sys.argv[1]), "cwd": os.getcwd()}), flush=True)
