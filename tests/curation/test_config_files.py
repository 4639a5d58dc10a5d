"""RunConfig: YAML loading, errors that name the file and field, CLI overrides, the library views."""
from __future__ import annotations

from pathlib import Path

import pytest

from dpsel.config import RunConfig
from dpsel.errors import DpselInputError

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_round_trip_and_library_views(tmp_path):
    path = _write(tmp_path, """
data: {train: d/train.parquet, meta: d/meta.parquet, test: d/test.parquet}
curate: {method: loss, threshold: 0.4, steps: 50, select: {batch_size: 8, extra: {kappa: 3.0}}}
tune: {method: qlora, steps: 20, lr: 0.001, r: 4, weights_column: dpsel_weight}
model: tiny
device: cpu
seed: 7
out: runs/x
""")
    config = RunConfig.from_yaml(path)
    assert config.data.eval == "d/test.parquet"  # `test` is accepted for `eval`
    select = config.select_config()
    assert (select.model, select.device, select.seed, select.steps, select.batch_size, select.extra) == \
        ("tiny", "cpu", 7, 50, 8, {"kappa": 3.0})
    assert config.tune_options() == {"method": "qlora", "model": "tiny", "seed": 7, "device": "cpu",
                                     "weights_column": "dpsel_weight", "steps": 20, "lr": 0.001, "r": 4}
    assert RunConfig.from_mapping(config.model_dump(mode="json")) == config


def test_empty_file_gives_defaults(tmp_path):
    config = RunConfig.from_yaml(_write(tmp_path, ""))
    assert config.curate.method == "bads" and config.tune.method == "lora" and config.device == "auto"


@pytest.mark.parametrize("text, field", [
    ("curate: {budgt: 0.5}", "curate.budgt"),
    ("curate: {budget: 1.5}", "curate.budget"),
    ("curate: {method: magic}", "curate.method"),
    ("curate: {budget: 0.5, threshold: 0.2}", "curate"),
    ("tune: {steps: many}", "tune.steps"),
    ("device: tpu", "device"),
])
def test_bad_field_is_named_with_the_file(tmp_path, text, field):
    path = _write(tmp_path, text)
    with pytest.raises(DpselInputError) as caught:
        RunConfig.from_yaml(path)
    message = str(caught.value)
    assert str(path) in message and f"field {field}" in message
    assert caught.value.file == str(path)


def test_unreadable_or_malformed_files(tmp_path):
    with pytest.raises(DpselInputError, match="cannot read config"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(DpselInputError, match="not valid YAML"):
        RunConfig.from_yaml(_write(tmp_path, "data: [unclosed"))
    with pytest.raises(DpselInputError, match="must be a mapping"):
        RunConfig.from_yaml(_write(tmp_path, "- a\n- b\n"))


def test_cli_overrides(tmp_path):
    config = RunConfig.from_yaml(_write(tmp_path, "curate: {threshold: 0.3, steps: 10}\ntune: {steps: 5}\n"))
    # None = option not given; strings from the command line are coerced; budget replaces the file's threshold
    over = config.with_overrides({"budget": "0.6", "steps": "40", "seed": "3", "lr": None, "train": Path("t.pq"),
                                  "tune_method": "lokr"}, stage="curate")
    assert (over.curate.budget, over.curate.threshold, over.curate.steps) == (0.6, None, 40)
    assert (over.tune.steps, over.tune.method, over.seed, over.data.train) == (5, "lokr", 3, "t.pq")
    assert config.with_overrides({"tune.steps": 9}).tune.steps == 9
    assert config.with_overrides({"steps": 9}, stage="tune").tune.steps == 9
    with pytest.raises(DpselInputError, match="ambiguous"):
        config.with_overrides({"method": "bads"})
    with pytest.raises(DpselInputError, match="unknown run option 'colour'"):
        config.with_overrides({"colour": "red"})
    with pytest.raises(DpselInputError, match="field curate.budget"):
        config.with_overrides({"budget": 2}, stage="curate")


def test_required_fields_are_named():
    config = RunConfig.from_mapping({"data": {"train": "a.parquet"}})
    with pytest.raises(DpselInputError, match="curate needs data.meta, out"):
        config.require("data.train", "data.meta", "out", flow="curate")


def test_relative_paths_become_absolute_but_urls_do_not(tmp_path):
    config = RunConfig.from_mapping({"data": {"train": ["a.parquet", "s3://bucket/b"], "meta": "/abs/m.parquet"},
                                     "out": "runs/x"})
    absolute = config.with_absolute_paths(tmp_path)
    assert absolute.data.train == [str(tmp_path / "a.parquet"), "s3://bucket/b"]
    assert absolute.data.meta == "/abs/m.parquet" and absolute.out == str(tmp_path / "runs/x")


def test_example_config_matches_the_demo():
    from dpsel import demo

    example = RunConfig.from_yaml(REPO / "configs" / "demo.yaml")
    built = demo.demo_config(Path("runs/demo"))
    assert example.curate == built.curate and example.tune == built.tune
    assert example.data.train == str(Path("runs/demo") / "data" / "train.parquet")
