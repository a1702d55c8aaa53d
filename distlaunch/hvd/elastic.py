"""``hvd.elastic``: Horovod's elastic training API, for jobs that restart whole.

Horovod's elastic mode keeps a job alive while workers come and go: its driver
(horovodrun's elastic mode) re-forms the world and ``hvd.elastic.run`` rolls the state back
to the last commit in memory. distlaunch does not re-form a running job: after a failure
``distlaunch run --max-restarts N`` relaunches it as a fresh job. What carries the state
over is the disk: :meth:`TorchState.commit` also writes a checkpoint (rank 0, through
:mod:`distlaunch.checkpoint`), and the function decorated with :func:`run` starts from the
newest one. A script written for Horovod's elastic API runs unchanged::

    state = hvd.elastic.TorchState(model, optimizer, epoch=0)

    @hvd.elastic.run
    def train(state):
        while state.epoch < epochs:
            train_one_epoch(state.model, state.optimizer)
            state.epoch += 1
            state.commit()  # in memory, and on disk (rank 0): a relaunch starts at this epoch

    train(state)

Used with both runtimes (real Horovod's own elastic module needs horovodrun's elastic
driver). ``ElasticSampler`` is not provided.
"""
from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .. import checkpoint

__all__ = ["HostsUpdatedInterrupt", "ObjectState", "State", "TorchState", "run"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def _hvd() -> Any:
    from .. import hvd  # the package imports this module last: it is complete by the time this runs

    return hvd


class HostsUpdatedInterrupt(RuntimeError):
    """Same name as Horovod's: the job's hosts changed. Never raised here (hosts do not
    change inside a distlaunch job); kept so that scripts that catch it still run."""

    def __init__(self, skip_sync: bool = False) -> None:
        super().__init__("the job's hosts changed")
        self.skip_sync = skip_sync


class State:
    """What a training process keeps across failures: :meth:`save` keeps it in memory,
    :meth:`restore` goes back to it, :meth:`sync` makes every rank equal to rank 0,
    :meth:`commit` saves (and, in :class:`TorchState`, writes a checkpoint).

    ``bcast_object(obj)`` gives rank 0's ``obj`` on every rank and ``get_rank()`` this
    rank; both default to ``distlaunch.hvd``'s."""

    def __init__(self, bcast_object: Callable[[Any], Any] | None = None,
                 get_rank: Callable[[], int] | None = None) -> None:
        self._bcast_object = bcast_object or (
            lambda obj: _hvd().broadcast_object(obj, root_rank=0, name="distlaunch.elastic"))
        self._rank = get_rank or (lambda: _hvd().rank())
        self._reset_callbacks: list[Callable[[], Any]] = []

    def register_reset_callbacks(self, callbacks: list[Callable[[], Any]]) -> None:
        """Functions to call after a reset; here, when :func:`run` resumes from a
        checkpoint (the world may have another size after a restart)."""
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        self.reset()
        for callback in self._reset_callbacks:
            callback()

    def on_hosts_updated(self, timestamp: float, update_res: Any) -> None:
        """Horovod's elastic driver announces host changes here; distlaunch has none."""

    def commit(self) -> None:
        """Save the state as the one to come back to; every rank calls it."""
        self.save()
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Nothing to check: hosts never change inside a distlaunch job."""

    def save(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Subclasses' hook, before the reset callbacks."""

    def resume(self) -> checkpoint.Checkpoint | None:
        """distlaunch's addition: take up the newest disk checkpoint, if the state writes
        any (:class:`TorchState` does). Every rank calls it; None when there is none."""
        return None


class ObjectState(State):
    """Plain Python values as attributes (``ObjectState(epoch=0, batch=0)``): snapshot in
    memory by :meth:`save`, put back by :meth:`restore`, rank 0's committed values
    everywhere after :meth:`sync`."""

    def __init__(self, bcast_object: Callable[[Any], Any] | None = None,
                 get_rank: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(bcast_object, get_rank)
        self._saved_state = copy.deepcopy(kwargs)
        self._set_attrs()

    def save(self) -> None:
        self._saved_state = {name: copy.deepcopy(getattr(self, name)) for name in self._saved_state}

    def restore(self) -> None:
        self._set_attrs()

    def sync(self) -> None:
        if self._saved_state:
            self._saved_state = self._bcast_object(self._saved_state)
            self._set_attrs()

    def _set_attrs(self) -> None:
        for name, value in self._saved_state.items():
            setattr(self, name, copy.deepcopy(value))  # the snapshot stays as saved whatever the script does

    if TYPE_CHECKING:  # the values are attributes made at run time: let type checkers take any name
        def __getattr__(self, name: str) -> Any: ...

        def __setattr__(self, name: str, value: Any) -> None: ...


def _has_state(value: Any) -> bool:
    """A model, optimizer, LR scheduler, sampler...: kept through its state dict."""
    return (not isinstance(value, type) and callable(getattr(value, "state_dict", None))
            and callable(getattr(value, "load_state_dict", None)))


class TorchState(ObjectState):
    """A PyTorch training process: ``model``, ``optimizer`` and any other keyword that has a
    state dict (more models, optimizers, schedulers) are kept through their state dicts, the
    rest as :class:`ObjectState` values. :meth:`commit` also writes a checkpoint (rank 0;
    the newest commit is the newest file), which :func:`run` resumes from after a restart."""

    def __init__(self, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        stateful = {"model": model, "optimizer": optimizer,
                    **{name: value for name, value in kwargs.items() if _has_state(value)}}
        self._stateful = [name for name, value in stateful.items() if value is not None]
        self._snapshots: dict[str, Any] = {}
        self._commits = 0
        for name, value in stateful.items():
            setattr(self, name, value)
        super().__init__(**{name: value for name, value in kwargs.items() if name not in stateful})
        self._save_states()

    def _save_states(self) -> None:
        self._snapshots = {name: copy.deepcopy(getattr(self, name).state_dict()) for name in self._stateful}

    def save(self) -> None:
        self._save_states()
        super().save()

    def restore(self) -> None:
        for name in self._stateful:  # (a copy: load_state_dict may keep the tensors it is given)
            getattr(self, name).load_state_dict(copy.deepcopy(self._snapshots[name]))
        super().restore()

    def sync(self) -> None:
        """Rank 0's parameters, optimizer states and values on every rank; that is then the
        state :meth:`restore` returns to."""
        import torch

        hvd = _hvd()
        for name in self._stateful:
            value = getattr(self, name)
            if isinstance(value, torch.nn.Module):
                hvd.broadcast_parameters(value.state_dict(), root_rank=0)
            elif isinstance(value, torch.optim.Optimizer):
                hvd.broadcast_optimizer_state(value, root_rank=0)
            else:
                value.load_state_dict(self._bcast_object(value.state_dict()))
        super().sync()
        self.save()

    def commit(self) -> None:
        """Save in memory, then write the checkpoint on rank 0; returns on every rank once
        the file is complete, so a rank that fails after ``commit()`` never loses it."""
        super().commit()
        self._commits += 1
        others = {name: self._snapshots[name] for name in self._stateful if name not in ("model", "optimizer")}
        checkpoint.save(self._commits, model=getattr(self, "model", None), optimizer=getattr(self, "optimizer", None),
                        state=self._saved_state, state_dicts=others)
        _hvd().barrier()  # every rank waits for rank 0's file

    def resume(self) -> checkpoint.Checkpoint | None:
        """Load the newest checkpoint into the model, optimizer and values (every rank)."""
        found = checkpoint.load_latest(model=getattr(self, "model", None), optimizer=getattr(self, "optimizer", None))
        if found is None:
            return None
        values = found.extra.get("state") or {}
        self._saved_state = {name: values.get(name, value) for name, value in self._saved_state.items()}
        self._set_attrs()
        for name, state_dict in (found.extra.get("state_dicts") or {}).items():
            if name in self._stateful:
                getattr(self, name).load_state_dict(state_dict)
        self._commits = found.step
        self._save_states()
        log.info("resumed from %s (commit %d)", found.path, found.step)
        return found


def run(func: Callable[..., T]) -> Callable[..., T]:
    """Decorate the training function ``func(state, *args, **kwargs)``, as Horovod's
    ``hvd.elastic.run``: the wrapper resumes ``state`` from the newest checkpoint its
    commits left (after a ``--max-restarts`` relaunch; the reset callbacks then run), makes
    every rank equal to rank 0 (``state.sync()``), and calls ``func``.

    Unlike Horovod's, it does not retry inside the process: a ``HorovodInternalError`` or
    :class:`HostsUpdatedInterrupt` propagates, the rank fails, and the launcher relaunches
    the whole job, which resumes from the last commit. A job without ``--max-restarts``
    just fails."""

    @functools.wraps(func)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> T:
        if state.resume() is not None:
            state.on_reset()
        state.sync()
        return func(state, *args, **kwargs)

    return wrapper
