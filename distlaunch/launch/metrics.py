"""Metrics of finished runs, on the launcher side: read them back, write TensorBoard
event files, draw them. (``rank.metrics`` is what a training script calls to log them.)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import SpecError
from ..records import make_private


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
    make_private(target)
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
        raise SpecError("--plot needs matplotlib: pip install matplotlib") from None
    metrics = read_metrics(run_root)
    if not metrics:
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
