"""What a rank's program sees of its interpreter, written to $OUT_DIR/view-<rank>-<tag>.json:
the same whether the worker forked it or started a new interpreter. Run as a script, as
``python -m interpreter_view`` or as ``python -c "$(cat interpreter_view.py)"``."""
import atexit
import json
import os
import signal
import sys
import threading

rank = os.environ["RANK"]


def annotated(x: int) -> None:  # no __future__ import here: real classes in __annotations__
    pass


argv = open("/proc/self/cmdline", "rb").read().split(b"\0")
main_file = getattr(sys.modules["__main__"], "__file__", None)  # none for python -c
view = {
    "module": argv[argv.index(b"-m") + 1].decode() if b"-m" in argv else None,
    "argv": sys.argv[1:],
    "argv0": os.path.basename(sys.argv[0]),
    "path0": ("script dir" if main_file and sys.path[0] == os.path.dirname(os.path.abspath(main_file))
              else "cwd" if sys.path[0] == os.getcwd() else sys.path[0]),
    "path_rest": sys.path[1:],
    "name": __name__,
    "spec": getattr(__spec__, "name", None),
    "main_is_this": sys.modules["__main__"].__dict__ is globals(),
    "annotations": repr(annotated.__annotations__),
    "main_file": main_file and os.path.basename(main_file),
    "main_names": {name: type(value).__name__ for name, value in vars(sys.modules["__main__"]).items()
                   if name.startswith("__")},  # __loader__, __package__, __builtins__, ... as python sets them
    "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),  # 0, 1, 2 and the listing's own
    "stdin": sys.stdin.read(),
    "stdout_write_through": sys.stdout.write_through,
    "flags": [sys.flags.optimize, sys.flags.dont_write_bytecode, getattr(sys.flags, "safe_path", None)],
    "env": {name: os.environ.get(name) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "DISTLAUNCH_RANK",
                                                    "PYTHONUNBUFFERED", "DISTLAUNCH_EXCEPTION_FILE")},
    "c_env_rank": os.popen("printenv DISTLAUNCH_RANK").read().strip(),
    "handlers": {name: repr(signal.getsignal(getattr(signal, name))) for name in ("SIGINT", "SIGTERM", "SIGPIPE")},
    "parent_is_worker": b"distlaunch.rank.worker" in open(f"/proc/{os.getppid()}/cmdline", "rb").read(),
}
view["env"]["DISTLAUNCH_EXCEPTION_FILE"] = os.path.basename(view["env"]["DISTLAUNCH_EXCEPTION_FILE"] or "")
out = os.path.join(os.environ["OUT_DIR"], f"view-{rank}-{sys.argv[1]}.json")


def at_exit() -> None:  # runs after the non-daemon thread is joined, as at any interpreter exit
    view["thread_joined"] = done.is_set()
    with open(out, "w") as handle:
        json.dump(view, handle)


done = threading.Event()
atexit.register(at_exit)
threading.Thread(target=lambda: (threading.Event().wait(0.2), done.set())).start()
print(f"rank {rank} unfinished line", end="")
