"""Quality evidence inside bads: calibrated on meta into the prior (its weights listed for the manifest), kept out
of the uncalibrated `max` rule, and read by θ's quality density (quality_problem.py)."""
import random

import numpy as np
import torch

from builders import VOCAB
from dpsel.select.bads.config import BadsSettings
from dpsel.select.bads.priors import evidence_ablations, prior_means
from dpsel.select.bads.quality_problem import QualityEmbeddingProblem, quality_features


def _row(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _pool(n_clean=160, n_loops=20, n_meta=60, seed=0):
    """Clean answers (distinct sentences ending in a full stop) and planted repetition loops; meta is clean."""
    rng = random.Random(seed)
    sentence = lambda: " ".join(rng.choice(VOCAB) for _ in range(12)) + "."  # noqa: E731
    clean = [_row(f"What is {rng.choice(VOCAB)}?", f"{sentence()} {sentence()}") for _ in range(n_clean + n_meta)]
    loops = [_row(f"What is {rng.choice(VOCAB)}?", " ".join([sentence()] * 6)) for _ in range(n_loops)]
    return clean[:n_clean] + loops, clean[n_clean:], np.r_[np.zeros(n_clean, bool), np.ones(n_loops, bool)]


def test_quality_evidence_is_calibrated_into_the_tail_prior_and_listed_with_its_weight():
    train, meta, loop = _pool()
    settings = BadsSettings(semantic=False, fluency=False, group_consistency=False)
    report, calibration = {}, {}
    evidence, prior_mean, ablations = prior_means(train, np.zeros(len(train)), np.zeros(len(train), int),
                                                  settings, 0, meta, report, combine="tail",
                                                  calibration=calibration)
    combine = report["prior_combine"]
    assert "quality_repetition" in combine["used"]
    weight = combine["calibrated_weights"]["quality_repetition"]
    assert 0.05 < weight["rows_p_bad_over_half"] < 0.2 and weight["clean_fraction"] > 0.8
    prior = prior_mean.numpy()
    assert prior[loop].max() < np.median(prior[~loop])  # every loop is below a typical clean row
    alone = evidence_ablations(evidence, {}, np.zeros(len(train), int), prior_mean, calibration)
    assert alone["quality_evidence_only"][loop].max() < alone["quality_evidence_only"][~loop].min() + 1e-9


def test_the_max_rule_leaves_quality_evidence_out():
    train, meta, _ = _pool(seed=1)
    report = {}
    settings = BadsSettings(semantic=False, fluency=False, group_consistency=False)
    prior_means(train, np.zeros(len(train)), np.zeros(len(train), int), settings, 0, meta, report, combine="max")
    assert not any(name.startswith("quality_") for name in report["prior_combine"]["used"])


def test_theta_quality_density_scores_outlying_rows_higher_and_trains():
    rng = np.random.default_rng(0)
    n, n_meta, d = 60, 20, 8
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    q, a = unit(rng.standard_normal((n, d))), unit(rng.standard_normal((n, d)))
    pool_signal = np.r_[np.zeros(n - 5), np.full(5, 3.0)] + 0.1 * rng.standard_normal(n)
    calibration = {"quality_echo": (pool_signal, 0.1 * rng.standard_normal(n_meta))}
    f_train, f_meta = quality_features(calibration, ["quality_echo"])
    theta0 = (torch.eye(d), torch.zeros(d))
    problem = QualityEmbeddingProblem(q, a, q[:n_meta], a[:n_meta], np.zeros(n, int), theta0, 0.1, f_train,
                                      f_meta, ["quality_echo"])
    losses = problem.all_losses().numpy()
    map_only = (1 - np.sum(a * unit(q), axis=1)) / 0.1
    assert np.all((losses - map_only)[-5:] > (losses - map_only)[:-5].max())  # the outlying rows cost more
    train_loss, meta_loss = problem.losses(np.arange(n), np.arange(n_meta))
    (train_loss.sum() + meta_loss.sum()).backward()
    assert problem.centre.grad is not None and problem.raw_scale.grad.abs().sum() > 0
    assert set(problem.learnt()) == {"quality_echo"} and len(problem.theta()) == 4
