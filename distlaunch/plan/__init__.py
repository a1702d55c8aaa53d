"""The plan: what to run where, decided before anything starts (runs in the launcher).

spec (JobSpec, TargetSpec), hosts (host sources and slots), gpus and placement (rank →
host, GPU), mpi (which mpirun), mpirun (``plan()``: the exact argv, env and hostfile),
layout (where code goes on the nodes), ssh (ssh options), envpolicy (what reaches the
ranks), units (durations and sizes). ``plan()`` is pure and golden-file tested.
"""
