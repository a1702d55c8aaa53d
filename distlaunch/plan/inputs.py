"""Data inputs, the bare-metal form of datastores: ``--input NAME=PATH[:copy]``. Pure.

``NAME=PATH`` uses PATH in place: a shared filesystem every node sees (checked before
the launch). ``NAME=PATH:copy`` stages PATH once per node into a per-user cache under
``--remote-dir``, keyed by the data's content hash, and reuses it on later runs.

Either way the script finds the node-local path in ``$DISTLAUNCH_INPUT_<NAME>`` (NAME
upper-cased), and ``{inputs.NAME}`` in its arguments is replaced by it.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import SpecError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PLACEHOLDER = re.compile(r"\{inputs\.([A-Za-z_][A-Za-z0-9_]*)\}")
ENV_PREFIX = "DISTLAUNCH_INPUT_"
COPY_SUFFIX = ":copy"


@dataclass(frozen=True)
class InputSpec:
    """One named input: an absolute path here, used in place or copied to every node."""

    name: str
    path: str
    copy: bool = False

    @property
    def env_name(self) -> str:
        return f"{ENV_PREFIX}{self.name.upper()}"

    @property
    def mode(self) -> str:
        return "copy" if self.copy else "in place"


def parse_input(item: str) -> InputSpec:
    """``train=/data/train`` or ``train=./data:copy`` → InputSpec (path made absolute)."""
    name, eq, path = item.partition("=")
    if not eq or not _NAME.match(name) or not path:
        raise SpecError(f"--input {item!r}: expected NAME=PATH or NAME=PATH:copy, e.g. --input train=/data/train")
    copy = path.endswith(COPY_SUFFIX)
    if copy:
        path = path[: -len(COPY_SUFFIX)]
    if not path:
        raise SpecError(f"--input {item!r}: no path before ':copy'")
    return InputSpec(name, os.path.abspath(os.path.expanduser(path)), copy)


def check_inputs(inputs: Sequence[InputSpec], script_args: Sequence[str]) -> None:
    """SpecError for a name given twice, a copied input missing here, or a ``{inputs.X}``
    in the arguments with no ``--input X``."""
    seen: dict[str, str] = {}
    for item in inputs:
        other = seen.get(item.env_name)
        if other is not None:
            raise SpecError(f"--input {item.name}: the name is given twice (as {other!r} and {item.name!r}): "
                            "give each input its own name")
        seen[item.env_name] = item.name
        if item.copy and not os.path.exists(item.path):
            raise SpecError(f"--input {item.name}={item.path}:copy: no such file or directory here: check the path")
        if item.copy and not os.access(item.path, os.R_OK):
            raise SpecError(f"--input {item.name}={item.path}:copy: not readable here: check its permissions")
    names = {item.name for item in inputs}
    for arg in script_args:
        for name in PLACEHOLDER.findall(arg):
            if name not in names:
                raise SpecError(f"{{inputs.{name}}} in the script's arguments, but no --input {name}=PATH is given: "
                                "add it, or fix the name")


def substitute(argv: Sequence[str], paths: Mapping[str, str]) -> list[str]:
    """``{inputs.NAME}`` in each argument replaced by NAME's path on the nodes."""
    return [PLACEHOLDER.sub(lambda m: paths.get(m.group(1), m.group(0)), arg) for arg in argv]


def cache_path(remote_root: str, name: str, digest: str, source: str) -> str:
    """Where a copied input lives on every node: ``ROOT/inputs/<name>-<hash>/<basename>``."""
    base = os.path.basename(source.rstrip("/")) or name
    return f"{cache_dir(remote_root, name, digest)}/{base}"


def cache_dir(remote_root: str, name: str, digest: str) -> str:
    return f"{remote_root.rstrip('/')}/inputs/{name}-{digest[:16]}"
