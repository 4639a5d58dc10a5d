"""The meta-calibrated evidence combination (select/bads/calibration.py) on planted pools."""
import numpy as np

from dpsel.curation.truth import auroc
from dpsel.select.bads.calibration import clean_fraction, noisy_or, prior_mean_from_bad_probability, tail_bad_probability
from dpsel.select.consistency import combine_evidence
from dpsel.select.semantic import robust_z


def planted(seed=0, n=3000, n_meta=200, bad_fraction=0.3):
    rng = np.random.default_rng(seed)
    bad = rng.random(n) < bad_fraction
    informative = rng.standard_normal(n) + 2.5 * bad   # high = looks bad, and bad rows are high
    anti = rng.standard_normal(n) - 1.0 * bad          # bad rows look *better* than clean ones (fluent boilerplate)
    noisy = rng.standard_t(2, n)                      # heavy-tailed noise, no signal: what `max` let in
    meta = {name: rng.standard_normal(n_meta) for name in ("informative", "anti")}
    meta["noisy"] = rng.standard_t(2, n_meta)
    return bad, {"informative": informative, "anti": anti, "noisy": noisy}, meta


def test_uninformative_and_anti_informative_sources_drop_out_of_the_combination():
    bad, pool, meta = planted()
    p = {name: tail_bad_probability(pool[name], meta[name]) for name in pool}
    # their tails are no heavier in the pool than in meta: near 0 on average (a few extreme rows keep some, where
    # 200 meta rows say little about the pool's top 1%)
    assert p["anti"].mean() < 0.02 and p["noisy"].mean() < 0.1 and p["informative"].mean() > 0.5
    combined = noisy_or(list(p.values()))
    alone = auroc(~bad, -pool["informative"])
    assert auroc(~bad, -combined - 1e-9 * pool["informative"]) > alone - 0.01
    by_max = combine_evidence([robust_z(pool[name]) for name in pool], "max")
    assert auroc(~bad, -by_max) < alone - 0.03  # the rule it replaces is diluted by the other sources' tails


def test_an_informative_source_flags_its_tail_and_prior_means_follow():
    bad, pool, meta = planted(seed=1)
    p = tail_bad_probability(pool["informative"], meta["informative"])
    order = np.argsort(pool["informative"])
    assert np.all(np.diff(p[order]) >= 0)  # a worse score never gets a lower P(bad)
    assert p[bad].mean() > p[~bad].mean() + 0.3
    assert np.isclose(p.min(), 1 - clean_fraction(pool["informative"], meta["informative"]))  # tail area: base rate
    mean = prior_mean_from_bad_probability(p, 0.7)
    assert mean.max() <= 0.7 and mean[bad].mean() < mean[~bad].mean()


def test_noisy_or_one_source_at_a_time_equals_the_stacked_product():
    """Streamed over a generator (one source's array held at a time), the same values, bit for bit, as
    1 − Π(1 − p) over the stacked sources."""
    _, pool, meta = planted(seed=2)
    p = [tail_bad_probability(pool[name], meta[name]) for name in pool]
    stacked = 1.0 - np.prod([1.0 - q for q in p], axis=0)
    assert np.array_equal(noisy_or(iter(p)), stacked) and np.array_equal(noisy_or(p), stacked)
    assert np.allclose(noisy_or([p[0]]), p[0])
