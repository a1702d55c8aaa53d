"""Checkpoints that survive a restart: rank 0 saves, every rank resumes.

``distlaunch run --max-restarts N`` relaunches a failed job as a fresh job; a training
script that saves with :func:`save` each epoch and starts with :func:`load_latest` goes on
from its last checkpoint instead of from scratch::

    from distlaunch import checkpoint

    found = checkpoint.load_latest(model=model, optimizer=optimizer)  # on every rank
    first = found.step + 1 if found else 0
    for epoch in range(first, epochs):
        train_one_epoch()
        checkpoint.save(epoch, model=model, optimizer=optimizer, best=best)  # writes on rank 0 only

Files are ``ckpt-<step>.pt`` (``torch.save`` of ``{"step", "model", "optimizer",
"extra"}``) in :func:`directory`, written atomically (a crash never leaves a partial file
under that name), readable by their owner only, the newest ``keep`` kept. Only rank 0
reads the file: it broadcasts the bytes, so ranks on nodes that cannot see its disk
resume too. After a restart rank 0 may land on another node: keep checkpoints on a
filesystem every node sees (``DISTLAUNCH_CHECKPOINT_DIR``) unless rank 0's node is fixed.
Loading uses ``torch.load(weights_only=True)``: extras must be tensors and plain Python
values. ``hvd.elastic.TorchState`` commits through this module.

torch is imported only when a checkpoint is saved or loaded.
"""
from __future__ import annotations

import io
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .protocol import OUTPUT_DIR

__all__ = ["Checkpoint", "directory", "latest", "load_latest", "save"]

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "DISTLAUNCH_CHECKPOINT_DIR"  # where checkpoints go, when the outputs folder is not the place
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
_TEMP_PREFIX = ".ckpt-"  # a save in progress (or one that crashed): never a checkpoint
_TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class Checkpoint:
    """What :func:`load_latest` found: the step it was saved at, the extras, and its file
    (as rank 0 sees it)."""

    step: int
    extra: dict[str, Any]
    path: str


def directory() -> Path:
    """Where checkpoints live: ``$DISTLAUNCH_CHECKPOINT_DIR``, else the run's outputs folder
    (``$DISTLAUNCH_OUTPUT_DIR/checkpoints``, set on every rank by distlaunch), else
    ``./outputs/checkpoints``."""
    chosen = os.environ.get(CHECKPOINT_DIR)
    if chosen:
        return Path(chosen)
    return Path(os.environ.get(OUTPUT_DIR) or "outputs") / "checkpoints"


def _folder(given: str | os.PathLike[str] | None) -> Path:
    return Path(given) if given is not None else directory()


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in ``folder``, oldest step first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = [(int(match.group(1)), folder / name) for name in names if (match := _NAME.match(name))]
    return sorted(found)


def latest(directory: str | os.PathLike[str] | None = None) -> Path | None:
    """The newest complete checkpoint (highest step) in ``directory`` (default
    :func:`directory`), or None."""
    found = _checkpoints(_folder(directory))
    return found[-1][1] if found else None


# ---------------------------------------------------------------- who am I, and how to reach the others
def _hvd() -> Any:
    """``distlaunch.hvd`` when the script imported it and called ``hvd.init()``; never imported here."""
    hvd = sys.modules.get("distlaunch.hvd")
    return hvd if hvd is not None and hvd.is_initialized() else None


