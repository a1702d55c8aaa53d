"""Past and running runs: find them by id prefix, list them, read and merge their logs,
ask them to stop.

A run is cancelled by creating ``cancel-requested`` in its folder: the supervisor of
that run (in a ``distlaunch run`` process or a ``Job.submit()`` thread) sees it within
a fraction of a second and stops the job as on Ctrl-C. No process is signalled from
outside, so no pid can be mistaken for another.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import RunNotFound, SpecError
from ..protocol import split_rank_line
from ..records import RunPaths, RunRecord, Status, read_json, write_json


def run_folders(runs_root: str | Path) -> list[Path]:
    root = Path(runs_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "run.json").is_file())


def resolve(runs_root: str | Path, key: str) -> RunPaths:
    """The run whose id is ``key`` or starts with it; RunNotFound says what exists."""
    folders = run_folders(runs_root)
    exact = [p for p in folders if p.name == key]
    matches = exact or [p for p in folders if p.name.startswith(key)]
    if len(matches) == 1:
        return RunPaths(matches[0].absolute())
    if not matches:
        latest = f"; the latest is {folders[-1].name}" if folders else ""
        raise RunNotFound(f"no run {key!r} under {runs_root}{latest}: see 'distlaunch runs list'")
    names = ", ".join(p.name for p in matches[:5])
    raise RunNotFound(f"{key!r} matches {len(matches)} runs ({names}...): give more of the id")


def summary(record: RunRecord) -> dict[str, Any]:
    """One row of ``runs list``."""
    ppn = record.spec.get("target", {}).get("ppn") or (record.ranks // record.nodes if record.nodes else record.ranks)
    started = record.started or record.created
    return {
        "id": record.id,
        "experiment": record.experiment or "-",
        "script": Path(record.script or "?").name,
        "status": record.status.value,
        "shape": f"{record.nodes}x{ppn}",
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "duration": f"{record.duration_s:.1f} s" if record.duration_s is not None else "-",
        "exit": "-" if record.exit_code is None else record.exit_code,
        "tags": ",".join(f"{k}={v}" if v else k for k, v in sorted(record.tags.items())) or "-",
    }


def current(paths: RunPaths) -> RunRecord:
    """The run record as it stands, with a batch run's record brought up to date with
    Slurm when the batch job ended without saying so (see ``slurm.reconcile``), and the
    tags added since the launch."""
    record = RunRecord.load(paths)
    if record.scheduler and not record.status.finished:
        from .slurm import reconcile

        record = reconcile(paths, record)
    record.tags = {**record.tags, **later_tags(paths)}
    return record


def later_tags(paths: RunPaths) -> dict[str, str]:
    """Tags added after the launch (``tags.json``: the launcher never writes it, so no
    save of the run record can lose them)."""
    try:
        data = read_json(paths.tags_file)
    except (OSError, ValueError):
        return {}
    return {str(key): str(value) for key, value in data.items()} if isinstance(data, dict) else {}


def add_tags(paths: RunPaths, tags: dict[str, Any]) -> None:
    for key in tags:
        if not key or "=" in key or any(ch.isspace() for ch in key):
            raise SpecError(f"tag {key!r}: a tag name must be non-empty, without '=' or spaces")
    import fcntl

    folder = os.open(paths.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)  # two taggers at once: neither loses the other's tags
        write_json(paths.tags_file, {**later_tags(paths), **{key: str(value) for key, value in tags.items()}})
    finally:
        os.close(folder)


def matches(record: RunRecord, experiment: str | None, tags: Iterable[str]) -> bool:
    """Whether a run is of ``experiment`` and has every ``KEY`` or ``KEY=VALUE`` of ``tags``."""
    if experiment is not None and record.experiment != experiment:
        return False
    for item in tags:
        key, eq, value = item.partition("=")
        if key not in record.tags or (eq and record.tags[key] != value):
            return False
    return True


def request_cancel(paths: RunPaths, wait: float = 30.0) -> str:
    """Ask a run to stop and wait until it has; return its final status. A running run
    stops as on Ctrl-C; a batch run still queued is taken out of the queue (scancel),
    and so is one whose launcher does not answer in time."""
    record = current(paths)
    if record.status.finished:
        return record.status.value
    if record.scheduler is not None and record.status is Status.QUEUED:
        from .slurm import cancel

        cancel(record)
    paths.cancel_marker.touch()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        record = current(paths)
        if record.status.finished:
            return record.status.value
        time.sleep(0.1)
    if record.scheduler is not None:
        from .slurm import cancel

        cancel(record)
    return current(paths).status.value


def remove(paths: RunPaths) -> None:
    status = current(paths).status
    if not status.finished:
        raise RunNotFound(f"run {paths.run_id} is {status.value}: cancel it first "
                          f"(distlaunch cancel {paths.run_id})")
    shutil.rmtree(paths.root)


def merge(lines: Iterable[str]) -> Iterator[str]:
    """Fold the same line printed by several ranks into one: ``[0-3] epoch 1 loss 0.5``.

    Lines come as ``[rank] text`` in arrival order; a text joins the open group of that
    text unless its rank is already in it (then it is a new occurrence)."""
    groups: list[tuple[str, set[int]]] = []
    open_group: dict[str, int] = {}
    for raw in lines:
        rank, text = split_rank_line(raw)
        if rank is None:
            groups.append((raw, set()))
            continue
        index = open_group.get(text)
        if index is not None and rank not in groups[index][1]:
            groups[index][1].add(rank)
        else:
            open_group[text] = len(groups)
            groups.append((text, {rank}))
    for text, ranks in groups:
        yield f"[{rank_set(ranks)}] {text}" if ranks else text


def rank_set(ranks: set[int]) -> str:
    """{0,1,2,3,5} → '0-3,5'."""
    spans: list[str] = []
    ordered = sorted(ranks)
    start = prev = ordered[0]
    for value in ordered[1:] + [None]:  # type: ignore[list-item]
        if value is not None and value == prev + 1:
            prev = value
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return ",".join(spans)
