"""Flows on tiny inputs against a real Prefect test-harness server: outputs, artifacts, cache, shards, retries."""
from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from dpsel.config import RunConfig
from dpsel.errors import DpselInputError

pytestmark = pytest.mark.prefect


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from dpsel.synth import generate

    return {k: str(v) for k, v in generate(tmp_path_factory.mktemp("synth"), rows=40, noise=0.3, seed=1,
                                           meta_rows=8, test_rows=6).items()}


def _config(synth, out, **curate) -> RunConfig:
    return RunConfig.from_mapping({"data": {"train": synth["train"], "meta": synth["meta"], "eval": synth["test"],
                                            "truth": synth["truth"]},
                                   "curate": {"method": "random", "budget": 0.5, **curate},
                                   "tune": {"steps": 2, "batch_size": 4, "max_length": 64},
                                   "device": "cpu", "out": str(out)})


def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


# ---- no server needed ----------------------------------------------------------------------------------

def test_cache_key_follows_content_options_and_version(tmp_path, monkeypatch):
    import dpsel.version
    from flows.cache import stage_key

    data = tmp_path / "a.parquet"
    data.write_bytes(b"one")
    params = {"train": str(data), "out": "o", "method": "random"}
    first = stage_key("curate", params, ["train"])
    assert stage_key("curate", dict(params), ["train"]) == first
    assert stage_key("curate", {**params, "method": "all"}, ["train"]) != first
    assert stage_key("curate", {**params, "out": "elsewhere"}, ["train"]) != first
    data.write_bytes(b"two")  # same path, same size, new content
    changed = stage_key("curate", params, ["train"])
    assert changed != first
    monkeypatch.setattr(dpsel.version, "__version__", "9.9.9")
    assert stage_key("curate", params, ["train"]) != changed


def test_cache_key_of_a_scorer_folder_covers_its_files(tmp_path):
    from flows.cache import stage_key

    scorer = tmp_path / "scorer"
    scorer.mkdir()
    (scorer / "scorer.json").write_text('{"kind": "all"}')
    before = stage_key("filter-shard", {"scorer": str(scorer)}, ["scorer"])
    (scorer / "scorer.json").write_text('{"kind": "random"}')
    assert stage_key("filter-shard", {"scorer": str(scorer)}, ["scorer"]) != before


def test_run_flow_defaults_prefect_home_and_rejects_unknown_flows(tmp_path, monkeypatch):
    import flows

    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    flows.use_project_prefect_home(tmp_path)
    assert os.environ["PREFECT_HOME"] == str(tmp_path / ".prefect")
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    monkeypatch.setenv("PREFECT_HOME", "/somewhere/else")
    flows.use_project_prefect_home(tmp_path)
    assert os.environ["PREFECT_HOME"] == "/somewhere/else"
    with pytest.raises(DpselInputError, match="unknown flow"):
        flows.run_flow("curate-everything")
    with pytest.raises(DpselInputError, match="ambiguous"):
        flows.run_flow("curate-then-tune", method="bads")


# ---- against the test-harness server -------------------------------------------------------------------

def test_curate_flow_writes_outputs_and_artifacts(prefect_server, synth, tmp_path):
    from flows.pipeline import curate_flow

    result = curate_flow(_config(synth, tmp_path / "run"))
    summary = result["curate"]
    assert result["stages"] == {"curate": "Completed"}
    counts = summary["counts"]
    assert counts["input_rows"] == 40 == counts["kept_rows"] + counts["dropped_rows"]
    assert pq.read_table(summary["paths"]["curated"]).num_rows == counts["kept_rows"]
    assert summary["auroc"]["overall"] is not None  # truth was given
    assert {g["column"] for g in summary["groups"]} >= {"task"}

    table = _artifacts("curate-rows")
    assert table and "input_rows" in table[0].data and "mean_weight" in table[0].data
    report = _artifacts("curate-report")
    assert report and "kept fraction" in report[0].data and "weights_hist.png" in report[0].data
    assert "](data:image/png;base64," in report[0].data  # embedded: the UI cannot open local file links


