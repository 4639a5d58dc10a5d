"""Coarse Prefect tasks: one per stage (curate, tune) or per shard (filter). They take and return paths and
small JSON summaries, never rows or tensors, so results persist cheaply and the cache stays small.

Every stage is cached by `flows.cache.content_cache_key` (input bytes + options + code version); results are
persisted as JSON. Stages that read or write files retry on transient I/O errors only — a bad input
(DpselInputError) or a bug fails at once instead of re-running a long sampler.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import task

from dpsel.io import write_json_atomic
from flows.artifacts import artifact_key, progress_artifact_sink
from flows.cache import content_cache_key

IO_RETRIES = 2
IO_RETRY_DELAY_S = 3
# OSErrors that a retry cannot fix: the file is not there or not ours to read.
_PERMANENT_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def retry_on_transient_io(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry network/filesystem hiccups, not bad input or bugs."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, (OSError, TimeoutError)) and not isinstance(error, _PERMANENT_OS_ERRORS)


_STAGE_OPTIONS = dict(persist_result=True, result_serializer="json", retries=IO_RETRIES,
                      retry_delay_seconds=IO_RETRY_DELAY_S, retry_condition_fn=retry_on_transient_io)


def _as_str_paths(paths: dict[str, Any]) -> dict[str, str]:
    return {name: os.fspath(path) for name, path in paths.items()}


def manifest_groups(manifest: dict) -> list[dict]:
    """The manifest's per-`task`/`source` statistics as flat rows (column, group, rows, kept, mean_weight...)."""
    return [{"column": column, "group": name, **stats}
            for column, by_value in (manifest.get("groups") or {}).items() for name, stats in by_value.items()]


def curation_summary(result: Any) -> dict:
    """A CurationResult as a small JSON summary (what flows pass on and Prefect persists)."""
    return {"out_dir": os.fspath(result.out_dir), "paths": _as_str_paths(result.paths),
            "counts": dict(result.counts), "auroc": result.auroc, "method": result.manifest.get("method"),
            "groups": manifest_groups(result.manifest), "timings": result.manifest.get("timings", {})}


@task(name="curate", cache_key_fn=content_cache_key("train", "meta", "truth", "labels"), **_STAGE_OPTIONS)
def curate_stage(train: Any, meta: Any, out: str, settings: dict, truth: str | None = None,
                 labels: str | None = None) -> dict:
    """Select rows of `train` with the trusted `meta` set; writes the curation outputs into `out`. `settings`:
    `RunConfig.curate_settings()` (method, keep rule, selection, engine: ray runs the method's scoring passes
    on Ray Data, see dpsel.engines). `labels`: a reviewer's keep/drop file (`curate --labels`)."""
    from dpsel.config import RunConfig
    from dpsel.curation.run import curate_from_config
    from dpsel.progress import default_phase_of, progress_reporter

    config = RunConfig.from_mapping({**settings, "data": {"train": train, "meta": meta, "truth": truth,
                                                          "labels": labels}})
    method = config.curate.method
    with progress_reporter(f"curate[{method}]", default_phase=default_phase_of(method),
                           sinks=[progress_artifact_sink(artifact_key("curate-progress"))]) as progress:
        result = curate_from_config(config, out=out, progress=progress)
    return curation_summary(result)


@task(name="filter-shard", cache_key_fn=content_cache_key("scorer", "shard"), **_STAGE_OPTIONS)
def filter_shard(scorer: str, shard: str, out: str, threshold: float | None = None,
                 stages: dict | None = None) -> dict:
    """Score one shard with a saved scorer and keep what passes; outputs go to the shard's own folder.
    `stages`: the run config's `stages:` section (the curation stages before scoring)."""
    from dpsel.curation.filter import filter_rows

    result = filter_rows(scorer, [shard], out, threshold=threshold, stages=_stage_options(stages))
    return {**curation_summary(result), "shard": shard}


@task(name="filter", cache_key_fn=content_cache_key("scorer", "inputs"), **_STAGE_OPTIONS)
def filter_stage(scorer: str, inputs: Any, out: str, threshold: float | None, ray_options: dict,
                 stages: dict | None = None) -> dict:
    """Filter all of `inputs` as one stage on Ray Data (`engine: ray`): Ray spreads the shards over its
    workers, so Prefect sees one task, whose progress artifact follows the rows Ray has scored."""
    from dpsel.curation.filter import filter_rows
    from dpsel.engines import RayOptions
    from dpsel.progress import progress_reporter

    with progress_reporter("filter[ray]", default_phase="scoring",
                           sinks=[progress_artifact_sink(artifact_key("filter-progress"))]) as progress:
        result = filter_rows(scorer, inputs, out, threshold=threshold, progress=progress, engine="ray",
                             ray=RayOptions(**ray_options), stages=_stage_options(stages))
    return curation_summary(result)


def _stage_options(stages: dict | None):
    from dpsel.stages.options import stages_config
    return stages_config(**(stages or {}))


@task(name="filter-summary", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAY_S,
      retry_condition_fn=retry_on_transient_io)
def combine_filter_summaries(shards: list[dict], out: str) -> dict:
    """Totals over shards (counts summed key by key) written to OUT/summary.json."""
    totals: dict[str, Any] = {}
    for shard in shards:
        _add_counts(totals, shard["counts"])
    summary = {"out_dir": out, "counts": totals, "shards": shards, "groups": _merge_groups(shards)}
    summary["paths"] = {"summary": os.fspath(write_json_atomic(summary, Path(out) / "summary.json"))}
    return summary


def _add_counts(into: dict, counts: dict) -> None:
    """Sum row counts key by key, nested ones (dropped_by_reason) too."""
    for name, value in counts.items():
        if isinstance(value, dict):
            _add_counts(into.setdefault(name, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            into[name] = into.get(name, 0) + value


def _merge_groups(shards: list[dict]) -> list[dict]:
    """Per-group rows over all shards; the mean weight re-weighted by each shard's scored rows."""
    merged: dict[tuple[str, str], dict] = {}
    for shard in shards:
        for group in shard.get("groups", []):
            into = merged.setdefault((group["column"], group["group"]),
                                     {"column": group["column"], "group": group["group"], "rows": 0,
                                      "scored": 0, "kept": 0, "_weight_sum": 0.0})
            into["rows"] += group["rows"]
            into["scored"] += group["scored"]
            into["kept"] += group["kept"]
            if group["scored"]:
                into["_weight_sum"] += group["mean_weight"] * group["scored"]
    for row in merged.values():
        row["mean_weight"] = row.pop("_weight_sum") / row["scored"] if row["scored"] else float("nan")
        row["kept_fraction"] = row["kept"] / row["rows"] if row["rows"] else 0.0
    return list(merged.values())


@task(name="tune", cache_key_fn=content_cache_key("data", "eval_path"), **_STAGE_OPTIONS)
def tune_stage(data: Any, out: str, options: dict, eval_path: Any = None) -> dict:
    """Fine-tune on `data` (curated or not); writes OUT/adapter/ and OUT/metrics.json."""
    from dpsel.progress import progress_reporter
    from dpsel.tuning import tune_parquet

    name = Path(out).name
    with progress_reporter(f"tune[{options.get('method', 'lora')}] {name}", default_phase="training",
                           sinks=[progress_artifact_sink(artifact_key("tune-progress", name))]) as progress:
        metrics = tune_parquet(data, out, eval_path=eval_path, progress=progress, **options)
    return {"out_dir": out, "metrics": metrics,
            "paths": {"adapter": os.fspath(Path(out) / "adapter"), "metrics": os.fspath(Path(out) / "metrics.json")}}
