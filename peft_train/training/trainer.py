"""``WeightedTrainer``: transformers' ``Trainer`` with the per-row weighted response-only loss.

Each optimizer step's loss is Σ w_i ℓ_i / Σ w_i over its rows (every micro-batch of the accumulation, every
rank), ℓ_i the row's mean response-token NLL. Trainer already counts "items" over a step's micro-batches and
ranks and hands the count to ``compute_loss`` as ``num_items_in_batch``; here the items are the rows' weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Trainer

from peft_train.encode import per_example_nll
from peft_train.memory import MemoryMeter
from peft_train.training.data import SeededLengthGroupedSampler


def weighted_loss(
    per_row_nll: torch.Tensor, weights: torch.Tensor | None = None, total_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ w_i ℓ_i / Σ w_i over the batch; the plain mean when ``weights`` is None.

    ``total_weight`` replaces the denominator: Σ w over every micro-batch (and rank) of one optimizer step, so
    the micro-batches' losses add up to the step's weighted mean.

    Rows with w = 0 are masked out before the product, so even a non-finite ℓ_i of such a row cannot leak
    into the loss or its gradient; a batch whose weights sum to 0 gives a loss of 0 (and zero gradients).
    """
    if weights is None:
        return per_row_nll.mean()
    weights = weights.to(device=per_row_nll.device, dtype=per_row_nll.dtype)
    if weights.shape != per_row_nll.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} != per-row loss shape {tuple(per_row_nll.shape)}")
    active = weights > 0
    contributions = torch.where(active, per_row_nll, torch.zeros_like(per_row_nll)) * weights
    denominator = weights.sum() if total_weight is None else total_weight.to(weights)
    return contributions.sum() / denominator.clamp_min(torch.finfo(weights.dtype).tiny)


class WeightedTrainer(Trainer):
    """``Trainer`` with the weighted loss, a seed+epoch length-grouped order and the memory meter's hooks."""

    loss_is_scaled_for_ga = True  # compute_loss divides by Σ w of the whole optimizer step

    def __init__(self, *args, lengths: Sequence[int], meter: MemoryMeter, **kwargs):
        super().__init__(*args, **kwargs)
        self.lengths, self.meter = lengths, meter

    def _get_train_sampler(self, train_dataset=None):
        # grouped by the rows of one optimizer step, so N processes × batch B order rows as one process × B × N
        step_rows = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return SeededLengthGroupedSampler(step_rows, self.lengths, self.args.seed)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """Σ w over the step's micro-batches and, under DDP, over every rank: the step's loss denominator."""
        total = sum((batch["weights"].sum() for batch in batch_samples), torch.zeros(())).to(device)
        if self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights, labels = inputs.pop("weights"), inputs.pop("labels")
        with self.meter.saving_activations():
            outputs = model(**inputs, use_cache=False)
            per_row = per_example_nll(outputs.logits, labels)
            if num_items_in_batch is None:  # evaluation: the batch's own (weighted) mean
                loss = weighted_loss(per_row, weights)
            else:  # × ranks: DDP's gradient mean over ranks then gives Σ_all w ℓ / Σ_all w
                loss = weighted_loss(per_row, weights, num_items_in_batch) * self.accelerator.num_processes
        self.meter.end_step()
        return (loss, outputs) if return_outputs else loss
