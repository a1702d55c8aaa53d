"""Metric tracking from inside a training script: ``distlaunch.log_metric``.

Each call appends one JSON line ``{"name", "value", "step", "rank", "time"}`` to
``metrics/rank-<N>.jsonl`` in the run's folder (on the rank's node; distlaunch brings
it back with the logs). By default only rank 0 records, as estimator services did;
``all_ranks=True`` keeps every rank's values. Outside a distlaunch run the file goes to
``./metrics/``. ``read_metrics`` gives them back by name; after the run the launcher
writes them as TensorBoard event files too (``write_tensorboard``), and ``plot`` draws them.
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
        if path.is_file():
            for name, items in read_metrics_file(path).items():
                found.setdefault(name, []).extend(items)
    return found


def write_tensorboard(run_root: Path) -> Path | None:
    """Turn the run's metric JSON lines into TensorBoard event files under
    ``logs/tensorboard/rank-<N>`` (so ``tensorboard --logdir runs/<id>/logs`` shows them).
    Returns the folder, or None when there are no metrics or no ``tensorboard`` package."""
    files = sorted((run_root / "metrics").glob("rank-*.jsonl"))
    if not files:
        return None
    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        import logging

        logging.getLogger(__name__).info("metrics kept as JSON lines only: pip install tensorboard for event files")
        return None
    target = run_root / "logs" / "tensorboard"
    for path in files:
        writer = EventFileWriter(str(target / path.stem))
        counters: dict[str, int] = {}
        for items in read_metrics_file(path).values():
            for item in items:
                if not isinstance(item["value"], (int, float)):
                    continue
                step = item["step"] if item["step"] is not None else counters.get(item["name"], 0)
                counters[item["name"]] = step + 1
                summary = Summary(value=[Summary.Value(tag=item["name"], simple_value=float(item["value"]))])
                writer.add_event(Event(summary=summary, step=int(step), wall_time=float(item["time"])))
        writer.close()
    return target


def read_metrics_file(path: Path) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        found.setdefault(item["name"], []).append(item)
    return found


def plot(run_root: Path, target: Path) -> Path:
    """Draw every metric of rank 0 against its step into a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import SpecError

        raise SpecError("--plot needs matplotlib: pip install matplotlib") from None
    metrics = read_metrics(run_root)
    if not metrics:
        from .errors import SpecError

        raise SpecError(f"run {run_root.name} logged no metrics: nothing to plot")
    fig, axes = plt.subplots(len(metrics), 1, figsize=(6, 2.4 * len(metrics)), squeeze=False)
    for ax, (name, items) in zip(axes[:, 0], sorted(metrics.items())):
        points = [(i["step"] if i["step"] is not None else n, i["value"]) for n, i in enumerate(items)
                  if isinstance(i["value"], (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"run {run_root.name}")
    fig.tight_layout()
    fig.savefig(target, dpi=80)
    plt.close(fig)
    return target
