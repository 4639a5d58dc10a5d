"""Reviewed labels in the evidence calibration (calibration.py): a source that separates the reviewed drops from
the keeps and meta rows gets more weight, one whose pool tail the drops do not share gets less."""
from __future__ import annotations

import numpy as np
import torch

from dpsel.select.bads.calibration import (MIN_REVIEWED_DROPS, labelled_bad_probability, meta_bad_probability,
                                           noisy_or, reviewed_rows, tail_bad_probability)
from dpsel.select.bads.config import BadsSettings
from dpsel.select.bads.priors import REVIEWED_DROP_PRIOR_MEAN, _combined_mean


def planted(n_pool=400, n_meta=150, seed=0):
    """Two sources, both with a pool tail heavier than meta's: `real`'s tail is the bad rows (the first 80 pool
    rows), `decoy`'s another 80 rows that are fine (fluent boilerplate, say). The reviewer dropped 20 bad rows."""
    rng = np.random.default_rng(seed)
    real, decoy = rng.normal(size=n_pool), rng.normal(size=n_pool)
    real[:80] += 3.0
    decoy[200:280] += 3.0
    calibration = {"real": (real, rng.normal(size=n_meta)), "decoy": (decoy, rng.normal(size=n_meta))}
    drop = np.zeros(n_pool, dtype=bool)
    drop[:20] = True
    return calibration, drop, np.zeros(n_meta, dtype=bool)


def test_labels_weight_the_source_that_separates_reviewed_drops_from_the_clean_rows():
    calibration, drop, keep = planted()
    with reviewed_rows(drop, keep):
        from dpsel.select.bads.calibration import current_reviewed
        reviewed = current_reviewed(len(drop), len(keep))
    _, record = labelled_bad_probability(calibration, ["real", "decoy"], reviewed)
    assert record["weights_without_labels"] == {"real": 1.0, "decoy": 1.0}
    assert record["weights"]["real"] > 1.5 and record["weights"]["decoy"] < 0.7
    bad, _ = labelled_bad_probability(calibration, ["real", "decoy"], reviewed)
    unlabelled = noisy_or([tail_bad_probability(*calibration[n]) for n in ("real", "decoy")])
    rest = slice(20, None)   # the rows nobody labelled: the decoy's fine tail now looks less bad than the real tail
    truth = np.r_[np.ones(60), np.zeros(320)].astype(bool)
    assert bad[rest][truth].mean() - bad[rest][~truth].mean() > unlabelled[rest][truth].mean() - \
        unlabelled[rest][~truth].mean()


def test_too_few_drops_leave_the_unsupervised_combination_and_say_why():
    calibration, drop, keep = planted()
    drop[MIN_REVIEWED_DROPS - 1:] = False
    with reviewed_rows(drop, keep):
        from dpsel.select.bads.calibration import current_reviewed
        bad, record = labelled_bad_probability(calibration, ["real", "decoy"], current_reviewed(400, 150))
    assert record["weights"] is None and "fewer than" in record["why"]
    assert np.allclose(bad, noisy_or([tail_bad_probability(*calibration[n]) for n in ("real", "decoy")]))


def test_no_context_no_labels_and_meta_rows_read_off_the_pool_curve():
    from dpsel.select.bads.calibration import current_reviewed
    assert current_reviewed(400, 150) is None
    with reviewed_rows(np.zeros(3, dtype=bool), np.zeros(2, dtype=bool)):
        assert current_reviewed(400, 150) is None   # another run's row counts: not this run's labels
    pool, meta = np.arange(10.0), np.array([-1.0, 4.5, 100.0])
    curve = tail_bad_probability(pool, meta)
    assert list(meta_bad_probability(pool, meta)) == [0.0, curve[4], curve.max()]


def test_reviewed_drops_weight_the_prior_and_the_report_records_it():
    calibration, drop, keep = planted()
    report = {}
    mean = _combined_mean({}, calibration, ["real", "decoy"], "tail", BadsSettings(), None, report)
    assert report == {} and mean.shape == (400,)
    with reviewed_rows(drop, keep):
        from dpsel.select.bads.calibration import current_reviewed
        labelled = _combined_mean({}, calibration, ["real", "decoy"], "tail", BadsSettings(),
                                  current_reviewed(400, 150), report)
    assert report["labels"]["drops"] == 20 and set(report["labels"]["weights"]) == {"real", "decoy"}
    assert labelled[200:280].mean() > mean[200:280].mean()   # the decoy's fine tail gets a higher prior mean
    assert float(torch.as_tensor(REVIEWED_DROP_PRIOR_MEAN)) < 0.01
