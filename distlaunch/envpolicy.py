"""What of the environment reaches the ranks, and how it is written down.

Values of secret-looking names (TOKEN, KEY, SECRET, PASSWORD, ...) are never written
to run records or printed: ``redact`` replaces them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)
REDACTED = "<redacted>"


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def redact(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` with the values of secret-looking names hidden."""
    return {name: (REDACTED if is_secret(name) else value) for name, value in env.items()}
