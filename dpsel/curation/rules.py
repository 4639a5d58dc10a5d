"""Selection rules: which usable rows to keep given their weights — the top `budget` fraction, or weight >=
`threshold`, optionally per group — and the effective thresholds a finished selection implies."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from dpsel.errors import DpselInputError

DEFAULT_BUDGET = 0.7


@dataclass
class SelectionRule:
    """How rows are kept: the top `budget` fraction, or weight >= `threshold`, optionally per group.

    `group_budgets` maps group value -> fraction; `per_group` applies `budget` inside every group.
    `group_thresholds` (filter only) maps group value -> threshold, `threshold` being the fallback.
    """
    budget: float | None = None
    threshold: float | None = None
    group_column: str | None = None
    group_budgets: dict[str, float] = field(default_factory=dict)
    per_group: bool = False
    group_thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if self.threshold is not None:
            return "group_threshold" if self.group_thresholds else "threshold"
        return "group_budget" if (self.group_budgets or self.per_group) else "budget"

    def to_dict(self) -> dict:
        return {"rule": self.kind, "budget": self.budget, "threshold": self.threshold,
                "group_column": self.group_column if self.uses_groups else None,
                "group_budgets": dict(self.group_budgets), "per_group": self.per_group,
                "group_thresholds": dict(self.group_thresholds)}

    @property
    def uses_groups(self) -> bool:
        return bool(self.group_budgets or self.per_group or self.group_thresholds)


def _check_fraction(value: float, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise DpselInputError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= value <= 1.0):
        raise DpselInputError(f"{what} must be in [0, 1], got {value}")
    return value


def make_rule(method: str, budget: float | None, threshold: float | None,
              task_budgets: dict[str, float] | None, per_group: bool, group_column: str) -> SelectionRule:
    """Validate the user's selection options and fill in the defaults (budget 0.7; `all` keeps all)."""
    if budget is not None and threshold is not None:
        raise DpselInputError("give either --budget or --threshold, not both")
    if threshold is not None and (task_budgets or per_group):
        raise DpselInputError("per-group budgets cannot be combined with --threshold")
    if threshold is not None:  # weights are in [0, 1]: any other threshold keeps all or nothing
        return SelectionRule(threshold=_check_fraction(threshold, "--threshold"))
    if budget is None:
        budget = 1.0 if method == "all" else DEFAULT_BUDGET
    budget = _check_fraction(budget, "--budget")
    groups = {str(k): _check_fraction(v, f"budget for {group_column} {k!r}") for k, v in (task_budgets or {}).items()}
    return SelectionRule(budget=budget, group_column=group_column, group_budgets=groups, per_group=per_group)


def budget_count(fraction: float, n: int) -> int:
    """Rows a fraction of n keeps: round half up, so 0.7 of 5 keeps 4 and 0.5 of 3 keeps 2."""
    return min(n, max(0, math.floor(fraction * n + 0.5)))


def top_fraction(weights: np.ndarray, candidates: np.ndarray, fraction: float) -> np.ndarray:
    """Indices (into `weights`) of the top `fraction` of `candidates` by weight; ties go to the earlier row."""
    k = budget_count(fraction, len(candidates))
    # A stable sort on -weight keeps input order among equal weights: deterministic tie-breaking.
    order = np.argsort(-weights[candidates], kind="stable")
    return candidates[order[:k]]


def apply_rule(rule: SelectionRule, weights: np.ndarray, usable: np.ndarray,
               groups: np.ndarray | None = None) -> np.ndarray:
    """Boolean keep-mask over all rows; only `usable` rows can be kept."""
    keep = np.zeros(len(weights), dtype=bool)
    candidates = np.flatnonzero(usable)
    if rule.threshold is not None:
        row_threshold = np.full(len(weights), rule.threshold)
        if rule.group_thresholds and groups is not None:
            for value, limit in rule.group_thresholds.items():
                row_threshold[groups == value] = limit
        keep[candidates] = weights[candidates] >= row_threshold[candidates]
        return keep
    if not rule.uses_groups:
        keep[top_fraction(weights, candidates, rule.budget)] = True
        return keep
    if groups is None:
        raise DpselInputError("per-group budgets need a group column", column=rule.group_column)
    present = set(groups[candidates].tolist())
    unknown = sorted(set(rule.group_budgets) - set(groups.tolist()))
    if unknown:
        raise DpselInputError(f"budget given for unknown {rule.group_column} value(s) {unknown}; "
                              f"present: {sorted(present)}", column=rule.group_column)
    for value in sorted(present):
        in_group = candidates[groups[candidates] == value]
        fraction = rule.group_budgets.get(value, rule.budget)
        keep[top_fraction(weights, in_group, fraction)] = True
    return keep


def effective_thresholds(weights: np.ndarray, keep: np.ndarray,
                         groups: np.ndarray | None) -> tuple[float | None, dict[str, float]]:
    """The lowest kept weight overall and per group: the threshold that reproduces this selection on
    the same rows (up to ties), stored with the scorer as `filter`'s default."""
    if not keep.any():
        return None, {}
    overall = float(weights[keep].min())
    per_group = {}
    if groups is not None:
        for value in sorted(set(groups[keep].tolist())):
            per_group[value] = float(weights[keep & (groups == value)].min())
    return overall, per_group
