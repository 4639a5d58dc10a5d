"""θ in the sentence embedder's space (issue 18): a linear map from question embedding to answer embedding.

The built-in byte LM is random-init and knows no language, so its losses on real text are noise that dilutes the
prior's evidence. Here θ = (W, b) maps a row's normalised question embedding q to a predicted answer direction, and
a row's loss is ℓ_i = (1 − cos(W q_i + b, a_i)) / τ. The BADS model is unchanged (`model.log_joint`): the
w-weighted pool is the prior on θ, the meta rows its likelihood; with a clean majority the weighted fit learns what
answers to such questions look like, and swapped, refused, truncated or off-topic answers keep a high loss, hence a
low weight. θ₀ is a ridge fit (closed form) on the meta rows plus the pool.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from dpsel.select.bads.problems import SelectionProblem


def ridge_map(q: np.ndarray, a: np.ndarray, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [d, d], b [d]) minimising ‖q W + b − a‖² + α‖W‖² (sklearn's Ridge, intercept unpenalised)."""
    from sklearn.linear_model import Ridge
    fit = Ridge(alpha=alpha).fit(q, a)
    return (torch.as_tensor(fit.coef_.T, dtype=torch.float32).contiguous(),
            torch.as_tensor(fit.intercept_, dtype=torch.float32))


def map_distance(q: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """1 − cos(q W + b, a) per row: 0 where the answer sits where the map expects it, up to 2."""
    return 1.0 - (F.normalize(q @ weight + bias, dim=1) * a).sum(1)


class EmbeddingProblem(SelectionProblem):
    """Rows as (question, answer) embeddings; θ = (W, b); per-row loss the scaled map distance."""

    def __init__(self, q: np.ndarray, a: np.ndarray, q_meta: np.ndarray, a_meta: np.ndarray, groups: np.ndarray,
                 theta0: tuple[torch.Tensor, torch.Tensor], scale: float):
        as_t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
        self.q, self.a, self.q_meta, self.a_meta = as_t(q), as_t(a), as_t(q_meta), as_t(a_meta)
        self.n_train, self.n_meta = len(self.q), len(self.q_meta)
        self.groups = groups
        self.weight = torch.nn.Parameter(theta0[0].clone())
        self.bias = torch.nn.Parameter(theta0[1].clone())
        self.scale = float(scale)

    def theta(self):
        return [self.weight, self.bias]

    def _loss(self, q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return map_distance(q, a, self.weight, self.bias) / self.scale

    def losses(self, train_idx, meta_idx):
        train_idx, meta_idx = (torch.as_tensor(np.asarray(i), dtype=torch.long) for i in (train_idx, meta_idx))
        return self._loss(self.q[train_idx], self.a[train_idx]), self._loss(self.q_meta[meta_idx],
                                                                            self.a_meta[meta_idx])

    @torch.no_grad()
    def all_losses(self) -> torch.Tensor:
        return self._loss(self.q, self.a)


PROJECTION_DIM = 16  # per embedding kept as weight-net features (a fixed random projection, as for the LM's states)


def _projection(dim: int, seed: int = 4321) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((dim, PROJECTION_DIM)) / np.sqrt(dim)


def embedding_features(q: np.ndarray, a: np.ndarray, answer_words: np.ndarray,
                       maps: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """Raw weight-net features per row from the embeddings alone (so `filter` judges new shards as the run did):
    cos(q, a), the map distance under each saved map (θ₀ and the meta-only reference), the answer's log word count,
    and fixed projections of q and of the residual a − q W (what the answer adds beyond the expected one)."""
    qt, at = torch.as_tensor(q, dtype=torch.float32), torch.as_tensor(a, dtype=torch.float32)
    distances = [map_distance(qt, at, w, b).numpy()[:, None] for w, b in maps]
    w0, b0 = maps[0]
    residual = (at - F.normalize(qt @ w0 + b0, dim=1)).numpy()
    proj = _projection(q.shape[1])
    return np.hstack([np.sum(q * a, axis=1, keepdims=True), *distances,
                      np.log1p(np.asarray(answer_words, dtype=np.float64))[:, None], q @ proj, residual @ proj])
