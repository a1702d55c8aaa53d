"""What a sweep found: its trials as table rows, best first, and a plot of the metric by
trial (with the best so far) and against each parameter."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import SpecError
from .study import SweepSpec

_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}
_WORDS = {"COMPLETE": "completed", "PRUNED": "stopped early", "RUNNING": "running", "WAITING": "waiting",
          "FAIL": "failed"}


def state_word(trial: Any) -> str:
    if trial.state.name == "FAIL" and trial.user_attrs.get("interrupted"):
        return "interrupted"
    return _WORDS.get(trial.state.name, trial.state.name.lower())


def value_of(trial: Any) -> float | None:
    """The trial's metric: its final value, or the last value it reported."""
    if trial.value is not None:
        return float(trial.value)
    if trial.intermediate_values:
        return float(trial.intermediate_values[max(trial.intermediate_values)])
    return None


def rows(spec: SweepSpec, trials: Sequence[Any], exact: bool = False) -> list[dict[str, str]]:
    """One row per trial: completed ones best first, then those stopped early (by their
    last value), then the rest. Numbers rounded for a table, or ``exact`` (for JSON)."""
    sign = 1.0 if spec.goal == "minimize" else -1.0

    def key(trial: Any) -> tuple[int, float, int]:
        value = value_of(trial)
        order = _ORDER.get(trial.state.name, 5) + (1 if state_word(trial) == "interrupted" else 0)
        return order, sign * value if value is not None and math.isfinite(value) else math.inf, trial.number

    found = []
    for trial in sorted(trials, key=key):
        value = value_of(trial)
        row = {"trial": str(trial.number), "state": state_word(trial),
               spec.metric: "" if value is None else (repr(value) if exact else f"{value:.6g}"),
               "steps": str(trial.user_attrs.get("steps", len(trial.intermediate_values))),
               "run": trial.user_attrs.get("run_id", "")}
        for param in spec.space:
            value = trial.params.get(param.name)
            if value is None:
                row[param.name] = ""
            elif isinstance(value, float):
                row[param.name] = repr(value) if exact else f"{value:.4g}"
            else:
                row[param.name] = str(value)
        found.append(row)
    return found


def plot(spec: SweepSpec, trials: Sequence[Any], target: Path) -> Path:
    """Metric by trial number with the best so far, and the metric against each parameter."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpecError("the sweep plot needs matplotlib: pip install matplotlib, or pass --no-plot") from None
    points = [(t, value_of(t)) for t in trials]
    points = [(t, v) for t, v in points if v is not None and math.isfinite(v)]
    if not points:
        raise SpecError(f"sweep {spec.name} has no trial with a {spec.metric} yet: nothing to plot")
    panels = 1 + len(spec.space)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    ax = axes[0, 0]
    colors = {"completed": "tab:blue", "stopped early": "tab:orange"}
    for word, color in colors.items():
        chosen = [(t.number, v) for t, v in points if state_word(t) == word]
        ax.scatter([n for n, _v in chosen], [v for _n, v in chosen], color=color, label=word, s=18)
    best, line = None, []
    for trial, value in sorted(points, key=lambda p: p[0].number):
        if state_word(trial) == "completed":
            better = best is None or (value < best if spec.goal == "minimize" else value > best)
            best = value if better else best
        if best is not None:
            line.append((trial.number, best))
    if line:
        ax.step([n for n, _b in line], [b for _n, b in line], where="post", color="black", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(spec.metric)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    for ax, param in zip(axes[0, 1:], spec.space):
        chosen = [(t.params.get(param.name), v, state_word(t)) for t, v in points if param.name in t.params]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _v, _w in chosen)
        labels = sorted({str(x) for x, _v, _w in chosen})
        for word, color in colors.items():
            xs = [(x if numeric else labels.index(str(x))) for x, _v, w in chosen if w == word]
            ax.scatter(xs, [v for _x, v, w in chosen if w == word], color=color, s=18)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        if param.is_log:
            ax.set_xscale("log")
        ax.set_xlabel(param.name)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"sweep {spec.name}: {spec.goal} {spec.metric}")
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=80)
    plt.close(fig)
    return target
