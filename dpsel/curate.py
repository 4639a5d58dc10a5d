"""Curation: read → select → keep/drop every input row → write outputs (`curate`), and the same with a
saved scorer on new data (`filter_rows`).

Row accounting: every input row ends up in exactly one bucket — kept, or dropped with a reason
(`invalid`, `duplicate`, `low_weight`) — so `input_rows == kept_rows + dropped_rows` always holds.
Selection only ever sees the usable rows (valid and first occurrence of their content).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import dpsel
from dpsel import checkpoint
from dpsel.data import InstructionSet, read_instruction_set
from dpsel.errors import DpselInputError
from dpsel.outputs import (SELECTION_FILE, begin_staging, check_outputs_do_not_overwrite_inputs, curated_table,
                           file_records, new_run_id, output_error, output_paths, publish, scores_table,
                           write_manifest, write_scorer, write_tables)
from dpsel.runlock import locks_out
from dpsel.select import load_scorer, select
from dpsel.select.base import ProgressFn, SelectConfig, read_scorer_meta

DEFAULT_BUDGET = 0.7
log = logging.getLogger(__name__)

REASON_INVALID = "invalid"
REASON_DUPLICATE = "duplicate"
REASON_LOW_WEIGHT = "low_weight"


@dataclass
class CurationResult:
    out_dir: Path
    paths: dict[str, Path]
    counts: dict
    manifest: dict
    auroc: dict | None = None


# ------------------------------------------------------------------------------------------------
# Selection rule: which usable rows to keep given their weights
# ------------------------------------------------------------------------------------------------
@dataclass
class SelectionRule:
    """How rows are kept: the top `budget` fraction, or weight >= `threshold`, optionally per group.

    `group_budgets` maps group value -> fraction; `per_group` applies `budget` inside every group.
    `group_thresholds` (filter only) maps group value -> threshold, `threshold` being the fallback.
    """
    budget: float | None = None
    threshold: float | None = None
    group_column: str | None = None
    group_budgets: dict[str, float] = field(default_factory=dict)
    per_group: bool = False
    group_thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if self.threshold is not None:
            return "group_threshold" if self.group_thresholds else "threshold"
        return "group_budget" if (self.group_budgets or self.per_group) else "budget"

    def to_dict(self) -> dict:
        return {"rule": self.kind, "budget": self.budget, "threshold": self.threshold,
                "group_column": self.group_column if self.uses_groups else None,
                "group_budgets": dict(self.group_budgets), "per_group": self.per_group,
                "group_thresholds": dict(self.group_thresholds)}

    @property
    def uses_groups(self) -> bool:
        return bool(self.group_budgets or self.per_group or self.group_thresholds)


def _check_fraction(value: float, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise DpselInputError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= value <= 1.0):
        raise DpselInputError(f"{what} must be in [0, 1], got {value}")
    return value


def make_rule(method: str, budget: float | None, threshold: float | None,
              task_budgets: dict[str, float] | None, per_group: bool, group_column: str) -> SelectionRule:
    """Validate the user's selection options and fill in the defaults (budget 0.7; `all` keeps all)."""
    if budget is not None and threshold is not None:
        raise DpselInputError("give either --budget or --threshold, not both")
    if threshold is not None and (task_budgets or per_group):
        raise DpselInputError("per-group budgets cannot be combined with --threshold")
    if threshold is not None:  # weights are in [0, 1]: any other threshold keeps all or nothing
        return SelectionRule(threshold=_check_fraction(threshold, "--threshold"))
    if budget is None:
        budget = 1.0 if method == "all" else DEFAULT_BUDGET
    budget = _check_fraction(budget, "--budget")
    groups = {str(k): _check_fraction(v, f"budget for {group_column} {k!r}") for k, v in (task_budgets or {}).items()}
    return SelectionRule(budget=budget, group_column=group_column, group_budgets=groups, per_group=per_group)


def budget_count(fraction: float, n: int) -> int:
    """Rows a fraction of n keeps: round half up, so 0.7 of 5 keeps 4 and 0.5 of 3 keeps 2."""
    return min(n, max(0, math.floor(fraction * n + 0.5)))


def top_fraction(weights: np.ndarray, candidates: np.ndarray, fraction: float) -> np.ndarray:
    """Indices (into `weights`) of the top `fraction` of `candidates` by weight; ties go to the earlier row."""
    k = budget_count(fraction, len(candidates))
    # A stable sort on -weight keeps input order among equal weights: deterministic tie-breaking.
    order = np.argsort(-weights[candidates], kind="stable")
    return candidates[order[:k]]


