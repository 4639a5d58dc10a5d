"""select(): the registry, trivial baselines, and scorer round trips."""
from __future__ import annotations

import numpy as np
import pytest

from dpsel.data import row_id
from dpsel.errors import DpselInputError
from dpsel.select import METHODS, load_scorer, select
from dpsel.select.base import SelectConfig

from builders import SMALL_LM


def _rows(n, prefix="q"):
    return [[{"role": "user", "content": f"{prefix}{i}"}, {"role": "assistant", "content": f"a{i}"}]
            for i in range(n)]


def test_methods_registry():
    assert METHODS == ("bads", "l2rw", "loss", "ifd", "rds", "random", "all")
    with pytest.raises(DpselInputError):
        select(_rows(3), _rows(2), "nope")
    with pytest.raises(DpselInputError):
        select([], _rows(2), "all")


@pytest.mark.parametrize("method", ["random", "all"])
def test_trivial_methods_shapes_and_ranges(method, tmp_path):
    train = _rows(50)
    scores = select(train, [], method, SelectConfig(seed=3))
    assert scores.method == method
    assert scores.weight_mean.shape == (50,) and scores.weight_std.shape == (50,)
    assert np.all((scores.weight_mean >= 0) & (scores.weight_mean <= 1))
    assert np.all(scores.weight_std >= 0)
    if method == "all":
        assert np.all(scores.weight_mean == 1)
    else:
        assert scores.weight_mean.std() > 0.1  # actually random, not constant
        again = select(train, [], method, SelectConfig(seed=3))
        other = select(train, [], method, SelectConfig(seed=4))
        np.testing.assert_array_equal(scores.weight_mean, again.weight_mean)
        assert not np.allclose(scores.weight_mean, other.weight_mean)
    scores.scorer.save(tmp_path / "scorer")
    scorer = load_scorer(tmp_path / "scorer")
    ids = [row_id(m) for m in train]
    mean, std = scorer.score(train, ids)
    np.testing.assert_array_equal(mean, scores.weight_mean)
    new_mean, new_std = scorer.score(_rows(5, "unseen"))
    assert np.all(np.isfinite(new_mean)) and np.all((new_mean >= 0) & (new_mean <= 1))


def test_load_scorer_rejects_non_scorer_dir(tmp_path):
    with pytest.raises(DpselInputError):
        load_scorer(tmp_path)


# ---------------------------------------------------------------------------- LM methods on synth data



@pytest.fixture(scope="module")
def synth_rows(tmp_path_factory):
    import pandas as pd
    import torch

    from dpsel.data import alpaca_to_messages
    from dpsel.synth import generate

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("synth")
    paths = generate(out, rows=60, noise=0.3, seed=1, meta_rows=24, test_rows=10)
    def rows(name):
        return [alpaca_to_messages(r.instruction, r.output, r.input) for r in pd.read_parquet(paths[name]).itertuples()]
    train, tasks, seen = [], [], set()
    for messages, task in zip(rows("train"), pd.read_parquet(paths["train"]).task):
        if row_id(messages) not in seen:  # curate drops exact duplicates before selection; so do we
            seen.add(row_id(messages))
            train.append(messages)
            tasks.append(task)
    return train, rows("meta"), tasks


