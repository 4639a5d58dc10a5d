"""The record of a run: every output file (scores, curated rows, scorer, report, plots) written into a staging
folder beside OUT, the manifest last, then published as OUT in one swap — for `curate` and `filter` alike."""
from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from dpsel.curation.curated import curated_parts
from dpsel.curation.examples import ExamplePicker, examples_markdown, fill_texts
from dpsel.curation.labels import label_column
from dpsel.curation.rows import RunRows, as_path_list, count_rows, final_reasons
from dpsel.curation.rules import SelectionRule, effective_thresholds
from dpsel.data import GROUP_COLUMNS
from dpsel.io import write_parquet_atomic, write_parquet_parts_atomic
from dpsel.outputs import (CURATED_FILE, SCORES_FILE, begin_staging, file_records, new_run_id,
                           output_error, output_paths, publish, scores_table, with_run_id, write_manifest,
                           write_scorer)
from dpsel.version import __version__


@dataclass
class CurationResult:
    out_dir: Path
    paths: dict[str, Path]
    counts: dict
    manifest: dict
    auroc: dict | None = None


# Writing a run
# ------------------------------------------------------------------------------------------------
def inputs_entry(paths, rows: RunRows) -> dict:
    return input_files_entry(paths, rows.n, rows.data.shape, rows.data.files)


def input_files_entry(paths, n: int, shape, files) -> dict:
    return {"paths": as_path_list(paths), "rows": n, "shape": shape,
            "files": [{"path": f.path, "rows": f.rows, "sha256": f.sha256} for f in files]}


def _group_stats(rows: RunRows, weights: np.ndarray, keep: np.ndarray, extra_column: str | None) -> dict:
    """Per task/source (and the grouping column): rows, mean weight, kept share, and the share of the total
    weight mass (the mixture weight of that group under weighted fine-tuning)."""
    from dpsel.report import group_summary   # plotting is imported only when a run is written
    columns = [c for c in dict.fromkeys([*GROUP_COLUMNS, extra_column]) if c]
    total_mass = float(weights[rows.usable].sum()) or 1.0
    stats = {}
    for column in columns:
        values = rows.group_values(column)
        if values is None:
            continue
        stats[column] = {}
        for row in group_summary(values, weights, keep, rows.usable):
            name = row.pop("group")
            mass = float(weights[(values == name) & rows.usable].sum())
            stats[column][name] = {**row, "mixture_weight": mass / total_mass}
    return stats


@dataclass
class Run:
    """Everything `write_run` needs, from either curate or filter."""
    command: str
    method: str
    config: dict
    rows: RunRows
    inputs: dict
    weights: np.ndarray
    stds: np.ndarray
    keep: np.ndarray
    rule: SelectionRule
    scorer: object                     # Scorer, a scorer directory to copy, or None
    diagnostics: dict
    timings: dict
    started: float
    group_column: str | None = None
    truth: dict | None = None
    coverage: dict | None = None       # how every row got its weight (visits after burn-in; Scores.coverage)
    extra_manifest: dict = field(default_factory=dict)   # e.g. meta rows dropped as duplicates
    near_dup_index: tuple | None = None  # (NearDupIndex, StagesConfig) of the curated rows, saved in scorer/
    examples: ExamplePicker | None = None   # the report's dropped rows, where picked batch by batch (streamed)
    labels: object = None              # a reviewer's labels (dpsel.curation.labels.Labels): scores' dpsel_label


def _selection_record(run: Run, cutoff: float | None, group_cutoffs: dict) -> dict:
    return {"method": run.method, "command": run.command, **run.rule.to_dict(),
            "effective_threshold": cutoff, "effective_group_thresholds": group_cutoffs,
            "group_column": run.group_column, "config": run.config, "dpsel_version": __version__}


def write_run(out: Path, run: Run) -> CurationResult:
    """Write every file into a staging folder beside `out` (manifest last), then publish it as `out` in one
    swap (dpsel.outputs): a reader never sees a folder that mixes two runs."""
    from dpsel.parallel.env import is_writer
    if not is_writer():  # torchrun: rank 0 writes the run; the other ranks only sampled their shard
        return CurationResult(out_dir=out, paths={}, counts=_outcome(run)[-1], manifest={})
    with staged_run(out) as (stage, run_id):
        return commit_run(stage, out, run, run_id)


