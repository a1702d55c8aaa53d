"""Horovod's PyTorch API: ``import distlaunch.hvd as hvd`` in place of ``import horovod.torch as hvd``.

Real Horovod is used when ``horovod.torch`` imports and was built with MPI or Gloo, and
the launcher gives the ranks an MPI world (distlaunch, mpirun, srun with a PMI,
horovodrun); otherwise distlaunch's implementation on torch.distributed (gloo on CPU,
nccl with CUDA), which joins the world of whatever launched it: MPI, torchrun's
rendezvous, or an srun step's (``rendezvous.join``). ``DISTLAUNCH_HVD_BACKEND=horovod|torch``
forces one; ``hvd.backend()`` says which is active.

Real Horovod runs its Gloo controller and operations where no rank has CUDA (measured
faster than its MPI ones on a CPU-only host: README, "Which runtime"), its MPI ones with
CUDA, with a communicator given to ``hvd.init``, or where a host's name does not resolve;
``DISTLAUNCH_HVD_OPS=gloo|mpi`` (``distlaunch run --hvd-ops``) or Horovod's own
``HOROVOD_CPU_OPERATIONS`` / ``HOROVOD_CONTROLLER`` choose. horovodrun's MPI mode leaves
no trace in the ranks' environment, so there too Gloo's are the default unless one of
those says otherwise. ``hvd.init()`` says on rank 0, in one line on stderr, which runtime
is in use and why (``DISTLAUNCH_HVD_QUIET=1`` silences it).

``hvd.elastic`` is Horovod's elastic API (``TorchState``, ``run``) for jobs that
``distlaunch run --max-restarts`` relaunches whole: commits go to disk and the relaunched
job resumes from the newest (``distlaunch.hvd.elastic``).
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


def _real_horovod() -> tuple[bool, str]:
    """Whether real Horovod is used, and why (the start-up line's reason)."""
    if _choice == "torch":
        return False, "DISTLAUNCH_HVD_BACKEND=torch"
    outside = _outside_mpi()
    if outside is not None:
        if _choice == "horovod":
            raise ImportError(f"DISTLAUNCH_HVD_BACKEND=horovod, but {outside} gives the ranks no MPI world, so real "
                              "Horovod would run each rank alone: unset the variable (the torch backend joins "
                              f"{outside}'s world), or launch with mpirun or distlaunch run")
        return False, f"{outside} gives the ranks no MPI world for real Horovod"
    try:
        import horovod.torch as real
    except ImportError as exc:
        if _choice == "horovod":
            raise ImportError(
                f"DISTLAUNCH_HVD_BACKEND=horovod but horovod.torch cannot be imported ({exc}): "
                "build it with 'distlaunch install-horovod', or unset the variable"
            ) from exc
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "horovod":
            return False, "horovod.torch is not installed; 'distlaunch install-horovod' builds it"
        return False, f"horovod.torch failed to import ({exc}); 'distlaunch install-horovod' rebuilds it"
    if not (real.mpi_built() or real.gloo_built()):
        if _choice == "horovod":
            raise ImportError("horovod.torch was built without MPI and Gloo: rebuild it with "
                              "'distlaunch install-horovod'")
        return False, "horovod.torch was built without MPI and Gloo"
    return True, "DISTLAUNCH_HVD_BACKEND=horovod" if _choice == "horovod" else "horovod.torch is installed"


def _operations() -> tuple[str, str, bool]:
    """Real Horovod's CPU operations ('gloo', 'mpi', or what HOROVOD_CPU_OPERATIONS names,
    such as 'ccl'), why, and whether that is only the default, which hvd.init may still
    turn to MPI's with every rank's say (horovod_gloo.prepare)."""
    if _FROM_HOROVODRUN:
        return "gloo", "horovodrun --gloo set them up", False
    import horovod.torch as real

    asked = os.environ.get("DISTLAUNCH_HVD_OPS", "").strip().lower()
    if asked:
        if asked not in ("mpi", "gloo"):
            raise ImportError(f"DISTLAUNCH_HVD_OPS={asked!r}: use 'mpi' (Horovod's MPI controller and operations) "
                              "or 'gloo' (its Gloo ones, as horovodrun --gloo)")
        if not (real.gloo_built() if asked == "gloo" else real.mpi_built()):
            other = "mpi" if asked == "gloo" else "gloo"
            raise ImportError(f"DISTLAUNCH_HVD_OPS={asked}, but this Horovod was built without "
                              f"{'Gloo' if asked == 'gloo' else 'MPI'}: use DISTLAUNCH_HVD_OPS={other}, or rebuild "
                              "it with 'distlaunch install-horovod'")
        return asked, f"DISTLAUNCH_HVD_OPS={asked}", False
    controller = os.environ.get("HOROVOD_CONTROLLER", "").strip().lower()
    operations = os.environ.get("HOROVOD_CPU_OPERATIONS", "").strip().lower()
    if controller == "gloo":  # Horovod's Gloo controller needs the rendezvous, whatever the operations
        if operations == "mpi":  # measured with 0.28.1: gloo's MPI context aborts in MPI_Comm_size
            raise ImportError("HOROVOD_CONTROLLER=gloo with HOROVOD_CPU_OPERATIONS=mpi aborts in Horovod: unset "
                              "one of them (DISTLAUNCH_HVD_OPS=gloo|mpi chooses both)")
        return "gloo", "HOROVOD_CONTROLLER=gloo", False
    if operations:  # Horovod's own setting, whatever it names (mpi, gloo, ccl)
        return operations, f"HOROVOD_CPU_OPERATIONS={operations}", False
    if controller == "mpi":
        return "mpi", "HOROVOD_CONTROLLER=mpi", False
    if not real.gloo_built():
        return "mpi", "this Horovod was built without Gloo", False
    if not real.mpi_built():
        return "gloo", "this Horovod was built without MPI", False
    return "gloo", "the default where no rank has CUDA; DISTLAUNCH_HVD_OPS=mpi for MPI's", True


def _announce(line: str) -> None:
    if os.environ.get("DISTLAUNCH_HVD_QUIET", "").strip().lower() not in ("", "0", "false", "no"):
        return
    import sys

    print(f"distlaunch.hvd: {line}", file=sys.stderr, flush=True)


_REAL, _WHY = _real_horovod()
if _REAL:
    from horovod.torch import *  # noqa: F403
    from horovod.torch import Compression  # noqa: F401

    _BACKEND = "horovod"
    # horovodrun --gloo's variables, as the process started (not those hvd.init sets)
    _FROM_HOROVODRUN = "HOROVOD_GLOO_RENDEZVOUS_ADDR" in os.environ
    _OPS, _OPS_WHY, _OPS_DEFAULT = _operations()
    _horovod_init = init  # noqa: F405

    def init(comm=None, process_sets=None):  # type: ignore[no-redef]  # noqa: ANN001
        """Horovod's init; with Gloo operations outside horovodrun, the ranks first serve
        Horovod's rendezvous among themselves (horovod_gloo)."""
        why = _OPS_WHY
        first = not is_initialized()  # noqa: F405
        if first and _OPS == "gloo" and not _FROM_HOROVODRUN:
            from .horovod_gloo import prepare

            why = prepare(asked=not _OPS_DEFAULT, comm=comm) or why
        _horovod_init(comm, process_sets)
        if first and rank() == 0:  # noqa: F405
            import horovod

            ops = "Gloo" if gloo_enabled() else "MPI" if _OPS in ("gloo", "mpi") else _OPS.upper()  # noqa: F405
            _announce(f"real Horovod {horovod.__version__} with {ops} operations ({_WHY}; {why})")

    _horovod_shutdown = shutdown  # noqa: F405

    def shutdown() -> None:  # type: ignore[no-redef]
        """Horovod's shutdown; then the rendezvous init served stops and its variables
        leave the environment (child processes must not take them for horovodrun's)."""
        _horovod_shutdown()
        if not _FROM_HOROVODRUN:
            from .horovod_gloo import forget

            forget()
else:
    from .collectives import *  # noqa: F403
    from .compression import Compression  # noqa: F401
    from .optimizer import DistributedOptimizer  # noqa: F401
    from .sync_batch_norm import SyncBatchNorm  # noqa: F401
    from .torchdist import *  # noqa: F403 - with Average, Sum, ..., HorovodInternalError
    from .torchdist import init as _torch_init

    _BACKEND = "torch"

    def init(comm=None, process_sets=None):  # type: ignore[no-redef]  # noqa: ANN001
        """Join the job (idempotent); see torchdist.init."""
        from .core import state

        first = state.topology is None
        _torch_init(comm, process_sets)
        if first and rank() == 0:  # noqa: F405
            from .world import channel

            how = {"shm": "collectives through this node's shared memory",
                   "mpi": "rounds over MPI, data over torch.distributed",
                   "gloo": "collectives over torch.distributed"}[channel()]
            _announce(f"distlaunch's torch backend, {how} ({_WHY})")


from .rendezvous import WorldError  # noqa: E402,F401 - what init raises instead of splitting the job


def backend() -> str:
    """'horovod' when real Horovod is in use, 'torch' for distlaunch's torch.distributed one."""
    return _BACKEND


def launcher() -> str:
    """What started this process, as the ranks see it: 'openmpi', 'mpich', 'slurm',
    'torchrun', 'horovodrun' or 'single'."""
    from ..rank.rankinfo import from_environ

    return from_environ().source


# distlaunch's elastic API with both runtimes: real Horovod's (horovod.torch.elastic) needs
# horovodrun's elastic driver to re-form the job. The star import above brought Horovod's in,
# and "from . import" would keep a name that is already there: drop it first.
globals().pop("elastic", None)
from . import elastic  # noqa: E402,F401
