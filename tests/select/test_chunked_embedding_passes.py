"""bads in embedder space reads the pool's embeddings from the store in chunks (issue 29): every chunked pass
equals the whole-array computation it replaced (sklearn's Ridge and KFold, the whole-array features)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold

from dpsel.models.embedding_store import EmbeddingStore
from dpsel.models.embedder import Embedder, EmbeddingCache
from dpsel.select.bads.embedding_problem import (EmbeddingProblem, embedding_features, map_distances, ridge_map,
                                                 sampled_embedding_features)
from dpsel.select.bads.weights import HeldRows
from dpsel.select.features import FeatureStats
from dpsel.select.ridge_stats import CHUNK_ROWS, kfold_of, qa_consistency_stats, stats_of


def _unit(rng, n, d=6):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _column(tmp_path, array, chunk=7):
    """The array written to a store in two writer sessions (two segments) and read back as a Column."""
    store = EmbeddingStore(tmp_path, "float32")
    ids = [f"r{i}" for i in range(len(array))]
    for start, stop in ((0, len(array) // 3), (len(array) // 3, len(array))):
        writer = store.writer()
        for s in range(start, stop, chunk):
            writer.append(ids[s:min(s + chunk, stop)], array[s:min(s + chunk, stop)])
        writer.close()
    cache = EmbeddingCache.__new__(EmbeddingCache)
    return EmbeddingCache._column(cache, store, ids)


def test_ridge_from_chunked_statistics_is_sklearns_ridge(monkeypatch):
    monkeypatch.setattr("dpsel.select.ridge_stats.CHUNK_ROWS", 16)     # many chunks on a small pool
    rng = np.random.default_rng(0)
    q, a = _unit(rng, 100), _unit(rng, 100)
    weight, bias = ridge_map(q, a, 0.7)
    fit = Ridge(alpha=0.7).fit(q.astype(np.float64), a.astype(np.float64))
    np.testing.assert_allclose(weight.numpy(), fit.coef_.T, atol=1e-5)
    np.testing.assert_allclose(bias.numpy(), fit.intercept_, atol=1e-5)
    half = stats_of(q[:40], a[:40]) + stats_of(q[40:], a[40:])
    np.testing.assert_allclose(half.solve(0.7)[0], weight.numpy(), atol=1e-5)


def test_folds_and_out_of_fold_consistency_are_sklearns():
    rng = np.random.default_rng(1)
    q, a = _unit(rng, 53), _unit(rng, 53)
    extra = (_unit(rng, 9), _unit(rng, 9))
    fold = kfold_of(53, 5, seed=3)
    for f, (_, held) in enumerate(KFold(5, shuffle=True, random_state=3).split(q)):
        np.testing.assert_array_equal(np.flatnonzero(fold == f), held)
    expected = np.zeros_like(a, dtype=np.float64)
    for fit, held in KFold(5, shuffle=True, random_state=3).split(q):
        xs, ys = np.vstack([q[fit], extra[0]]).astype(np.float64), np.vstack([a[fit], extra[1]]).astype(np.float64)
        expected[held] = Ridge(alpha=1.0).fit(xs, ys).predict(q[held])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(qa_consistency_stats(q, a, 3, stats_of(*extra)), np.sum(expected * a, axis=1),
                               atol=1e-5)


def test_store_columns_give_the_whole_arrays_losses_and_features(tmp_path, monkeypatch):
    monkeypatch.setattr("dpsel.select.bads.embedding_problem.CHUNK_ROWS", 8)
    assert CHUNK_ROWS > 8
    rng = np.random.default_rng(2)
    q, a = _unit(rng, 30), _unit(rng, 30)
    qc, ac = _column(tmp_path / "q", q), _column(tmp_path / "a", a)
    maps = [ridge_map(q, a, 1.0), (torch.eye(6), torch.zeros(6))]
    words = rng.integers(1, 50, 30)
    np.testing.assert_allclose(embedding_features(qc, ac, words, maps), embedding_features(q, a, words, maps),
                               atol=1e-6)
    np.testing.assert_allclose(map_distances(qc, ac, *maps[0]), map_distances(q, a, *maps[0]), atol=1e-6)
    from_store = EmbeddingProblem(qc, ac, q[:3], a[:3], np.zeros(30, int), maps[0], 0.1)
    in_memory = EmbeddingProblem(q, a, q[:3], a[:3], np.zeros(30, int), maps[0], 0.1)
    torch.testing.assert_close(from_store.all_losses(), in_memory.all_losses())
    idx = np.array([29, 0, 11, 11])
    torch.testing.assert_close(from_store.losses(idx, [1])[0], in_memory.losses(idx, [1])[0])


def test_a_sample_of_the_features_is_the_whole_arrays_rows_with_its_standardisation(tmp_path, monkeypatch):
    """The weight net's distillation sample alone is held: its rows and the pool's standardisation equal those
    of the whole [N, features] array, from store columns read in many chunks."""
    monkeypatch.setattr("dpsel.select.bads.embedding_problem.CHUNK_ROWS", 8)
    rng = np.random.default_rng(4)
    q, a = _unit(rng, 45), _unit(rng, 45)
    maps = [ridge_map(q, a, 1.0), (torch.eye(6), torch.zeros(6))]
    words = rng.integers(1, 50, 45)
    whole = embedding_features(q, a, words, maps)
    sample = np.array([0, 7, 8, 9, 23, 44])            # chunk edges, consecutive rows, the last row
    stats, raw = sampled_embedding_features(_column(tmp_path / "q", q), _column(tmp_path / "a", a), words, maps,
                                            sample)
    np.testing.assert_allclose(raw, whole[sample], atol=1e-6)
    fitted = FeatureStats.fit(whole.astype(np.float64))
    np.testing.assert_allclose(stats.mean, fitted.mean, atol=1e-6)
    np.testing.assert_allclose(stats.std, fitted.std, rtol=1e-5)
    held = HeldRows(sample, stats.standardise(raw.copy()))
    np.testing.assert_allclose(held[sample[::-1]], fitted.apply(whole)[sample[::-1]], atol=1e-5)
    for missing in ([1], [0, 44, 45], [-1]):
        with pytest.raises(IndexError, match="distillation sample"):
            held[np.array(missing)]
    assert held[np.array([], np.int64)].shape == (0, whole.shape[1])


def test_pool_embeddings_are_float16_in_the_store(tmp_path):
    class Fixed:
        def encode(self, texts, **_):
            return np.full((len(texts), 4), 1 / 3, np.float32)
    cache = EmbeddingCache(Embedder("fixed", Fixed(), {"w": "2" * 64}, {}), root=tmp_path)
    column = cache.column(["x", "y"], ["x", "y"], "answer")
    assert column.segments[0].vectors.dtype == np.float16
    assert column.rows([1])[0, 0] == np.float32(np.float16(1 / 3)) != np.float32(1 / 3)
