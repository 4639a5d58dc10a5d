"""Explicit choices are honoured or refused: an `--embedder`, `--model`, theta_space or `--filters` given by the
user that cannot be honoured exits 2 (DpselInputError) naming it and why, from the CLI, the Python API and the
flows; only a default may fall back, and it says so."""
from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

import dpsel.models.embedder as embedder_module
from dpsel.cli import app
from dpsel.errors import DpselInputError
from dpsel.select.bads import BadsSettings
from dpsel.select.bads.embedder_method import theta_space
from dpsel.select.base import SelectConfig

runner = CliRunner()
MISSING = "/nonexistent/embedder"
TINY = SelectConfig(model="tiny", device="cpu", seed=0, steps=2, batch_size=4, meta_batch_size=4, max_length=32)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from dpsel.synth import generate
    return {k: str(v) for k, v in generate(tmp_path_factory.mktemp("pool"), rows=24, noise=0.3, seed=0,
                                           meta_rows=6, test_rows=4).items()}


@pytest.fixture
def default_unavailable(monkeypatch):
    """The default embedder's package is missing (loading any embedder fails)."""
    def unavailable(spec, device="auto"):
        raise embedder_module.EmbedderUnavailable(f"embedder {spec!r} is not installed here")
    monkeypatch.setattr(embedder_module, "load_embedder", unavailable)


def _curate(pool, tmp_path, *options):
    return runner.invoke(app, ["curate", "--train", pool["train"], "--meta", pool["meta"], "--out",
                               str(tmp_path / "out"), "--steps", "2", "--device", "cpu", *options])


def _refused(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output


# ---- the CLI -----------------------------------------------------------------------------------------------
def test_an_explicit_missing_embedder_with_bads_exits_2_naming_it(pool, tmp_path):
    result = _curate(pool, tmp_path, "--method", "bads", "--embedder", MISSING)
    _refused(result, f"--embedder {MISSING}", "not found", "never replaced")
    assert not (tmp_path / "out" / "curated.parquet").exists()


def test_an_explicit_missing_embedder_with_semantic_dup_exits_2(pool, tmp_path):
    _refused(_curate(pool, tmp_path, "--method", "random", "--semantic-dup", "0.9", "--embedder", MISSING),
             "--semantic-dup", MISSING)


def test_an_unloadable_model_exits_2_naming_it(pool, tmp_path):
    _refused(_curate(pool, tmp_path, "--method", "bads", "--model", "/nonexistent/model"), "/nonexistent/model")


@pytest.mark.parametrize("theta, extra, words", [
    ("embedding", [], ["theta_space 'embedding'", "auto, embedder, lm"]),
    ("embedder", ["--embedder", "none"], ["theta_space=embedder", "--embedder 'none'"]),
    ("embedder", ["--model", "/some/causal-lm"], ["theta_space=embedder", "--model /some/causal-lm"]),
])
def test_an_explicit_theta_space_that_cannot_be_honoured_exits_2(pool, tmp_path, theta, extra, words):
    config = tmp_path / "run.yaml"
    config.write_text(f"curate:\n  select:\n    extra:\n      theta_space: {theta}\n")
    _refused(_curate(pool, tmp_path, "--method", "bads", "--config", str(config), *extra), *words)


@pytest.mark.parametrize("content", [None, "rules: [1, 2\n", "no_such_rule: 3\n"])
def test_filters_file_missing_or_invalid_exits_2_naming_it(pool, tmp_path, content):
    filters = tmp_path / "filters.yaml"
    if content is not None:
        filters.write_text(content)
    _refused(_curate(pool, tmp_path, "--method", "random", "--filters", str(filters)), "--filters", str(filters))


# ---- the Python API ----------------------------------------------------------------------------------------
def test_the_api_raises_for_an_explicit_missing_embedder(pool, tmp_path):
    import dpsel.api as api
    from dpsel.curation import curate
    with pytest.raises(DpselInputError, match="--embedder /nonexistent/embedder"):
        api.curate(pool["train"], pool["meta"], tmp_path / "api", method="bads", embedder=MISSING, steps=2,
                   device="cpu", progress=False)
    config = SelectConfig(**{**TINY.to_dict(), "embedder": MISSING})
    with pytest.raises(DpselInputError, match="never replaced"):
        curate(pool["train"], pool["meta"], tmp_path / "lib", method="bads", config=config)


# ---- θ's space: only `auto` may switch, and says so ----------------------------------------------------------
def test_theta_space_embedder_under_torchrun_exits_2_and_auto_keeps_the_lm():
    torchrun = object()  # any data-parallel group
    with pytest.raises(DpselInputError, match="under torchrun"):
        theta_space(TINY, BadsSettings(theta_space="embedder"), torchrun)
    space, embedder, why = theta_space(TINY, BadsSettings(), torchrun)
    assert (space, embedder) == ("lm", None) and "torchrun" in why


def test_an_explicit_embedder_is_refused_where_the_default_falls_back(default_unavailable, caplog):
    with pytest.raises(DpselInputError, match=f"--embedder {MISSING}"):
        embedder_module.try_embedder(MISSING)
    with pytest.raises(DpselInputError, match="--embedder static"):
        embedder_module.try_embedder("static")
    with pytest.raises(DpselInputError, match=f"--embedder {MISSING}"):
        theta_space(TINY, BadsSettings(embedder=MISSING), None)
    with pytest.raises(DpselInputError, match="theta_space=embedder"):  # an explicit θ space: no fallback either
        theta_space(TINY, BadsSettings(theta_space="embedder"), None)
    with caplog.at_level(logging.WARNING):
        space, _, why = theta_space(TINY, BadsSettings(), None)
    assert space == "lm" and "default embedder is unavailable" in why
    assert "falls back" in caplog.text and "not installed here" in caplog.text


def test_a_bads_scorer_whose_embedder_is_missing_names_it(default_unavailable):
    from dpsel.select.bads.scorer import _same_embedder
    with pytest.raises(DpselInputError, match="not installed here"):
        _same_embedder(MISSING, "0" * 64)


# ---- the flows ----------------------------------------------------------------------------------------------
@pytest.mark.prefect
def test_the_curate_flow_fails_with_the_same_error(prefect_server, pool, tmp_path):
    from dpsel.config import RunConfig
    from flows.pipeline import curate_flow
    config = RunConfig.from_mapping({"data": {"train": pool["train"], "meta": pool["meta"]},
                                     "curate": {"method": "bads", "steps": 2}, "embedder": MISSING,
                                     "device": "cpu", "out": str(tmp_path / "flow")})
    with pytest.raises(DpselInputError, match=f"--embedder {MISSING}"):
        curate_flow(config)


def test_a_misspelt_selection_setting_exits_2_with_the_near_name():
    """A `curate.select.extra` key no method reads is refused before any work, not dropped in silence."""
    from dpsel.select import check_extra_settings, select
    from dpsel.select.base import SelectConfig
    row = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    with pytest.raises(DpselInputError, match="'theta_sapce' \\(did you mean 'theta_space'\\?\\)"):
        select([row], [row], "bads", SelectConfig(extra={"theta_sapce": "lm"}))
    check_extra_settings({"theta_space": "lm", "ref_steps": 5, "l2rw_lr": 1e-3, "lora_r": 4})   # all read by some method
