"""`loss` and `ifd`: scores from a reference model fitted to the meta set alone (early-stopped).

`loss`: rows the meta-fitted reference finds easy are kept: weight = 1 − (rank of the row's response NLL within
its group), so tasks with inherently longer or harder answers are not dropped wholesale (per-task normalisation
when groups are given; one group otherwise).

`ifd` (Li et al. 2023, "From Quantity to Quality"): IFD = ℓ(answer | prompt) / ℓ(answer alone). The paper keeps
rows with *high* IFD (the prompt helps the model little, so the row teaches something) but discards IFD > 1 (the
prompt does not help at all: answer and prompt do not belong together). We follow it: weight = rank of IFD
among rows with IFD ≤ 1, scaled to (0, 1]; rows with IFD > 1 get weight 0.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dpsel.models.lm import LM_EXTRA_KEYS
from dpsel.models.reference_fit import REFERENCE_EXTRA_KEYS
from dpsel.select.base import Messages, ProgressFn, Scores, SelectConfig
from dpsel.select.scorers import SeenTableScorer

# the `SelectConfig.extra` settings loss and ifd read: the LM's and the reference fit's
EXTRA_KEYS = frozenset({*LM_EXTRA_KEYS, *REFERENCE_EXTRA_KEYS})


def loss_weights(nll: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    from dpsel.select.ranks import rank_normalise
    return 1.0 - rank_normalise(nll, groups)


def ifd_weights(ifd: np.ndarray) -> np.ndarray:
    from dpsel.select.ranks import rank_normalise
    out = np.zeros(len(ifd))
    ok = ifd <= 1.0
    if ok.any():
        out[ok] = rank_normalise(ifd[ok])
    return out


def pool_nll(lm, messages: list[Messages], max_length: int, stage: str | None = None) -> np.ndarray:
    """The reference's NLL of every row, on the current executor (Ray actors under `curate --engine ray`);
    `stage`: resumable by chunk in a checkpointed run (`dpsel.models.passes.pool_pass`)."""
    from dpsel.models.lm import score_nll
    from dpsel.models.passes import pool_pass
    return pool_pass(score_nll, lm, messages, max_length, stage=stage)


def _ifd(lm, messages: list[Messages], max_length: int, stage: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    from dpsel.models.lm import response_only_rows
    conditional = pool_nll(lm, messages, max_length, stage and f"{stage}.nll")
    unconditional = pool_nll(lm, response_only_rows(messages), max_length, stage and f"{stage}.nll_response_only")
    return conditional / np.maximum(unconditional, 1e-6), conditional


def _select_reference(method: str, train, meta, config: SelectConfig, progress, groups) -> Scores:
    from dpsel.data import row_id
    from dpsel.select.bads import infer_groups
    from dpsel.models.lm import EncodedRows, build_lm, seed_all
    from dpsel.models.reference_fit import fit_reference

    started = time.perf_counter()
    seed_all(config.seed)
    lm = build_lm(config)
    meta_rows = EncodedRows(meta, lm.tokenizer, config.max_length, lm.pad_id)
    ref = fit_reference(lm, meta_rows, config, progress)
    if method == "loss":
        values = pool_nll(lm, train, config.max_length, stage="loss.nll")
        weights = loss_weights(values, infer_groups(train, groups) if groups is not None else None)
    else:
        values, _ = _ifd(lm, train, config.max_length, stage="ifd")
        weights = ifd_weights(values)
    scorer = ReferenceScorer([row_id(m) for m in train], weights, np.zeros(len(train)),
                             {"method": method, "max_length": config.max_length, "seed": config.seed})
    scorer.attach(lm, np.sort(values))
    timings = {"seconds": time.perf_counter() - started, "reference_seconds": ref.seconds,
               "reference_steps": ref.steps, "reference_best_step": ref.best_step}
    diagnostics = {"reference_heldout_loss": [v for _, v in ref.trace],
                   "step": [float(s) for s, _ in ref.trace]}
    return Scores(method, weights, np.zeros(len(train)), config.to_dict(), diagnostics, timings, scorer)


def select_loss(train, meta, config: SelectConfig, progress: ProgressFn | None = None, groups=None) -> Scores:
    return _select_reference("loss", train, meta, config, progress, groups)


def select_ifd(train, meta, config: SelectConfig, progress: ProgressFn | None = None, groups=None) -> Scores:
    return _select_reference("ifd", train, meta, config, progress, groups)


class ReferenceScorer(SeenTableScorer):
    """Unseen rows: the reference's NLL (or IFD) placed on the empirical distribution of the training rows'."""
    kind = "loss"

    def attach(self, lm, sorted_values: np.ndarray) -> None:
        self.lm, self.sorted_values = lm, np.asarray(sorted_values)
        self.kind = self.info.get("method", "loss")

    def _score_unseen(self, messages, ids):
        from dpsel.models.lm import EncodedRows, score_nll
        max_length = int(self.info.get("max_length", 256))
        if self.kind == "ifd":
            values, _ = _ifd(self.lm, messages, max_length)
            below = values <= 1.0
            ranks = np.searchsorted(self.sorted_values[self.sorted_values <= 1.0], values) / max(
                1, int((self.sorted_values <= 1.0).sum()))
            return np.where(below, np.clip(ranks, 0, 1), 0.0), np.zeros(len(values))
        values = score_nll(self.lm, EncodedRows(messages, self.lm.tokenizer, max_length, self.lm.pad_id))
        cdf = np.searchsorted(self.sorted_values, values) / max(1, len(self.sorted_values))
        return np.clip(1.0 - cdf, 0, 1), np.zeros(len(values))

    def _save_model(self, directory: Path) -> None:
        from dpsel.models.lm import save_theta
        info = save_theta(self.lm, directory / "reference")
        np.save(directory / "reference_values.npy", self.sorted_values)
        torch.save({"reference": info}, directory / "reference.pt")

    def _load_model(self, directory: Path) -> None:
        from dpsel.models.lm import load_theta
        saved = torch.load(directory / "reference.pt", weights_only=True)
        self.attach(load_theta(directory / "reference", saved["reference"], device="cpu"),
                    np.load(directory / "reference_values.npy"))
