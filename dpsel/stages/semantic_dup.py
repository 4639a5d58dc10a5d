"""Semantic duplicates (SemDeDup-style): rows whose embeddings' cosine reaches a threshold.

Input: an N×d float32 array of L2-normalised embeddings aligned with the rows (the embedder is not
this module's job). How: k-means (faiss, fixed seed) splits the rows into clusters of about
`cluster_rows`; inside each cluster an exact inner-product range search (faiss `IndexFlatIP`) finds
every pair at cosine >= threshold; rows are then visited in input order and a row is dropped if an
earlier *kept* row of its cluster is a neighbour (its `dup_of` is the most similar such row). So the
first row of a group is always kept. Pairs split across two k-means clusters are missed, as in
SemDeDup; with N <= cluster_rows there is one cluster and the search is exact.
"""
from __future__ import annotations

import faiss
import numpy as np

from dpsel.stages.base import Block, ConversationBatch, Verdict

REASON = "semantic_duplicate"
SEED = 1234


def _clusters(vectors: np.ndarray, cluster_rows: int) -> np.ndarray:
    k = max(1, len(vectors) // cluster_rows)
    if k == 1:
        return np.zeros(len(vectors), np.int64)
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=20, seed=SEED, spherical=True, verbose=False)
    kmeans.train(vectors)
    return kmeans.index.search(vectors, 1)[1][:, 0]


def _greedy_keepers(members: np.ndarray, vectors: np.ndarray, threshold: float) -> np.ndarray:
    """For the members of one cluster (ascending row numbers): the row each is a duplicate of, or -1."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors[members])
    limits, scores, neighbours = index.range_search(vectors[members], threshold - 1e-6)
    dup_of = np.full(len(members), -1, np.int64)
    for i in range(len(members)):
        found = neighbours[limits[i]:limits[i + 1]]
        similarity = scores[limits[i]:limits[i + 1]]
        earlier = (found < i)
        if not earlier.any():
            continue
        found, similarity = found[earlier], similarity[earlier]
        kept = dup_of[found] == -1
        if kept.any():
            best = np.lexsort((found[kept], -similarity[kept]))[0]    # most similar, then earliest
            dup_of[i] = members[found[kept][best]]
    return dup_of


class SemanticDup(Block):
    name = "semantic_dup"

    def __init__(self, threshold: float = 0.95, cluster_rows: int = 20_000):
        super().__init__()
        if not -1 <= threshold <= 1:
            raise ValueError(f"semantic-dup cosine threshold must be in [-1, 1], got {threshold}")
        self.threshold, self.cluster_rows = threshold, cluster_rows

    def decide(self, rows: ConversationBatch, embeddings: np.ndarray | None = None, **_) -> Verdict:
        if embeddings is None:
            raise ValueError("semantic duplicates need `embeddings` (N×d, float32, L2-normalised)")
        vectors = np.ascontiguousarray(embeddings, np.float32)
        if vectors.ndim != 2 or len(vectors) != len(rows):
            raise ValueError(f"embeddings shape {vectors.shape} does not match {len(rows)} rows")
        verdict = Verdict.keep_all(len(rows))
        if not len(rows):
            return verdict
        labels = _clusters(vectors, self.cluster_rows)
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            dup_of = _greedy_keepers(members, vectors, self.threshold)
            duplicate = dup_of >= 0
            verdict.reason[members[duplicate]] = REASON
            verdict.dup_of[members[duplicate]] = rows.ids[dup_of[duplicate]]
        return verdict
