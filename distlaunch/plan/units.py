"""Parsing of durations (``90``, ``90s``, ``5m``, ``1h30m``) and sizes (``8B``, ``4KiB``, ``1MB``).

Bad text raises SpecError with a one-line explanation, never another exception type.
"""
from __future__ import annotations

import math
import re

from ..errors import SpecError

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?b?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
               "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds from ``90``, ``1.5s``, ``500ms``, ``5m``, ``1h30m``, ``2d``."""
    raw = text.strip()
    pos, total, parts = 0, 0.0, 0
    while pos < len(raw):
        match = _DURATION_PART.match(raw, pos)
        if match is None:
            break
        unit = match.group(2).lower() if match.group(2) else None
        total += float(match.group(1)) * _DURATION_UNITS[unit]
        pos, parts = match.end(), parts + 1
        while pos < len(raw) and raw[pos] == " ":
            pos += 1
    if not raw or pos != len(raw) or parts == 0 or not math.isfinite(total) or total <= 0:
        raise SpecError(f"{what} {text!r} is not a duration: write e.g. 90, 90s, 5m or 1h30m (more than 0)")
    return total


def parse_size(text: str, what: str = "size", allow_zero: bool = False) -> int:
    """Bytes from ``8``, ``8B``, ``4KiB``, ``1MB``, ``256MiB``, ``1.5GiB`` (and 0, in any
    unit, with ``allow_zero``)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise SpecError(f"{what} {text!r} is not a size: write e.g. 8B, 4KiB, 1MiB or 256MiB")
    value = float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]
    if allow_zero and value == 0:
        return 0
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise SpecError(f"{what} {text!r} must be a whole number of bytes, at least 1")
    return int(value)


def format_size(nbytes: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= factor and nbytes % factor == 0:
            return f"{nbytes // factor}{unit}"
    return f"{nbytes}B"


def human_size(nbytes: float) -> str:
    """``12345678`` → ``11.8 MiB``: for progress lines, not for parsing back."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= factor:
            return f"{nbytes / factor:.1f} {unit}"
    return f"{int(nbytes)} B"