def test_curate_cache_hits_when_unchanged_and_misses_when_input_changes(prefect_server, synth, tmp_path,
                                                                        monkeypatch):
    import dpsel.curation.run as curation_run
    from flows.pipeline import curate_flow

    calls = []
    real_curate = curation_run.curate
    monkeypatch.setattr(curation_run, "curate", lambda *a, **k: calls.append(1) or real_curate(*a, **k))
    meta = tmp_path / "meta.parquet"
    pq.write_table(pq.read_table(synth["meta"]), meta)
    config = _config(synth, tmp_path / "run").with_overrides({"meta": str(meta)})

    assert curate_flow(config)["stages"]["curate"] == "Completed"
    assert curate_flow(config)["stages"]["curate"] == "Cached"
    assert len(calls) == 1

    pq.write_table(pq.read_table(synth["meta"]).slice(1), meta)  # same path, new content
    assert curate_flow(config)["stages"]["curate"] == "Completed"
    assert len(calls) == 2

    # A cached result whose files were deleted is recomputed, not handed on.
    os.remove(tmp_path / "run" / "curated.parquet")
    assert curate_flow(config)["stages"]["curate"] == "Completed"
    assert (tmp_path / "run" / "curated.parquet").exists() and len(calls) == 3


def _training_rows_in_shards(synth, shards):
    """The synth training rows again, as 3 shards of 15 rows."""
    shards.mkdir()
    train = pq.read_table(synth["train"])
    for i, start in enumerate(range(0, train.num_rows, 15)):
        pq.write_table(train.slice(start, 15), shards / f"part-{i}.parquet")
    return shards, train


def test_filter_flow_runs_one_task_per_shard(prefect_server, synth, tmp_path):
    from flows.pipeline import curate_flow, filter_flow

    scored = curate_flow(_config(synth, tmp_path / "curated"))["curate"]
    shards, train = _training_rows_in_shards(synth, tmp_path / "new")

    config = RunConfig.from_mapping({"data": {"scorer": scored["paths"]["scorer"], "inputs": str(shards)},
                                     "out": str(tmp_path / "filtered")})
    result = filter_flow(config)
    summary = result["filter"]
    assert result["stages"]["filter-shard"] == ["Completed"] * 3
    assert len(summary["shards"]) == 3
    for shard in summary["shards"]:
        assert os.path.exists(shard["paths"]["scores"])
    assert summary["counts"]["input_rows"] == train.num_rows
    assert summary["counts"]["kept_rows"] + summary["counts"]["dropped_rows"] == train.num_rows
    assert os.path.exists(tmp_path / "filtered" / "summary.json")


def test_curate_then_tune_compares_curated_with_uncurated(prefect_server, synth, tmp_path):
    from flows.pipeline import curate_then_tune_flow, tune_flow

    config = _config(synth, tmp_path / "pipe")
    summary = curate_then_tune_flow(config, compare=True)
    assert set(summary["tune"]) == {"curated", "uncurated"}
    for result in summary["tune"].values():
        assert {"eval_loss", "eval_exact_match"} <= set(result["metrics"])
        assert os.path.isdir(result["paths"]["adapter"])
    assert summary["tune"]["curated"]["metrics"]["trained_rows"] < summary["tune"]["uncurated"]["metrics"]["trained_rows"]
    report = (tmp_path / "pipe" / "report.md").read_text()
    assert "eval loss / exact match (uncurated)" in report and "selection AUROC" in report
    assert "](curate/weights_hist.png)" in report and "base64" not in report  # the file links, the artifact embeds
    assert _artifacts("curate-then-tune-comparison")

    # The tune flow on the same rows, options and folder is the compare stage again: a cache hit.
    again = tune_flow(config.with_overrides({"out": str(tmp_path / "pipe" / "tune-uncurated")}))
    assert again["stages"]["tune"] == "Cached"
    assert again["tune"]["metrics"] == summary["tune"]["uncurated"]["metrics"]


def test_flow_names_the_missing_config_field(prefect_server, tmp_path):
    from flows.pipeline import curate_flow

    with pytest.raises(DpselInputError, match="data.meta"):
        curate_flow(RunConfig.from_mapping({"data": {"train": "x.parquet"}, "out": str(tmp_path)}))


def test_io_stages_retry_transient_errors_only(prefect_server):
    from prefect import flow, task

    from flows.tasks import retry_on_transient_io

    attempts = {"flaky": 0, "bad": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_on_transient_io)
    def flaky():
        attempts["flaky"] += 1
        if attempts["flaky"] == 1:
            raise ConnectionResetError("network blip")
        return "ok"

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_on_transient_io)
    def bad_input():
        attempts["bad"] += 1
        raise DpselInputError("broken row", file="x.parquet", row=3)

    @flow
    def both():
        return flaky(), bad_input(return_state=True).is_failed()

    assert both() == ("ok", True)
    assert attempts == {"flaky": 2, "bad": 1}


