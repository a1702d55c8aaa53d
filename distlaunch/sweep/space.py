"""A sweep's search space: parameters written as ``lr=loguniform(1e-4, 1e-1)`` (or the
same as a mapping in a sweep file), each able to ask an Optuna trial for its value and,
when it has finitely many values, to list them for grid sampling. Pure; no Optuna import.

    choice(16, 32, 64)          one of these values (numbers or words)
    uniform(0.0, 1.0)           a float in [low, high]
    loguniform(1e-5, 1e-1)      a float in [low, high], uniform in its logarithm
    quniform(0, 1, 0.25)        low, low+q, ... high (integers when all three are)
    randint(1, 8)               an integer in [low, high], both included
"""
from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError

KINDS = ("choice", "uniform", "loguniform", "quniform", "randint")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_EXPR = re.compile(r"^\s*([a-z]+)\s*\((.*)\)\s*$", re.S)
Value = Any  # int | float | str | bool


@dataclass(frozen=True)
class Param:
    """One parameter of the space: ``kind`` and its arguments (see the module doc)."""

    name: str
    kind: str
    args: tuple[Value, ...]

    def __post_init__(self) -> None:
        where = f"parameter {self.name} = {self}"
        if not _NAME.match(self.name):
            raise SpecError(f"parameter name {self.name!r}: use letters, digits, '_', '.', '-' (it becomes "
                            f"--{self.name} on the script's command line)")
        if self.kind not in KINDS:
            raise SpecError(f"{where}: unknown kind {self.kind!r}; the kinds are {', '.join(KINDS)}")
        if self.kind == "choice":
            if not self.args:
                raise SpecError(f"{where}: choice needs at least one value")
            if len(set(map(repr, self.args))) != len(self.args):
                raise SpecError(f"{where}: a value is listed twice")
            if not all(isinstance(v, (int, float, str, bool)) for v in self.args):
                raise SpecError(f"{where}: choice takes numbers, words or true/false")
            return
        count = 3 if self.kind == "quniform" else 2
        if len(self.args) != count or not all(_number(v) for v in self.args):
            shape = "low, high, q" if count == 3 else "low, high"
            raise SpecError(f"{where}: {self.kind} takes {shape} (numbers)")
        low, high = self.args[0], self.args[1]
        if not low < high:
            raise SpecError(f"{where}: low must be less than high")
        if self.kind == "loguniform" and low <= 0:
            raise SpecError(f"{where}: loguniform needs low > 0")
        if self.kind == "randint" and not all(isinstance(v, int) for v in self.args):
            raise SpecError(f"{where}: randint takes whole numbers")
        if self.kind == "quniform":
            q = self.args[2]
            steps = (high - low) / q if q > 0 else -1
            if q <= 0 or abs(steps - round(steps)) > 1e-9 * max(1.0, steps):
                raise SpecError(f"{where}: q must be positive and divide high - low")

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(map(repr, self.args))})"

    @property
    def is_log(self) -> bool:
        return self.kind == "loguniform"

    def values(self) -> list[Value] | None:
        """Every value the parameter can take, or None when there are infinitely many."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "randint":
            return list(range(self.args[0], self.args[1] + 1))
        if self.kind == "quniform":
            low, high, q = self.args
            count = round((high - low) / q) + 1
            if all(isinstance(v, int) for v in self.args):
                return [low + i * q for i in range(count)]
            return [round(low + i * q, 12) for i in range(count)]
        return None

    def suggest(self, trial: Any) -> Value:
        """Ask an Optuna trial for this parameter's value."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.args))
        if self.kind == "randint":
            return trial.suggest_int(self.name, self.args[0], self.args[1])
        if self.kind == "quniform":
            low, high, q = self.args
            if all(isinstance(v, int) for v in self.args):
                return trial.suggest_int(self.name, low, high, step=q)
            return trial.suggest_float(self.name, float(low), float(high), step=float(q))
        return trial.suggest_float(self.name, float(self.args[0]), float(self.args[1]), log=self.is_log)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _literal(text: str, where: str) -> Value:
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if re.fullmatch(r"[A-Za-z0-9_.+/:-]+", text):
            return text  # a bare word: choice(adam, sgd)
        raise SpecError(f"{where}: {text!r} is not a number or a word: quote it") from None
    if not isinstance(value, (int, float, str, bool)):
        raise SpecError(f"{where}: {text!r} is not a number or a word")
    return value


def parse_expression(name: str, text: str) -> Param:
    """``loguniform(1e-4, 1e-1)`` for parameter ``name``."""
    where = f"parameter {name} = {text!r}"
    match = _EXPR.match(text)
    if match is None:
        raise SpecError(f"{where}: write KIND(ARGS), e.g. loguniform(1e-4, 1e-1) or choice(16, 32); "
                        f"the kinds are {', '.join(KINDS)}")
    kind, inner = match.groups()
    args = tuple(_literal(part, where) for part in _split(inner)) if inner.strip() else ()
    return Param(name, kind, args)


def _split(text: str) -> list[str]:
    """Split on commas outside quotes."""
    parts, current, quote = [], "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == ",":
            parts.append(current)
            current = ""
            continue
        current += char
    return [*parts, current]


def parse_item(item: str) -> Param:
    """``NAME=KIND(ARGS)`` as given to --param."""
    name, eq, text = item.partition("=")
    if not eq or not name.strip():
        raise SpecError(f"--param {item!r}: write NAME=KIND(ARGS), e.g. lr=loguniform(1e-4,1e-1)")
    return parse_expression(name.strip(), text)


def parse_space(space: Mapping[str, Any] | Sequence[str]) -> tuple[Param, ...]:
    """A space from --param items, or from a mapping: name → ``"KIND(ARGS)"``, a list (a
    choice), or ``{kind: ..., args: [...]}`` / ``{kind: ..., low: .., high: .., q: ..}``."""
    if isinstance(space, Mapping):
        params = []
        for name, value in space.items():
            name = str(name)
            if isinstance(value, str):
                params.append(parse_expression(name, value))
            elif isinstance(value, (list, tuple)):
                params.append(Param(name, "choice", tuple(value)))
            elif isinstance(value, Mapping) and "kind" in value:
                args = value.get("args")
                if args is None:
                    args = [value[key] for key in ("low", "high", "q") if key in value]
                params.append(Param(name, str(value["kind"]), tuple(args)))
            else:
                raise SpecError(f"parameter {name}: write it as \"KIND(ARGS)\", a list of choices, or "
                                "{kind: ..., low: ..., high: ...}")
    else:
        params = [parse_item(item) for item in space]
    if not params:
        raise SpecError("the search space is empty: give at least one --param NAME=KIND(ARGS)")
    names = [p.name for p in params]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SpecError(f"parameter {twice[0]} is given twice: give each parameter once")
    return tuple(params)


def grid(params: Sequence[Param]) -> dict[str, list[Value]]:
    """The grid of a space whose parameters all have finitely many values."""
    found: dict[str, list[Value]] = {}
    for param in params:
        values = param.values()
        if values is None:
            raise SpecError(f"grid sampling needs every parameter to have finitely many values, and {param.name} "
                            f"is {param}: use choice(...), quniform(...) or randint(...), or --sampler random|tpe")
        found[param.name] = values
    return found


def as_args(params: Mapping[str, Value]) -> tuple[str, ...]:
    """The script's arguments for a trial's values: ``--lr 0.01 --batch 32``."""
    return tuple(word for name, value in params.items() for word in (f"--{name}", _text(value)))


def _text(value: Value) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)
