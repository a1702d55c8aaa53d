"""The exception tree of distlaunch and the exit codes the CLI maps them to.

Every error message says what was wrong and what to do about it, on one line.
Only ``distlaunch.cli`` turns these into exit codes; the library raises them.
"""
from __future__ import annotations


class ExitCode:
    """Exit codes of the ``distlaunch`` command (the job's own code when the job fails)."""

    OK = 0
    USAGE = 2  # bad command line, spec, hostfile or host list
    MPI_NOT_FOUND = 69  # no usable mpirun (EX_UNAVAILABLE)
    RUN_DIR = 73  # run folder cannot be created or written (EX_CANTCREAT)
    LAUNCH = 70  # mpirun could not start the job (EX_SOFTWARE)
    TIMEOUT = 124  # --timeout or --hang-timeout ended the job
    INTERRUPTED = 130  # cancelled with Ctrl-C (128 + SIGINT)


class DistlaunchError(Exception):
    """Base class: a problem the user can act on."""

    exit_code: int = ExitCode.USAGE


class SpecError(DistlaunchError):
    """The job description (command line or Job(...) arguments) is invalid."""


class HostError(DistlaunchError):
    """Host list, hostfile or scheduler allocation is invalid or too small."""


class MPINotFound(DistlaunchError):
    """No mpirun, or one distlaunch cannot drive."""

    exit_code = ExitCode.MPI_NOT_FOUND


class RunDirError(DistlaunchError):
    """The run folder cannot be created or written."""

    exit_code = ExitCode.RUN_DIR


class RunNotFound(DistlaunchError):
    """No run matches the id or prefix given."""


class LaunchFailed(DistlaunchError):
    """mpirun itself failed before or while starting the ranks."""

    exit_code = ExitCode.LAUNCH
