"""Code that runs inside every rank (started by mpirun or srun on each node).

worker (the per-rank shim: prefixed output, per-rank log, exit record, GPU choice),
bootstrap (runs a .py script: exception record, stack dumps), rankinfo (who am I),
metrics (``distlaunch.log_metric``), onnx_export (``distlaunch.export_onnx``).
Kept light: the worker starts once per rank on every launch.
"""
