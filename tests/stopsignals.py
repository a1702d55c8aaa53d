"""SIGTERM and SIGHUP as an exception, for the scripts that bring simulated nodes or a
Slurm up (the benchmarks, by hand or from CI's timeout).

Those start processes in sessions of their own (sshd in its namespaces, Slurm's
daemons), which a signal to the script's group does not reach. A signal's default
action ends the script without its ``finally`` blocks and ``with`` exits, and leaves
them running (and Slurm's line in /etc/hosts). Inside ``unwinding()``, the first such
signal raises ``Terminated`` where the script is, so everything on the way out runs;
signals that come while it unwinds are taken and dropped, so that they do not break off
the teardown, and the script's exit status is 128 + the first signal's number. For a
script's main thread (``signal`` allows no other); not for pytest, where an exception
in one test would not stop the session.
"""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

STOPS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(SystemExit):
    """A stop signal reached the script inside ``unwinding()``: exit status 128 + its number."""


@contextlib.contextmanager
def unwinding() -> Iterator[None]:
    """The ``with`` block's stop signals raise ``Terminated`` (the first; later ones are dropped)."""

    def stop(signum: int, _frame: object) -> None:
        for each in STOPS:
            signal.signal(each, drop)  # a handler, not SIG_IGN: what the teardown runs must not inherit it
        raise Terminated(128 + signum)

    def drop(_signum: int, _frame: object) -> None:
        pass

    before = {signum: signal.signal(signum, stop) for signum in STOPS}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
