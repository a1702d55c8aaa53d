"""Horovod's timeline for the torch backend: ``HOROVOD_TIMELINE=path`` at init, or
``hvd.start_timeline(path)`` when ``HOROVOD_TIMELINE=DYNAMIC`` (Horovod's rule),
records every collective of rank 0 as a Chrome trace (open it in chrome://tracing or
Perfetto), one row per tensor name, with the collective's kind, start and duration;
``hvd.stop_timeline()`` closes it.

The file is valid JSON once stopped (and at exit); while recording it is the trace
format's open array, which the viewers read too.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, TextIO

from .core import state, topo


class Timeline:
    def __init__(self, path: str, mark_cycles: bool) -> None:
        self.file: TextIO = open(path, "w", encoding="utf-8")  # noqa: SIM115 - open until stop_timeline
        self.file.write("[\n")
        self.mark_cycles = mark_cycles
        self.rows: dict[str, int] = {}
        self.lock = threading.Lock()
        self.origin = time.perf_counter()

    def record(self, label: str, kind: str, start: float, end: float) -> None:
        with self.lock:
            row = self.rows.get(label)
            if row is None:
                row = self.rows[label] = len(self.rows) + 1
                self._write({"name": "process_name", "ph": "M", "pid": row, "args": {"name": label}})
            self._write({"name": kind, "ph": "X", "pid": row, "tid": 0, "ts": round((start - self.origin) * 1e6, 1),
                         "dur": round((end - start) * 1e6, 1)})
            if self.mark_cycles:
                self._write({"name": "CYCLE_START", "ph": "i", "s": "g", "pid": row, "tid": 0,
                             "ts": round((start - self.origin) * 1e6, 1)})

    def _write(self, event: dict[str, Any]) -> None:
        self.file.write(json.dumps(event) + ",\n")

    def close(self) -> None:
        with self.lock:
            self.file.write("{}\n]\n")
            self.file.close()


def kind_of(task: Any) -> str:
    """A task's collective, from the function that made it (``_allreduce_task`` -> ALLREDUCE)."""
    maker = getattr(task, "__qualname__", "task").split(".")[0]
    return maker.strip("_").removesuffix("_task").upper() or "COLLECTIVE"


def _observe(task: Any, label: str | None) -> Any:
    """The engine's observer while recording: time the collective, then note it."""
    start = time.perf_counter()
    try:
        return task()
    finally:
        timeline = state.timeline
        if timeline is not None:
            kind = kind_of(task)
            timeline.record(label or kind.lower(), kind, start, time.perf_counter())


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Record rank 0's collectives to ``file_path`` (other ranks: nothing)."""
    topo()
    if os.environ.get("HOROVOD_TIMELINE") != "DYNAMIC":
        raise ValueError("Set HOROVOD_TIMELINE=DYNAMIC to enable dynamic timeline usage.")
    _start(file_path, mark_cycles)


def _start(file_path: str, mark_cycles: bool) -> None:
    stop_timeline()
    if topo().rank == 0:
        state.timeline = Timeline(file_path, mark_cycles)
        state.engine.observer = _observe


def stop_timeline() -> None:
    if state.timeline is not None:
        state.engine.observer = None
        timeline, state.timeline = state.timeline, None
        timeline.close()


def from_environment() -> None:
    path = os.environ.get("HOROVOD_TIMELINE")
    if path and path != "DYNAMIC":
        _start(path, os.environ.get("HOROVOD_TIMELINE_MARK_CYCLES", "0") not in ("", "0", "false"))
