"""The static embedder distilled from the packaged MiniLM (dpsel.models.distil, model2vec): offline, checked,
named in the manifest with its source, cached under its own weights."""
from __future__ import annotations

import numpy as np

from dpsel.models.distil import distil_static
from dpsel.models.embedder import PACKAGED_NAME, PUBLISHED_SHA256, EmbeddingCache, load_embedder
from dpsel.select.semantic import row_embeddings

# A small vocabulary (the behaviour check's words and a few more) keeps the distillation to seconds.
WORDS = ("how do i reset my password what are the steps to change capital of france is paris ? . "
         "egg boil moon sun water cook planet money bank soil tomato garden").split()


def test_distilled_embedder_loads_offline_and_embeds(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = distil_static(tmp_path / "static", dims=16, keep_tokens=WORDS)
    embedder = load_embedder(str(folder))
    record = embedder.record()
    assert record["distilled_from"]["source"] == PACKAGED_NAME
    assert record["distilled_from"]["source_weights_sha256"]["model.safetensors"] == PUBLISHED_SHA256
    assert list(record["weights_sha256"]) == ["model.safetensors"]
    assert record["weights_sha256"]["model.safetensors"] != PUBLISHED_SHA256
    check = record["behaviour_check"]
    assert check["paraphrase_cosine"] - check["unrelated_cosine"] > 0.4

    rows = [[{"role": "user", "content": "How do I boil an egg?"}, {"role": "assistant", "content": "Boil water."}],
            [{"role": "user", "content": "Where is Paris?"}, {"role": "assistant", "content": "In France."}]]
    cache = EmbeddingCache(embedder, root=tmp_path)
    q, a = row_embeddings(embedder, rows, cache)
    assert q.shape == a.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-3)
    assert cache.path.stem == embedder.sha[:16] and cache.stats["encoded"] == 4
