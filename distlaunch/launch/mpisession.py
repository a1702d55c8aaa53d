"""Where Open MPI 5's mpirun keeps its session on this machine: a folder of this user's.

Open MPI 5's mpirun (PRRTE) keeps its session (PMIx sockets, the ranks' session folders)
in ``$TMPDIR/ompi.<its pid>``, mode 0700, and removes it as it ends. One that is killed
(a launcher killed outright, or mpirun SIGKILLed after ``--kill-grace``) leaves it, and
any other user's mpirun that later gets the same pid cannot start (PMIx cannot make its
folder: exit 70 at once). On a shared login node pids come round often enough for that.

So distlaunch points mpirun's local session base (``prte_local_tmpdir_base``) at
``$TMPDIR/distlaunch-<user>/mpirun`` (beside the nodes' scratch of the same name), each
folder made mode 0700 and accepted only if it is this user's and no one else can write
it (nor any folder above it, but for /tmp's sticky bit): what a killed mpirun leaves
there can only ever meet this user's own later runs, and the next run's end removes it.
Where that folder is not safe, or the user chose a session base themselves, mpirun keeps
its default. The nodes' daemons (``prte_remote_tmpdir_base``) are left alone: they end
with mpirun.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

LOCAL_BASE = "PRTE_MCA_prte_local_tmpdir_base"


def default_base(env: Mapping[str, str]) -> str:
    """Where Open MPI puts its sessions unless told otherwise: TMPDIR, TEMP or TMP of its
    environment, else /tmp (PRRTE's own order)."""
    return next((env[name] for name in ("TMPDIR", "TEMP", "TMP") if env.get(name)), "/tmp")


def session_base(env: Mapping[str, str]) -> str | None:
    """This user's private folder for mpirun's sessions, made if need be; None (and a
    warning saying why) where it is not safe to use."""
    from ..nodes.agent import Unsafe, check_ancestors, private_dir
    from ..plan.spec import default_remote_root

    root = Path(default_base(env)) / Path(default_remote_root()).name
    base = root / "mpirun"
    try:
        check_ancestors(root)
        private_dir(root)
        private_dir(base)
    except (Unsafe, OSError) as exc:
        why = (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
        log.warning("%s: Open MPI keeps its session folder in %s as usual, where another user's mpirun can "
                    "stumble on what a killed one leaves (remove it to have a private one again)", why, root.parent)
        return None
    return str(base)


def chosen_by_user(argv: Sequence[str], env: Mapping[str, str]) -> bool:
    """Whether the launcher's own arguments or its environment set a session base already."""
    own = argv[:list(argv).index("distlaunch.rank.worker")] if "distlaunch.rank.worker" in argv else argv
    return any("tmpdir_base" in arg for arg in own) or any("tmpdir_base" in name for name in env)


def session_env(argv: Sequence[str], env: Mapping[str, str]) -> dict[str, str]:
    """What to add to mpirun's environment ``env``: the private session base, unless the
    user chose one or there is no safe one."""
    if chosen_by_user(argv, env):
        return {}
    base = session_base(env)
    return {LOCAL_BASE: base} if base else {}


def remove_leftovers(pid: int, folder: str, private: bool) -> None:
    """After mpirun ``pid`` is reaped: its session folder in ``folder``, where a killed
    one leaves it (ours only), and in this user's ``private`` base also those of earlier
    mpiruns that no longer run (killed with their launcher)."""
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
