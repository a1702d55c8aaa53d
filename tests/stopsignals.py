"""SIGTERM and SIGHUP as an exception, for the scripts that bring simulated nodes or a
Slurm up (the benchmarks, by hand or from CI's timeout).

Those start processes in sessions of their own (sshd in its namespaces, Slurm's
daemons), which a signal to the script's group does not reach. A signal's default
action ends the script without its ``finally`` blocks and ``with`` exits, and leaves
them running (and Slurm's line in /etc/hosts). Inside ``unwinding()``, the first such
signal raises ``Terminated`` where the script is, so everything on the way out runs;
signals that come while it unwinds are taken and dropped, so that they do not break off
the teardown. Code that must not be cut in two (starting a node and noting its pid,
stopping the nodes or daemons) runs inside ``held()``: a signal that comes there is
raised as the block ends. The exit status is 128 + the first signal's number, unless
the teardown itself fails (then its error, status 1).

For a script's main thread (``signal`` allows no other); a signal the script was
started with ignored (``nohup``) stays ignored. Not for pytest, where an exception in
one test would not stop the session; ``held()`` is harmless there (nothing to hold).
"""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

STOPS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(SystemExit):
    """A stop signal reached the script inside ``unwinding()``: exit status 128 + its number."""


class _State:
    holding = 0  # nesting depth of held()
    pending: int | None = None  # a signal taken inside held(), raised as it ends
    raised = False  # Terminated was raised: signals from then on are dropped


def _stop(signum: int, _frame: object) -> None:
    if _State.raised:
        return  # unwinding already: the teardown runs to its end
    if _State.holding:
        _State.pending = _State.pending or signum
        return
    _State.raised = True
    raise Terminated(128 + signum)


@contextlib.contextmanager
def unwinding() -> Iterator[None]:
    """The ``with`` block's first stop signal raises ``Terminated``; later ones are dropped.
    A Python handler, not ``SIG_IGN``, drops them: what the teardown starts must not
    inherit an ignored signal."""
    before = {}
    for signum in STOPS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            before[signum] = signal.signal(signum, _stop)
    _State.pending, _State.raised = None, False
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set from C


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A stop signal that comes during the block is raised (as ``Terminated``) only as the
    block ends, so the block is never cut in two."""
    _State.holding += 1
    try:
        yield
    finally:
        _State.holding -= 1
    if not _State.holding and _State.pending is not None and not _State.raised:
        signum, _State.pending = _State.pending, None
        _State.raised = True
        raise Terminated(128 + signum)
