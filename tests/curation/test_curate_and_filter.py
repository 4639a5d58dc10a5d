"""curate / filter_rows: row accounting, selection rules, output files, scorer round trip."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpsel.curation import curate, filter_rows
from dpsel.curation.rules import apply_rule, budget_count, make_rule, top_fraction
from dpsel.data import read_instruction_set
from dpsel.errors import DpselInputError
from dpsel.synth import generate

OUTPUT_FILES = {"scores.parquet", "curated.parquet", "manifest.json", "report.md", "weights_hist.png",
                "weights_by_task.png", "weights_by_source.png", "scorer"}


def _alpaca_rows(n: int, task_of=lambda i: "ab"[i % 2]) -> list[dict]:
    return [{"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1), "task": task_of(i),
             "source": "web", "note": f"n{i}"} for i in range(n)]


@pytest.fixture(scope="module")
def dirty(tmp_path_factory) -> dict:
    """A train set with an invalid row (empty output, row 3) and a duplicate of row 1 (row 5), plus a meta set."""
    root = tmp_path_factory.mktemp("dirty")
    rows = _alpaca_rows(40)
    rows[3]["output"] = "  "
    rows[5] = dict(rows[1])
    pq.write_table(pa.Table.from_pylist(rows), root / "train.parquet")
    meta = [{"instruction": f"Add {i} and 1.", "output": str(i + 1), "task": "a", "source": "trusted",
             "note": ""} for i in range(100, 110)]
    pq.write_table(pa.Table.from_pylist(meta), root / "meta.parquet")
    return {"train": root / "train.parquet", "meta": root / "meta.parquet", "root": root}


@pytest.fixture(scope="module")
def random_run(dirty, tmp_path_factory):
    before = {p: _sha(dirty[p]) for p in ("train", "meta")}
    out = tmp_path_factory.mktemp("out") / "run"
    result = curate(dirty["train"], dirty["meta"], out, method="random", budget=0.5)
    return result, before


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _scores(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "scores.parquet")


# ---------------------------------------------------------------------------- selection rule (pure)
def test_budget_count_rounds_half_up():
    assert [budget_count(0.7, 5), budget_count(0.5, 3), budget_count(0.0, 9), budget_count(1.0, 9)] == [4, 2, 0, 9]


def test_top_fraction_breaks_ties_by_input_order():
    weights = np.array([0.5, 0.9, 0.5, 0.5, 0.1])
    kept = top_fraction(weights, np.arange(5), 0.6)   # 3 rows: 0.9, then the first two 0.5s
    assert sorted(kept.tolist()) == [0, 1, 2]


def test_threshold_keeps_usable_rows_at_or_above():
    weights = np.array([0.2, 0.5, 0.7, 0.9])
    usable = np.array([True, True, True, False])
    keep = apply_rule(make_rule("random", None, 0.5, None, False, "task"), weights, usable)
    assert keep.tolist() == [False, True, True, False]


@pytest.mark.parametrize("kwargs", [dict(budget=0.5, threshold=0.3), dict(budget=1.5),
                                    dict(threshold=0.3, per_group=True)])
def test_conflicting_or_bad_options_are_input_errors(kwargs):
    with pytest.raises(DpselInputError):
        make_rule("random", kwargs.get("budget"), kwargs.get("threshold"), None, kwargs.get("per_group", False),
                  "task")


def test_budget_and_threshold_together_rejected_by_curate(dirty, tmp_path):
    with pytest.raises(DpselInputError, match="not both"):
        curate(dirty["train"], dirty["meta"], tmp_path / "o", method="random", budget=0.5, threshold=0.5)


# ---------------------------------------------------------------------------- accounting
def test_one_scores_row_per_input_row_in_order(random_run, dirty):
    result, _ = random_run
    scores = _scores(result.out_dir)
    data = read_instruction_set([str(dirty["train"])])
    assert len(scores) == 40
    assert scores["dpsel_id"].tolist() == data.frame["dpsel_id"].tolist()
    assert scores["dpsel_file_row"].tolist() == list(range(40))
    assert result.counts["input_rows"] == result.counts["kept_rows"] + result.counts["dropped_rows"] == 40


def test_invalid_and_duplicate_rows_get_their_reasons(random_run):
    scores = _scores(random_run[0].out_dir)
    invalid, dup, first = scores.iloc[3], scores.iloc[5], scores.iloc[1]
    assert (invalid.dpsel_reason, invalid.dpsel_weight, invalid.dpsel_weight_std, invalid.dpsel_kept) == \
        ("invalid", 0.0, 0.0, False)
    assert (dup.dpsel_reason, dup.dpsel_kept) == ("duplicate", False)
    assert dup.dpsel_weight == first.dpsel_weight
    assert "output" in invalid.dpsel_detail
    counts = random_run[0].counts
    assert counts["dropped_by_reason"]["invalid"] == 1 and counts["dropped_by_reason"]["duplicate"] == 1


def test_budget_keeps_top_fraction_of_usable_rows(random_run):
    scores = _scores(random_run[0].out_dir)
    usable = scores[~scores.dpsel_reason.isin(["invalid", "duplicate"])]
    kept = usable[usable.dpsel_kept]
    assert len(kept) == budget_count(0.5, 38) == 19
    assert kept.dpsel_weight.min() >= usable[~usable.dpsel_kept].dpsel_weight.max()
    assert set(scores[scores.dpsel_kept].dpsel_reason) == {""}
    assert set(usable[~usable.dpsel_kept].dpsel_reason) == {"low_weight"}


def test_threshold_run_keeps_rows_at_or_above(dirty, tmp_path):
    result = curate(dirty["train"], dirty["meta"], tmp_path / "t", method="random", threshold=0.4)
    scores = _scores(result.out_dir)
    usable = ~scores.dpsel_reason.isin(["invalid", "duplicate"])
    assert scores.dpsel_kept.tolist() == (usable & (scores.dpsel_weight >= 0.4)).tolist()
    assert result.manifest["selection"]["rule"] == "threshold"


def test_all_keeps_every_usable_row_by_default(dirty, tmp_path):
    result = curate(dirty["train"], dirty["meta"], tmp_path / "a", method="all")
    assert result.counts["kept_rows"] == 38
    assert result.counts["dropped_by_reason"] == {"invalid": 1, "duplicate": 1, "low_weight": 0}


def test_per_task_budgets(dirty, tmp_path):
    result = curate(dirty["train"], dirty["meta"], tmp_path / "g", method="random",
                    task_budgets={"a": 1.0, "b": 0.25})
    scores = _scores(result.out_dir).assign(task=pd.read_parquet(dirty["train"])["task"])
    usable = scores[~scores.dpsel_reason.isin(["invalid", "duplicate"])]
    per_task = usable.groupby("task").dpsel_kept.agg(["sum", "size"])
    assert per_task.loc["a", "sum"] == per_task.loc["a", "size"]            # every usable `a` row
    assert per_task.loc["b", "sum"] == budget_count(0.25, per_task.loc["b", "size"])
    with pytest.raises(DpselInputError, match="unknown"):
        curate(dirty["train"], dirty["meta"], tmp_path / "g2", method="random", task_budgets={"zzz": 0.5})


def test_per_group_true_applies_budget_inside_each_task(dirty, tmp_path):
    result = curate(dirty["train"], dirty["meta"], tmp_path / "pg", method="random", budget=0.5, per_group=True)
    groups = result.manifest["groups"]["task"]
    assert groups["a"]["kept"] == budget_count(0.5, groups["a"]["scored"])
    assert groups["b"]["kept"] == budget_count(0.5, groups["b"]["scored"])


def test_bad_meta_row_is_an_error_naming_the_file(dirty, tmp_path):
    bad_meta = tmp_path / "meta_bad.parquet"
    rows = _alpaca_rows(4)
    rows[2]["instruction"] = ""
    pq.write_table(pa.Table.from_pylist(rows), bad_meta)
    with pytest.raises(DpselInputError) as err:
        curate(dirty["train"], bad_meta, tmp_path / "m", method="random")
    assert "meta_bad.parquet" in str(err.value) and err.value.row == 2


def test_out_dir_that_would_overwrite_an_input_is_refused(tmp_path, dirty):
    own = tmp_path / "scores.parquet"
    pq.write_table(pa.Table.from_pylist(_alpaca_rows(6)), own)
    with pytest.raises(DpselInputError, match="overwrite"):
        curate(own, dirty["meta"], tmp_path, method="random")


# ---------------------------------------------------------------------------- output files
def test_output_files_and_inputs_untouched(random_run, dirty):
    result, before = random_run
    names = {p.name for p in result.out_dir.iterdir()}
    assert OUTPUT_FILES <= names
    assert not any(n.endswith(".tmp") for n in names)
    assert {p: _sha(dirty[p]) for p in ("train", "meta")} == before
    report = (result.out_dir / "report.md").read_text()
    assert report.startswith("# dpsel curate: random") and "kept rows**: 19" in report
    assert "weights_hist.png" in report and "weights_by_task.png" in report


def test_manifest_fields(random_run, dirty):
    manifest = json.loads((random_run[0].out_dir / "manifest.json").read_text())
    import dpsel
    assert manifest["dpsel_version"] == dpsel.__version__
    assert manifest["method"] == "random" and manifest["seed"] == 0 and manifest["config"]["model"] == "tiny"
    train_file = manifest["inputs"]["train"]["files"][0]
    assert train_file["sha256"] == _sha(dirty["train"]) and train_file["rows"] == 40
    counts = manifest["counts"]
    assert counts["input_rows"] == counts["kept_rows"] + counts["dropped_rows"]
    assert counts["dropped_rows"] == sum(counts["dropped_by_reason"].values())
    assert {"read_s", "select_s", "write_s", "total_s"} <= set(manifest["timings"])
    mixture = [g["mixture_weight"] for g in manifest["groups"]["task"].values()]
    assert set(manifest["groups"]["task"]) == {"a", "b"} and sum(mixture) == pytest.approx(1.0)
    selection = json.loads((random_run[0].out_dir / "scorer" / "selection.json").read_text())
    scores = _scores(random_run[0].out_dir)
    assert selection["effective_threshold"] == scores[scores.dpsel_kept].dpsel_weight.min()


def test_curated_parquet_loads_with_datasets(random_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    path = random_run[0].out_dir / "curated.parquet"
    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path))
    assert loaded.column_names == ["instruction", "output", "task", "source", "note", "dpsel_id", "dpsel_weight",
                                   "messages", "dpsel_pii"]   # dpsel_pii: the PII stage's default `flag`
    scores = _scores(random_run[0].out_dir)
    assert loaded.num_rows == int(scores.dpsel_kept.sum())
    assert loaded["dpsel_id"] == scores[scores.dpsel_kept].dpsel_id.tolist()
    # the normalised conversation, ready for chat fine-tuning code (TRL's SFTTrainer takes `messages`)
    first = loaded[0]
    assert first["messages"][-1] == {"role": "assistant", "content": first["output"]}
    assert first["messages"][-2]["role"] == "user" and first["instruction"] in first["messages"][-2]["content"]


def test_rerun_into_same_dir_replaces_files(dirty, tmp_path):
    out = tmp_path / "same"
    out.mkdir()
    (out / "keep_me.txt").write_text("user file")
    curate(dirty["train"], dirty["meta"], out, method="random", budget=0.5)
    second = curate(dirty["train"], dirty["meta"], out, method="all")
    assert second.counts["kept_rows"] == 38 and int(_scores(out).dpsel_kept.sum()) == 38
    assert (out / "keep_me.txt").read_text() == "user file"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------- filter
def test_filter_reproduces_curate_weights_and_selection(random_run, dirty, tmp_path):
    result, _ = random_run
    filtered = filter_rows(result.out_dir / "scorer", [str(dirty["train"])], tmp_path / "f")
    a, b = _scores(result.out_dir), _scores(filtered.out_dir)
    pd.testing.assert_series_equal(a.dpsel_weight, b.dpsel_weight)
    # default threshold = the run's lowest kept weight, so the same rows pass
    assert a.dpsel_kept.tolist() == b.dpsel_kept.tolist()
    assert {p.name for p in filtered.out_dir.iterdir()} == {p.name for p in result.out_dir.iterdir()}
    assert {p.name for p in (filtered.out_dir / "scorer").iterdir()} == \
        {p.name for p in (result.out_dir / "scorer").iterdir()}
    assert filtered.manifest["command"] == "filter"


def test_filter_on_unseen_rows_with_explicit_threshold(random_run, tmp_path):
    unseen = tmp_path / "new.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": f"Say {w}.", "output": w} for w in "xyzuvw"]), unseen)
    filtered = filter_rows(random_run[0].out_dir / "scorer", unseen, tmp_path / "fu", threshold=0.5)
    scores = _scores(filtered.out_dir)
    assert len(scores) == 6 and scores.dpsel_kept.tolist() == (scores.dpsel_weight >= 0.5).tolist()
    with pytest.raises(DpselInputError):
        filter_rows(random_run[0].out_dir / "scorer", unseen, tmp_path / "fx", threshold=0.5, budget=0.5)


# ---------------------------------------------------------------------------- truth / bads
def test_truth_adds_auroc(tmp_path):
    paths = generate(tmp_path / "synth", rows=120, noise=0.3, seed=1, meta_rows=20, test_rows=10)
    result = curate(paths["train"], paths["meta"], tmp_path / "o", method="random", truth=paths["truth"])
    assert 0.0 <= result.auroc["overall"] <= 1.0
    assert {"wrong", "garbage"} <= set(result.auroc)
    assert result.manifest["truth"]["kept_fraction_by_kind"]["duplicate"] == 0.0
    assert "AUROC" in (tmp_path / "o" / "report.md").read_text()


@pytest.mark.slow
def test_small_bads_run_writes_traces(tmp_path):
    pytest.importorskip("dpsel.select.bads")
    from dpsel.select.base import SelectConfig
    paths = generate(tmp_path / "synth", rows=80, noise=0.3, seed=2, meta_rows=16, test_rows=4)
    from builders import SMALL_LM  # a short reference fit: this checks the plumbing, not quality
    config = SelectConfig(steps=20, batch_size=8, meta_batch_size=8, max_length=64, device="cpu", extra=SMALL_LM)
    seen = []
    result = curate(paths["train"], paths["meta"], tmp_path / "o", method="bads", config=config,
                    progress=lambda step, total, diag: seen.append(step), truth=paths["truth"])
    assert seen and result.counts["input_rows"] == 80
    scores = _scores(result.out_dir)
    assert scores.dpsel_weight.between(0, 1).all()
    filtered = filter_rows(result.out_dir / "scorer", paths["train"], tmp_path / "f")
    np.testing.assert_allclose(_scores(filtered.out_dir).dpsel_weight, scores.dpsel_weight)


def test_sampler_traces_are_plotted_and_stale_plots_removed(dirty, tmp_path, monkeypatch):
    """A method that records diagnostics gets traces.png; a later run without them removes the stale plot."""
    import dpsel.curation.run as curate_module
    from dpsel.select import select as real_select

    def select_with_traces(train, meta, method, config, progress, groups=None):
        scores = real_select(train, meta, "random", config, progress, groups=groups)
        scores.diagnostics = {"step": [0, 10, 20], "loss": [3.0, 2.0, 1.5], "mean_w": [0.5, 0.6, 0.65]}
        return scores

    out = tmp_path / "tr"
    monkeypatch.setattr(curate_module, "select", select_with_traces)
    curate(dirty["train"], dirty["meta"], out, method="random")
    assert (out / "traces.png").stat().st_size > 0 and "traces.png" in (out / "report.md").read_text()
    monkeypatch.setattr(curate_module, "select", real_select)
    curate(dirty["train"], dirty["meta"], out, method="random")
    assert not (out / "traces.png").exists()
