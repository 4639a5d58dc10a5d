"""The trivial baselines: `all` (keep everything, weight 1) and `random` (a seeded uniform per row)."""
from __future__ import annotations

import time

import numpy as np

from dpsel.data import row_id
from dpsel.select.base import Messages, ProgressFn, Scores, SelectConfig
from dpsel.select.scorers import ConstantScorer, RandomScorer, hashed_uniform

EXTRA_KEYS: frozenset = frozenset()   # random and all read no `SelectConfig.extra` setting


def select_all(train: list[Messages], meta: list[Messages], config: SelectConfig,
               progress: ProgressFn | None = None, groups=None) -> Scores:
    start = time.perf_counter()
    ids = [row_id(m) for m in train]
    mean, std = np.ones(len(train)), np.zeros(len(train))
    scorer = ConstantScorer(ids, mean, std, {"seed": config.seed})
    return Scores("all", mean, std, config.to_dict(), timings={"seconds": time.perf_counter() - start},
                  scorer=scorer)


def select_random(train: list[Messages], meta: list[Messages], config: SelectConfig,
                  progress: ProgressFn | None = None, groups=None) -> Scores:
    start = time.perf_counter()
    ids = [row_id(m) for m in train]
    # Hash of (seed, id): the same row gets the same score in the run and later through the scorer.
    mean, std = hashed_uniform(ids, config.seed), np.zeros(len(train))
    scorer = RandomScorer(ids, mean, std, {"seed": config.seed})
    return Scores("random", mean, std, config.to_dict(), timings={"seconds": time.perf_counter() - start},
                  scorer=scorer)
