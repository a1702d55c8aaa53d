"""Run a user's Python script the way ``python script.py`` would, plus three things.

``python -m distlaunch.bootstrap SCRIPT [ARGS...]`` is what the worker shim starts for
``.py`` scripts:

- an uncaught exception is printed as usual, recorded (type, message, traceback) in the
  JSON file named by ``DISTLAUNCH_EXCEPTION_FILE``, and the process then leaves at once
  with ``os._exit(1)``: no atexit handler (an MPI finalize, a process-group teardown) can
  hang it while the other ranks wait in a collective, so mpirun ends the job promptly;
- ``faulthandler`` dumps every thread's stack to stderr on ``DISTLAUNCH_DUMP_SIGNAL``
  (SIGRTMIN+4 unless set), which the launcher sends when ``--hang-timeout`` expires;
- it is started with ``python -P`` (the current directory is not searched for its own
  imports) and puts the script's directory first on ``sys.path``, as plain python does;
- ``sys.exit(N)`` with N != 0 also leaves at once, for the same reason; exit 0 is normal;
- nothing else: ``sys.argv``, ``sys.path[0]`` and ``__main__`` look as they would.
"""
from __future__ import annotations

import faulthandler
import json
import os
import runpy
import sys
import time
import traceback

from ..protocol import EXCEPTION_FILE, dump_signal


def _record_exception(exc: BaseException) -> None:
    path = os.environ.get(EXCEPTION_FILE)
    if not path:
        return
    data = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        "message": str(exc)[:4000],
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-20000:],
        "time": time.time(),
    }
    try:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)
    except OSError:
        pass


def _user_frames(exc: BaseException) -> BaseException:
    """Drop the bootstrap's and runpy's frames so the traceback reads like plain python's."""
    tb = exc.__traceback__
    while tb is not None and (tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__)
                              or tb.tb_frame.f_code.co_filename == "<frozen runpy>"):
        tb = tb.tb_next
    return exc.with_traceback(tb)  # None: a script that did not compile shows no frame, as with python


def _leave_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(argv: list[str]) -> None:
    """Run ``argv`` (SCRIPT [ARGS...]) as ``__main__``, as described above. Returns (or
    raises ``SystemExit`` with code 0 or None) only when the script ended well; a failing
    script leaves the process here and now. Also what a worker's fork runs
    (``distlaunch.rank.worker``), so the rank needs no interpreter of its own."""
    script = argv[0]
    sys.argv = list(argv)
    here = os.path.dirname(os.path.abspath(script))
    if getattr(sys.flags, "safe_path", False):
        sys.path.insert(0, here)  # -P: nothing of ours to replace
    else:
        sys.path[0] = here  # the cwd that ``-m`` put there
    faulthandler.register(dump_signal(), file=sys.stderr, all_threads=True, chain=False)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        # a failing exit must not wait in atexit handlers (MPI finalize) for peers that
        # are blocked in a collective: leave now, mpirun then ends the job
        if not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        _leave_now(exc.code if isinstance(exc.code, int) else 1)
    except BaseException as exc:  # noqa: BLE001 - every uncaught exception ends the rank
        exc = _user_frames(exc)
        traceback.print_exception(type(exc), exc, exc.__traceback__)
        _record_exception(exc)
        _leave_now(130 if isinstance(exc, KeyboardInterrupt) else 1)


def main() -> None:
    if len(sys.argv) < 2:
        sys.stderr.write("usage: python -m distlaunch.bootstrap SCRIPT [ARGS...]\n")
        sys.exit(2)
    run(sys.argv[1:])

if __name__ == "__main__":
    main()
