"""The torch backend's executor: collectives run one at a time, in the order this rank
submitted them, as Horovod's background thread runs them.

An ``*_async`` call returns at once: its work goes to one daemon thread, and the handle
is a future (``poll`` is False until the peers have done their part). A blocking call
runs on the caller's thread when nothing is queued (no hand-over, so a small allreduce
costs what it did), and otherwise waits its turn behind the queued work, so the order
every rank sees is the order of its calls. The thread is a daemon: a rank that exits
with work in flight is not held by it.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as WaitTimeout
from typing import Any


class Engine:
    def __init__(self) -> None:
        self.lock = threading.Lock()  # held while a collective runs, by whichever thread runs it
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Any], str | None, Future[Any]]] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.submitted = 0  # written by submitters only
        self.completed = 0  # written by the worker only
        self.observer: Callable[[Callable[[], Any], str | None], Any] | None = None  # e.g. the timeline

    def run(self, task: Callable[[], Any], label: str | None = None) -> Any:
        """Run ``task`` now, after whatever was submitted before it; return its result."""
        if self.submitted != self.completed:
            return self.submit(task, label).result()
        with self.lock:
            if self.observer is not None:
                return self.observer(task, label)
            return task()

    def submit(self, task: Callable[[], Any], label: str | None = None) -> Future[Any]:
        """Queue ``task`` behind earlier work; the future holds its result or exception."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="distlaunch-hvd", daemon=True)
            self.thread.start()
        future: Future[Any] = Future()
        self.submitted += 1
        self.jobs.put((task, label, future))
        return future

    def _work(self) -> None:
        while True:
            task, label, future = self.jobs.get()
            try:
                with self.lock:
                    result = task() if self.observer is None else self.observer(task, label)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever synchronizes
                self.completed += 1
                future.set_exception(exc)
            else:
                self.completed += 1
                future.set_result(result)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for everything submitted so far (errors stay with their futures); with
        ``timeout``, give up after that long (at exit, a peer may never come). True when
        nothing is left running."""
        if self.submitted != self.completed:
            done: Future[Any] = self.submit(lambda: None)
            try:
                done.result(timeout)
            except (TimeoutError, WaitTimeout):
                return False
        return True
