"""`rds`: representation similarity to the meta set (RDS+, Ivison et al. 2025, "Large-Scale Data Selection for
Instruction Tuning"): embed every row with the *base* model's last hidden states, position-weighted mean
pooled over the whole sequence (RDS+'s pooling: later tokens, which have seen more context, weigh more), and
score it by its highest cosine similarity to any meta row. No training, one forward pass per row.

Weight = rank of that similarity among the training rows, mapped to (0, 1): rows that look like nothing in the
trusted set (off-domain, boilerplate, another language) rank last. Unseen rows are placed on the saved
distribution of the training rows' similarities.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dpsel.models.forward import forward_rows
from dpsel.models.lm import LM_EXTRA_KEYS
from dpsel.select.base import Messages, ProgressFn, Scores, SelectConfig
from dpsel.select.scorers import SeenTableScorer

# the `SelectConfig.extra` settings rds reads: the LM's (its base model)
EXTRA_KEYS = frozenset({*LM_EXTRA_KEYS})


def embed_rows(lm, rows, batch_size: int = 64) -> np.ndarray:
    """[N, hidden] unit-norm RDS+ embeddings: position-weighted mean of the last hidden states of all tokens.
    A pool pass (`dpsel.models.passes.pool_pass`) computed by the batched forward (`dpsel.models.forward`)."""
    return forward_rows(lm.model, lambda chunk: rows.batch(chunk, lm.device), rows.lengths, _embedding,
                        batch_size=batch_size, output_hidden_states=True)


def _embedding(output, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = output.hidden_states[-1].float()
    mask = batch["attention_mask"].float()
    position_weight = mask.cumsum(1) * mask  # 1, 2, ... n over the real tokens, 0 on padding
    pooled = (hidden * position_weight[..., None]).sum(1) / position_weight.sum(1, keepdim=True).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=1)


def max_similarity(embeddings: np.ndarray, meta_embeddings: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Highest cosine similarity of each row to any meta row (both unit-norm)."""
    return np.concatenate([(embeddings[i:i + chunk] @ meta_embeddings.T).max(1)
                           for i in range(0, len(embeddings), chunk)]) if len(embeddings) else np.zeros(0)


def select_rds(train: list[Messages], meta: list[Messages], config: SelectConfig,
               progress: ProgressFn | None = None, groups=None) -> Scores:
    from dpsel.data import row_id
    from dpsel.models.lm import EncodedRows, build_lm, seed_all
    from dpsel.models.passes import pool_pass
    from dpsel.select.ranks import rank_normalise

    started = time.perf_counter()
    seed_all(config.seed)
    lm = build_lm(config)
    meta_emb = embed_rows(lm, EncodedRows(meta, lm.tokenizer, config.max_length, lm.pad_id))
    similarity = max_similarity(pool_pass(embed_rows, lm, train, config.max_length, stage="rds.embeddings"),
                                meta_emb)
    weights = rank_normalise(similarity)
    if progress:
        progress(1, 1, {"mean_similarity": float(similarity.mean())})
    scorer = RdsScorer([row_id(m) for m in train], weights, np.zeros(len(train)),
                       {"max_length": config.max_length, "seed": config.seed})
    scorer.attach(lm, meta_emb, np.sort(similarity))
    timings = {"seconds": time.perf_counter() - started}
    return Scores("rds", weights, np.zeros(len(train)), config.to_dict(),
                  {"similarity_quantiles": np.quantile(similarity, [0.1, 0.5, 0.9]).tolist()}, timings, scorer)


class RdsScorer(SeenTableScorer):
    """Unseen rows: their max similarity to the meta rows, placed on the training rows' similarity distribution."""
    kind = "rds"

    def attach(self, lm, meta_embeddings: np.ndarray, sorted_similarity: np.ndarray) -> None:
        self.lm, self.meta_embeddings, self.sorted_similarity = lm, meta_embeddings, sorted_similarity

    def _score_unseen(self, messages, ids):
        from dpsel.models.lm import EncodedRows
        rows = EncodedRows(messages, self.lm.tokenizer, int(self.info.get("max_length", 256)), self.lm.pad_id)
        similarity = max_similarity(embed_rows(self.lm, rows), self.meta_embeddings)
        ranks = np.searchsorted(self.sorted_similarity, similarity) / max(1, len(self.sorted_similarity))
        return np.clip(ranks, 0, 1), np.zeros(len(messages))

    def _save_model(self, directory: Path) -> None:
        from dpsel.models.lm import save_theta
        info = save_theta(self.lm, directory / "base")
        np.save(directory / "meta_embeddings.npy", self.meta_embeddings)
        np.save(directory / "similarity.npy", self.sorted_similarity)
        torch.save({"base": info}, directory / "rds.pt")

    def _load_model(self, directory: Path) -> None:
        from dpsel.models.lm import load_theta
        saved = torch.load(directory / "rds.pt", weights_only=True)
        self.attach(load_theta(directory / "base", saved["base"], device="cpu"),
                    np.load(directory / "meta_embeddings.npy"), np.load(directory / "similarity.npy"))
