"""Ridge maps from question to answer embeddings fitted from sufficient statistics accumulated chunk by chunk, so
a pool's embeddings are read from the store (`dpsel.models.embedding_store.Column`) in passes and never held
whole: n, Σq, Σa, qᵀq and qᵀa (float64, d×d) are all a fit needs. The same solve as sklearn's `Ridge` (intercept
unpenalised: centred normal equations, (QcᵀQc + αI) W = QcᵀAc), and out-of-fold fits are the totals less a
fold's statistics, with the folds sklearn's `KFold(shuffle=True)` draws."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpsel.models.embedding_store import as_column

CHUNK_ROWS = 8192   # rows per pass chunk: a few float32/float64 [rows, d] temporaries of ~10-25 MB each, not ~200 MB


@dataclass
class RidgeStats:
    """Σ over rows of 1, q, a, qqᵀ and qaᵀ (float64)."""
    n: float
    sum_q: np.ndarray
    sum_a: np.ndarray
    qq: np.ndarray
    qa: np.ndarray

    @classmethod
    def empty(cls, dim_q: int, dim_a: int) -> "RidgeStats":
        return cls(0.0, np.zeros(dim_q), np.zeros(dim_a), np.zeros((dim_q, dim_q)), np.zeros((dim_q, dim_a)))

    def add(self, q: np.ndarray, a: np.ndarray) -> None:
        q, a = np.asarray(q, np.float64), np.asarray(a, np.float64)
        self.n += len(q)
        self.sum_q += q.sum(0)
        self.sum_a += a.sum(0)
        self.qq += q.T @ q
        self.qa += q.T @ a

    def __add__(self, other: "RidgeStats") -> "RidgeStats":
        return RidgeStats(self.n + other.n, self.sum_q + other.sum_q, self.sum_a + other.sum_a, self.qq + other.qq,
                          self.qa + other.qa)

    def __sub__(self, other: "RidgeStats") -> "RidgeStats":
        return RidgeStats(self.n - other.n, self.sum_q - other.sum_q, self.sum_a - other.sum_a, self.qq - other.qq,
                          self.qa - other.qa)

    def solve(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """(W [d_q, d_a], b [d_a]) minimising ‖q W + b − a‖² + α‖W‖² over the rows added."""
        mean_q, mean_a = self.sum_q / self.n, self.sum_a / self.n
        gram = self.qq - self.n * np.outer(mean_q, mean_q)
        cross = self.qa - self.n * np.outer(mean_q, mean_a)
        weight = np.linalg.solve(gram + alpha * np.eye(len(gram)), cross)
        return weight, mean_a - mean_q @ weight


def stats_of(q, a, rows: np.ndarray | None = None) -> RidgeStats:
    """The statistics of two columns (or arrays), of `rows` only when given, read chunk by chunk."""
    q, a = as_column(q), as_column(a)
    stats = RidgeStats.empty(q.dim, a.dim)
    rows = np.arange(len(q)) if rows is None else np.asarray(rows)
    for start in range(0, len(rows), CHUNK_ROWS):
        part = rows[start:start + CHUNK_ROWS]
        stats.add(q.rows(part), a.rows(part))
    return stats


def kfold_of(n: int, folds: int, seed: int) -> np.ndarray:
    """Each row's test fold under sklearn's KFold(folds, shuffle=True, random_state=seed) (int8: a byte a row)."""
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(folds, n // folds)
    sizes[:n % folds] += 1
    fold = np.empty(n, np.int8)
    fold[order] = np.repeat(np.arange(folds), sizes)
    return fold


def qa_consistency_stats(q, a, seed: int, extra: RidgeStats | None = None, folds: int = 5,
                         alpha: float = 1.0) -> np.ndarray:
    """Per row: cos(answer, ridge(question)) with the map fitted out of fold (`extra`: statistics of clean pairs
    that only ever train), reading the columns in chunks. `semantic.qa_consistency` on arrays, in bounded memory."""
    q, a = as_column(q), as_column(a)
    folds = min(folds, len(q))
    fold = kfold_of(len(q), folds, seed)
    per_fold = [stats_of(q, a, np.flatnonzero(fold == f)) for f in range(folds)]
    total = sum(per_fold[1:], per_fold[0])
    score = np.empty(len(q), np.float32)
    for f in range(folds):
        fit = total - per_fold[f]
        weight, bias = (fit + extra if extra is not None else fit).solve(alpha)
        held = np.flatnonzero(fold == f)
        for start in range(0, len(held), CHUNK_ROWS):
            part = held[start:start + CHUNK_ROWS]
            predicted = q.rows(part) @ weight + bias
            predicted /= np.linalg.norm(predicted, axis=1, keepdims=True) + 1e-12
            score[part] = np.sum(predicted * a.rows(part), axis=1)
    return score

