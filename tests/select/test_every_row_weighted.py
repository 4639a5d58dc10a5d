"""Selection at any pool size: every row gets a weight backed by something, and `rds`."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpsel.select import select
from dpsel.select.base import SelectConfig
from dpsel.select.quality import TEXT_SIGNALS

QUALITY_TEXT = [f"quality_{name}" for name in TEXT_SIGNALS]  # the text signals, in the prior's order
EMBEDDER_EVIDENCE = ["qa_consistency", "quality_genericness", "fluency", *QUALITY_TEXT, "theta"]

SMALL_LM = dict(ref_steps=20, ref_eval_every=10, ref_batch_size=8)


def _qa(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _arithmetic(n, offset=0):
    return [_qa(f"What is {i + offset} + {2 * i + 1}?", str(3 * i + offset + 1)) for i in range(n)]


def test_bads_steps_follow_epochs():
    from dpsel.select.bads import BadsSettings
    settings = BadsSettings(epochs=2.0, burn_in=0.25)
    assert settings.resolve_steps(3000, 16) == 502  # ceil(2 × 188 batches / 0.75): 25% burn-in first
    settings.steps = 7
    assert settings.resolve_steps(3000, 16) == 7    # an explicit step count wins


@pytest.mark.parametrize("variant", ["default", "paper"])
def test_pool_larger_than_the_run_gets_every_row_scored(variant):
    """60 rows, 3 steps × 4 rows: most rows are never visited; none may sit silently at its prior."""
    from dpsel.select.bads import BadsSettings, empirical_bayes_mean
    train, meta = _arithmetic(60), _arithmetic(12, offset=500)
    config = SelectConfig(model="tiny", device="cpu", seed=3, steps=3, batch_size=4, meta_batch_size=4,
                          max_length=64, variant=variant, extra=dict(SMALL_LM, burn_in=0.0))
    scores = select(train, meta, "bads", config)
    coverage = scores.coverage
    visits = coverage["visits_after_burn_in"]
    assert coverage["steps"] == 3 and visits["max"] >= 1 and visits["min"] == 0
    assert coverage["rows_never_visited_after_burn_in"] >= 60 - 12
    assert sum(coverage["rows_scored_by"].values()) == 60
    w = scores.weight_mean
    assert np.all(np.isfinite(w)) and np.all((w >= 0) & (w <= 1))
    if variant == "default":
        assert coverage["rows_scored_by"] == {"posterior_pass": 60}
        # no group column, θ in the embedder's space: q–a consistency and fluency (pseudo-groups off there)
        assert coverage["prior_evidence"] == EMBEDDER_EVIDENCE
        assert np.all(scores.weight_std > 0)  # every row has posterior spread from the θ draws
    else:
        assert coverage["rows_scored_by"]["under_visited"] >= 60 - 12
        assert coverage["prior_evidence"] == []  # the paper form: flat prior
        prior = BadsSettings.for_variant("paper", {}).beta  # the paper form's flat prior mean
        assert not np.allclose(w, prior)                    # the weight network scored them, not the prior
    # the unvisited rows do not all share one value (they are scored, not defaulted)
    assert len(np.unique(np.round(w, 6))) > 10
    del empirical_bayes_mean


def test_curate_manifest_records_coverage(tmp_path):
    from dpsel.curation import curate
    rows = [{"instruction": f"What is {i} + {i + 1}?", "output": str(2 * i + 1), "task": "add"} if i % 2 else
            {"instruction": f"Shout the word w{i}", "output": f"W{i}!", "task": "shout"} for i in range(48)]
    meta = [{"instruction": f"What is {i} + 2?", "output": str(i + 2), "task": "add"} for i in range(300, 312)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(meta), tmp_path / "meta.parquet")
    config = SelectConfig(model="tiny", device="cpu", seed=0, steps=2, batch_size=4, meta_batch_size=4,
                          max_length=64, extra=SMALL_LM)
    result = curate(tmp_path / "train.parquet", tmp_path / "meta.parquet", tmp_path / "out", method="bads",
                    budget=0.5, config=config)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    coverage = manifest["coverage"]
    assert coverage == result.manifest["coverage"]
    assert coverage["rows_never_visited_after_burn_in"] > 0
    assert coverage["rows_scored_by"] == {"posterior_pass": 48}
    assert set(coverage["visits_after_burn_in"]) == {"min", "median", "max"}
    # the pool has a task column: its own groups, no pseudo-groups
    # tail prior: only sources that score the meta rows (group consistency cannot: meta has no group column)
    assert coverage["prior_evidence"] == EMBEDDER_EVIDENCE


def test_rds_ranks_off_domain_rows_below_on_domain():
    on_domain = _arithmetic(30)
    off_domain = [_qa(f"Écris un poème sur la mer numéro {chr(945 + i)}.",
                      "Les vagues chantent doucement sous la lune d'argent, " * 2) for i in range(10)]
    train = on_domain[:15] + off_domain[:5] + on_domain[15:] + off_domain[5:]
    is_off = np.array([False] * 15 + [True] * 5 + [False] * 15 + [True] * 5)
    meta = _arithmetic(10, offset=700)
    config = SelectConfig(model="tiny", device="cpu", seed=0, max_length=96)
    scores = select(train, meta, "rds", config)
    w = scores.weight_mean
    assert w[is_off].max() < w[~is_off].min()
    # the scorer places an unseen off-domain row low too
    new_off, _ = scores.scorer.score([_qa("Traduis « bonjour » en allemand, s'il te plaît.", "Guten Tag, mein Freund.")])
    new_on, _ = scores.scorer.score([_qa("What is 41 + 7?", "48")])
    assert new_off[0] < new_on[0]


def test_epochs_option_reaches_the_selection_config():
    from dpsel.config import RunConfig
    run = RunConfig.load(None, {"epochs": 1.5, "method": "rds"}, stage="curate")
    assert run.select_config().epochs == 1.5 and run.curate.method == "rds"