def commit_run(stage: Path, out: Path, run: Run, run_id: str,
               write_curated: Callable[[Path], None] | None = None) -> CurationResult:
    """Write the run into its staging folder: scores.parquet, curated.parquet (by `write_curated(path)` where
    an engine's workers wrote its parts, see `dpsel.curation.parts`), then everything else, manifest last."""
    write_start = time.perf_counter()
    cutoff, group_cutoffs, reasons, details, counts = _outcome(run)
    _write_tables(stage, run, run_id, reasons, details, write_curated)
    return finish_run(stage, out, run, run_id, (cutoff, group_cutoffs, counts), write_start)


@contextmanager
def staged_run(out: Path):
    """(staging folder, run id) of a new run into `out`: published as `out` when the block ends, removed if it
    raises (environment errors, e.g. a full disk, become input errors naming the path)."""
    run_id = new_run_id()
    stage = begin_staging(out, run_id)
    try:
        yield stage, run_id
        publish(stage, out, run_id)
    except BaseException as error:
        shutil.rmtree(stage, ignore_errors=True)
        mapped = output_error(error, stage) if isinstance(error, OSError) else error
        if mapped is error:
            raise
        raise mapped from error


def _outcome(run: Run) -> tuple:
    """(cutoff, group cutoffs, reason and detail per row, counts) of a finished selection."""
    groups = run.rows.group_values(run.group_column) if run.group_column else None
    cutoff, group_cutoffs = effective_thresholds(run.weights, run.keep, groups)
    reasons, details = final_reasons(run.rows, run.keep, run.weights, run.rule, cutoff)
    return cutoff, group_cutoffs, reasons, details, count_rows(reasons, run.rows.usable, run.rows.stage_stats)


def _write_tables(stage: Path, run: Run, run_id: str, reasons: list[str], details: list[str],
                  write_curated: Callable[[Path], None] | None = None) -> None:
    ids = run.rows.ids
    scores = scores_table(ids, run.weights, run.stds, run.keep, reasons, details, run.rows.files,
                          run.rows.file_rows, run.rows.dup_of)
    if run.labels is not None:
        scores = scores.append_column("dpsel_label", label_column(run.labels, len(ids)))
    write_parquet_atomic(with_run_id(scores, run_id), stage / SCORES_FILE)
    del scores
    if write_curated is not None:
        write_curated(stage / CURATED_FILE)
        return
    parts = (with_run_id(part, run_id) for part in curated_parts(run.rows, run.weights, run.keep))
    write_parquet_parts_atomic(parts, stage / CURATED_FILE)


def finish_run(stage: Path, out: Path, run: Run, run_id: str, outcome: tuple, write_start: float) -> CurationResult:
    """Everything but scores.parquet and curated.parquet (already in `stage`): scorer/, report, manifest (last).
    `outcome`: (cutoff, group cutoffs, counts) of the selection."""
    from dpsel.report import kept_fraction, write_report   # plotting is imported only when a report is written
    cutoff, group_cutoffs, counts = outcome
    paths = output_paths(out)
    selection = {**_selection_record(run, cutoff, group_cutoffs), "run_id": run_id}
    scorer_dir = write_scorer(stage, run.scorer, selection)
    if run.near_dup_index is not None and scorer_dir is not None:   # what `dpsel filter` dedups against
        from dpsel.curation.stages import save_index
        save_index(scorer_dir, *run.near_dup_index)

    group_stats = _group_stats(run.rows, run.weights, run.keep, run.group_column)
    report_paths = write_report(stage, _report_data(run, counts, cutoff, run_id, dropped_examples(stage, run)))
    paths.update({k: out / v.relative_to(stage) for k, v in report_paths.items() if k != "report"})
    timings = {**run.timings, "write_s": time.perf_counter() - write_start,
               "total_s": time.perf_counter() - run.started}
    if run.rows.stage_stats:
        timings["stages"] = {st["stage"]: st["seconds"] for st in run.rows.stage_stats}
    manifest = {
        "run_id": run_id,
        "dpsel_version": __version__,
        "command": run.command,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": run.inputs,
        "method": run.method,
        "config": run.config,
        "seed": run.config.get("seed"),
        "selection": {k: v for k, v in selection.items() if k not in ("config", "dpsel_version", "method")},
        "counts": counts,
        "kept_fraction": kept_fraction(counts),  # of input rows, as in report.md and the artifacts
        "timings": timings,
        "groups": group_stats,
        "truth": run.truth,
        "coverage": run.coverage,
        "outputs": {name: path.name for name, path in paths.items()},
        **run.extra_manifest,
        # sha256 of every other file of this run: with run_id, what `dpsel.outputs.verify_run` checks
        "files": file_records(stage),
    }
    write_manifest(stage, manifest)  # last: the completion marker
    return CurationResult(out_dir=out, paths=paths, counts=counts, manifest=manifest,
                          auroc=run.truth["auroc"] if run.truth else None)


