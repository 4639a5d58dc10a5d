"""`filter_rows`: score new rows with a curation run's saved scorer and keep those that pass, writing the same
record as `curate` (the scorer is copied along). The local engine streams the input (`dpsel.curation.stream`:
memory flat in the rows but for small per-row state); the Ray engine, semantic dedup and an empty input hold
the whole input, with the same outputs."""
from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import numpy as np

from dpsel.curation.parts import merge_curated_parts, write_scored_part
from dpsel.curation.record import (CurationResult, Run, commit_run, input_files_entry, inputs_entry, staged_run,
                                   write_run)
from dpsel.curation.rows import as_path_list, check_weights, read_rows, rows_from, spread_scores
from dpsel.curation.rules import SelectionRule, apply_rule, make_rule
from dpsel.curation.stages import apply_stages, load_index
from dpsel.curation.stream import plan_input, score_in_chunks, stream_filter
from dpsel.errors import DpselInputError
from dpsel.outputs import CURATED_PARTS, SELECTION_FILE, check_outputs_do_not_overwrite_inputs
from dpsel.runlock import locks_out
from dpsel.select import load_scorer
from dpsel.select.base import ProgressFn, read_scorer_meta
from dpsel.stages.options import StagesConfig, check_stages


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


@locks_out("inputs")
def filter_rows(scorer_dir, inputs, out, *, threshold: float | None = None, budget: float | None = None,
                progress: ProgressFn | None = None, engine: str = "local", ray=None,
                stages: StagesConfig | None = None, embedder: str = "default") -> CurationResult:
    """Score new rows with a curation run's saved scorer and keep those that pass.

    Default rule: the threshold the curation run stored in scorer/selection.json (its lowest kept weight,
    per group for a per-group run). Writes the same files as `curate`; scorer/ is copied into `out`.
    `engine="ray"` reads and scores on Ray Data (`ray`: `dpsel.engines.RayOptions`); same outputs.
    `stages`: the curation stages, as for `curate`, run in this process; near-duplicates are also found
    against the rows of the curation run (its scorer/near_dup.npz); `embedder`: the semantic-dup stage's.
    """
    from dpsel.engines import check_engine

    started = time.perf_counter()
    scorer_dir = Path(scorer_dir)
    if budget is not None or threshold is not None:  # the same checks as curate, before the scorer loads
        make_rule("filter", budget, threshold, None, False, "task")
    selection = _read_selection(scorer_dir)
    stages = check_stages(stages or StagesConfig(), embedder)
    seen = load_index(scorer_dir, stages)
    out = Path(out)
    if check_engine(engine) == "ray":
        return _filter_on_ray(scorer_dir, inputs, out, selection, threshold, budget, progress, ray, stages,
                              embedder, seen, started)
    if _streamable(stages, plan := plan_input(inputs)):
        return _filter_streamed(scorer_dir, plan, out, selection, threshold, budget, progress, stages, seen,
                                started)
    rows, mean, std, timings, scorer_kind = _score_locally(scorer_dir, inputs, out, progress, started,
                                                           lambda rows: apply_stages(rows, stages, embedder, seen))
    return write_run(out, _selected(rows, mean, std, timings, scorer_kind, scorer_dir, inputs, selection,
                                    threshold, budget, stages, seen, started))


def _selected(rows, mean: np.ndarray, std: np.ndarray, timings: dict, scorer_kind: str | None, scorer_dir: Path,
              inputs, selection: dict, threshold, budget, stages: StagesConfig, seen, started: float) -> Run:
    """The run record of a filter whose rows are all scored: the keep rule applied to every row."""
    check_weights(mean, std, f"scorer {scorer_dir}")
    group_column = selection.get("group_column") or "task"
    groups = rows.group_values(group_column)
    rule = _filter_rule(selection, threshold, budget, scorer_dir, groups is not None)
    weights, stds = spread_scores(rows, mean, std)
    keep = apply_rule(rule, weights, rows.usable, groups)
    return _run(selection, scorer_dir, inputs_entry(inputs, rows), scorer_kind, stages, seen, rule, group_column,
                groups is not None, started)(rows, weights, stds, keep, timings)