@pytest.mark.parametrize("weight_param", ["logits", "amortized"])
def test_bads_small_lm_run_is_finite_reproducible_and_scorer_round_trips(synth_rows, weight_param, tmp_path):
    train, meta, tasks = synth_rows
    config = SelectConfig(model="tiny", device="cpu", seed=5, steps=12, batch_size=8, meta_batch_size=4,
                          max_length=96, weight_param=weight_param, extra=dict(SMALL_LM, burn_in=0.25))
    seen = []
    scores = select(train, meta, "bads", config, progress=lambda s, t, d: seen.append((s, t)), groups=tasks)
    w, s = scores.weight_mean, scores.weight_std
    assert w.shape == (len(train),) and np.all(np.isfinite(w)) and np.all((w >= 0) & (w <= 1))
    assert np.all(np.isfinite(s)) and np.all(s >= 0)
    assert seen and seen[-1][0] == seen[-1][1]  # the progress callback reached the end
    for key in ("step", "mean_weight", "meta_loss", "train_loss", "weight_q10", "weight_q50", "weight_q90"):
        assert len(scores.diagnostics[key]) >= 2, key
    assert scores.timings["seconds_per_step"] > 0

    again = select(train, meta, "bads", config, groups=tasks)
    np.testing.assert_array_equal(w, again.weight_mean)  # bit for bit on CPU
    np.testing.assert_array_equal(s, again.weight_std)

    scores.scorer.save(tmp_path / "scorer")
    scorer = load_scorer(tmp_path / "scorer")
    mean, _ = scorer.score(train, [row_id(m) for m in train])
    np.testing.assert_array_equal(mean, w)
    unseen = [[{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
              [{"role": "user", "content": "Reverse 'abc'."}, {"role": "assistant", "content": "cba"}]]
    new_mean, new_std = scorer.score(unseen)
    assert np.all(np.isfinite(new_mean)) and np.all((new_mean >= 0) & (new_mean <= 1)) and np.all(new_std >= 0)
    # the scorer in memory and the reloaded one agree on unseen rows
    np.testing.assert_allclose(scores.scorer.score(unseen)[0], new_mean, rtol=1e-5)


@pytest.mark.parametrize("method", ["loss", "ifd", "l2rw"])
def test_baseline_lm_methods_small_run(synth_rows, method, tmp_path):
    train, meta, tasks = synth_rows
    config = SelectConfig(device="cpu", seed=2, steps=6, batch_size=8, meta_batch_size=4, max_length=96,
                          extra=SMALL_LM)
    scores = select(train, meta, method, config, groups=tasks)
    w = scores.weight_mean
    assert w.shape == (len(train),) and np.all(np.isfinite(w)) and np.all((w >= 0) & (w <= 1))
    if method == "loss":  # a decreasing function of the reference loss, rank-normalised per task
        assert w.std() > 0.1
    scores.scorer.save(tmp_path / "s")
    scorer = load_scorer(tmp_path / "s")
    np.testing.assert_array_equal(scorer.score(train)[0], w)
    new_mean, _ = scorer.score([[{"role": "user", "content": "Sort 3, 1, 2."}, {"role": "assistant", "content": "1, 2, 3"}]])
    assert np.all(np.isfinite(new_mean)) and 0 <= new_mean[0] <= 1


def test_bads_rejects_unknown_variant(synth_rows):
    train, meta, _ = synth_rows
    with pytest.raises(DpselInputError):
        select(train, meta, "bads", SelectConfig(device="cpu", variant="nope", extra=SMALL_LM))


def test_seen_table_scorer_keeps_ids_in_arrow_and_the_first_of_repeated_ids(tmp_path):
    from dpsel.select.scorers import SeenTableScorer
    scorer = SeenTableScorer((i for i in ["a", "b", "a", "c"]), [0.1, 0.2, 0.3, 0.4], [0.0, 0.1, 0.2, 0.3])
    assert scorer.ids.to_pylist() == ["a", "b", "a", "c"]
    mean, std = scorer.score([[], [], []], ["c", "a", "b"])
    assert mean.tolist() == [0.4, 0.1, 0.2] and std.tolist() == [0.3, 0.0, 0.1]
    scorer.save(tmp_path)
    loaded = SeenTableScorer.load(tmp_path)
    assert loaded.score([[]], ["a"])[0].tolist() == [0.1]
    with pytest.raises(ValueError, match="3 ids but 2 weights"):
        SeenTableScorer(["a", "b", "c"], [0.1, 0.2], [0.0, 0.0])