def apply_rule(rule: SelectionRule, weights: np.ndarray, usable: np.ndarray,
               groups: np.ndarray | None = None) -> np.ndarray:
    """Boolean keep-mask over all rows; only `usable` rows can be kept."""
    keep = np.zeros(len(weights), dtype=bool)
    candidates = np.flatnonzero(usable)
    if rule.threshold is not None:
        row_threshold = np.full(len(weights), rule.threshold)
        if rule.group_thresholds and groups is not None:
            for value, limit in rule.group_thresholds.items():
                row_threshold[groups == value] = limit
        keep[candidates] = weights[candidates] >= row_threshold[candidates]
        return keep
    if not rule.uses_groups:
        keep[top_fraction(weights, candidates, rule.budget)] = True
        return keep
    if groups is None:
        raise DpselInputError("per-group budgets need a group column", column=rule.group_column)
    present = set(groups[candidates].tolist())
    unknown = sorted(set(rule.group_budgets) - set(groups.tolist()))
    if unknown:
        raise DpselInputError(f"budget given for unknown {rule.group_column} value(s) {unknown}; "
                              f"present: {sorted(present)}", column=rule.group_column)
    for value in sorted(present):
        in_group = candidates[groups[candidates] == value]
        fraction = rule.group_budgets.get(value, rule.budget)
        keep[top_fraction(weights, in_group, fraction)] = True
    return keep


def effective_thresholds(weights: np.ndarray, keep: np.ndarray,
                         groups: np.ndarray | None) -> tuple[float | None, dict[str, float]]:
    """The lowest kept weight overall and per group: the threshold that reproduces this selection on
    the same rows (up to ties), stored with the scorer as `filter`'s default."""
    if not keep.any():
        return None, {}
    overall = float(weights[keep].min())
    per_group = {}
    if groups is not None:
        for value in sorted(set(groups[keep].tolist())):
            per_group[value] = float(weights[keep & (groups == value)].min())
    return overall, per_group


# ------------------------------------------------------------------------------------------------
# Rows: one input set, the per-row arrays curation needs
# ------------------------------------------------------------------------------------------------
@dataclass
class _Rows:
    data: InstructionSet
    ids: list[str]
    reasons: list[str]          # "" | invalid | duplicate (from the data layer)
    details: list[str]
    files: list[str]
    file_rows: np.ndarray       # row number within its file
    usable: np.ndarray          # bool: valid and first occurrence

    @property
    def n(self) -> int:
        return len(self.ids)

    def first_occurrence(self) -> np.ndarray:
        """For each row, the index of the first usable row with its id (-1 for invalid rows)."""
        first = np.where(self.usable, np.arange(self.n), self.data.duplicate_of)   # from the data layer's dedup
        return first.astype(np.int64)

    def group_values(self, column: str) -> np.ndarray | None:
        """A column's values as strings (missing -> "(none)"), or None when the input lacks it."""
        if column not in self.data.original_columns:
            return None
        values = self.data.table.column(column).to_pylist()
        return np.array(["(none)" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                         for v in values], dtype=object)

    def previews(self) -> "_Previews":
        """Short text per row for the report's examples: last user prompt -> response."""
        return _Previews(self.data)


