"""Group-consistency evidence in the bads empirical-Bayes prior."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq
import pytest

from dpsel.data import alpaca_to_messages
from dpsel.errors import DpselInputError
from dpsel.select.bads import BadsSettings, empirical_bayes_mean, infer_groups, prior_evidence_z
from dpsel.select.consistency import combine_evidence, consistency_z, group_consistency, prior_mean_from_z
from dpsel.synth import generate


def _auroc(good: np.ndarray, bad: np.ndarray) -> float:
    """P(a good row scores above a bad one), ties half."""
    diff = good[:, None] - bad[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def test_consistency_ranks_swapped_and_garbage_below_clean(tmp_path):
    paths = generate(tmp_path, rows=400, noise=0.3, seed=4, meta_rows=10, test_rows=10)
    train = pq.read_table(paths["train"]).to_pylist()
    kinds = np.asarray(pq.read_table(paths["truth"]).column("kind").to_pylist())
    messages = [alpaca_to_messages(r["instruction"], r["output"], r["input"]) for r in train]
    groups = infer_groups(messages, [r["task"] for r in train])
    confidence = group_consistency(messages, groups, seed=0)
    assert confidence.shape == (len(train),) and np.all((confidence >= 0) & (confidence <= 1))
    clean = confidence[kinds == "clean"]
    for kind in ("swapped", "garbage"):
        assert (kinds == kind).sum() >= 10
        assert _auroc(clean, confidence[kinds == kind]) > 0.8, kind
    # an arithmetic slip still looks like its task's answers: this evidence leaves it to the LM
    assert _auroc(clean, confidence[kinds == "wrong"]) < 0.7


def test_a_sampled_fit_scores_the_rows_outside_it_as_well(tmp_path):
    """Above `fit_rows` the classifier fits on a stratified sample; the fold models' mean scores the rest."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from dpsel.select.consistency import char_ngrams, fit_sample, group_self_confidence, linear_classifier
    paths = generate(tmp_path, rows=600, noise=0.3, seed=4, meta_rows=10, test_rows=10)
    train = pq.read_table(paths["train"]).to_pylist()
    kinds = np.asarray(pq.read_table(paths["truth"]).column("kind").to_pylist())
    answers = [r["output"] for r in train]
    groups = infer_groups([[{"role": "user", "content": ""}]] * len(train), [r["task"] for r in train])
    # up to fit_rows: exactly sklearn's out-of-fold predictions
    whole = group_self_confidence(answers, groups, seed=0)
    oof = cross_val_predict(linear_classifier(0), char_ngrams().transform(answers), groups,
                            cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")
    np.testing.assert_allclose(whole, oof[np.arange(len(groups)), groups], rtol=1e-6)
    sample = fit_sample(groups, 200, 5, seed=0)
    assert 190 <= len(sample) <= 220 and len(np.unique(sample)) == len(sample)
    assert np.bincount(groups[sample]).min() >= min(5, np.bincount(groups).min())
    sampled = group_self_confidence(answers, groups, seed=0, fit_rows=200)
    outside = np.setdiff1d(np.arange(len(groups)), sample)
    assert np.all((sampled >= 0) & (sampled <= 1))
    clean = kinds[outside] == "clean"
    for kind in ("swapped", "garbage"):
        bad = kinds[outside] == kind
        assert bad.sum() >= 10
        assert _auroc(sampled[outside][clean], sampled[outside][bad]) > 0.8, kind


def test_prior_without_groups_is_the_reference_prior_and_says_so(caplog):
    rng = np.random.default_rng(0)
    ref_nll = rng.normal(size=40)
    messages = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(40)]
    # no embedder: no pseudo-groups to stand in for the groups; fluency and quality off to leave the reference alone
    settings = BadsSettings(embedder="none", fluency=False, quality=False)
    assert settings.group_consistency  # on by default
    with caplog.at_level(logging.WARNING, logger="dpsel.select.consistency"):
        evidence = prior_evidence_z(messages, ref_nll, infer_groups(messages, None), settings, seed=0)
    assert list(evidence) == ["reference"]
    assert "group-consistency evidence off" in caplog.text
    prior = prior_mean_from_z(combine_evidence(list(evidence.values()), "max"), settings.beta, settings.eb_gamma)
    np.testing.assert_allclose(prior, empirical_bayes_mean(ref_nll, np.zeros(40, dtype=int), settings.beta,
                                                           settings.eb_gamma))
    assert not BadsSettings.for_variant("paper", {}).group_consistency


def test_max_rule_is_the_lower_prior_mean_and_bad_rules_exit_2():
    z_a, z_b = np.array([-1.0, 0.5, 2.0]), np.array([0.0, -0.5, 3.0])
    combined = prior_mean_from_z(combine_evidence([z_a, z_b], "max"), 0.7, 1.0)
    np.testing.assert_allclose(combined, np.minimum(prior_mean_from_z(z_a, 0.7, 1.0), prior_mean_from_z(z_b, 0.7, 1.0)))
    assert np.all(np.diff(consistency_z(np.array([0.99, 0.5, 0.01]))) > 0)  # less likely its group's: worse
    with pytest.raises(DpselInputError, match="unknown evidence combination"):
        combine_evidence([z_a], "mean")