def _torch_dist() -> Any:
    """``torch.distributed`` when the script initialised it; never imported here."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    hvd = _hvd()
    if hvd is not None:
        return int(hvd.rank())
    dist = _torch_dist()
    if dist is not None:
        return int(dist.get_rank())
    from .rank.rankinfo import from_environ

    return from_environ().rank


def _from_rank_0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    hvd = _hvd()
    if hvd is not None:
        return hvd.broadcast_object(obj, root_rank=0, name="distlaunch.checkpoint")
    dist = _torch_dist()
    if dist is not None:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    from .rank.rankinfo import from_environ

    if from_environ().size == 1:
        return obj
    raise RuntimeError("checkpoint.load_latest needs the ranks connected: call hvd.init() (or initialise "
                       "torch.distributed) before it")


# ---------------------------------------------------------------- saving
def save(step: int, *, model: Any = None, optimizer: Any = None, keep: int = 3,
         directory: str | os.PathLike[str] | None = None, **extra: Any) -> Path | None:
    """Save ``step``, the model's and optimizer's state dicts and ``extra`` as
    ``ckpt-<step>.pt`` (rank 0 only; other ranks return None and touch nothing), then
    delete older checkpoints so that ``keep`` remain: this one and the newest others.
    Returns the file."""
    if keep < 1:
        raise ValueError(f"checkpoint.save: keep={keep}, but at least the checkpoint just saved must stay: "
                         "use keep >= 1")
    if _rank() != 0:
        return None
    import torch

    folder = _folder(directory)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = folder / f"ckpt-{int(step):09d}.pt"
    content = {
        "step": int(step),
        "model": model.state_dict() if model is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra,
    }
    handle, temp = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{int(step):09d}-", suffix=_TEMP_SUFFIX, dir=folder)
    try:  # mkstemp made it 0600; it gets the final name only once complete
        with os.fdopen(handle, "wb") as stream:
            torch.save(content, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, final)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _sync_folder(folder)
    _tidy(folder, int(step), keep, temp)
    return final


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (a crash of the node right after keeps the file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tidy(folder: Path, saved: int, keep: int, mine: str) -> None:
    """Keep the checkpoint just saved and the newest ``keep - 1`` others; delete the rest
    and the temporary files of saves that crashed."""
    others = [(step, path) for step, path in _checkpoints(folder) if step != saved]
    newer = [path.name for step, path in others if step > saved]
    if newer:
        log.warning("checkpoint step %d was saved, but %s holds newer ones (%s): load_latest still picks "
                    "those; use a fresh directory for a new training run", saved, folder, ", ".join(newer))
    for _step, path in others[:max(0, len(others) - (keep - 1))]:
        path.unlink(missing_ok=True)
    for name in os.listdir(folder):
        if name.startswith(_TEMP_PREFIX) and name.endswith(_TEMP_SUFFIX) and name != os.path.basename(mine):
            (folder / name).unlink(missing_ok=True)


# ---------------------------------------------------------------- loading
def load_latest(*, model: Any = None, optimizer: Any = None, directory: str | os.PathLike[str] | None = None,
                map_location: Any = "cpu") -> Checkpoint | None:
    """Resume from the newest checkpoint, on every rank (a collective: every rank calls it).

    Rank 0 reads the file and broadcasts its bytes (through ``distlaunch.hvd`` once
    ``hvd.init()`` ran, else ``torch.distributed`` once initialised; a job of one rank
    needs neither); every rank loads the states into ``model`` and ``optimizer`` and gets
    the step and extras back. None on every rank when there is no checkpoint."""
    found: tuple[str, bytes] | None = None
    if _rank() == 0:
        path = latest(directory)
        if path is not None:
            found = (str(path), path.read_bytes())
    found = _from_rank_0(found)
    if found is None:
        return None
    path_text, data = found
    import pickle

    import torch

    try:
        content = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        said = re.search(r"WeightsUnpickler error: ([^.\n]+)", str(exc))
        reason = said.group(1) if said else type(exc).__name__
        raise pickle.UnpicklingError(
            f"checkpoint {path_text} holds more than tensors and plain Python values ({reason}): keep "
            "extras plain, or allow their types with torch.serialization.add_safe_globals") from exc
    for what, target in (("model", model), ("optimizer", optimizer)):
        if target is None:
            continue
        if content.get(what) is None:
            log.warning("checkpoint %s has no %s state: the %s given to load_latest is left as it is",
                        path_text, what, what)
        else:
            target.load_state_dict(content[what])
    return Checkpoint(step=int(content["step"]), extra=dict(content.get("extra") or {}), path=path_text)
