"""What this Python has installed, read from its package folders' ``*.dist-info`` names.

A wheel installs ``{name}-{version}.dist-info`` (PEP 427, the name with ``_`` for ``-``
and ``.``) beside the packages: listing the folders of ``sys.path`` tells every
project's version at once, without ``importlib.metadata``, whose import alone costs more
than the listing on every launch and every node check. ``versions`` falls back to
``importlib.metadata`` for a name the listing does not show (an ``.egg-info``, an
unusual layout), so a package is never reported missing by this shortcut.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Sequence


def normalized(name: str) -> str:
    """A project name as the ``.dist-info`` folder spells it, lower case (``Foo-Bar`` -> ``foo_bar``)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def dist_infos(path: Sequence[str] | None = None, shadowed: bool = False) -> Iterator[tuple[str, str, str]]:
    """(normalized project, version, its .dist-info folder) for each wheel-style install in
    the folders of ``path`` (``sys.path``), in search order; a project found again later
    in the path is shadowed, as for imports, and left out unless ``shadowed``."""
    seen: set[str] = set()
    for folder in dict.fromkeys(entry for entry in (sys.path if path is None else path) if entry):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in sorted(names):
            if not name.endswith(".dist-info"):
                continue
            project, _, version = name[:-len(".dist-info")].partition("-")
            project = normalized(project)
            if version and (shadowed or project not in seen):
                seen.add(project)
                yield project, version, os.path.join(folder, name)


def versions(projects: Sequence[str]) -> dict[str, str | None]:
    """Each project's installed version, None where it is not installed."""
    wanted = {normalized(name): name for name in projects}
    found: dict[str, str | None] = {}
    for project, version, _folder in dist_infos():
        if project in wanted:
            found[wanted[project]] = version
    missing = [name for name in projects if name not in found]
    if missing:
        from importlib import metadata

        for name in missing:
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                found[name] = None
    return {name: found[name] for name in projects}
