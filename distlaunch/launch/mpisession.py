"""Where Open MPI 5's mpirun keeps its session on this machine: a folder of this user's.

Open MPI 5's mpirun (PRRTE) keeps its session (PMIx sockets, the ranks' session folders)
in ``$TMPDIR/ompi.<its pid>``, mode 0700, and removes it as it ends. One that is killed
(a launcher killed outright, or mpirun SIGKILLed after ``--kill-grace``) leaves it, and
any other user's mpirun that later gets the same pid cannot start (PMIx cannot make its
folder: exit 70 at once). On a shared login node pids come round often enough for that.

So distlaunch points mpirun's local session base (``prte_local_tmpdir_base``) at
``$TMPDIR/distlaunch-<user>/mpirun-<host>`` (in the folder the nodes' scratch has on
them), each folder accepted only if it is this user's and no one else can write it (nor
any folder above it, but for /tmp's sticky bit), the last one kept mode 0700: what a
killed mpirun leaves there can only ever meet this user's own later runs on this host
(a TMPDIR shared by several hosts has a folder per host), and the next run's end removes
it. Where that folder is not safe, mpirun keeps its default, with a warning. Where a
session base may have been chosen already (launcher arguments, environment, MCA
parameter files: PRRTE refuses a local base beside a global one), nothing is added.
The nodes' daemons (``prte_remote_tmpdir_base``) are left alone: they end with mpirun.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..plan.hosts import hostname

if TYPE_CHECKING:
    from ..plan.mpirun import LaunchPlan

log = logging.getLogger(__name__)

LOCAL_BASE = "PRTE_MCA_prte_local_tmpdir_base"
WHY = ("Open MPI 5: mpirun's session folder in one of this user's own, not in the shared temporary folder, "
       "where one a killed mpirun leaves would stop another user's mpirun that gets its pid")


def default_base(env: Mapping[str, str]) -> str:
    """Where Open MPI puts its sessions unless told otherwise: TMPDIR, TEMP or TMP of its
    environment, else /tmp (PRRTE's own order)."""
    return next((env[name] for name in ("TMPDIR", "TEMP", "TMP") if env.get(name)), "/tmp")


def _folders(env: Mapping[str, str]) -> tuple[Path, Path]:
    """This user's folder in the temporary folder, and the one for mpirun's sessions on this host in it."""
    from ..plan.spec import default_remote_root

    root = Path(default_base(env)) / Path(default_remote_root()).name
    host = re.sub(r"[^A-Za-z0-9._-]", "_", hostname().split(".")[0]) or "host"
    return root, root / f"mpirun-{host}"


def _safe_base(env: Mapping[str, str], make: bool) -> Path:
    """The private folder for mpirun's sessions, its folders checked (and with ``make``,
    made, the last one 0700); Unsafe or OSError where it is not safe to use."""
    from ..nodes.agent import check_ancestors, check_private, private_dir

    root, base = _folders(env)
    check_ancestors(root)
    for folder in (root, base):
        if make:
            private_dir(folder)
        elif os.path.lexists(folder):
            check_private(folder)
    if make:
        os.chmod(base, 0o700)
    return base


def session_base(env: Mapping[str, str], make: bool = True) -> str | None:
    """This user's private folder for mpirun's sessions, made if need be; None (and, with
    ``make``, a warning saying why) where it is not safe to use. ``make=False`` only
    checks, for what a dry run shows: the launch makes it, or says why not."""
    from ..nodes.agent import Unsafe

    root = _folders(env)[0]
    try:
        base = _safe_base(env, make)
    except (Unsafe, OSError) as exc:
        if not make:
            return None
        why = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
        log.warning("%s: Open MPI keeps its session folder in %s as usual, where another user's mpirun can "
                    "stumble on what a killed one leaves (make that folder yours alone, or remove it, to have a "
                    "private one again)", why, root.parent)
        return None
    return str(base)


def param_files(mpirun: str, env: Mapping[str, str]) -> list[Path]:
    """The MCA parameter files PRRTE and Open MPI read, where they may be: the install's
    own, Debian's and the user's."""
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    # the install's prefix, from mpirun as named (a venv's) and as resolved (a symlink into one)
    prefixes = dict.fromkeys(Path(path).parent.parent for path in (mpirun, os.path.realpath(mpirun)))
    folders = [*(prefix / "etc" for prefix in prefixes), Path("/etc/openmpi")]
    return [*(folder / name for folder in folders for name in ("prte-mca-params.conf", "openmpi-mca-params.conf")),
            home / ".prte" / "mca-params.conf", home / ".openmpi" / "mca-params.conf"]


def _names_a_base(key: str) -> bool:
    return "tmpdir_base" in key or "top_session_dir" in key


def chosen_elsewhere(argv: Sequence[str], env: Mapping[str, str]) -> bool:
    """Whether a session base may be set already: by the launcher's own arguments (also a
    ``--tune`` file), its environment (also other parameter files), or a parameter file."""
    from ..plan.mpirun import launcher_args

    own = launcher_args(argv)
    if any(_names_a_base(arg) or arg.startswith("--tune") for arg in own):
        return True
    if any(_names_a_base(name) or "param_files" in name for name in env):
        return True
    for path in param_files(own[0], env) if own else []:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        if any(_names_a_base(line.split("=", 1)[0]) for line in lines if not line.lstrip().startswith("#")):
            return True
    return False


def session_env(argv: Sequence[str], env: Mapping[str, str], make: bool = True) -> dict[str, str]:
    """What to add to mpirun's environment ``env``: the private session base, unless the
    user or the site may have chosen one, or there is no safe one (``make``: see
    ``session_base``)."""
    if chosen_elsewhere(argv, env):
        return {}
    base = session_base(env, make)
    return {LOCAL_BASE: base} if base else {}


def planned(plan: LaunchPlan, env: Mapping[str, str]) -> list[tuple[str, str]]:
    """What ``session_env`` will add to ``plan``'s mpirun environment (over ``env``), with
    why, as ``--dry-run`` and ``-v`` show it: the same decision, but nothing is made (where a
    folder is not safe, nothing is shown here, and the launch says why)."""
    if not plan.private_session:
        return []
    added = session_env(plan.argv, {**env, **plan.env}, make=False)
    return [(f"{name}={value}", WHY) for name, value in added.items()]


def remove_leftovers(pid: int, folder: str, private: bool) -> None:
    """Once mpirun ``pid`` has exited, before it is reaped (its pid is still ours): its
    session folder in ``folder``, where a killed one leaves it (ours only), and in this
    user's ``private`` base also those of earlier mpiruns that no longer run (killed with
    their launcher)."""
    found = [os.path.join(folder, f"ompi.{pid}")]
    if private:
        try:
            names = os.listdir(folder)
        except OSError:
            names = []
        for name in names:
            number = name[len("ompi."):]
            if name.startswith("ompi.") and number.isdigit() and int(number) != pid and not _running(int(number)):
                found.append(os.path.join(folder, name))
    for path in found:
        try:
            if os.lstat(path).st_uid == os.getuid():
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
