"""`dpsel inspect RUN`: a finished run's dropped rows printed beside what they matched, read back from the
input files its manifest names; bad runs, reasons and inputs exit 2 naming the file."""
from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

import dpsel
from builders import dropped_rows_inputs
from dpsel.cli import app
from dpsel.curation import curate
from dpsel.stages.options import StagesConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect")
    paths = dropped_rows_inputs(folder)
    curate(paths["train"], paths["meta"], folder / "run", method="all",
           stages=StagesConfig(decontaminate=[paths["eval"]]))
    return folder / "run", paths


def _inspect(*args):
    return CliRunner().invoke(app, ["inspect", *map(str, args)])


def test_inspect_prints_duplicates_beside_their_kept_rows(run):
    result = _inspect(run[0], "--reason", "duplicate", "--rows", "2")
    assert result.exit_code == 0, result.output
    blocks = result.output.strip().split("\n\n")
    assert len(blocks) == 2 and all(b.startswith("[duplicate] input row ") for b in blocks)
    assert "detail: same content as input row 1" in blocks[0]
    assert blocks[0].count("user: Question 1 about item 1") == 2            # the row and the row kept instead
    assert "beside: input row 1: user: Question 1" in blocks[0]
    assert "left | right\n          second line long" in blocks[1]          # plain text: newlines kept, indented
    assert "…" in blocks[1]


def test_inspect_shows_the_eval_text_a_contaminated_row_matched(run):
    result = _inspect(run[0], "--reason", "contaminated", "--reason", "near_duplicate")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("[contaminated] input row 7")
    assert f"beside: eval row 0 of {run[1]['eval']}: user: Question 7 about item 7" in result.output
    assert "[near_duplicate] input row 13" in result.output


def test_inspect_unknown_reason_exits_2_listing_the_present_ones(run):
    result = _inspect(run[0], "--reason", "filtered:len")
    assert result.exit_code == 2
    assert "scores.parquet" in result.output and "filtered:len" in result.output
    assert "reasons present: contaminated (1), duplicate (8), invalid (1), near_duplicate (1)" in result.output


def test_inspect_missing_run_or_scores_exits_2_naming_it(run, tmp_path):
    result = _inspect(tmp_path / "nowhere")
    assert result.exit_code == 2 and "nowhere" in result.output
    (tmp_path / "half").mkdir()
    result = _inspect(tmp_path / "half")
    assert result.exit_code == 2 and "scores.parquet" in result.output


def test_inspect_changed_or_missing_input_exits_2_naming_it(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["inputs"]["train"]["files"][0]["sha256"] = "0" * 64       # as if the file changed since the run
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = _inspect(copy, "--reason", "duplicate")
    assert result.exit_code == 2 and run[1]["train"] in result.output and "changed" in result.output
    moved = tmp_path / "moved.parquet"
    shutil.move(run[1]["train"], moved)
    try:
        result = _inspect(run[0], "--reason", "invalid")
    finally:
        shutil.move(moved, run[1]["train"])
    assert result.exit_code == 2 and run[1]["train"] in result.output and "not found" in result.output


def test_api_inspect_returns_the_rows_as_dicts(run):
    rows = dpsel.inspect(run[0], reason="near_duplicate", limit=5)
    assert len(rows) == 1
    row = rows[0]
    assert (row["row"], row["reason"], row["partner"]) == (13, "near_duplicate", "input row 3")
    assert row["text"].startswith("user: Question 3 about item 3") and row["partner_text"].startswith("user: Question 3")
    assert len(dpsel.inspect(run[0])) == 11       # every reason, every dropped row (under the default limit)
    assert [r["row"] for r in dpsel.inspect(run[0], limit=3)] == [7, 12, 13]   # the first, in input order