def dropped_examples(stage: Path, run: Run) -> list[str]:
    """report.md's "What the stages dropped" lines: the rows picked while they were in memory (here, for a run
    that holds its rows), their partners completed from the staged scores.parquet and the input files."""
    picker = run.examples
    if picker is None:
        picker = ExamplePicker()
        picker.add(run.rows)
    eval_paths = (run.extra_manifest.get("stages") or {}).get("decontaminate") or []
    return examples_markdown(fill_texts(picker.examples(), stage / SCORES_FILE, eval_paths), run.rows.stage_stats)


def _report_data(run: Run, counts: dict, cutoff: float | None, run_id: str, dropped: list[str]):
    from dpsel.report import ReportData, kept_fraction, read_truth_kinds, stage_seconds
    headline = {"command": run.command, "run id": run_id, "method": run.method, "input rows": counts["input_rows"],
                "usable rows": counts["usable_rows"], "kept rows": counts["kept_rows"],
                "kept fraction (of input rows)": kept_fraction(counts)}
    headline.update({f"dropped ({reason})": n for reason, n in counts["dropped_by_reason"].items()})
    headline["selection rule"] = run.rule.kind + (f" {run.rule.budget}" if run.rule.threshold is None
                                                  else f" {run.rule.threshold}")
    headline["lowest kept weight"] = "none kept" if cutoff is None else cutoff
    if run.truth:
        headline["AUROC (clean vs corrupted)"] = run.truth["auroc"]["overall"] if run.truth["auroc"]["overall"] \
            is not None else float("nan")
    headline[f"{run.command} seconds (manifest timings)"] = stage_seconds(run.timings)
    tables = {}
    if counts.get("stages"):   # curation stages, in order: rows in, dropped (by reason), seconds
        tables["Curation stages"] = [{"stage": st["stage"], "rows in": st["rows_in"], "dropped": st["dropped"],
                                      "by reason": ", ".join(f"{k} {v}" for k, v in st["by_reason"].items()) or "-",
                                      "seconds": st["seconds"]} for st in run.rows.stage_stats]
    if run.truth:
        tables["Against the truth file"] = [
            {"kind": k, "rows": run.truth["rows_by_kind"][k],
             "AUROC vs clean": run.truth["auroc"].get(k) if k != "clean" else float("nan"),
             "kept fraction": v} for k, v in run.truth["kept_fraction_by_kind"].items()]
    groups = {c: v for c in GROUP_COLUMNS if (v := run.rows.group_values(c)) is not None}
    return ReportData(title=f"dpsel {run.command}: {run.method}", headline=headline, weights=run.weights,
                      kept=run.keep, usable=run.rows.usable, groups=groups,
                      diagnostics=run.diagnostics or {}, previews=run.rows.previews(), tables=tables,
                      truth_kinds=read_truth_kinds(run.truth["path"], run.rows.n) if run.truth else None,
                      config=run.config, sections=dropped)
