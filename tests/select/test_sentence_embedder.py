"""The sentence embedder (dpsel.models.embedder) and its evidence in the bads prior."""
from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpsel.models.embedder import PUBLISHED_SHA256, EmbeddingCache, load_embedder, try_embedder
from dpsel.select.bads import BadsSettings, infer_groups, prior_evidence_z
from dpsel.select.base import SelectConfig
from dpsel.select.semantic import pseudo_groups, qa_consistency, row_embeddings
from dpsel.select.quality import TEXT_SIGNALS

QUALITY_TEXT = [f"quality_{name}" for name in TEXT_SIGNALS]  # the text signals, in the prior's order
EMBEDDER_EVIDENCE = ["qa_consistency", "quality_genericness", "fluency", *QUALITY_TEXT, "theta"]

SMALL_LM = {"ref_steps": 2}   # a short reference fit (the tiny LM has no size settings)
TOPICS = {
    "cooking": ("How long should I boil an egg for a soft yolk?", "Boil it for about six minutes, then cool it."),
    "astronomy": ("Why does the Moon show phases?", "Sunlight lights half of the Moon and we see it from angles."),
    "finance": ("What is compound interest?", "Interest earned on both the principal and earlier interest."),
    "gardening": ("When should tomatoes be planted outdoors?", "After the last frost, once the soil is warm."),
}


def _pool(n_per_topic: int = 10):
    """Paraphrased questions per topic with their topic's answer; no group column."""
    rows = []
    for topic, (question, answer) in TOPICS.items():
        for i in range(n_per_topic):
            rows.append([{"role": "user", "content": f"{question} (asked by reader {i})"},
                         {"role": "assistant", "content": f"{answer} Note {i}."}])
    return rows


@pytest.fixture(scope="module")
def embedder():
    return load_embedder("default")


