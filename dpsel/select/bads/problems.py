"""What the sampler needs from a model (`SelectionProblem`: θ, per-row losses, groups, batch order) and the
LM case; swapping the problem (a logistic regression in the tests) changes nothing else."""
from __future__ import annotations

import numpy as np
import torch

from dpsel.select.base import Messages


class SelectionProblem:
    """What the sampler needs from a model: θ, per-row losses on index batches, groups, batch order."""
    n_train: int
    n_meta: int
    groups: np.ndarray  # [n_train] int group id (per-task normalisation); all zeros if unknown

    def theta(self) -> list[torch.nn.Parameter]: ...

    def losses(self, train_idx: np.ndarray, meta_idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...

    def train_batches(self, batch_size: int, seed: int) -> list:
        """One pass's minibatches (index arrays: views of one permutation, 8 bytes a row)."""
        order = np.random.default_rng(seed).permutation(self.n_train)
        return [order[i:i + batch_size] for i in range(0, self.n_train, batch_size)]

    def plain_step_loss(self, train_idx: np.ndarray) -> torch.Tensor:
        return self.losses(train_idx, np.zeros(0, dtype=int))[0].mean()

    def all_losses(self) -> torch.Tensor:
        """Loss of every train row under the current θ (no grad); the posterior pass calls it once per θ draw."""
        return losses_in_batches(self)


@torch.no_grad()
def losses_in_batches(problem, batch_size: int = 256) -> torch.Tensor:
    none = np.zeros(0, dtype=int)
    return torch.cat([problem.losses(np.arange(i, min(i + batch_size, problem.n_train)), none)[0].float().cpu()
                      for i in range(0, problem.n_train, batch_size)])


class LMProblem(SelectionProblem):
    """Train and meta rows under an LM whose trainable parameters are θ; one forward over both batches."""

    def __init__(self, lm, train_rows, meta_rows, groups: np.ndarray):
        self.lm, self.train_rows, self.meta_rows = lm, train_rows, meta_rows
        self.n_train, self.n_meta = len(train_rows), len(meta_rows)
        self.groups = groups

    def theta(self):
        return self.lm.theta()

    def losses(self, train_idx, meta_idx):
        from dpsel.models.lm import batch_nll
        # Two forwards, each padded to its own longest row: train batches are length-grouped, meta rows are not,
        # and one joint batch would pad the train rows to the longest meta row.
        train_nll = batch_nll(self.lm.model, self.train_rows.batch(train_idx, self.lm.device))
        if len(meta_idx) == 0:
            return train_nll, train_nll.new_zeros(0)
        return train_nll, batch_nll(self.lm.model, self.meta_rows.batch(meta_idx, self.lm.device))

    def train_batches(self, batch_size, seed):
        from peft_train.encode import length_grouped_batches
        return length_grouped_batches(self.train_rows.lengths.tolist(), batch_size, seed)

    def all_losses(self):
        from dpsel.models.lm import score_nll
        return torch.as_tensor(score_nll(self.lm, self.train_rows), dtype=torch.float32)


def infer_groups(messages: list[Messages], groups) -> np.ndarray:
    """Integer group per row: the given labels (e.g. a `task` column), else one group."""
    if groups is None:
        return np.zeros(len(messages), dtype=int)
    _, codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return codes.astype(int)
