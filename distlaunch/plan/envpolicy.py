"""What of the launcher's environment reaches the ranks, and how it is written down.

Ranks on the launching machine inherit mpirun's environment anyway; ranks on other
nodes get only what is exported (Open MPI ``-x NAME``). Exported are: the variables
given with ``--env NAME=VALUE``, those matching a ``--env-pass PATTERN``, and those on
the default allow list below, minus the deny list. Values of secret-looking names
(TOKEN, KEY, SECRET, PASSWORD, ...) are never written to run records: ``redact``.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping

SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)
REDACTED = "<redacted>"

ALLOW = (
    "PATH", "LD_LIBRARY_PATH", "LIBRARY_PATH", "CUDA_*", "NCCL_*", "NVIDIA_*", "OMP_*", "MKL_*", "OPENBLAS_*",
    "PYTHON*", "HOROVOD_*", "DISTLAUNCH_*", "MASTER_*", "GLOO_*", "TORCH_*", "TORCHINDUCTOR_*", "HF_*",
    "TRANSFORMERS_*", "WANDB_*", "MLFLOW_*", "TF_*", "UCX_*", "FI_*", "LANG", "LC_*", "TZ", "VIRTUAL_ENV",
    "CONDA_PREFIX",
)
DENY = (
    "BASH_FUNC_*", "OLDPWD", "PWD", "SHLVL", "_", "SSH_*", "DISPLAY", "XAUTHORITY", "TERM", "TERMCAP",
    "HOSTNAME", "HOME", "USER", "LOGNAME", "MAIL", "OMPI_*", "PMIX_*", "PRTE_*", "PMI_*", "SLURM_*", "PBS_*",
    "LSB_*", "DISTLAUNCH_GPU_INVENTORY", "DISTLAUNCH_RUN_*",
)


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def redact(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` with the values of secret-looking names hidden."""
    return {name: (REDACTED if is_secret(name) else value) for name, value in env.items()}


def redact_pairs(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """``redact`` for ``(name, value)`` pairs (``JobSpec.env``)."""
    return [(name, REDACTED if is_secret(name) else value) for name, value in pairs]


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A command line with the value of every ``SECRET_NAME=value`` word hidden."""
    out = []
    for word in argv:
        name, eq, _value = word.partition("=")
        out.append(f"{name}={REDACTED}" if eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)
                   and is_secret(name) else word)
    return out


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def exported_names(names: Iterable[str], passes: Iterable[str] = ()) -> list[str]:
    """Which of the launcher's variable names to export to every rank, sorted."""
    passes = tuple(passes)
    chosen = []
    for name in names:
        if _matches(name, passes):
            chosen.append(name)  # an explicit --env-pass beats the deny list
        elif _matches(name, ALLOW) and not _matches(name, DENY):
            chosen.append(name)
    return sorted(chosen)