def _filter_on_ray(scorer_dir: Path, inputs, out: Path, selection: dict, threshold, budget, progress, ray,
                   stages: StagesConfig, embedder: str, seen, started: float) -> CurationResult:
    """Read and score on Ray Data, the actors writing the scored rows' parts of curated.parquet into the staging
    folder; the driver runs the stages (near-dup signatures on the same actors' runtime), applies the keep
    rule to the weights and merges the parts' kept rows on commit (`curation.parts`)."""
    from dpsel.engines import RayOptions
    from dpsel.engines.ray_engine import block_map, engine_runtime, score_with_ray
    from dpsel.stages.base import mapping_blocks_on
    ray = ray or RayOptions()
    with staged_run(out) as (stage, run_id):
        parts = stage / CURATED_PARTS
        with engine_runtime(ray), mapping_blocks_on(block_map(ray)):   # one runtime: scoring, then the stages
            scored = score_with_ray(partial(load_scorer, scorer_dir), inputs, ray, progress, parts_dir=parts,
                                    write_part=write_scored_part)
            rows, scorer_kind = rows_from(scored.data), read_scorer_meta(scorer_dir).get("kind")
            check_outputs_do_not_overwrite_inputs(out, [f.path for f in rows.data.files], as_path_list(inputs))
            apply_stages(rows, stages, embedder, seen)   # after scoring on Ray: the scores of dropped rows are not used
        timings = {"engine": "ray", "ray_workers": scored.workers, "read_and_score_s": scored.seconds,
                   **scored.split}
        run = _selected(rows, scored.weights[rows.usable], scored.stds[rows.usable], timings, scorer_kind,
                        scorer_dir, inputs, selection, threshold, budget, stages, seen, started)
        sent = rows.data.usable_mask()   # the rows the actors scored (and wrote), before the stages
        merge = partial(merge_curated_parts, parts, rows=rows, scored=sent, keep=run.keep, run_id=run_id) \
            if scored.parts_written and sent.any() else None
        return commit_run(stage, out, run, run_id, merge)


def _run(selection: dict, scorer_dir: Path, inputs: dict, scorer_kind: str | None, stages: StagesConfig, seen,
         rule: SelectionRule, group_column: str, has_groups: bool, started: float):
    """The run record of a filter, given (rows, weights, stds, keep, timings)."""
    method = selection.get("method") or scorer_kind or "unknown"

    def make(rows, weights, stds, keep, timings) -> Run:
        return Run(command="filter", method=method, config=dict(selection.get("config") or {}), rows=rows,
                   inputs={"in": inputs, "scorer": {"path": str(scorer_dir), "kind": scorer_kind}},
                   weights=weights, stds=stds, keep=keep, rule=rule, scorer=scorer_dir, diagnostics={},
                   timings=timings, started=started, group_column=group_column if has_groups else None,
                   extra_manifest={"stages": {**stages.model_dump(mode="json"), "near_dup_seen_rows": len(seen) if seen else 0}})
    return make


def _streamable(stages: StagesConfig, plan) -> bool:
    """The local engine streams (dpsel.curation.stream); semantic dedup compares every pair of rows'
    embeddings, and an empty input has no batch to take the outputs' columns from: those hold the whole input."""
    return stages.semantic_dup is None and plan.n > 0


def _filter_streamed(scorer_dir: Path, plan, out: Path, selection: dict, threshold, budget, progress, stages,
                     seen, started: float) -> CurationResult:
    scorer = load_scorer(scorer_dir)
    check_outputs_do_not_overwrite_inputs(out, [f.path for f in plan.files], plan.paths)
    group_column = selection.get("group_column") or "task"
    has_groups = group_column in plan.schema.names
    rule = _filter_rule(selection, threshold, budget, scorer_dir, has_groups)
    make = _run(selection, scorer_dir, input_files_entry(plan.paths, plan.n, plan.shape, plan.files),
                getattr(scorer, "kind", None), stages, seen, rule, group_column, has_groups, started)
    return stream_filter(plan, scorer, stages, seen, rule, group_column, out, progress, make,
                         scorer_name=f"scorer {scorer_dir}")


def _score_locally(scorer_dir: Path, inputs, out: Path, progress: ProgressFn | None, started: float,
                   run_stages):
    """The local engine's read + stages + score, the whole input in this process (semantic dedup on)."""
    scorer = load_scorer(scorer_dir)
    rows = read_rows(inputs)
    check_outputs_do_not_overwrite_inputs(out, [f.path for f in rows.data.files], as_path_list(inputs))
    run_stages(rows)
    read_s = time.perf_counter() - started
    score_start = time.perf_counter()
    mean, std = score_in_chunks(scorer, rows, np.flatnonzero(rows.usable), progress)
    timings = {"read_s": read_s, "score_s": time.perf_counter() - score_start}
    return rows, mean, std, timings, getattr(scorer, "kind", None)
