"""The names and formats that the launcher, the node agent and the ranks share.

Three kinds of process speak to each other only through environment variables, files
in the run folder and prefixed output lines. Everything they must agree on is here,
so a change in one place cannot leave the others behind:

- the ``DISTLAUNCH_*`` variables each rank (and the node agent) reads;
- the signal that asks a Python rank for its stacks (``--hang-timeout``);
- the names of a rank's files in the run folder;
- the ``[rank] `` prefix the worker puts before every line, and its parser.

Kept free of imports beyond the standard library: every rank loads it.
"""
from __future__ import annotations

import os
import re
import signal

# -- variables set for every rank by the launcher (plan) or the worker shim
RUN_ID = "DISTLAUNCH_RUN_ID"  # tags every process of a run: the leftover scan finds them by it
RUN_DIR = "DISTLAUNCH_RUN_DIR"  # where the rank keeps its log, exit record and metrics
OUTPUT_DIR = "DISTLAUNCH_OUTPUT_DIR"  # the run's outputs folder as this rank sees it
RESTART_COUNT = "DISTLAUNCH_RESTART_COUNT"  # 0 on the first attempt, K on the K-th restart (--max-restarts)
MASTER_ADDR = "DISTLAUNCH_MASTER_ADDR"  # rank 0's host, as the other ranks reach it
RANK = "DISTLAUNCH_RANK"  # set by the worker on the user's program only: marks a rank process
EXCEPTION_FILE = "DISTLAUNCH_EXCEPTION_FILE"  # where the bootstrap records an uncaught exception
DUMP_SIGNAL = "DISTLAUNCH_DUMP_SIGNAL"  # overrides the stack-dump signal
GPU_INVENTORY = "DISTLAUNCH_GPU_INVENTORY"  # a JSON device list instead of NVML
FORK_RANKS = "DISTLAUNCH_FORK_RANKS"  # "0": a worker starts a new interpreter for every rank, never forks
FULL_EXIT = "DISTLAUNCH_FULL_EXIT"  # "1": a rank that ended well leaves with the collector's last passes
# and the native libraries' exit handlers too
RELAY_METRICS = "DISTLAUNCH_RELAY_METRICS"  # "1": rank 0 is on another node; its worker relays its metrics live

# -- where ranks on other nodes keep their logs and records until they are collected
AGENT_DIR = ".distlaunch-run"

# -- a rank's files in its run folder (or AGENT_DIR): what the worker writes and the
# launcher reads (``records.RunPaths`` gives these same paths as ``pathlib.Path``)
LOGS, RANKS, METRICS = "logs", "ranks", "metrics"


def rank_log(run_dir: str | os.PathLike[str], rank: int) -> str:
    """Everything rank N printed."""
    return os.path.join(run_dir, LOGS, f"rank-{rank}.log")


def rank_record(run_dir: str | os.PathLike[str], rank: int) -> str:
    """How rank N started and ended (``records.RankExit`` as JSON)."""
    return os.path.join(run_dir, RANKS, f"rank-{rank}.json")


def rank_exception(run_dir: str | os.PathLike[str], rank: int) -> str:
    """The uncaught exception the bootstrap recorded for rank N."""
    return os.path.join(run_dir, RANKS, f"rank-{rank}.exception.json")


def rank_metrics(run_dir: str | os.PathLike[str], rank: int) -> str:
    """The metrics rank N logged, a JSON object a line."""
    return os.path.join(run_dir, METRICS, f"rank-{rank}.jsonl")


# -- a metrics line rank 0's worker relays from another node: ``[0] <METRIC_MARK><json>``;
# the launcher keeps it in the run folder's metrics as it comes, never on the console
METRIC_MARK = b"\x1edistlaunch-metric "

_RANK_LINE = re.compile(r"^\[ *(\d+)\] ?(.*)$", re.DOTALL)
_RANK_LINE_BYTES = re.compile(rb"^\[ *(\d+)\] ")


def metric_payload(line: bytes) -> bytes | None:
    """The JSON of a metrics line rank 0's worker relayed (``[0] <METRIC_MARK>{...}``);
    None for any other line (another rank's, whatever it prints)."""
    match = _RANK_LINE_BYTES.match(line)
    if match is None or match.group(1) != b"0" or not line.startswith(METRIC_MARK, match.end()):
        return None
    return line[match.end() + len(METRIC_MARK):]


# -- the line a rank's worker prints on stderr as its rank fails, where the launcher asks for
# it (FAILURE_NOTICE=1): ``[N] <RANK_FAILED_MARK>``; the launcher hears of the failure at
# once, from any node, and never shows the line (also when mpirun prefixes it, --tag-output)
FAILURE_NOTICE = "DISTLAUNCH_FAILURE_NOTICE"
RANK_FAILED_MARK = b"\x1edistlaunch-rank-failed"
_FAILED_LINE = re.compile(rb"\[ *(\d+)\] " + re.escape(RANK_FAILED_MARK) + rb"$")


def failed_rank(line: bytes) -> tuple[int, bytes] | None:
    """The rank a worker's failure line (``[N] <RANK_FAILED_MARK>``) names, and what came
    before it on the line; None for any other line."""
    match = _FAILED_LINE.search(line) if RANK_FAILED_MARK in line else None
    return (int(match.group(1)), line[:match.start()]) if match else None


def dump_signal() -> int:
    """The signal a Python rank answers by printing every thread's stack."""
    return int(os.environ.get(DUMP_SIGNAL, signal.SIGRTMIN + 4))


def rank_prefix(rank: int, size: int) -> bytes:
    """``[3] `` before each line of rank 3, padded so that the columns line up."""
    width = len(str(max(size - 1, 0)))
    return f"[{rank:>{width}}] ".encode()


def line_rank(line: bytes) -> int | None:
    """The rank a relayed output line came from; None for mpirun's own lines."""
    match = _RANK_LINE_BYTES.match(line)
    return int(match.group(1)) if match else None


def split_rank_line(line: str) -> tuple[int | None, str]:
    """``'[2] text'`` → ``(2, 'text')``; a line without a prefix → ``(None, line)``."""
    match = _RANK_LINE.match(line)
    if match is None:
        return None, line
    return int(match.group(1)), match.group(2)