def test_progress_artifact_is_created_once_and_throttled(prefect_server, monkeypatch):
    from prefect import flow

    from flows import artifacts

    updates = []
    real_update = artifacts.update_progress_artifact
    monkeypatch.setattr(artifacts, "update_progress_artifact",
                        lambda *a, **k: updates.append(a[1]) or real_update(*a, **k))

    @flow
    def sampler():
        progress = artifacts.throttled_progress("test-progress", "sampler", every_s=60)
        for step in range(1, 101):
            progress(step, 100, {"loss": 1.0 / step})

    sampler()
    assert updates == [100.0]  # the first call creates it, the last step always updates it
    shown = _artifacts("test-progress")
    assert shown and float(shown[0].data) == 100.0


def test_run_flow_reads_a_config_file_and_applies_options(prefect_server, synth, tmp_path, capsys):
    import yaml

    import flows

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": synth["train"], "meta": synth["meta"]},
                                    "curate": {"method": "random", "threshold": 0.9}, "out": "unused"}))
    # as `dpsel flow curate --config run.yaml --method all --budget 1 --out DIR` passes them (strings)
    summary = flows.run_flow("curate", config=path, method="all", budget="1", out=str(tmp_path / "run"))
    assert summary["curate"]["method"] == "all"
    assert summary["curate"]["counts"]["kept_rows"] == summary["curate"]["counts"]["usable_rows"]
    assert f"curate: outputs in {tmp_path / 'run'}" in capsys.readouterr().out


def test_filter_flow_on_ray_is_one_task_with_the_local_engines_outputs(prefect_server, ray_local, synth, tmp_path):
    from dpsel.curation import filter_rows
    from flows.pipeline import curate_flow, filter_flow

    scored = curate_flow(_config(synth, tmp_path / "curated"))["curate"]
    shards, _ = _training_rows_in_shards(synth, tmp_path / "new")
    config = RunConfig.from_mapping({"data": {"scorer": scored["paths"]["scorer"], "inputs": str(shards)},
                                     "engine": "ray", "ray": {"workers": 2, "batch_size": 8},
                                     "out": str(tmp_path / "filtered")})
    result = filter_flow(config)
    assert result["stages"] == {"filter": "Completed"}
    local = filter_rows(scored["paths"]["scorer"], str(shards), tmp_path / "local")
    for name in ("scores.parquet", "curated.parquet"):
        assert pq.read_table(tmp_path / "filtered" / name).equals(pq.read_table(local.out_dir / name))
    assert result["filter"]["counts"] == local.counts
    assert _artifacts("filter-progress")


class _CountingRay:
    """The real `ray` module, but `init`/`shutdown` only counted: the session's runtime stays up and serves the
    stages' Ray work, while the flow's own runtime looks stopped until the flow starts it."""

    def __init__(self, ray):
        self._ray, self.inits, self.shutdowns, self.up = ray, 0, 0, False

    def is_initialized(self) -> bool:
        return self.up

    def init(self, **kwargs) -> None:
        self.inits, self.up = self.inits + 1, True

    def shutdown(self) -> None:
        self.shutdowns, self.up = self.shutdowns + 1, False

    def __getattr__(self, name):
        return getattr(self._ray, name)


def test_curate_then_filter_on_ray_starts_one_runtime_for_both_stages(prefect_server, ray_local, synth, tmp_path,
                                                                      monkeypatch):
    """`engine: ray`: the flow starts one Ray runtime; curate's model passes and filter's scoring both run on
    it (each stage on its own would start and stop a runtime), and it is stopped when the flow ends."""
    import dpsel.engines.ray_engine as ray_engine
    from flows.pipeline import curate_then_filter_flow

    counting = _CountingRay(ray_local)
    monkeypatch.setattr(ray_engine, "require_ray", lambda: counting)
    shards, train = _training_rows_in_shards(synth, tmp_path / "new")
    config = RunConfig.from_mapping({"data": {"train": synth["train"], "meta": synth["meta"], "inputs": str(shards)},
                                     "curate": {"method": "loss", "steps": 10}, "engine": "ray",
                                     "ray": {"workers": 2, "batch_size": 16}, "out": str(tmp_path / "run")})
    result = curate_then_filter_flow(config)
    assert (counting.inits, counting.shutdowns, counting.up) == (1, 1, False)
    assert result["stages"] == {"curate": "Completed", "filter": "Completed"}
    for stage in ("curate", "filter"):
        assert result[stage]["timings"]["engine"] == "ray", stage
    assert result["filter"]["counts"]["input_rows"] == train.num_rows
    assert (tmp_path / "run" / "filter" / "curated.parquet").is_file()
