"""The CLI's contract: sub-commands, exit codes (0 ok, 2 bad input/arguments, 1 internal) and messages."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dpsel.cli import _parse_extra_options, app

runner = CliRunner()


@pytest.mark.parametrize("command", ["synth", "validate", "curate", "tune", "filter", "flow"])
def test_every_subcommand_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_synth_then_validate(tmp_path):
    result = runner.invoke(app, ["synth", "--out", str(tmp_path), "--rows", "60", "--seed", "3"])
    assert result.exit_code == 0, result.output
    for name in ("train", "meta", "test", "truth"):
        assert (tmp_path / f"{name}.parquet").exists()
    result = runner.invoke(app, ["validate", str(tmp_path / "meta.parquet")])
    assert result.exit_code == 0, result.output
    assert "200" in result.output  # default meta rows


def test_missing_file_is_exit_2_naming_the_file(tmp_path):
    missing = tmp_path / "nope.parquet"
    result = runner.invoke(app, ["validate", str(missing)])
    assert result.exit_code == 2
    assert "nope.parquet" in result.output
    assert "Traceback" not in result.output


def test_bad_row_is_exit_2_naming_column_and_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["x", ""]}), path)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "output" in result.output and "row 1" in result.output


def test_bad_arguments_are_exit_2(tmp_path):
    assert runner.invoke(app, ["synth", "--out", str(tmp_path), "--noise", "1.5"]).exit_code == 2
    assert runner.invoke(app, ["synth"]).exit_code == 2  # missing --out
    result = runner.invoke(app, ["curate", "--train", "x", "--meta", "y", "--out", str(tmp_path),
                                 "--method", "nonsense"])
    assert result.exit_code == 2 and "bads" in result.output


def test_extra_flow_options_parse():
    assert _parse_extra_options(["--train", "a.parquet", "--steps=5", "--compare"]) == {
        "train": "a.parquet", "steps": "5", "compare": True}


def test_curate_reads_a_run_config_and_options_override_it(tmp_path):
    data = tmp_path / "data"
    assert runner.invoke(app, ["synth", "--out", str(data), "--rows", "80", "--meta-rows", "20",
                               "--test-rows", "10"]).exit_code == 0
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  train: {data / 'train.parquet'}\n  meta: {data / 'meta.parquet'}\n"
                      f"curate:\n  method: all\n  select:\n    max_length: 64\nout: {tmp_path / 'from-file'}\n")
    result = runner.invoke(app, ["curate", "--config", str(config), "--method", "random", "--budget", "0.5",
                                 "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["method"] == "random" and not (tmp_path / "from-file").exists()
    counts = manifest["counts"]
    assert counts["kept_rows"] == round(0.5 * (counts["input_rows"] - counts["dropped_by_reason"]["duplicate"]))


def test_curate_without_inputs_names_what_is_missing(tmp_path):
    result = runner.invoke(app, ["curate", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "data.train" in result.output
