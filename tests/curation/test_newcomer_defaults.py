"""What a newcomer meets first: --help on every option, one set of defaults for CLI, config and Python."""
import inspect

import numpy as np
import pyarrow.parquet as pq
import pytest

import typer.main

from dpsel.cli import app


def _commands():
    group = typer.main.get_command(app)
    return {name: command for name, command in group.commands.items()}


def test_every_option_of_every_command_has_help_text():
    missing = [f"{name} {param.opts[0]}" for name, command in _commands().items() for param in command.params
               if param.param_type_name == "option" and not (param.help or "").strip()]
    assert missing == []


def test_flow_help_lists_the_options_it_accepts():
    epilog = _commands()["flow"].epilog
    for option in ("--compare", "--train", "--out", "--budget", "--tune-steps", "--curate.select.batch-size"):
        assert option in epilog


# ---- one set of defaults -------------------------------------------------------------------------------

def test_cli_config_and_python_share_the_selection_defaults():
    from dpsel.config import RunConfig, SelectParams
    from dpsel.select.base import SelectConfig

    library = SelectConfig()
    assert RunConfig().select_config() == library          # a config file with nothing set / the CLI's unset options
    from_cli = RunConfig.load(None, {"batch_size": None, "max_length": None}, stage="curate").select_config()
    assert from_cli == library
    for name in SelectParams.model_fields:
        if name != "extra":
            assert getattr(SelectParams(), name) == getattr(library, name), name
    assert library.meta_batch_size == 4


def test_python_api_options_are_the_cli_defaults():
    import dpsel.api as api

    # every CLI option of curate/tune that is not a path is a keyword of the API, unset by default
    for fn in (api.curate, api.tune):
        params = inspect.signature(fn).parameters
        assert "options" in params and params["config"].default is None


# ---- the Python API -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from dpsel.synth import generate

    return generate(tmp_path_factory.mktemp("api-synth"), rows=30, noise=0.3, seed=2, meta_rows=8, test_rows=6)


def _as(kind: str, path):
    table = pq.read_table(path)
    if kind == "path":
        return str(path)
    if kind == "pandas":
        return table.to_pandas()
    if kind == "arrow":
        return table
    import datasets
    return datasets.Dataset(table)


@pytest.mark.parametrize("kind", ["path", "pandas", "arrow", "datasets"])
def test_curate_takes_paths_frames_tables_and_datasets(synth, tmp_path, kind):
    import dpsel

    result = dpsel.curate(_as(kind, synth["train"]), _as(kind, synth["meta"]), out=tmp_path / "run",
                          truth=synth["truth"], method="random", budget=0.5, progress=False)
    assert list(result.scores.columns[:5]) == ["dpsel_id", "dpsel_weight", "dpsel_weight_std", "dpsel_kept",
                                               "dpsel_reason"]
    assert len(result.scores) == 30 and result.counts["kept_rows"] == result.scores["dpsel_kept"].sum()
    assert result.paths["curated"].exists() and len(result.curated()) == result.counts["kept_rows"]
    assert result.manifest["inputs"]["train"]["rows"] == 30
    assert result.auroc is not None
    if kind != "path":  # in-memory rows are written once, beside the outputs, and the manifest names them
        assert result.manifest["inputs"]["train"]["paths"] == [str(tmp_path / "run.inputs" / "train.parquet")]


def test_dpsel_curate_is_the_api_function_and_the_library_is_dpsel_curation():
    import dpsel
    import dpsel.api
    import dpsel.curation
    from dpsel.curation.rules import apply_rule

    assert dpsel.curate is dpsel.api.curate and dpsel.filter is dpsel.api.filter
    assert callable(dpsel.curation.curate) and callable(apply_rule)


def test_filter_and_tune_take_in_memory_data(synth, tmp_path):
    import datasets

    import dpsel

    run = dpsel.curate(synth["train"], synth["meta"], out=tmp_path / "cur", method="loss", steps=5,
                       max_length=64, device="cpu", extra={"ref_steps": 4, "ref_eval_every": 2}, progress=False)
    new_rows = pq.read_table(synth["test"]).to_pandas()
    filtered = dpsel.filter(run.paths["scorer"], new_rows, out=tmp_path / "filtered")
    assert len(filtered.scores) == len(new_rows)
    tuned = dpsel.tune(datasets.Dataset.from_pandas(run.curated()), out=tmp_path / "tuned", steps=2,
                       batch_size=4, max_length=48, device="cpu", eval=new_rows, progress=False)
    assert tuned.paths["adapter"].is_dir() and tuned.metrics["steps"] == 2 and "eval_loss" in tuned.metrics


def test_api_names_an_unsupported_input_type(tmp_path):
    import dpsel
    from dpsel.errors import DpselInputError

    with pytest.raises(DpselInputError, match="meta: expected a path, a pandas DataFrame"):
        dpsel.curate(str(tmp_path / "train.parquet"), {"rows": 1}, out=tmp_path / "o")


# ---- validate a folder that holds more than instruction sets -------------------------------------------

def test_validate_folder_skips_known_outputs_only(tmp_path):
    import shutil

    from dpsel.data import validate_paths
    from dpsel.errors import DpselInputError
    from dpsel.synth import generate

    paths = generate(tmp_path / "synth", rows=20, meta_rows=5, test_rows=5, seed=3)
    summary = validate_paths([str(tmp_path / "synth")])
    assert summary.rows == 30 and len(summary.skipped) == 1 and "truth.parquet" in summary.skipped[0]
    assert "skipped" in summary.render()
    with pytest.raises(DpselInputError, match="no recognised columns") as named:
        validate_paths([str(paths["truth"])])            # named explicitly: checked, and it is not one
    assert "truth.parquet" in str(named.value)
    shutil.copy(paths["truth"], tmp_path / "synth" / "labels.parquet")
    with pytest.raises(DpselInputError, match="labels.parquet"):  # an unknown file: it says which one broke it
        validate_paths([str(tmp_path / "synth")])


