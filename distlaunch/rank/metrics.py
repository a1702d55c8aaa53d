"""Metric tracking from inside a training script: ``distlaunch.log_metric``.

Each call appends one JSON line ``{"name", "value", "step", "rank", "time"}`` to
``metrics/rank-<N>.jsonl`` in the run's folder (on the rank's node; distlaunch brings
it back with the logs). By default only rank 0 records, as estimator services did;
``all_ranks=True`` keeps every rank's values. Outside a distlaunch run the file goes to
``$DISTLAUNCH_OUTPUT_DIR/metrics/`` or ``./outputs/metrics/`` (said once). The
launcher side (reading, TensorBoard, plots) is ``launch.metrics``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from ..protocol import OUTPUT_DIR, RUN_DIR
from ..records import RunPaths, open_private


def _rank() -> int:
    from .rankinfo import from_environ

    return from_environ().rank


_said: list[str] = []  # where metrics go outside a distlaunch run, once said


def metrics_file(rank: int) -> Path:
    """Inside a distlaunch run: the run folder's ``metrics/``. Outside one (torchrun, srun,
    plain python): ``$DISTLAUNCH_OUTPUT_DIR/metrics/``, else ``./outputs/metrics/``, said
    once on stderr."""
    run_dir = os.environ.get(RUN_DIR)
    if run_dir:
        return RunPaths(Path(run_dir)).rank_metrics(rank)
    folder = Path(os.environ.get(OUTPUT_DIR) or "outputs") / "metrics"
    if not _said:
        _said.append(str(folder))
        if rank == 0:
            print(f"distlaunch: not started by distlaunch run: metrics go to {folder}/ "
                  "(set DISTLAUNCH_OUTPUT_DIR to choose)", file=sys.stderr, flush=True)
    return folder / f"rank-{rank}.jsonl"


def log_metric(name: str, value: float, step: int | None = None, all_ranks: bool = False) -> None:
    """Record ``value`` for metric ``name`` (at ``step``, if given)."""
    rank = _rank()
    if rank != 0 and not all_ranks:
        return
    number = float(value)
    if not isinstance(name, str) or not name:
        raise ValueError("a metric needs a non-empty name")
    path = metrics_file(rank)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    line = {"name": name, "value": number if math.isfinite(number) else str(number), "step": step,
            "rank": rank, "time": time.time()}
    with open_private(path, "a") as handle:
        handle.write(json.dumps(line) + "\n")


def log_metrics(values: Mapping[str, float], step: int | None = None, all_ranks: bool = False) -> None:
    for name, value in values.items():
        log_metric(name, value, step, all_ranks)
