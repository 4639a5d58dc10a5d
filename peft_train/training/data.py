"""The rows Trainer sees: encoded conversations with their loss weights (weight-0 rows and rows truncated down to
no response token left out), their collation, and a seeded length-grouped order."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from transformers.trainer_pt_utils import LengthGroupedSampler

from peft_train.encode import IGNORE_INDEX, EncodedExample, EncodedSet, collate


class WeightedRows(Dataset):
    def __init__(self, examples: Sequence[EncodedExample], weights: Sequence[float]):
        self.examples, self.weights = examples, weights

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        return self.examples[index], self.weights[index]


def collate_weighted(pad_token_id: int):
    """A data collator for ``WeightedRows``: ``encode.collate``'s batch plus the rows' ``weights``."""

    def collate_rows(rows):
        batch = collate([example for example, _ in rows], pad_token_id)
        batch["weights"] = torch.tensor([weight for _, weight in rows], dtype=torch.float32)
        return batch

    return collate_rows


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped order, drawn from a generator seeded with seed + epoch.

    A function of (seed, epoch) only, not of the global RNG, so that a run resumed mid-epoch skips into the very
    batches the uninterrupted run saw (Trainer calls ``set_epoch`` at the start of every epoch).
    """

    def __init__(self, batch_size: int, lengths: Sequence[int], seed: int):
        super().__init__(batch_size, lengths=list(lengths), generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + int(epoch))


def check_weights(weights: Sequence[float] | None, n_rows: int) -> list[float]:
    if weights is None:
        return [1.0] * n_rows
    values = [float(w) for w in weights]
    if len(values) != n_rows:
        raise ValueError(f"got {len(values)} weights for {n_rows} conversations")
    for index, value in enumerate(values):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weight of row {index} is {value}; weights must be finite and >= 0")
    return values


def has_response(example: EncodedExample) -> bool:
    # per_example_nll shifts by one: a label at position 0 is never predicted.
    return any(label != IGNORE_INDEX for label in example.labels[1:])


def trainable_rows(encoded: EncodedSet, weights: list[float]) -> tuple[list[EncodedExample], list[float], int]:
    """The examples with a positive weight and a response token, their weights, and how many were left out."""
    keep = [i for i, ex in enumerate(encoded.examples) if weights[i] > 0 and has_response(ex)]
    if not keep:
        raise ValueError("no row to train on: every row has weight 0 or no response token left after truncation")
    return [encoded.examples[i] for i in keep], [weights[i] for i in keep], len(encoded.examples) - len(keep)