# ---- the report explains itself -----------------------------------------------------------------------

def test_convergence_check_tells_drift_from_noise():
    from dpsel.report import convergence, convergence_words

    rng = np.random.default_rng(0)
    steps = list(range(0, 400, 10))
    stationary = convergence(list(0.6 + 0.01 * rng.standard_normal(len(steps))), steps, burn_in=100)
    drifting = convergence(list(np.linspace(0.5, 0.8, len(steps))), steps, burn_in=100)
    assert stationary["draws"] == 30 and stationary["converged"]
    assert not drifting["converged"] and "NOT stable" in convergence_words("mean weight", drifting)
    assert "too few" in convergence_words("x", convergence([0.1, 0.2, 0.3], [0, 10, 20], burn_in=0))


def test_report_states_convergence_splits_by_truth_and_lists_its_plots(tmp_path):
    from dpsel.report import ReportData, group_summary, write_report

    rng = np.random.default_rng(1)
    n = 60
    weights = rng.uniform(size=n)
    kinds = np.where(np.arange(n) % 3 == 0, "wrong", "clean")
    steps = [float(s) for s in range(0, 200, 10)]
    data = ReportData(title="t", headline={"kept": 1}, weights=weights, kept=weights > 0.4,
                      usable=np.ones(n, bool), groups={"task": np.array(["a", "b"] * 30)},
                      diagnostics={"step": steps, "mean_weight": list(0.5 + 0.01 * rng.standard_normal(20)),
                                   "meta_loss": list(2 + 0.1 * rng.standard_normal(20))},
                      truth_kinds=kinds, config={"bads": {"burn_in": 0.25, "steps": 200}})
    paths = write_report(tmp_path, data)
    text = paths["report"].read_text()
    assert "## Did the sampler converge?" in text and "split-R̂" in text
    assert "split by truth kind" in text and "## Plots in this folder" in text
    assert {"plot_hist", "plot_task", "plot_traces"} <= set(paths)
    summary = group_summary(data.groups["task"], weights, data.kept, data.usable)
    assert all(row["ci95"] > 0 for row in summary)


@pytest.mark.prefect
def test_scheduled_filter_over_an_empty_landing_folder_succeeds_and_says_so(prefect_server, tmp_path):
    from dpsel.config import RunConfig
    from flows.pipeline import filter_flow

    config = RunConfig.from_mapping({"data": {"scorer": str(tmp_path / "no-scorer-yet"),
                                              "inputs": str(tmp_path / "incoming")}, "out": str(tmp_path / "out")})
    result = filter_flow(config=config)["filter"]
    assert "nothing to filter" in result["message"] and result["shards"] == []
    (tmp_path / "incoming").mkdir()
    assert filter_flow(config=config)["filter"]["shards"] == []


def test_defaults_named_in_help_are_the_librarys():
    import re

    from dpsel.select.base import SelectConfig
    from dpsel.tuning import DEFAULT_STEPS, tune_parquet

    tune_defaults = {name: p.default for name, p in inspect.signature(tune_parquet).parameters.items()}
    library = {("curate", "--batch-size"): SelectConfig.batch_size, ("curate", "--max-length"): SelectConfig.max_length,
               ("tune", "--steps"): DEFAULT_STEPS,  # steps=None means DEFAULT_STEPS unless epochs is given
               ("tune", "--batch-size"): tune_defaults["batch_size"],
               ("tune", "--max-length"): tune_defaults["max_length"]}
    commands = _commands()
    for (command, option), value in library.items():
        param = next(p for p in commands[command].params if option in p.opts)
        said = re.search(r"default (\d+)", param.help)
        assert said and int(said.group(1)) == value, (command, option, param.help, value)


# ---- the demo -----------------------------------------------------------------------------------------

def test_demo_plans_first_and_ends_with_the_margin_over_seeds(tmp_path):
    from dpsel import demo

    config = demo.demo_config(tmp_path, size=demo.QUICK)
    assert config.curate.steps == demo.QUICK.overrides["curate.steps"] and config.data.train.startswith(str(tmp_path))
    assert demo.demo_config(tmp_path).curate.steps > config.curate.steps  # the full demo is configs/demo.yaml
    plan = demo.plan(config, demo.QUICK)
    assert "600 synthetic rows" in plan[0] and plan[-1].startswith("estimate: about")
    summary = {"report": "r.md", "headline": {"selection AUROC": 0.7, "kept rows": 7, "input rows": 10,
                                               "usable rows": 9, "kept fraction (of input rows)": 0.7},
               "eval_loss_by_seed": {"qlora": {"seeds": [0, 1, 2], "curated": [1.0, 1.1, 1.2],
                                               "uncurated": [1.1, 1.15, 1.3]}}}
    lines = demo.headline(summary)
    assert demo.margins(summary["eval_loss_by_seed"]["qlora"]) == pytest.approx([0.1, 0.05, 0.1])
    assert any("margin (uncurated - curated): +0.0833" in line and "3 of 3 seeds" in line for line in lines)
    assert lines[-1].endswith("yes")
