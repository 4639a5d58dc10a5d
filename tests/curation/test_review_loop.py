"""Active curation: `dpsel review` picks the rows whose keep/drop is most uncertain, and `curate --labels` takes
a reviewer's answers back (drop: weight 0, reason reviewed_drop; keep: joins the meta rows, weight 1); a bad
labels file exits 2 naming the row."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.sparse import csr_matrix
from typer.testing import CliRunner

import dpsel.curation.run as curation_run
from builders import docs
from dpsel.cli import app
from dpsel.curation import curate
from dpsel.curation.review import diverse_pick, flip_probability, review_rows, write_review


def _write(folder, n=40, seed=3):
    texts = docs(n + 6, words=12, seed=seed)
    rows = [{"instruction": f"Question {i}: {t[:30]}", "input": "", "output": t} for i, t in enumerate(texts[:n])]
    meta = [{"instruction": f"Meta {i}", "input": "", "output": t} for i, t in enumerate(texts[n:])]
    paths = {"train": folder / "train.parquet", "meta": folder / "meta.parquet"}
    for name, table in (("train", rows), ("meta", meta)):
        pq.write_table(pa.Table.from_pylist(table), paths[name])
    return paths


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("review")
    paths = _write(folder)
    curate(paths["train"], paths["meta"], folder / "run", method="random", budget=0.5)
    return folder, paths


def _cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def test_flip_probability_is_half_on_the_cut_and_zero_for_certain_rows():
    p = flip_probability(np.array([0.5, 0.6, 0.9, 0.5, 0.7]), np.array([0.1, 0.1, 0.1, 0.0, 0.0]), 0.5)
    assert p[0] == pytest.approx(0.5) and p[3] == 0.5 and p[4] == 0.0
    assert p[1] == pytest.approx(0.158655, abs=1e-5)          # one std from the cut: Φ(-1)
    assert p[2] < 1e-4 < p[1]


def test_diverse_pick_takes_no_near_copies_of_the_most_uncertain_cluster():
    # 20 copies of one row are the most uncertain, then 40 distinct rows: K = 6 takes one copy, not six
    vectors = np.vstack([np.tile(np.eye(60)[0], (20, 1)), np.eye(60)[1:41]])
    picked = diverse_pick(np.arange(60), csr_matrix(vectors), 6)
    assert len(picked) == 6 and picked[0] == 0
    assert sum(p < 20 for p in picked) == 1
    assert picked[1:] == [20, 21, 22, 23, 24]                 # then the next most uncertain distinct rows


def test_review_writes_the_most_uncertain_rows_with_an_empty_label(first_run, tmp_path):
    folder, paths = first_run
    run = tmp_path / "run"
    shutil.copytree(folder / "run", run)
    scores = pq.read_table(run / "scores.parquet")
    planted_std = np.linspace(0.01, 0.4, scores.num_rows)[::-1]          # planted: row 0 least certain
    pq.write_table(scores.set_column(2, "dpsel_weight_std", pa.array(planted_std)), run / "scores.parquet")
    cut = json.loads((run / "manifest.json").read_text())["selection"]["effective_threshold"]
    p = flip_probability(scores.column("dpsel_weight").to_numpy(), planted_std, cut)
    result = _cli("review", "--run", run, "--rows", 5, "--out", tmp_path / "review.parquet")
    assert result.exit_code == 0, result.output
    review = pd.read_parquet(tmp_path / "review.parquet")
    assert len(review) == 5 and set(review.label) == {""}
    assert {"dpsel_id", "messages", "dpsel_weight", "dpsel_weight_std", "dpsel_reason"} <= set(review.columns)
    most_uncertain = np.argsort(-p, kind="stable")[:5]
    assert list(review.dpsel_id) == [scores.column("dpsel_id")[i].as_py() for i in most_uncertain]
    assert list(review.flip_probability) == pytest.approx(p[most_uncertain])
    train = pd.read_parquet(paths["train"])
    first = review.iloc[0]
    assert first.messages[0]["content"] == train.instruction[int(first.dpsel_file_row)]   # the conversation as read


def test_review_formats_csv_jsonl_and_label_studio(first_run, tmp_path):
    table = review_rows(first_run[0] / "run", 3)
    write_review(table, tmp_path / "r.csv")
    write_review(table, tmp_path / "r.jsonl")
    write_review(table, tmp_path / "ls.json", "label-studio")
    assert list(pd.read_csv(tmp_path / "r.csv").dpsel_id) == table.column("dpsel_id").to_pylist()
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 3
    tasks = json.loads((tmp_path / "ls.json").read_text())
    assert tasks[0]["data"]["text"].startswith("user: Question") and "dpsel_id" in tasks[0]["data"]
    assert '<Choice value="keep"/>' in (tmp_path / "ls.label_config.xml").read_text()


def test_labels_drop_fixes_weight_0_and_keep_joins_the_meta_rows(first_run, tmp_path, monkeypatch):
    folder, paths = first_run
    ids = pd.read_parquet(folder / "run" / "scores.parquet").dpsel_id
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"dpsel_id": ids[:4], "label": ["keep", "drop", "KEEP", ""]}).to_csv(labels, index=False)
    seen = {}
    real_select = curation_run.select

    def spying_select(train, meta, *args, **kwargs):
        seen["train"], seen["meta"] = train, meta
        return real_select(train, meta, *args, **kwargs)
    monkeypatch.setattr(curation_run, "select", spying_select)
    result = _cli("curate", "--train", paths["train"], "--meta", paths["meta"], "--out", tmp_path / "run2",
                  "--method", "random", "--budget", "0.5", "--labels", labels)
    assert result.exit_code == 0, result.output
    scores = pd.read_parquet(tmp_path / "run2" / "scores.parquet")
    assert list(scores.dpsel_label[:3]) == ["keep", "drop", "keep"] and scores.dpsel_label[3:].isna().all()
    assert scores.dpsel_reason[1] == "reviewed_drop" and scores.dpsel_weight[1] == 0 and not scores.dpsel_kept[1]
    assert list(scores.dpsel_weight[[0, 2]]) == [1.0, 1.0] and scores.dpsel_kept[[0, 2]].all()
    assert list(scores.dpsel_weight_std[[0, 1, 2]]) == [0.0, 0.0, 0.0]
    # keeps left the pool and joined meta; the drop stays in the pool (the calibration's known-bad row), weight 0
    assert len(seen["train"]) == 38 and len(seen["meta"]) == 6 + 2
    manifest = json.loads((tmp_path / "run2" / "manifest.json").read_text())
    assert manifest["labels"]["keep"] == 2 and manifest["labels"]["drop"] == 1
    assert manifest["labels"]["blank_rows"] == 1 and len(manifest["labels"]["sha256"]) == 64
    assert manifest["labels"]["calibration"] is None   # `random` has no calibrated evidence to weight
    assert manifest["counts"]["dropped_by_reason"]["reviewed_drop"] == 1
    assert manifest["counts"]["kept_rows"] + manifest["counts"]["dropped_rows"] == 40


def _bad_labels(first_run, tmp_path, frame: pd.DataFrame):
    folder, paths = first_run
    frame.to_parquet(tmp_path / "labels.parquet")
    return _cli("curate", "--train", paths["train"], "--meta", paths["meta"], "--out", tmp_path / "bad",
                "--method", "random", "--labels", tmp_path / "labels.parquet")


def test_label_other_than_keep_or_drop_exits_2_naming_the_row(first_run, tmp_path):
    ids = pd.read_parquet(first_run[0] / "run" / "scores.parquet").dpsel_id
    result = _bad_labels(first_run, tmp_path, pd.DataFrame({"dpsel_id": ids[:3], "label": ["keep", "drop", "maybe"]}))
    assert result.exit_code == 2
    assert "labels.parquet" in result.output and "row 2" in result.output and "'maybe'" in result.output
    assert not (tmp_path / "bad").exists()


def test_label_of_an_unknown_dpsel_id_exits_2_naming_the_row(first_run, tmp_path):
    ids = list(pd.read_parquet(first_run[0] / "run" / "scores.parquet").dpsel_id[:1])
    result = _bad_labels(first_run, tmp_path, pd.DataFrame({"dpsel_id": ids + ["nosuchid"], "label": ["keep", "drop"]}))
    assert result.exit_code == 2 and "row 1" in result.output and "nosuchid" in result.output


def test_labels_file_without_the_columns_exits_2_naming_the_column(first_run, tmp_path):
    result = _bad_labels(first_run, tmp_path, pd.DataFrame({"id": ["x"], "verdict": ["keep"]}))
    assert result.exit_code == 2 and "column 'dpsel_id'" in result.output and "labels.parquet" in result.output


def test_a_label_studio_export_is_a_labels_file(tmp_path):
    from dpsel.curation.labels import read_labels
    export = [{"data": {"dpsel_id": "a"}, "annotations": [{"result": [{"value": {"choices": ["drop"]}}]}]},
              {"data": {"dpsel_id": "b"}, "annotations": []}]
    (tmp_path / "export.json").write_text(json.dumps(export))
    labels = read_labels(tmp_path / "export.json", {"a", "b"})
    assert labels.by_id == {"a": "drop"} and labels.blank_rows == 1
