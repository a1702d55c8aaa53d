"""distlaunch: launch distributed training with MPI, and run Horovod-style scripts anywhere.

``import distlaunch`` stays light: the names below are loaded on first use, and torch,
mpi4py and pynvml only by the parts that need them.

- ``Job``, ``Run``: the Python API (``Job(...).submit()`` returns a ``Run``)
- ``Slurm``: a compute target, ``Job(..., compute_target=Slurm(partition=..., time=...))``
- ``Sweep``: hyperparameter sweeps over a Job (``Sweep.create(job, space, metric).run()``)
- ``log_metric``, ``log_metrics``: metric tracking from a training script
- ``export_onnx``: export a trained model to ONNX from rank 0, checked
"""
from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: every rank's worker imports this package, typing costs it ~3 ms
if TYPE_CHECKING:
    from typing import Any
else:
    Any = object  # what ``typing.get_type_hints`` reads the annotations as, typing not imported

__version__ = "0.1.0"

_LAZY = {
    "Job": "distlaunch.launch.api",
    "Run": "distlaunch.launch.api",
    "log_metric": "distlaunch.rank.metrics",
    "log_metrics": "distlaunch.rank.metrics",
    "export_onnx": "distlaunch.rank.onnx_export",
    "Slurm": "distlaunch.plan.slurm",
    "Sweep": "distlaunch.sweep.study",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'distlaunch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
