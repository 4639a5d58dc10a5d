"""Scores to weights by rank: the rank-based methods (loss, ifd, rds) and the group-consistency evidence map a
score to its rank within its group, so scales that differ between tasks do not matter."""
from __future__ import annotations

import numpy as np


def rank_normalise(values: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Ranks mapped to (0, 1) within each group (all rows one group when `groups` is None)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.empty_like(values)
    groups = np.zeros(len(values), dtype=int) if groups is None else np.asarray(groups)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        ranks = np.argsort(np.argsort(values[idx], kind="stable"), kind="stable")
        out[idx] = (ranks + 0.5) / len(idx)
    return out
