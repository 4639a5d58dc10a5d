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

from dpsel.models.embedding_store import as_column
from dpsel.select.bads.problems import SelectionProblem
from dpsel.select.features import FeatureStats
from dpsel.select.ridge_stats import CHUNK_ROWS, stats_of


def ridge_map(q, a, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [d, d], b [d]) minimising ‖q W + b − a‖² + α‖W‖² (intercept unpenalised, as sklearn's Ridge), from
    arrays or store columns read in chunks (`ridge_stats`)."""
    return as_map(stats_of(q, a).solve(alpha))


def as_map(solved: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = solved
    return (torch.as_tensor(weight, dtype=torch.float32).contiguous(), torch.as_tensor(bias, dtype=torch.float32))


def map_distance(q: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """1 − cos(q W + b, a) per row: 0 where the answer sits where the map expects it, up to 2."""
    return 1.0 - (F.normalize(q @ weight + bias, dim=1) * a).sum(1)


def map_distances(q, a, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    """`map_distance` of every row of two columns (or arrays), chunk by chunk: [N] float32."""
    q, a = as_column(q), as_column(a)
    out = np.empty(len(q), np.float32)
    with torch.no_grad():
        for start, part in q.chunks(CHUNK_ROWS):
            rows = np.arange(start, start + len(part))
            out[rows] = map_distance(torch.as_tensor(part), torch.as_tensor(a.rows(rows)), weight, bias).numpy()
    return out


class EmbeddingProblem(SelectionProblem):
    """Rows as (question, answer) embeddings; θ = (W, b); per-row loss the scaled map distance. The pool's
    embeddings are store columns (or arrays): minibatches are gathered and the whole-pool pass goes in chunks."""

    def __init__(self, q, a, q_meta: np.ndarray, a_meta: np.ndarray, groups: np.ndarray,
                 theta0: tuple[torch.Tensor, torch.Tensor], scale: float):
        as_t = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
        self.q, self.a = as_column(q), as_column(a)
        self.q_meta, self.a_meta = as_t(q_meta), as_t(a_meta)
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
        train_idx, meta_idx = np.asarray(train_idx, dtype=np.int64), torch.as_tensor(np.asarray(meta_idx),
                                                                                     dtype=torch.long)
        q, a = torch.as_tensor(self.q.rows(train_idx)), torch.as_tensor(self.a.rows(train_idx))
        return self._loss(q, a), self._loss(self.q_meta[meta_idx], self.a_meta[meta_idx])

    @torch.no_grad()
    @torch.no_grad()
    def all_losses(self) -> torch.Tensor:
        return torch.as_tensor(map_distances(self.q, self.a, self.weight.detach(), self.bias.detach())) / self.scale


PROJECTION_DIM = 16  # per embedding kept as weight-net features (a fixed random projection, as for the LM's states)


def _projection(dim: int, seed: int = 4321) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((dim, PROJECTION_DIM)) / np.sqrt(dim)


def embedding_features(q, a, answer_words: np.ndarray, maps: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """Raw weight-net features per row from the embeddings alone (so `filter` judges new shards as the run did):
    cos(q, a), the map distance under each saved map (θ₀ and the meta-only reference), the answer's log word count,
    and fixed projections of q and of the residual a − q W (what the answer adds beyond the expected one).
    [N, features] float32, computed chunk by chunk from arrays or store columns."""
    out = None
    for rows, features in _feature_chunks(q, a, answer_words, maps):
        out = np.empty((len(as_column(q)), features.shape[1]), np.float32) if out is None else out
        out[rows] = features
    return out if out is not None else np.zeros((0, _feature_count(maps)), np.float32)


def sampled_embedding_features(q, a, answer_words: np.ndarray, maps,
                               rows: np.ndarray) -> tuple[FeatureStats, np.ndarray]:
    """(the standardisation of every row's `embedding_features`, the raw features of `rows` only): the whole
    pool's features are made a chunk at a time and dropped, so a pool of millions never holds its [N, features]
    array (`rows`: sorted row numbers, e.g. the weight net's distillation sample)."""
    rows, kept = np.asarray(rows, np.int64), []

    def chunks():
        for chunk_rows, features in _feature_chunks(q, a, answer_words, maps):
            low, high = np.searchsorted(rows, [chunk_rows[0], chunk_rows[-1] + 1])
            kept.append(features[rows[low:high] - chunk_rows[0]])
            yield features

    stats = FeatureStats.from_chunks(chunks(), _feature_count(maps))
    return stats, np.concatenate(kept) if kept else np.zeros((0, _feature_count(maps)), np.float32)


def _feature_count(maps) -> int:
    return 2 + len(maps) + 2 * PROJECTION_DIM


def _feature_chunks(q, a, answer_words: np.ndarray, maps):
    """(row numbers, raw features) of each chunk of rows, in order."""
    q, a = as_column(q), as_column(a)
    words = np.log1p(np.asarray(answer_words, dtype=np.float64))
    proj = _projection(q.dim)
    with torch.no_grad():
        for start, part in q.chunks(CHUNK_ROWS):
            rows = np.arange(start, start + len(part))
            yield rows, _chunk_features(part, a.rows(rows), words[rows], maps, proj)


def _chunk_features(q: np.ndarray, a: np.ndarray, words: np.ndarray, maps, proj: np.ndarray) -> np.ndarray:
    qt, at = torch.as_tensor(q), torch.as_tensor(a)
    distances = [map_distance(qt, at, w, b).numpy()[:, None] for w, b in maps]
    w0, b0 = maps[0]
    residual = (at - F.normalize(qt @ w0 + b0, dim=1)).numpy()
    return np.hstack([np.sum(q * a, axis=1, keepdims=True), *distances, words[:, None], q @ proj, residual @ proj])
