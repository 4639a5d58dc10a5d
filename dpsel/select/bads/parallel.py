"""Data-parallel `bads` under torchrun / accelerate launch, on `dpsel.parallel.collectives.DataParallel`.

Each rank owns a contiguous shard of the training rows and the weights (logits u_i) of those rows only: w is
row-sparse, so it is never communicated. θ is shared: every step each rank back-propagates its shard's
minibatch, the θ gradients are summed over ranks (all-reduce), every rank takes the same preconditioned step
and θ is then broadcast from rank 0, so the SGLD noise (drawn per rank) is rank 0's and θ stays identical
everywhere. The posterior summaries (and visits) are gathered back into input order, so rank 0 writes one
`scores.parquet` with every row exactly once.

Why the sum is the single-process gradient: with global batch B over N rows, a rank holds N/W rows and draws
B/W of them, so its train term carries the same N/B scale; the θ prior and the meta term are the same on every
rank, so each rank counts them 1/W times (`rank_objective`). Summed over ranks that is the gradient of one
B-row minibatch (plus W independent meta minibatches averaged). Single-process runs call none of this.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from dpsel.select.bads.result import SamplerResult, coverage_summary


def rank_objective(terms: dict[str, torch.Tensor], total: torch.Tensor, world: int) -> torch.Tensor:
    """This rank's share of the log joint: the terms every rank computes alike count 1/W each."""
    shared = terms["log_prior_theta"] + terms["log_meta"]
    return total - (1.0 - 1.0 / world) * shared


def subset_rows(rows, idx: np.ndarray):
    """An EncodedRows holding only `idx` (a rank's shard), same encoding."""
    part = copy.copy(rows)
    part.examples = [rows.examples[i] for i in idx]
    part.lengths = rows.lengths[idx]
    part.has_response = rows.has_response[idx]
    return part


# -- the whole pool ----------------------------------------------------------------------------------------

class PoolLosses:
    """A rank's selection problem seen as the whole pool's, for the posterior pass: `all_losses()` (θ is the
    same on every rank) scores this rank's shard and gathers every rank's, in input order."""

    def __init__(self, problem, data_parallel):
        self.problem, self.data_parallel = problem, data_parallel
        self.n_train = int(data_parallel.gather_rows(np.array([problem.n_train])).sum())

    def all_losses(self) -> torch.Tensor:
        return torch.as_tensor(self.data_parallel.gather_rows(self.problem.all_losses().numpy()))


def whole_pool(data_parallel, problem, *per_row: torch.Tensor) -> tuple:
    """The posterior pass's inputs over the whole pool, not this rank's shard: the pass standardises each
    row's loss by its group's mean and std and ranks it within its group, and those are statistics of the
    pool — per shard they would score a row against its shard's neighbours only. Returns a problem whose
    `all_losses()` gathers every rank's losses (in input order), then each per-row tensor gathered."""
    return (PoolLosses(problem, data_parallel), *(data_parallel.gather_tensor(t) for t in per_row))


# -- results -------------------------------------------------------------------------------------------------

def gather_result(data_parallel, result: SamplerResult) -> SamplerResult:
    """A rank's SamplerResult over its shard -> the same over all rows (every row exactly once)."""
    dp = data_parallel
    gathered = {name: dp.gather_rows(getattr(result, name))
                for name in ("weight_mean", "weight_std", "visits", "under_visited")}
    alternatives = {k: dp.gather_rows(v) for k, v in result.alternatives.items()}
    parts = dp.gather_objects(result.coverage["rows_scored_by"])
    scored_by = {k: sum(p.get(k, 0) for p in parts) for k in parts[0]}
    coverage = coverage_summary(gathered["visits"], result.coverage["steps"],
                                result.coverage["burn_in_steps"], scored_by)
    n = len(gathered["visits"])
    coverage["data_parallel"] = {"processes": dp.world,
                                 "rows_per_process": [len(part) for part in np.array_split(np.arange(n), dp.world)]}
    timings = dict(result.timings, processes=dp.world)
    return dataclasses.replace(result, **gathered, alternatives=alternatives, coverage=coverage, timings=timings)
