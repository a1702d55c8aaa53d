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
from collections.abc import Callable, Iterable, Mapping

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


def _matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """One test for a list of shell-style patterns (case-sensitive): a match of any of
    them. Exact names and ``PREFIX*`` (all of the lists above) need no pattern matching."""
    exact, prefixes, other = set(), [], []
    for pattern in patterns:
        if not any(char in pattern for char in "*?["):
            exact.add(pattern)
        elif pattern.endswith("*") and not any(char in pattern[:-1] for char in "*?["):
            prefixes.append(pattern[:-1])
        else:
            other.append(pattern)
    starts = tuple(prefixes)
    return lambda name: (name in exact or name.startswith(starts)
                         or any(fnmatch.fnmatchcase(name, pattern) for pattern in other))


def exported_names(names: Iterable[str], passes: Iterable[str] = ()) -> list[str]:
    """Which of the launcher's variable names to export to every rank, sorted."""
    passed, allowed, denied = _matcher(passes), _matcher(ALLOW), _matcher(DENY)
    chosen = []
    for name in names:
        if passed(name):
            chosen.append(name)  # an explicit --env-pass beats the deny list
        elif allowed(name) and not denied(name):
            chosen.append(name)
    return sorted(chosen)
