"""bads with θ in the sentence embedder's space: the problem, the run, `filter`, the fallback."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from dpsel.select import load_scorer, select
from dpsel.select.bads import BadsSettings, EmbeddingProblem
from dpsel.select.base import SelectConfig
from dpsel.select.quality import TEXT_SIGNALS

QUALITY_TEXT = [f"quality_{name}" for name in TEXT_SIGNALS]  # the text signals, in the prior's order
EMBEDDER_EVIDENCE = ["qa_consistency", "quality_genericness", "fluency", *QUALITY_TEXT, "theta"]

TOPICS = {
    "cooking": ("How long should I boil an egg for a soft yolk?", "Boil it for about six minutes, then cool it "
                "in cold water so the yolk stays soft."),
    "astronomy": ("Why does the Moon show phases?", "Sunlight lights half of the Moon and we see that half from "
                  "changing angles as it orbits."),
    "finance": ("What is compound interest?", "Interest earned on both the principal and the interest added in "
                "earlier periods."),
    "gardening": ("When should tomatoes be planted outdoors?", "After the last frost, once the soil has warmed "
                  "and nights stay mild."),
}
SWAPPED = [3, 14, 25, 36]  # each gets the next topic's answer


def _row(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _pool(n_per_topic=10, tag="reader", swapped=()):
    topics = list(TOPICS)
    rows = [_row(f"{q} (asked by {tag} {i})", f"{a} Note {i}.") for q, a in TOPICS.values() for i in range(n_per_topic)]
    for i in swapped:
        rows[i] = _row(rows[i][0]["content"], TOPICS[topics[(i // n_per_topic + 1) % len(topics)]][1])
    return rows


CONFIG = SelectConfig(model="tiny", device="cpu", seed=0, batch_size=8, meta_batch_size=4, max_length=64)


def test_embedding_problem_losses_and_gradients_have_the_rows_shapes():
    gen = np.random.default_rng(0)
    unit = lambda n: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(gen.standard_normal((n, 6)))  # noqa
    q, a = unit(10), unit(10)
    problem = EmbeddingProblem(q, a, unit(3), unit(3), np.zeros(10, dtype=int), (torch.eye(6), torch.zeros(6)), 0.1)
    train, meta = problem.losses(np.array([0, 4, 7]), np.array([1, 2]))
    assert train.shape == (3,) and meta.shape == (2,)
    assert torch.allclose(train, torch.as_tensor(1 - np.sum(q[[0, 4, 7]] * a[[0, 4, 7]], 1), dtype=torch.float32)
                          / 0.1, atol=1e-5)  # W = I: the loss is the scaled cosine distance of q and a
    (train.sum() + meta.sum()).backward()
    weight, bias = problem.theta()
    assert weight.grad.shape == (6, 6) and bias.grad.shape == (6,) and weight.grad.abs().sum() > 0
    assert problem.all_losses().shape == (10,)


@pytest.fixture(scope="module")
def run():
    train = _pool(swapped=SWAPPED)
    meta = _pool(2, tag="editor")
    return train, select(train, meta, "bads", dataclasses.replace(CONFIG, extra={"ablations": True}))


def test_a_run_without_ablations_gives_the_same_weights_and_computes_none(caplog):
    """The ablations are diagnostics: off (the default) they are not computed, nor is the group consistency the
    tail rule never uses, and the weights do not move."""
    train, meta = _pool(swapped=SWAPPED), _pool(2, tag="editor")
    groups = [topic for topic in TOPICS for _ in range(10)]
    with_ablations = select(train, meta, "bads", dataclasses.replace(CONFIG, extra={"ablations": True}),
                            groups=groups)
    with caplog.at_level(logging.INFO, logger="dpsel.select.bads.priors"):
        plain = select(train, meta, "bads", CONFIG, groups=groups)
    assert plain.alternatives == {}
    assert "group_consistency_only" in with_ablations.alternatives and len(with_ablations.alternatives) > 10
    assert "group consistency not computed" in caplog.text
    np.testing.assert_allclose(plain.weight_mean, with_ablations.weight_mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(plain.weight_std, with_ablations.weight_std, rtol=0, atol=1e-12)
    assert plain.coverage["prior_evidence"] == with_ablations.coverage["prior_evidence"]


def test_embedder_theta_ranks_swapped_answers_low_and_the_manifest_says_so(run):
    train, scores = run
    clean = np.setdiff1d(np.arange(len(train)), SWAPPED)
    assert scores.weight_mean[SWAPPED].max() < np.median(scores.weight_mean[clean])
    assert scores.coverage["theta_space"]["space"] == "embedder"
    # the meta-only reference map is the question–answer map again on fewer rows: left out of the tail prior
    assert scores.coverage["prior_evidence"] == EMBEDDER_EVIDENCE
    combine = scores.coverage["prior_combine"]
    assert combine["rule"] == "tail" and combine["used"] == EMBEDDER_EVIDENCE[:-1]
    assert combine["calibrated_on_meta"] == sorted(combine["used"]) == sorted(combine["calibrated_weights"])
    assert scores.coverage["embedder"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert {"bads[theta_loss_only]", "bads[posterior_pass_reference_only]", "bads[evidence_prior_only]"} <= \
        {f"bads[{k}]" for k in scores.alternatives}


def test_filter_scores_unseen_rows_in_the_embedder_space(run, tmp_path):
    _, scores = run
    scores.scorer.save(tmp_path / "scorer")
    scorer = load_scorer(tmp_path / "scorer")
    assert scorer.kind == "bads-embedder"
    swapped = [1, 12, 23, 34]
    unseen = _pool(10, tag="newcomer", swapped=swapped)
    mean, _ = scorer.score(unseen)
    clean = np.setdiff1d(np.arange(len(unseen)), swapped)
    assert np.mean(mean[swapped]) < np.mean(mean[clean])


def test_without_the_default_embedder_theta_falls_back_to_the_lm_and_says_so(caplog, monkeypatch):
    """Only the default embedder may fall back; an explicit one that cannot load exits 2
    (tests/curation/test_explicit_choices.py)."""
    import dpsel.models.embedder as embedder_module
    from dpsel.select.bads.embedder_method import theta_space

    def unavailable(spec, device="auto"):
        raise embedder_module.EmbedderUnavailable("the default embedder is not installed")
    monkeypatch.setattr(embedder_module, "load_embedder", unavailable)
    with caplog.at_level(logging.WARNING):
        space, embedder, why = theta_space(CONFIG, BadsSettings(), None)
    assert (space, embedder) == ("lm", None) and "fell back to the built-in LM" in why
    assert "θ falls back to the built-in byte LM" in caplog.text and "default embedder is unavailable" in caplog.text
    assert theta_space(SelectConfig(model="/some/causal-lm"), BadsSettings(), None)[0] == "lm"  # --model: LM's θ
    assert theta_space(CONFIG, BadsSettings.for_variant("paper", {}), None)[0] == "lm"


def test_shuffled_answers_read_as_less_fluent():
    from dpsel.select.fluency import bigram_fluency
    answers = [a for _, a in TOPICS.values()] * 5
    shuffled = [" ".join(reversed(a.split())) for _, a in TOPICS.values()]
    scores = bigram_fluency(answers + shuffled)
    assert scores[-len(shuffled):].max() < scores[:len(answers)].min()


def test_a_pool_past_the_step_cap_grows_the_batch_not_the_run():
    """Where the defaulted run would pass embed_max_steps, the batch grows so each row keeps its passes."""
    settings = BadsSettings(embed_max_steps=1000)
    assert settings.embed_batch_size(1000, 16) == 16                 # 10,667 rows visited: 667 steps of 16
    grown = settings.embed_batch_size(100_000, 16)                   # the smallest batch within 1,000 steps
    assert settings.resolve_steps(100_000, grown) <= 1000 < settings.resolve_steps(100_000, grown - 1)
    assert settings.embed_batch_size(100_000, 32) == 32              # a batch size other than the default is kept
    assert BadsSettings(embed_max_steps=0).embed_batch_size(100_000, 16) == 16
    asked = BadsSettings.from_config(SelectConfig(epochs=8, extra={"embed_max_steps": 1000}))
    assert asked.embed_batch_size(100_000, 16) == 16                 # an explicit run length is kept
    train, meta = _pool(), _pool(2, tag="editor")
    config = SelectConfig(model="tiny", device="cpu", seed=0, meta_batch_size=4, max_length=64,
                          extra={"embed_max_steps": 30})
    scores = select(train, meta, "bads", config)
    # 40 rows: 16 a step is 3 batches a pass (32 steps), 20 a step 2 batches (22 steps)
    assert scores.coverage["batch_size"] == {"asked": 16, "used": 20}
    assert scores.coverage["steps"] == 22
    assert np.all(np.isfinite(scores.weight_mean)) and scores.weight_mean.shape == (len(train),)
