"""The Prefect flows: `curate`, `filter`, `tune`, `curate-then-tune`. Each takes one `RunConfig`.

A flow validates what it needs, runs coarse cached tasks (flows.tasks), writes a summary next to the run's
outputs and publishes artifacts (flows.artifacts). A stage answered from the cache whose output files have
since been deleted is re-run with `refresh_cache`, so a cache hit never hands on paths that do not exist.
"""
from __future__ import annotations

from dataclasses import asdict
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from dpsel.config import RunConfig
from dpsel.curation.examples import report_section
from dpsel.data import expand_paths
from dpsel.io import write_json_atomic, write_text_atomic
from dpsel.numbers import format_figure
from dpsel.report import kept_fraction, markdown_cell, markdown_table, stage_seconds
import flows.artifacts as artifacts
from flows.tasks import combine_filter_summaries, curate_stage, filter_shard, filter_stage, tune_stage

FILTER_WORKERS = max(1, min(4, os.cpu_count() or 1))


# ---- stage plumbing ------------------------------------------------------------------------------------

def _outputs_exist(summary: dict) -> bool:
    return all(Path(path).exists() for path in summary.get("paths", {}).values())


def _settle(task, state: State, kwargs: dict) -> tuple[dict, str]:
    """(result, state name) of a finished stage; a cached result whose files are gone is recomputed."""
    result = state.result()
    if state.name == "Cached" and not _outputs_exist(result):
        state = task.with_options(refresh_cache=True)(**kwargs, return_state=True)
        result = state.result()
    return result, state.name


def run_stage(task, **kwargs) -> tuple[dict, str]:
    """Run one stage task; returns its JSON summary and its final state name ('Completed' or 'Cached')."""
    return _settle(task, task(**kwargs, return_state=True), kwargs)


def curate_kwargs(config: RunConfig, out: Path) -> dict:
    return dict(train=config.data.train, meta=config.data.meta, truth=config.data.truth, out=os.fspath(out),
                settings=config.curate_settings(), labels=config.data.labels)


def landing_folder_is_empty(inputs) -> bool:
    """True when `inputs` is one local folder path (no glob, no URL) that is missing or holds no Parquet file."""
    if not isinstance(inputs, (str, os.PathLike)) or "://" in os.fspath(inputs) or any(c in os.fspath(inputs) for c in "*?["):
        return False
    folder = Path(inputs)
    if folder.suffix == ".parquet":
        return False  # a file: missing is an error, not an empty landing folder
    return not folder.exists() or (folder.is_dir() and not any(folder.rglob("*.parquet")))


def _out(config: RunConfig) -> Path:
    return Path(config.out)


def flow_engine(config: RunConfig):
    """The flow's Ray runtime with `engine: ray` (started or joined once, shut down when the flow ends; every
    stage inside runs on it), nothing for the local engine."""
    from dpsel.engines.ray_engine import flow_runtime
    return flow_runtime(config.engine, config.ray_options())


# ---- headline figures and reports ----------------------------------------------------------------------

def overall_auroc(auroc: Any) -> float | None:
    """The single selection AUROC of a curation summary (None without truth)."""
    if isinstance(auroc, (int, float)):
        return float(auroc)
    if isinstance(auroc, dict):
        for key in ("overall", "auroc", "all"):
            if isinstance(auroc.get(key), (int, float)):
                return float(auroc[key])
    return None


def curation_headline(summary: dict) -> dict:
    counts = summary["counts"]
    return {"method": summary.get("method"), "input rows": counts.get("input_rows"),
            "usable rows": counts.get("usable_rows"), "kept rows": counts.get("kept_rows"),
            "kept fraction (of input rows)": kept_fraction(counts),
            "selection AUROC": overall_auroc(summary.get("auroc")),
            "selection seconds": stage_seconds(summary.get("timings") or {})}


