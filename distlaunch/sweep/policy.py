"""How a sweep picks its trials and ends bad ones early: the sampler and the pruner by
name, as Optuna objects (imported only here, when a sweep runs).

Samplers: ``grid`` (every combination), ``random``, ``tpe`` (Bayesian, Optuna's TPE).
Early termination (``--early-stop``), each acting on the primary metric as rank 0 logs it:

    none             run every trial to its end
    median           stop a trial whose best value so far is worse than the median of
                     the finished trials at the same step (Optuna's MedianPruner)
    truncation:P     stop a trial in the worst P percent at its step (PercentilePruner)
    bandit:S         stop a trial more than S (a fraction, e.g. 0.1) worse than the best
                     value any other trial had at the same step
    hyperband        Optuna's HyperbandPruner (successive halving in brackets)
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError

SAMPLERS = ("grid", "random", "tpe")
EARLY_STOP = ("none", "median", "truncation", "bandit", "hyperband")


@dataclass(frozen=True)
class EarlyStop:
    """An early-termination policy: its kind, its one number (P or S), and when it may
    first act: after ``startup`` finished trials, from step ``warmup`` on."""

    kind: str = "none"
    amount: float | None = None
    startup: int = 2
    warmup: int = 1

    def __post_init__(self) -> None:
        if self.kind not in EARLY_STOP:
            raise SpecError(f"--early-stop {self.kind!r}: choose one of {', '.join(EARLY_STOP)} "
                            "(truncation:P and bandit:S take a number)")
        if self.kind == "truncation" and not (self.amount is not None and 0 < self.amount < 100):
            raise SpecError(f"--early-stop truncation:{self.amount}: the percentage must lie between 0 and 100")
        if self.kind == "bandit" and not (self.amount is not None and self.amount >= 0):
            raise SpecError(f"--early-stop bandit:{self.amount}: the slack must be a fraction of at least 0")
        if self.kind not in ("truncation", "bandit") and self.amount is not None:
            raise SpecError(f"--early-stop {self.kind} takes no number")
        if self.startup < 0 or self.warmup < 0:
            raise SpecError("--early-stop's startup trials and warm-up steps cannot be negative")

    def __str__(self) -> str:
        return self.kind if self.amount is None else f"{self.kind}:{self.amount:g}"


def parse_early_stop(text: str, startup: int = 2, warmup: int = 1) -> EarlyStop:
    """``median``, ``truncation:25``, ``bandit:0.1``, ..."""
    kind, colon, number = text.strip().partition(":")
    defaults = {"truncation": 25.0, "bandit": 0.1}
    amount: float | None = defaults.get(kind)
    if colon:
        try:
            amount = float(number)
        except ValueError:
            raise SpecError(f"--early-stop {text!r}: {number!r} is not a number") from None
    return EarlyStop(kind, amount, startup, warmup)


def make_sampler(name: str, grid: Mapping[str, Sequence[Any]] | None, seed: int | None) -> Any:
    import optuna

    if name == "grid":
        class Grid(optuna.samplers.GridSampler):
            """Optuna's grid, without its call to Study.stop once the grid is used up (that
            works inside study.optimize only; the sweep counts its trials itself)."""

            def after_trial(self, *args: Any) -> None:
                pass

        return Grid(dict(grid or {}), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        # constant liar: concurrent trials are not all sent to the same spot
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=4)
    raise SpecError(f"--sampler {name!r}: choose one of {', '.join(SAMPLERS)}")


def make_pruner(policy: EarlyStop) -> Any:
    import optuna

    if policy.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=policy.startup, n_warmup_steps=policy.warmup)
    if policy.kind == "truncation":
        assert policy.amount is not None
        # Optuna keeps the top P percent: truncation of the worst P keeps the best 100 - P
        return optuna.pruners.PercentilePruner(100.0 - policy.amount, n_startup_trials=policy.startup,
                                               n_warmup_steps=policy.warmup)
    if policy.kind == "bandit":
        assert policy.amount is not None
        return _bandit_pruner(policy)
    if policy.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, policy.warmup))
    return optuna.pruners.NopPruner()


def _bandit_pruner(policy: EarlyStop) -> Any:
    import optuna

    class BanditPruner(optuna.pruners.BasePruner):
        """Stop a trial whose value at a step is more than ``slack`` (relative) worse than
        the best value any other trial reported at that step."""

        def __init__(self, slack: float, startup: int, warmup: int) -> None:
            self.slack, self.startup, self.warmup = slack, startup, warmup

        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            step = trial.last_step
            if step is None or step < self.warmup:
                return False
            finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if len(finished) < self.startup:
                return False
            value = trial.intermediate_values[step]
            others = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False)
                      if t.number != trial.number and step in t.intermediate_values
                      and math.isfinite(t.intermediate_values[step])]
            if not others or not math.isfinite(value):
                return not math.isfinite(value)
            minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
            best = min(others) if minimize else max(others)
            allowed = abs(best) * self.slack
            return value > best + allowed if minimize else value < best - allowed

    return BanditPruner(float(policy.amount or 0.0), policy.startup, policy.warmup)
