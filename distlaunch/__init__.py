"""distlaunch: launch distributed training with MPI, and run Horovod-style scripts anywhere.

``import distlaunch`` stays light: torch, mpi4py and pynvml are imported only by the
parts that need them. The Python API (``Job``) is loaded on first use.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__"]


def __getattr__(name: str) -> Any:
    raise AttributeError(f"module 'distlaunch' has no attribute {name!r}")