def test_packaged_embedder_loads_offline_and_knows_language(embedder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    record = embedder.record()
    assert record["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert record["weights_sha256"]["model.safetensors"] == PUBLISHED_SHA256
    check = record["behaviour_check"]
    assert check["paraphrase_cosine"] > 0.7 and check["unrelated_cosine"] < 0.2


def test_embeddings_are_cached_per_row(embedder, tmp_path):
    cache = EmbeddingCache(embedder, root=tmp_path)
    rows = _pool(2)
    first = row_embeddings(embedder, rows, cache)
    again = row_embeddings(embedder, rows, cache)
    np.testing.assert_array_equal(first[0], again[0])
    assert cache.stats["encoded"] == 2 * len(rows) and cache.stats["cached"] == 2 * len(rows)


def test_swapped_answers_score_low_and_pseudo_groups_form(embedder, tmp_path):
    rows = _pool()
    topics = list(TOPICS)
    swapped = [3, 14, 25, 36]  # each gets the next topic's answer
    for i in swapped:
        rows[i] = [rows[i][0], {"role": "assistant", "content": TOPICS[topics[(i // 10 + 1) % 4]][1]}]
    q, a = row_embeddings(embedder, rows, EmbeddingCache(embedder, root=tmp_path))
    score = qa_consistency(q, a, seed=0)
    clean = np.setdiff1d(np.arange(len(rows)), swapped)
    assert score[swapped].max() < np.median(score[clean])
    groups = pseudo_groups(q, seed=0, rows_per_group=10)
    assert len(np.unique(groups)) == 4
    assert all(len(np.unique(groups[t * 10:(t + 1) * 10])) == 1 for t in range(4))  # one cluster per topic


def test_prior_evidence_lists_the_embedder_evidence_without_a_group_column(embedder):
    rows = _pool()
    report = {}
    evidence = prior_evidence_z(rows, np.zeros(len(rows)), infer_groups(rows, None), BadsSettings(), 0,
                                meta=rows[:4], report=report)
    assert list(evidence) == ["reference", "qa_consistency", "quality_genericness", "pseudo_group_consistency",
                              "fluency", *QUALITY_TEXT]
    assert report["embedder"]["weights_sha256"]["model.safetensors"] == PUBLISHED_SHA256
    assert "semantic" not in evidence and not BadsSettings.for_variant("paper", {}).semantic


def test_missing_default_embedder_says_what_the_run_falls_back_to(caplog, monkeypatch):
    """Only the default may fall back (loudly); an explicit embedder that cannot load is refused: see
    tests/curation/test_explicit_choices.py."""
    import dpsel.models.embedder as embedder_module

    def unavailable(spec, device="auto"):
        raise embedder_module.EmbedderUnavailable("the default embedder is not installed")
    monkeypatch.setattr(embedder_module, "load_embedder", unavailable)
    with caplog.at_level(logging.WARNING, logger="dpsel.models.embedder"):
        assert try_embedder("default") is None
    assert "not installed" in caplog.text and "the prior keeps the reference-loss evidence" in caplog.text
    rows = _pool(3)
    with caplog.at_level(logging.WARNING, logger="dpsel.models.embedder"):
        evidence = prior_evidence_z(rows, np.zeros(len(rows)), infer_groups(rows, None), BadsSettings(), 0)
    assert list(evidence) == ["reference", "fluency", *QUALITY_TEXT]  # these read words, not embeddings


def test_curate_manifest_names_the_embedder_and_the_evidence(embedder, tmp_path):
    from dpsel.curation import curate
    rows = [{"instruction": m[0]["content"], "output": m[1]["content"]} for m in _pool(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    meta = [{"instruction": r["instruction"] + " (trusted)", "output": r["output"]} for r in rows[::6]]
    pq.write_table(pa.Table.from_pylist(meta), tmp_path / "meta.parquet")
    config = SelectConfig(model="tiny", device="cpu", seed=0, steps=2, batch_size=4, meta_batch_size=4,
                          max_length=64, extra=SMALL_LM)
    curate(tmp_path / "train.parquet", tmp_path / "meta.parquet", tmp_path / "out", method="bads", budget=0.5,
           config=config)
    coverage = json.loads((tmp_path / "out" / "manifest.json").read_text())["coverage"]
    assert coverage["prior_evidence"] == EMBEDDER_EVIDENCE
    assert coverage["theta_space"]["space"] == "embedder"
    assert coverage["embedder"]["weights_sha256"]["model.safetensors"] == PUBLISHED_SHA256
    assert coverage["embedder"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_embedding_is_stored_chunk_by_chunk_with_progress_and_resumes(embedder, tmp_path):
    """A stopped encode keeps the chunks it finished; the re-run encodes only the rest and reports progress."""
    import dataclasses

    class StopAfter:
        def __init__(self, chunks):
            self.left = chunks

        def __call__(self, done, total, diag):
            if self.left == 0:
                raise KeyboardInterrupt
            self.left -= 1

    texts = [f"how do I sort list number {i}?" for i in range(10)]
    ids = [f"row{i}" for i in range(10)]
    with pytest.raises(KeyboardInterrupt):   # stopped while reporting its second chunk (8 rows stored)
        EmbeddingCache(embedder, tmp_path).embed(ids, texts, "question", StopAfter(1), chunk_rows=4)
    cache, calls = EmbeddingCache(embedder, tmp_path), []
    vectors = cache.embed(ids, texts, "question", lambda done, total, diag: calls.append((done, total, diag)),
                          chunk_rows=4)
    assert cache.stats["cached"] == 8 and cache.stats["encoded"] == 2      # two chunks of 4 were kept
    assert calls == [(2, 2, {"phase": "embedding questions"})]
    fresh = EmbeddingCache(dataclasses.replace(embedder), tmp_path / "other").embed(ids, texts, "question")
    assert np.allclose(vectors, fresh, atol=1e-5)


def test_cached_encoded_and_repeated_rows_come_back_in_order(tmp_path):
    """A mix of rows already in the cache, rows to encode and a repeated id: every row gets its own text's
    vector, in the order asked, and a repeated id is encoded once."""
    from dpsel.models.embedder import Embedder

    class Lengths:       # a stand-in model: the vector of a text is (its length, 1)
        calls: list = []

        def encode(self, texts, **_):
            self.calls.append(list(texts))
            return np.array([[len(t), 1.0] for t in texts], np.float32)

    model = Lengths()
    cache = EmbeddingCache(Embedder("lengths", model, {"w": "0" * 64}, {}), root=tmp_path)
    cache.embed(["b"], ["bb"], "q")
    vectors = cache.embed(["a", "b", "a", "c"], ["a", "bb", "a", "cccc"], "q", chunk_rows=1)
    np.testing.assert_array_equal(vectors[:, 0], [1, 2, 1, 4])
    assert model.calls == [["bb"], ["a"], ["cccc"]]
    assert cache.stats["cached"] == 2 and cache.stats["encoded"] == 3
