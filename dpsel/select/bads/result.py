"""What one sampler run returns (`SamplerResult`) and the coverage record of how every row got its weight."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplerResult:
    weight_mean: np.ndarray
    weight_std: np.ndarray
    diagnostics: dict[str, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    weights_model: object = None
    phi_samples: list[dict] = field(default_factory=list)
    visits: np.ndarray | None = None          # per row: minibatch visits after burn-in
    under_visited: np.ndarray | None = None   # rows whose weight is not yet backed by enough draws (caller decides)
    coverage: dict = field(default_factory=dict)
    alternatives: dict[str, np.ndarray] = field(default_factory=dict)  # other per-row estimates from this run


def coverage_summary(visits: np.ndarray, steps: int, burn_in: int, scored_by: dict[str, int]) -> dict:
    """What the manifest records about how every row got its weight."""
    return {"steps": int(steps), "burn_in_steps": int(burn_in),
            "visits_after_burn_in": {"min": int(visits.min()), "median": float(np.median(visits)),
                                     "max": int(visits.max())},
            "rows_never_visited_after_burn_in": int((visits == 0).sum()), "rows_scored_by": scored_by}
