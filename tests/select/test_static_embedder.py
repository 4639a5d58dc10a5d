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


def test_the_static_spec_is_built_once_into_the_cache_and_loads_quietly(tmp_path, monkeypatch, capfd):
    """`--embedder static`: distilled from the packaged MiniLM on first use, into the cache under the source's
    name; a second use finds it and builds nothing; model2vec's progress bars stay off."""
    import dpsel.models.distil as distil
    monkeypatch.setenv("DPSEL_CACHE", str(tmp_path / "cache"))
    builds = []

    def small_distil(out, source, **_):
        builds.append(out)
        return distil_static(out, source=source, dims=16, keep_tokens=WORDS)

    monkeypatch.setattr(distil, "distil_static", small_distil)
    first = distil.static_folder()
    assert distil.static_folder() == first and len(builds) == 1
    assert first.parent == tmp_path / "cache" / "embedders" and first.name.startswith("static-all-MiniLM-L6-v2-")
    assert not list(first.parent.glob("*.partial-*"))
    assert "Encoding tokens" not in capfd.readouterr().err
    load_embedder.cache_clear()
    try:
        embedder = load_embedder(distil.STATIC)
        assert embedder.name == f"{PACKAGED_NAME} (static, model2vec)"
        assert embedder.distilled_from["source_weights_sha256"]["model.safetensors"] == PUBLISHED_SHA256
    finally:
        load_embedder.cache_clear()
