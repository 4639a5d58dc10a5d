"""Label-free evidence from a sentence embedder (dpsel.models.embedder) for the bads prior.

- Question–answer consistency: does the answer sit where answers to questions like this one sit? A ridge map from
  question embedding to answer embedding is fitted on the pool (plus the clean meta rows), each pool row predicted
  out of fold, and the row's evidence is the cosine of its answer to the predicted answer. The clean majority
  teaches the map; a swapped, refused or off-topic answer lands far from its prediction.
- Pseudo-groups: where the pool has no group column, instructions are clustered (k-means on their embeddings) and
  the clusters serve group consistency (select/consistency.py), so it works on any pool.
"""
from __future__ import annotations

import logging

import numpy as np

from dpsel.models.embedder import Embedder, EmbeddingCache
from dpsel.select.base import Messages
from dpsel.select.consistency import answer_text

log = logging.getLogger(__name__)


def question_text(messages: Messages) -> str:
    """Everything before the answer (system and user turns), as one text."""
    return "\n".join(m["content"] for m in messages[:-1])


def row_embeddings(embedder: Embedder, rows: list[Messages], cache: EmbeddingCache | None = None, progress=None):
    """(question, answer) embeddings [N, d] each, through the per-row-id cache (`progress`: per encoded chunk)."""
    q, a = row_columns(embedder, rows, cache, progress)
    return q.to_array(), a.to_array()


def row_columns(embedder: Embedder, rows: list[Messages], cache: EmbeddingCache | None = None, progress=None):
    """(question, answer) embeddings as store columns: read in chunks or gathered by row, never held whole."""
    from dpsel.data import row_id
    cache = cache or EmbeddingCache(embedder)
    ids = [row_id(m) for m in rows]
    return (cache.column(ids, [question_text(m) for m in rows], "question", progress),
            cache.column(ids, [answer_text(m) for m in rows], "answer", progress))


def qa_consistency(q, a, seed: int, extra: tuple | None = None, folds: int = 5, alpha: float = 1.0) -> np.ndarray:
    """Per pool row: cos(answer, ridge(question)) with the map fitted out of fold (`extra`: clean (q, a) pairs
    that only ever train). Higher = the answer looks like answers to similar questions. Arrays or store columns,
    read in chunks (ridge_stats.py: the fits from sufficient statistics, the folds KFold's)."""
    from dpsel.select.ridge_stats import qa_consistency_stats, stats_of
    return qa_consistency_stats(q, a, seed, stats_of(*extra) if extra is not None else None, folds, alpha)


def robust_z(badness: np.ndarray) -> np.ndarray:
    """(x − median) / (1.4826 MAD): a typical row near 0, only rows far in the bad tail high (a rank score would
    spread every row over the normal range and feed noise into the prior's `max`)."""
    badness = np.asarray(badness, dtype=np.float64)
    centre = np.median(badness)
    scale = 1.4826 * np.median(np.abs(badness - centre)) + 1e-12
    return (badness - centre) / scale


def pseudo_groups(q: np.ndarray, seed: int, rows_per_group: int = 60, most: int = 40) -> np.ndarray:
    """k-means clusters of the instruction embeddings (k ≈ N/rows_per_group, 2..most) as integer group codes."""
    from sklearn.cluster import KMeans
    k = int(np.clip(len(q) // rows_per_group, 2, most))
    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(q).astype(int)