def curation_markdown(summary: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- **{label}**: {markdown_cell(value)}" for label, value in curation_headline(summary).items()]
    where = f"Outputs in `{summary['out_dir']}`"
    if "report" in summary.get("paths", {}):
        where += f"; full report: `{summary['paths']['report']}`"
    lines += ["", where]
    lines += ["", "## Rows", ""] + markdown_table([{"count": k, "rows": v} for k, v in artifacts.flat_counts(summary["counts"]).items()])
    groups = [{k: g[k] for k in ("column", "group", "rows", "kept", "mean_weight")} for g in summary.get("groups", [])]
    if groups:
        lines += ["## Mean weight per group", ""] + markdown_table(groups)
    if "report" in summary.get("paths", {}):   # the report's dropped rows beside what they matched
        lines += report_section(summary["paths"]["report"])
    links = artifacts.plot_links(summary["out_dir"])
    if links:
        lines += ["## Plots", ""] + links + [""]
    return "\n".join(lines)


def comparison_rows(tuned: dict[str, dict]) -> list[dict]:
    return [{"training set": name, "eval_loss": result["metrics"].get("eval_loss"),
             "eval_exact_match": result["metrics"].get("eval_exact_match"),
             "train_loss": result["metrics"].get("train_loss"),
             "seconds": result["metrics"].get("seconds"), "adapter": result["paths"]["adapter"]}
            for name, result in tuned.items()]


def pipeline_markdown(curated: dict, tuned: dict[str, dict], relative_to: str | Path | None = None) -> str:
    """The run's Markdown report: PNGs embedded (the Prefect artifact) or linked relative to `relative_to`
    (the report.md file beside the run's folders)."""
    lines = ["# Curate, then tune", ""]
    lines += [f"- **{label}**: {markdown_cell(value)}" for label, value in curation_headline(curated).items()]
    for name, result in tuned.items():
        metrics = result["metrics"]
        if "eval_loss" not in metrics:
            continue  # no eval set given
        lines.append(f"- **eval loss / exact match ({name})**: {markdown_cell(metrics.get('eval_loss'))} / "
                     f"{markdown_cell(metrics.get('eval_exact_match'))}")
    lines += ["", "## Fine-tuning", ""] + markdown_table(comparison_rows(tuned))
    lines += ["## Curation", "", f"Outputs in `{curated['out_dir']}`; report `{curated['paths'].get('report')}`", ""]
    links = artifacts.plot_links(curated["out_dir"], relative_to)
    if links:
        lines += ["## Plots", ""] + links + [""]
    return "\n".join(lines)


def publish_curation(summary: dict, prefix: str, title: str) -> None:
    artifacts.curation_table(summary, key=artifacts.artifact_key(prefix, "rows"))
    artifacts.markdown_report(curation_markdown(summary, title), key=artifacts.artifact_key(prefix, "report"),
                              description=title)


# ---- flows -------------------------------------------------------------------------------------------

@flow(name="curate")
def curate_flow(config: RunConfig) -> dict:
    """Data-point selection: scores, curated rows, manifest, report and scorer in `config.out`."""
    config.require("data.train", "data.meta", "out", flow="curate")
    with flow_engine(config):
        summary, state = run_stage(curate_stage, **curate_kwargs(config, _out(config)))
    publish_curation(summary, "curate", f"Curation ({summary.get('method')})")
    return {"curate": summary, "stages": {"curate": state}}


@flow(name="filter", task_runner=ThreadPoolTaskRunner(max_workers=FILTER_WORKERS))
def filter_flow(config: RunConfig) -> dict:
    """Score every shard of `data.inputs` with a saved scorer, one task per shard; per-shard outputs in
    OUT/shards/, totals in OUT/summary.json. Duplicates are detected within a shard, not across shards."""
    config.require("data.scorer", "data.inputs", "out", flow="filter")
    with flow_engine(config):
        return _filter(config, _out(config))


def _filter(config: RunConfig, out: Path) -> dict:
    """The filter flow's work: `data.inputs` with the scorer `data.scorer` into `out`."""
    if landing_folder_is_empty(config.data.inputs):
        # A scheduled filter over a landing folder: nothing landed yet is a normal outcome, said, not an error.
        message = f"no Parquet shards in {config.data.inputs} (missing or empty folder): nothing to filter"
        get_run_logger().warning(message)
        summary = combine_filter_summaries([], os.fspath(out))
        artifacts.markdown_report(f"# Filter\n\n{message}\n", key="filter-report", description="Filter (no shards)")
        return {"filter": {**summary, "message": message}, "stages": {"filter-shard": []}}
    if config.engine == "ray":
        return _filter_on_ray(config, out)
    shards = [file.url for file in expand_paths(config.data.inputs)]
    shard_outs = [os.fspath(out / "shards" / f"{i:05d}-{Path(url).stem}") for i, url in enumerate(shards)]
    stages = config.stages.model_dump(mode="json")
    futures = filter_shard.map(scorer=unmapped(config.data.scorer), shard=shards, out=shard_outs,
                               threshold=unmapped(config.curate.threshold), stages=unmapped(stages))
    results, states = [], []
    for future, shard, shard_out in zip(futures, shards, shard_outs):
        future.wait()
        kwargs = dict(scorer=config.data.scorer, shard=shard, out=shard_out, threshold=config.curate.threshold,
                      stages=stages)
        result, state = _settle(filter_shard, future.state, kwargs)
        results.append(result)
        states.append(state)
    summary = combine_filter_summaries(results, os.fspath(out))
    publish_curation(summary, "filter", f"Filter ({len(shards)} shard(s))")
    return {"filter": summary, "stages": {"filter-shard": states}}


def _filter_on_ray(config: RunConfig, out: Path) -> dict:
    """`engine: ray`: one Prefect task for the stage; Ray Data does the per-shard fan-out (one output set,
    duplicates found across shards)."""
    kwargs = dict(scorer=config.data.scorer, inputs=config.data.inputs, out=os.fspath(out),
                  threshold=config.curate.threshold, ray_options=asdict(config.ray_options()),
                  stages=config.stages.model_dump(mode="json"))
    summary, state = run_stage(filter_stage, **kwargs)
    publish_curation(summary, "filter", "Filter (Ray Data)")
    return {"filter": summary, "stages": {"filter": state}}


@flow(name="tune")
def tune_flow(config: RunConfig) -> dict:
    """Fine-tune on `data.train` (evaluated on `data.eval` when given): adapter/ and metrics.json in OUT."""
    config.require("data.train", "out", flow="tune")
    result, state = run_stage(tune_stage, data=config.data.train, out=os.fspath(_out(config)),
                              options=config.tune_options(), eval_path=config.data.eval)
    artifacts.table(comparison_rows({"train": result}), key="tune-metrics",
                    description=f"Fine-tuning ({config.tune.method})")
    return {"tune": result, "stages": {"tune": state}}


@flow(name="curate-then-tune")
def curate_then_tune_flow(config: RunConfig, compare: bool = False, tune_model: str | None = None) -> dict:
    """Curate, fine-tune on the curated rows and — with `compare` — also on all rows (no weights), with the
    same steps and seed, so the two eval figures differ only by the data. `tune_model`: the base to tune when
    it is not the one that selects (`model`). Layout: OUT/curate/, OUT/tune-curated/, OUT/tune-uncurated/,
    OUT/summary.json, OUT/report.md."""
    config.require("data.train", "data.meta", "out", flow="curate-then-tune")
    out = _out(config)
    # the pool is decontaminated against the eval set the tuned models are measured on
    with flow_engine(config):
        curated, curate_state = run_stage(curate_stage, **curate_kwargs(config.with_eval_decontamination(),
                                                                          out / "curate"))
    publish_curation(curated, "curate", f"Curation ({curated.get('method')})")

    options = {**config.tune_options(), **({"model": tune_model} if tune_model else {})}
    tuned: dict[str, dict] = {}
    stages = {"curate": curate_state}
    tuned["curated"], stages["tune-curated"] = run_stage(
        tune_stage, data=curated["paths"]["curated"], out=os.fspath(out / "tune-curated"), options=options,
        eval_path=config.data.eval)
    if compare:
        # The uncurated rows have no dpsel_weight column: the baseline is plain fine-tuning on everything.
        baseline = {**options, "weights_column": None}
        tuned["uncurated"], stages["tune-uncurated"] = run_stage(
            tune_stage, data=config.data.train, out=os.fspath(out / "tune-uncurated"), options=baseline,
            eval_path=config.data.eval)

    report = write_text_atomic(pipeline_markdown(curated, tuned, relative_to=out) + "\n", out / "report.md")
    summary = {"curate": curated, "tune": tuned, "stages": stages, "headline": curation_headline(curated),
               "report": os.fspath(report)}
    write_json_atomic(summary, out / "summary.json")
    artifacts.table(comparison_rows(tuned), key="curate-then-tune-comparison",
                    description="Fine-tuning on curated vs uncurated rows")
    artifacts.markdown_report(pipeline_markdown(curated, tuned), key="curate-then-tune-report",
                              description="Curate, then tune")
    return summary


@flow(name="curate-then-filter", task_runner=ThreadPoolTaskRunner(max_workers=FILTER_WORKERS))
def curate_then_filter_flow(config: RunConfig) -> dict:
    """Curate `data.train` against `data.meta`, then filter `data.inputs` with that run's scorer (select on a
    sample, keep what passes in the whole pool). With `engine: ray` both stages run on one Ray runtime, started
    once for the flow. Layout: OUT/curate/, OUT/filter/ (the filter flow's OUT), OUT/summary.json."""
    config.require("data.train", "data.meta", "data.inputs", "out", flow="curate-then-filter")
    out = _out(config)
    with flow_engine(config):
        curated, curate_state = run_stage(curate_stage, **curate_kwargs(config, out / "curate"))
        publish_curation(curated, "curate", f"Curation ({curated.get('method')})")
        scored = config.model_copy(update={"data": config.data.model_copy(
            update={"scorer": curated["paths"]["scorer"]})})
        filtered = _filter(scored, out / "filter")
    summary = {"curate": curated, "filter": filtered["filter"], "stages": {"curate": curate_state,
                                                                           **filtered["stages"]}}
    write_json_atomic(summary, out / "summary.json")
    return summary


FLOWS = {"curate": curate_flow, "filter": filter_flow, "tune": tune_flow, "curate_then_tune": curate_then_tune_flow,
         "curate_then_filter": curate_then_filter_flow}


def describe(name: str, summary: dict) -> str:
    """A few plain lines for the terminal: where the outputs are and the headline figures."""
    name = name.replace("-", "_")
    if name == "tune":
        result = summary["tune"]
        metrics = {k: result["metrics"].get(k) for k in ("train_loss", "eval_loss", "eval_exact_match")}
        return (f"tune: adapter {result['paths']['adapter']}\n"
                + " ".join(f"{k}={format_figure(v)}" for k, v in metrics.items() if v is not None))
    if name == "curate_then_tune":
        lines = [f"report: {summary['report']}"]
        lines += [f"{label}: {format_figure(value)}" for label, value in summary["headline"].items()]
        for set_name, result in summary["tune"].items():
            lines.append(f"{set_name}: eval_loss={format_figure(result['metrics'].get('eval_loss'))} "
                         f"eval_exact_match={format_figure(result['metrics'].get('eval_exact_match'))}")
        return "\n".join(lines)
    if name == "curate_then_filter":
        return "\n".join(describe(stage, {stage: summary[stage]}) for stage in ("curate", "filter"))
    if name == "curate_review_curate":
        answers = ", ".join(f"{k} {v}" for k, v in summary["answers"].items())
        return "\n".join([describe("curate", {"curate": summary["curate"]}), f"review answers: {answers}",
                          describe("curate", {"curate": summary["reviewed"]})])
    stage = summary[name]
    lines = [f"{name}: outputs in {stage['out_dir']}"] + ([stage["message"]] if stage.get("message") else [])
    lines += [f"{label}: {format_figure(value)}" for label, value in curation_headline(stage).items() if value is not None]
    return "\n".join(lines)