class _Previews(Sequence):
    """Preview text of any row, built when the report asks for it (it shows a few rows, not a million)."""

    def __init__(self, data: InstructionSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> str:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        row = np.zeros(len(self), dtype=bool)
        row[index] = True
        messages = self.data.messages(row)[0]
        user = next((m["content"] for m in reversed(messages or []) if m.get("role") == "user"), "") or ""
        answer = (messages[-1].get("content") if messages else "") or ""
        return f"{user.strip()[:70]} → {answer.strip()[:50]}"


def _read_rows(paths) -> _Rows:
    return _rows_from(read_instruction_set(_as_path_list(paths)))


def _rows_from(data: InstructionSet) -> _Rows:
    """The row view curation works on, from a columnar instruction set (no pandas frame is built)."""
    return _Rows(data=data, ids=data.id_list(), reasons=data.reasons.tolist(), details=data.details.to_pylist(),
                 files=data.file_paths().tolist(), file_rows=data.file_rows, usable=data.usable_mask())


def _as_path_list(paths) -> list[str]:
    if isinstance(paths, (str, Path)):
        return [str(paths)]
    return [str(p) for p in paths]


def _drop_meta_duplicates(rows: _Rows) -> dict:
    """Exact duplicates in the trusted meta set are common and harmless: score against the first copy only,
    and say so (log + manifest). Returns {"count", "rows": [{file, row, first}]} for the manifest."""
    first = rows.first_occurrence()
    dropped = [{"file": rows.files[i], "row": int(rows.file_rows[i]), "duplicate_of_row": int(first[i])}
               for i, reason in enumerate(rows.reasons) if reason == REASON_DUPLICATE]
    if dropped:
        rows.reasons = ["" if r == REASON_DUPLICATE else r for r in rows.reasons]
        log.warning("meta set: %d exact duplicate row(s) dropped (first: file %s row %d)", len(dropped),
                    dropped[0]["file"], dropped[0]["row"])
    return {"count": len(dropped), "rows": dropped[:100]}


def _require_all_usable(rows: _Rows, what: str) -> None:
    """The meta set is trusted: a bad or repeated row there is the user's error, not something to drop."""
    for i, reason in enumerate(rows.reasons):
        if reason:
            raise DpselInputError(f"{what} set row is {reason} ({rows.details[i]}); the {what} set must be clean "
                                  f"(row {rows.file_rows[i]} of this file)", file=rows.files[i], row=i)
    if rows.n == 0:
        raise DpselInputError(f"the {what} set has no rows", file=", ".join(f.path for f in rows.data.files))


def _check_weights(weights: np.ndarray, stds: np.ndarray, source: str) -> None:
    if not (np.all(np.isfinite(weights)) and np.all((weights >= 0) & (weights <= 1))):
        raise RuntimeError(f"{source} returned weights outside [0, 1]")
    if not (np.all(np.isfinite(stds)) and np.all(stds >= 0)):
        raise RuntimeError(f"{source} returned negative or non-finite weight std")


def spread_scores(rows: _Rows, usable_mean: np.ndarray, usable_std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the usable rows -> every input row: invalid 0 (std 0), duplicates their first occurrence's."""
    mean, std = np.zeros(rows.n), np.zeros(rows.n)
    mean[rows.usable], std[rows.usable] = usable_mean, usable_std
    first = rows.first_occurrence()
    dup = np.array([r == REASON_DUPLICATE for r in rows.reasons], dtype=bool) & (first >= 0)
    mean[dup], std[dup] = mean[first[dup]], std[first[dup]]
    return mean, std


def final_reasons(rows: _Rows, keep: np.ndarray, weights: np.ndarray,
                  rule: SelectionRule, cutoff: float | None) -> tuple[list[str], list[str]]:
    """Drop reason and detail per row: the data layer's (invalid/duplicate) first, then low_weight."""
    reasons, details = [], []
    for i in range(rows.n):
        if rows.reasons[i]:
            reasons.append(rows.reasons[i])
            details.append(rows.details[i])
        elif keep[i]:
            reasons.append("")
            details.append("")
        else:
            reasons.append(REASON_LOW_WEIGHT)
            if rule.threshold is not None:
                details.append(f"weight {weights[i]:.4f} below threshold")
            else:
                details.append(f"weight {weights[i]:.4f} outside the top budget"
                               + (f" (lowest kept {cutoff:.4f})" if cutoff is not None else ""))
    return reasons, details


def count_rows(reasons: list[str], usable: np.ndarray) -> dict:
    by_reason = {REASON_INVALID: 0, REASON_DUPLICATE: 0, REASON_LOW_WEIGHT: 0}
    for reason in reasons:
        if reason:
            by_reason[reason] = by_reason.get(reason, 0) + 1
    kept = sum(1 for r in reasons if not r)
    dropped = sum(by_reason.values())
    assert kept + dropped == len(reasons)
    return {"input_rows": len(reasons), "usable_rows": int(usable.sum()), "kept_rows": kept,
            "dropped_rows": dropped, "dropped_by_reason": by_reason}


# ------------------------------------------------------------------------------------------------
# Truth (synth): AUROC of the weights against known corruptions
# ------------------------------------------------------------------------------------------------
def load_truth(truth_path, rows: _Rows) -> tuple[str, np.ndarray]:
    """Read and check a truth file against the training rows (before the work starts): its path and the
    corruption kind of every row, in row order."""
    import pandas as pd

    path = str(truth_path)
    try:
        truth = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise DpselInputError(f"cannot read truth file ({exc})", file=path) from exc
    for column in ("row", "dpsel_id", "kind"):
        if column not in truth.columns:
            raise DpselInputError("truth file lacks this column", file=path, column=column)
    truth = truth.sort_values("row", kind="stable")
    if len(truth) != rows.n or not np.array_equal(truth["row"].to_numpy(), np.arange(rows.n)):
        raise DpselInputError(f"truth has {len(truth)} rows numbered {truth['row'].min()}..{truth['row'].max()}; "
                              f"the training input has {rows.n}", file=path, column="row")
    mismatch = np.flatnonzero(truth["dpsel_id"].astype(str).to_numpy() != np.asarray(rows.ids, dtype=object))
    if len(mismatch):
        raise DpselInputError("truth dpsel_id differs from the training row's id (another data set?)",
                              file=path, column="dpsel_id", row=int(mismatch[0]))
    return path, truth["kind"].astype(str).to_numpy()


def truth_auroc(truth_path, rows: _Rows, weights: np.ndarray, keep: np.ndarray) -> dict:
    """AUROC of the mean weight for clean (positive) vs corrupted rows, overall and per corruption kind,
    over the rows the method scored; plus the kept fraction of every kind over all rows."""
    from sklearn.metrics import roc_auc_score

    path, kind = load_truth(truth_path, rows)
    clean = kind == "clean"

    def auroc(mask: np.ndarray) -> float | None:
        labels = clean[mask]
        if labels.all() or not labels.any():
            return None  # one class only: AUROC undefined
        return float(roc_auc_score(labels, weights[mask]))

    scored = rows.usable
    result = {"overall": auroc(scored)}
    for name in sorted(set(kind.tolist()) - {"clean"}):
        value = auroc(scored & (clean | (kind == name)))
        if value is not None:  # e.g. duplicates: never scored, so no AUROC (their kept fraction still shows)
            result[name] = value
    kept_by_kind = {name: float(keep[kind == name].mean()) for name in sorted(set(kind.tolist()))}
    return {"path": path, "auroc": result, "kept_fraction_by_kind": kept_by_kind,
            "rows_by_kind": {name: int((kind == name).sum()) for name in sorted(set(kind.tolist()))}}


# ------------------------------------------------------------------------------------------------
# Writing a run
# ------------------------------------------------------------------------------------------------
def _inputs_entry(paths, rows: _Rows) -> dict:
    return {"paths": _as_path_list(paths), "rows": rows.n, "shape": rows.data.shape,
            "files": [{"path": f.path, "rows": f.rows, "sha256": f.sha256} for f in rows.data.files]}


def _group_stats(rows: _Rows, weights: np.ndarray, keep: np.ndarray, extra_column: str | None) -> dict:
    """Per task/source (and the grouping column): rows, mean weight, kept share, and the share of the total
    weight mass (the mixture weight of that group under weighted fine-tuning)."""
    from dpsel.report import GROUP_COLUMNS, group_summary   # plotting is imported only when a run is written
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
class _Run:
    """Everything `_write_run` needs, from either curate or filter."""
    command: str
    method: str
    config: dict
    rows: _Rows
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


def _selection_record(run: _Run, cutoff: float | None, group_cutoffs: dict) -> dict:
    return {"method": run.method, "command": run.command, **run.rule.to_dict(),
            "effective_threshold": cutoff, "effective_group_thresholds": group_cutoffs,
            "group_column": run.group_column, "config": run.config, "dpsel_version": dpsel.__version__}


def _write_run(out: Path, run: _Run) -> CurationResult:
    """Write every file into a staging folder beside `out` (manifest last), then publish it as `out` in one
    swap (dpsel.outputs): a reader never sees a folder that mixes two runs."""
    from dpsel.parallel.env import is_writer
    if not is_writer():  # torchrun: rank 0 writes the run; the other ranks only sampled their shard
        return CurationResult(out_dir=out, paths={}, counts=_outcome(run)[-1], manifest={})
    run_id = new_run_id()
    stage = begin_staging(out, run_id)
    try:
        result = _write_files(stage, out, run, run_id)
        publish(stage, out, run_id)
    except BaseException as error:
        shutil.rmtree(stage, ignore_errors=True)
        mapped = output_error(error, stage) if isinstance(error, OSError) else error
        if mapped is error:
            raise
        raise mapped from error
    return result


def _outcome(run: _Run) -> tuple:
    """(cutoff, group cutoffs, reason and detail per row, counts) of a finished selection."""
    groups = run.rows.group_values(run.group_column) if run.group_column else None
    cutoff, group_cutoffs = effective_thresholds(run.weights, run.keep, groups)
    reasons, details = final_reasons(run.rows, run.keep, run.weights, run.rule, cutoff)
    return cutoff, group_cutoffs, reasons, details, count_rows(reasons, run.rows.usable)


def _write_files(stage: Path, out: Path, run: _Run, run_id: str) -> CurationResult:
    from dpsel.report import kept_fraction, write_report   # plotting is imported only when a report is written
    write_start = time.perf_counter()
    cutoff, group_cutoffs, reasons, details, counts = _outcome(run)
    paths = output_paths(out)

    ids = run.rows.ids
    write_tables(stage, scores_table(ids, run.weights, run.stds, run.keep, reasons, details, run.rows.files,
                                     run.rows.file_rows),
                 curated_table(run.rows.data.table, ids, run.weights, run.keep, run.rows.data.messages(run.keep)),
                 run_id=run_id)
    selection = {**_selection_record(run, cutoff, group_cutoffs), "run_id": run_id}
    write_scorer(stage, run.scorer, selection)

    group_stats = _group_stats(run.rows, run.weights, run.keep, run.group_column)
    report_paths = write_report(stage, _report_data(run, counts, cutoff, run_id))
    paths.update({k: out / v.relative_to(stage) for k, v in report_paths.items() if k != "report"})
    timings = {**run.timings, "write_s": time.perf_counter() - write_start,
               "total_s": time.perf_counter() - run.started}
    manifest = {
        "run_id": run_id,
        "dpsel_version": dpsel.__version__,
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


def _report_data(run: _Run, counts: dict, cutoff: float | None, run_id: str):
    from dpsel.report import GROUP_COLUMNS, ReportData, kept_fraction, read_truth_kinds, stage_seconds
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
                      config=run.config)


# ------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------
@locks_out("train", "meta", "truth")
def curate(train, meta, out, *, method: str = "bads", budget: float | None = None,
           threshold: float | None = None, task_budgets: dict[str, float] | None = None,
           per_group: bool = False, group_column: str = "task", config: SelectConfig | None = None,
           progress: ProgressFn | None = None, truth=None, restart: bool = False, engine: str = "local",
           ray=None) -> CurationResult:
    """Score every training row with `method` against the trusted `meta` set and keep the best.

    Keeps the top `budget` fraction of the usable rows (default 0.7; `all` keeps everything) or the rows with
    mean weight >= `threshold` (not both). `task_budgets` ({group value: fraction}) or `per_group=True`
    apply budgets within each value of `group_column`. `truth` (a synth truth.parquet) adds AUROC.
    Writes scores.parquet, curated.parquet, manifest.json, report.md + PNGs and scorer/ under `out`
    (dpsel's files in an existing `out` are replaced; other files there are left alone).
    `engine="ray"` runs the method's pool-scoring passes on Ray (`ray`: `dpsel.engines.RayOptions`; methods in
    `dpsel.engines.RAY_CURATE_METHODS`, any other is an input error); same outputs.
    """
    from dpsel.engines import curate_engine
    from dpsel.engines.ray_engine import pool_executor
    from dpsel.models.passes import executing_on
    started = time.perf_counter()
    ray_options = curate_engine(engine, method, ray)
    config = config or SelectConfig()
    rule = make_rule(method, budget, threshold, task_budgets, per_group, group_column)
    out = Path(out)
    train_rows = _read_rows(train)
    meta_rows = _read_rows(meta)
    meta_duplicates = _drop_meta_duplicates(meta_rows)
    _require_all_usable(meta_rows, "meta")
    input_files = [f.path for r in (train_rows, meta_rows) for f in r.data.files]
    check_outputs_do_not_overwrite_inputs(out, input_files + ([str(truth)] if truth else []),
                                          _as_path_list(train) + _as_path_list(meta))
    if truth is not None:
        load_truth(truth, train_rows)  # a wrong truth file fails now, not after the work
    if rule.uses_groups and train_rows.group_values(group_column) is None:
        raise DpselInputError("per-group budgets need this column in the training set", column=group_column,
                              file=", ".join(f.path for f in train_rows.data.files))
    if not train_rows.usable.any():
        raise DpselInputError("no usable training rows (all invalid or duplicate)",
                              file=", ".join(f.path for f in train_rows.data.files))
    read_s = time.perf_counter() - started

    select_start = time.perf_counter()
    groups = train_rows.group_values(group_column)
    # Losses are normalised per group (task) inside the methods that use losses, when the column exists.
    usable_groups = None if groups is None else list(groups[train_rows.usable])
    checkpoints = _open_checkpoints(out, method, config, train_rows, meta_rows, restart)
    with checkpoint.active(checkpoints), executing_on(pool_executor(ray_options)):
        scores = select(train_rows.data.messages(train_rows.usable), meta_rows.data.messages(meta_rows.usable),
                        method, config, progress, groups=usable_groups)
    _check_weights(scores.weight_mean, scores.weight_std, f"method {method}")
    select_s = time.perf_counter() - select_start
    weights, stds = spread_scores(train_rows, scores.weight_mean, scores.weight_std)
    keep = apply_rule(rule, weights, train_rows.usable, groups)

    inputs = {"train": _inputs_entry(train, train_rows), "meta": _inputs_entry(meta, meta_rows)}
    truth_info = None
    if truth is not None:
        truth_info = truth_auroc(truth, train_rows, weights, keep)
        from dpsel.io import file_sha256
        inputs["truth"] = {"paths": [str(truth)], "sha256": file_sha256(truth)}
    run = _Run(command="curate", method=scores.method, config=scores.config or config.to_dict(), rows=train_rows,
               inputs=inputs, weights=weights, stds=stds, keep=keep, rule=rule, scorer=scores.scorer,
               diagnostics=scores.diagnostics, timings={"read_s": read_s, "select_s": select_s,
                                                        "method": dict(scores.timings), "engine": engine},
               started=started, group_column=group_column if groups is not None else None, truth=truth_info,
               coverage=scores.coverage or None, extra_manifest={"meta_duplicates_dropped": meta_duplicates,
                                                                 "resumed_from_checkpoint": checkpoints.resumed})
    result = _write_run(out, run)
    checkpoints.discard()  # published: nothing left to resume
    return result


def _open_checkpoints(out: Path, method: str, config: SelectConfig, train_rows: _Rows, meta_rows: _Rows,
                      restart: bool) -> checkpoint.Checkpoints:
    """This run's checkpoints beside `out`; a checkpoint of a run with another config or input is refused."""
    fingerprint = {"dpsel_version": dpsel.__version__, "method": method, "config": config.to_dict(),
                   "inputs": {name: [f.sha256 for f in rows.data.files]
                              for name, rows in (("train", train_rows), ("meta", meta_rows))}}
    return checkpoint.Checkpoints.open(out, fingerprint, restart=restart)


def _filter_rule(selection: dict, threshold: float | None, budget: float | None, scorer_dir: Path,
                 has_groups: bool) -> SelectionRule:
    """Explicit threshold or budget, else the curation run's effective threshold(s)."""
    if threshold is not None or budget is not None:
        return make_rule("filter", budget, threshold, None, False, "task")
    stored = selection.get("effective_threshold")
    if stored is None:
        raise DpselInputError("the curation run kept no rows, so it stores no threshold; give --threshold",
                              file=str(scorer_dir / SELECTION_FILE))
    group_thresholds = selection.get("effective_group_thresholds") or {}
    # A per-group run stores one threshold per group; plain runs apply one threshold everywhere.
    use_groups = selection.get("rule") == "group_budget" and has_groups and group_thresholds
    return SelectionRule(threshold=float(stored), group_column=selection.get("group_column"),
                         group_thresholds=dict(group_thresholds) if use_groups else {})


def _read_selection(scorer_dir: Path) -> dict:
    path = scorer_dir / SELECTION_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DpselInputError(f"unreadable selection file ({exc})", file=str(path)) from exc


SCORE_CHUNK_ROWS = 8192   # rows tokenised and scored at a time: memory bounded by the chunk, not the input


def _score_in_chunks(scorer, rows: _Rows, usable_idx: np.ndarray,
                     progress: ProgressFn | None) -> tuple[np.ndarray, np.ndarray]:
    """The scorer's weights for the usable rows, a chunk of rows at a time (messages built per chunk)."""
    mean, std = np.zeros(len(usable_idx)), np.zeros(len(usable_idx))
    for start in range(0, len(usable_idx), SCORE_CHUNK_ROWS):
        part = usable_idx[start:start + SCORE_CHUNK_ROWS]
        chunk = np.zeros(rows.n, dtype=bool)
        chunk[part] = True
        m, s = scorer.score(rows.data.messages(chunk), [rows.ids[i] for i in part])
        mean[start:start + len(part)], std[start:start + len(part)] = m, s
        if progress is not None:
            progress(start + len(part), len(usable_idx), {"rows": float(start + len(part))})
    if progress is not None and not len(usable_idx):
        progress(1, 1, {"rows": 0.0})
    return mean, std


@locks_out("inputs")
def filter_rows(scorer_dir, inputs, out, *, threshold: float | None = None, budget: float | None = None,
                progress: ProgressFn | None = None, engine: str = "local", ray=None) -> CurationResult:
    """Score new rows with a curation run's saved scorer and keep those that pass.

    Default rule: the threshold the curation run stored in scorer/selection.json (its lowest kept weight,
    per group for a per-group run). Writes the same files as `curate`; scorer/ is copied into `out`.
    `engine="ray"` reads and scores on Ray Data (`ray`: `dpsel.engines.RayOptions`); same outputs.
    """
    from dpsel.engines import check_engine

    started = time.perf_counter()
    scorer_dir = Path(scorer_dir)
    if budget is not None or threshold is not None:  # the same checks as curate, before the scorer loads
        make_rule("filter", budget, threshold, None, False, "task")
    selection = _read_selection(scorer_dir)
    out = Path(out)
    if check_engine(engine) == "ray":
        from dpsel.engines.ray_engine import score_with_ray
        scored = score_with_ray(scorer_dir, inputs, ray, progress)
        rows, scorer_kind = _rows_from(scored.data), read_scorer_meta(scorer_dir).get("kind")
        check_outputs_do_not_overwrite_inputs(out, [f.path for f in rows.data.files], _as_path_list(inputs))
        mean, std = scored.weights[rows.usable], scored.stds[rows.usable]
        timings = {"engine": "ray", "ray_workers": scored.workers, "read_and_score_s": scored.seconds,
                   **scored.split}
    else:
        rows, mean, std, timings, scorer_kind = _score_locally(scorer_dir, inputs, out, progress, started)
    _check_weights(mean, std, f"scorer {scorer_dir}")
    group_column = selection.get("group_column") or "task"
    groups = rows.group_values(group_column)
    rule = _filter_rule(selection, threshold, budget, scorer_dir, groups is not None)
    weights, stds = spread_scores(rows, mean, std)
    keep = apply_rule(rule, weights, rows.usable, groups)

    method = selection.get("method") or scorer_kind or "unknown"
    run = _Run(command="filter", method=method, config=dict(selection.get("config") or {}), rows=rows,
               inputs={"in": _inputs_entry(inputs, rows), "scorer": {"path": str(scorer_dir), "kind": scorer_kind}},
               weights=weights, stds=stds, keep=keep, rule=rule, scorer=scorer_dir, diagnostics={},
               timings=timings, started=started,
               group_column=group_column if groups is not None else None)
    return _write_run(out, run)


def _score_locally(scorer_dir: Path, inputs, out: Path, progress: ProgressFn | None, started: float):
    """The local engine's read + score: the whole input in this process, scored a chunk at a time."""
    scorer = load_scorer(scorer_dir)
    rows = _read_rows(inputs)
    check_outputs_do_not_overwrite_inputs(out, [f.path for f in rows.data.files], _as_path_list(inputs))
    read_s = time.perf_counter() - started
    score_start = time.perf_counter()
    mean, std = _score_in_chunks(scorer, rows, np.flatnonzero(rows.usable), progress)
    timings = {"read_s": read_s, "score_s": time.perf_counter() - score_start}
    return rows, mean, std, timings, getattr(scorer, "kind", None)


class _CallableModule(types.ModuleType):
    """`dpsel.curate(train, meta, out=...)`: this module, called, is the Python API's `dpsel.api.curate`."""

    def __call__(self, *args, **kwargs):
        from dpsel.api import curate as api_curate
        return api_curate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
