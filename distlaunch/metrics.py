"""Metric tracking from inside a training script: ``distlaunch.log_metric``.

Each call appends one JSON line ``{"name", "value", "step", "rank", "time"}`` to
``metrics/rank-<N>.jsonl`` in the run's folder (on the rank's node; distlaunch brings
it back with the logs). By default only rank 0 records, as estimator services did;
``all_ranks=True`` keeps every rank's values. Outside a distlaunch run the file goes to
``./metrics/``. ``read_metrics`` gives them back by name.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _rank() -> int:
    from .rankinfo import from_environ

    return from_environ().rank


def metrics_dir() -> Path:
    run_dir = os.environ.get("DISTLAUNCH_RUN_DIR")
    return Path(run_dir) / "metrics" if run_dir else Path("metrics")


def log_metric(name: str, value: float, step: int | None = None, all_ranks: bool = False) -> None:
    """Record ``value`` for metric ``name`` (at ``step``, if given)."""
    rank = _rank()
    if rank != 0 and not all_ranks:
        return
    number = float(value)
    if not isinstance(name, str) or not name:
        raise ValueError("a metric needs a non-empty name")
    folder = metrics_dir()
    folder.mkdir(parents=True, exist_ok=True)
    line = {"name": name, "value": number if math.isfinite(number) else str(number), "step": step,
            "rank": rank, "time": time.time()}
    with open(folder / f"rank-{rank}.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def log_metrics(values: Mapping[str, float], step: int | None = None, all_ranks: bool = False) -> None:
    for name, value in values.items():
        log_metric(name, value, step, all_ranks)


def read_metrics(run_root: Path, rank: int | None = 0) -> dict[str, list[dict[str, Any]]]:
    """Metrics of a run folder by name, in logged order (one rank, or all with None)."""
    folder = run_root / "metrics"
    files = sorted(folder.glob("rank-*.jsonl")) if rank is None else [folder / f"rank-{rank}.jsonl"]
    found: dict[str, list[dict[str, Any]]] = {}
    for path in files:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            found.setdefault(item["name"], []).append(item)
    return found
