"""Horovod's PyTorch API: ``import distlaunch.hvd as hvd`` in place of ``import horovod.torch as hvd``.

Real Horovod is used when ``horovod.torch`` imports and was built with MPI or Gloo, and
the launcher gives the ranks an MPI world (distlaunch, mpirun, srun with a PMI,
horovodrun); otherwise distlaunch's implementation on torch.distributed (gloo on CPU,
nccl with CUDA), which joins the world of whatever launched it: MPI, torchrun's
rendezvous, or an srun step's (``rendezvous.join``). ``DISTLAUNCH_HVD_BACKEND=horovod|torch``
forces one; ``hvd.backend()`` says which is active.
"""
from __future__ import annotations

import os

_choice = os.environ.get("DISTLAUNCH_HVD_BACKEND", "auto").strip().lower()
if _choice not in ("auto", "horovod", "torch"):
    raise ImportError(
        f"DISTLAUNCH_HVD_BACKEND={_choice!r} is not a backend: use 'horovod', 'torch' or leave it unset"
    )


def _outside_mpi() -> str | None:
    """The launcher, when it gives the ranks no MPI world (torchrun, srun without a PMI,
    horovodrun in Gloo mode with Horovod's own variables): real Horovod's MPI controller
    would see each rank alone there."""
    from ..rank.rankinfo import from_environ

    info = from_environ()
    if info.size > 1 and (info.source == "torchrun" or (info.source == "slurm" and not info.pmi)):
        return info.source
    return None


def _real_horovod() -> bool:
    if _choice == "torch":
        return False
    outside = _outside_mpi()
    if outside is not None:
        if _choice == "horovod":
            raise ImportError(f"DISTLAUNCH_HVD_BACKEND=horovod, but {outside} gives the ranks no MPI world, so real "
                              "Horovod would run each rank alone: unset the variable (the torch backend joins "
                              f"{outside}'s world), or launch with mpirun or distlaunch run")
        return False
    try:
        import horovod.torch as real
    except ImportError as exc:
        if _choice == "horovod":
            raise ImportError(
                f"DISTLAUNCH_HVD_BACKEND=horovod but horovod.torch cannot be imported ({exc}): "
                "build it with 'distlaunch install-horovod', or unset the variable"
            ) from exc
        return False
    if not (real.mpi_built() or real.gloo_built()):
        if _choice == "horovod":
            raise ImportError("horovod.torch was built without MPI and Gloo: rebuild it with "
                              "'distlaunch install-horovod'")
        return False
    return True


if _real_horovod():
    from horovod.torch import *  # noqa: F403
    from horovod.torch import Compression  # noqa: F401

    _BACKEND = "horovod"
    _OPS = os.environ.get("DISTLAUNCH_HVD_OPS", "mpi").strip().lower()
    if _OPS not in ("mpi", "gloo"):
        raise ImportError(f"DISTLAUNCH_HVD_OPS={_OPS!r}: use 'mpi' (Horovod's MPI controller and operations) or "
                          "'gloo' (its Gloo ones, as horovodrun --gloo)")
    if _OPS == "gloo" and "HOROVOD_GLOO_RENDEZVOUS_ADDR" not in os.environ:  # (horovodrun --gloo set them)
        _horovod_init = init  # noqa: F405

        def init(*args, **kwargs):  # type: ignore[no-redef]  # noqa: ANN002,ANN003
            """Horovod's init, after the ranks have set up its Gloo rendezvous (horovod_gloo)."""
            from .horovod_gloo import prepare

            prepare()
            _horovod_init(*args, **kwargs)
else:
    from .collectives import *  # noqa: F403
    from .compression import Compression  # noqa: F401
    from .optimizer import DistributedOptimizer  # noqa: F401
    from .sync_batch_norm import SyncBatchNorm  # noqa: F401
    from .torchdist import *  # noqa: F403 - with Average, Sum, ..., HorovodInternalError

    _BACKEND = "torch"


from .rendezvous import WorldError  # noqa: E402,F401 - what init raises instead of splitting the job


def backend() -> str:
    """'horovod' when real Horovod is in use, 'torch' for distlaunch's torch.distributed one."""
    return _BACKEND


def launcher() -> str:
    """What started this process, as the ranks see it: 'openmpi', 'mpich', 'slurm',
    'torchrun', 'horovodrun' or 'single'."""
    from ..rank.rankinfo import from_environ

    return from_environ().source
