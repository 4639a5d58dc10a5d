"""`curate`: read the training and meta sets, select, keep or drop every input row, write the run's record.

Selection only ever sees the usable rows (valid, first occurrence of their content, and kept by every curation
stage: `dpsel.curation.stages`); the meta set is trusted, so a bad row there is an error.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import dpsel.resume.checkpoints as checkpoint
from dpsel.curation.labels import (Labels, apply_drops, kept_by_review, read_labels, reviewed_in_selection,
                                   selection_pool, with_reviewed_keeps)
from dpsel.curation.record import CurationResult, Run, inputs_entry, write_run
from dpsel.curation.rows import (RunRows, as_path_list, check_weights, drop_meta_duplicates, read_rows,
                                 require_all_usable, spread_scores)
from dpsel.curation.rules import apply_rule, make_rule
from dpsel.curation.stages import SpilledIndex, apply_stages
from dpsel.curation.truth import load_truth, truth_auroc
from dpsel.errors import DpselInputError
from dpsel.outputs import check_outputs_do_not_overwrite_inputs
from dpsel.runlock import locks_out
from dpsel.select import select
from dpsel.select.bads.calibration import reviewed_rows
from dpsel.select.base import ProgressFn, SelectConfig
from dpsel.stages.options import StagesConfig, check_stages
from dpsel.version import __version__

if TYPE_CHECKING:
    from dpsel.config import RunConfig


@locks_out("train", "meta", "truth")
def curate(train, meta, out, *, method: str = "bads", budget: float | None = None,
           threshold: float | None = None, task_budgets: dict[str, float] | None = None,
           per_group: bool = False, group_column: str = "task", config: SelectConfig | None = None,
           progress: ProgressFn | None = None, truth=None, restart: bool = False, engine: str = "local",
           ray=None, stages: StagesConfig | None = None, labels=None) -> CurationResult:
    """Score every training row with `method` against the trusted `meta` set and keep the best.

    Keeps the top `budget` fraction of the usable rows (default 0.7; `all` keeps everything) or the rows with
    mean weight >= `threshold` (not both). `task_budgets` ({group value: fraction}) or `per_group=True`
    apply budgets within each value of `group_column`. `truth` (a synth truth.parquet) adds AUROC.
    Writes scores.parquet, curated.parquet, manifest.json, report.md + PNGs and scorer/ under `out`
    (dpsel's files in an existing `out` are replaced; other files there are left alone).
    `engine="ray"` runs the method's pool-scoring passes on Ray (`ray`: `dpsel.engines.RayOptions`; methods in
    `dpsel.engines.RAY_CURATE_METHODS`, any other is an input error); same outputs.
    `stages`: the curation stages before selection (default: the contract's, near-dup at 0.8 and PII flag);
    they run in this process, but for the near-dup signatures, which run on Ray actors with `engine="ray"`.
    `labels`: a reviewer's keep/drop file (`dpsel.curation.labels`): drop-labelled rows are dropped (reason
    `reviewed_drop`) but scored as the calibration's known-bad rows, keep-labelled rows join the meta rows and
    are kept with weight 1.
    """
    from dpsel.engines import curate_engine
    from dpsel.engines.ray_engine import block_map, engine_runtime, pool_executor
    from dpsel.models.passes import executing_on
    from dpsel.stages.base import mapping_blocks_on
    started = time.perf_counter()
    ray_options = curate_engine(engine, method, ray)
    config = config or SelectConfig()
    rule = make_rule(method, budget, threshold, task_budgets, per_group, group_column)
    stages = check_stages(stages or StagesConfig(), config.embedder)
    out = Path(out)
    train_rows, meta_rows, meta_duplicates = _read_inputs(train, meta, out, truth)
    review = read_labels(labels, set(train_rows.ids)) if labels is not None else None
    with engine_runtime(ray_options):   # one Ray runtime (if any) for the stages and the method's passes
        stages_start = time.perf_counter()
        with mapping_blocks_on(block_map(ray_options)):   # near-dup signatures on Ray actors too
            near_dup_index = apply_stages(train_rows, stages, config.embedder)
        near_dup_index = SpilledIndex(near_dup_index) if near_dup_index is not None else None
        if review is not None:
            apply_drops(train_rows, review)
        stages_s = time.perf_counter() - stages_start
        if rule.uses_groups and train_rows.group_values(group_column) is None:
            raise DpselInputError("per-group budgets need this column in the training set", column=group_column,
                                  file=", ".join(f.path for f in train_rows.data.files))
        if not train_rows.usable.any():
            raise DpselInputError("no usable training rows (all invalid, duplicate or dropped by a curation stage)",
                                  file=", ".join(f.path for f in train_rows.data.files))
        read_s = time.perf_counter() - started

        select_start = time.perf_counter()
        groups = train_rows.group_values(group_column)
        # Losses are normalised per group (task) inside the methods that use losses, when the column exists.
        pool = selection_pool(train_rows, review)   # usable rows, less those a reviewer labelled keep
        pool_groups = None if groups is None else list(groups[pool])
        checkpoints = open_checkpoints(out, method, config, train_rows, meta_rows, restart, stages, review)
        reviewed = reviewed_in_selection(train_rows, review, pool, int(meta_rows.usable.sum()))
        pool_rows, meta_messages = train_rows.conversation_rows(pool), _meta_messages(meta_rows, train_rows, review)
        train_rows.spill_table()   # selection reads only the pool's messages: the input table waits on disk
        with checkpoint.active(checkpoints), executing_on(pool_executor(ray_options)), \
                reviewed_rows(*reviewed) if reviewed else nullcontext():
            scores = select(pool_rows, meta_messages, method, config, progress, groups=pool_groups)
        del pool_rows
    check_weights(scores.weight_mean, scores.weight_std, f"method {method}")
    select_s = time.perf_counter() - select_start
    weights, stds = spread_scores(train_rows, *with_reviewed_keeps(train_rows.usable, pool, scores))
    keep = apply_rule(rule, weights, train_rows.usable, groups)

    inputs = {"train": inputs_entry(train, train_rows), "meta": inputs_entry(meta, meta_rows)}
    truth_info = None
    if truth is not None:
        truth_info = truth_auroc(truth, train_rows, weights, keep)
        from dpsel.io import file_sha256
        inputs["truth"] = {"paths": [str(truth)], "sha256": file_sha256(truth)}
    run = Run(command="curate", method=scores.method, config=scores.config or config.to_dict(), rows=train_rows,
              inputs=inputs, weights=weights, stds=stds, keep=keep, rule=rule, scorer=scores.scorer,
              diagnostics=scores.diagnostics, timings={"read_s": read_s, "stages_s": stages_s, "select_s": select_s,
                                                       "method": dict(scores.timings), "engine": engine},
              started=started, group_column=group_column if groups is not None else None, truth=truth_info,
              coverage=scores.coverage or None, extra_manifest={"meta_duplicates_dropped": meta_duplicates,
                                                                "resumed_from_checkpoint": checkpoints.resumed,
                                                                "stages": stages.model_dump(mode="json"),
                                                                **({"labels": _labels_record(review, scores)} if review else {})},
              labels=review,
              near_dup_index=(near_dup_index, stages) if near_dup_index is not None else None)
    result = write_run(out, run)
    checkpoints.discard()  # published: nothing left to resume
    return result


def _labels_record(review: Labels, scores) -> dict:
    """The manifest's `labels`: the file and its counts, and how the evidence's calibration used the labels (each
    source's weight with and without them; null where the method's prior has no calibrated combination)."""
    calibration = ((scores.coverage or {}).get("prior_combine") or {}).get("labels")
    return {**review.record(), "calibration": calibration}


def _meta_messages(meta_rows: RunRows, train_rows: RunRows, review: Labels | None) -> list:
    """The trusted rows selection learns from: the meta set, plus the training rows a reviewer labelled keep."""
    meta = meta_rows.data.messages(meta_rows.usable)
    if review is None:
        return meta
    return meta + train_rows.conversations(kept_by_review(train_rows, review))


def _read_inputs(train, meta, out: Path, truth) -> tuple[RunRows, RunRows, dict]:
    """The training and meta rows, checked before any work: a clean meta set (its exact duplicates dropped
    and recorded), outputs that overwrite no input, a truth file that matches the training rows."""
    train_rows = read_rows(train)
    meta_rows = read_rows(meta)
    meta_duplicates = drop_meta_duplicates(meta_rows)
    require_all_usable(meta_rows, "meta")
    input_files = [f.path for r in (train_rows, meta_rows) for f in r.data.files]
    check_outputs_do_not_overwrite_inputs(out, input_files + ([str(truth)] if truth else []),
                                          as_path_list(train) + as_path_list(meta))
    if truth is not None:
        load_truth(truth, train_rows)  # a wrong truth file fails now, not after the work
    return train_rows, meta_rows, meta_duplicates


def open_checkpoints(out: Path, method: str, config: SelectConfig, train_rows: RunRows, meta_rows: RunRows,
                     restart: bool, stages: StagesConfig | None = None,
                     review: Labels | None = None) -> checkpoint.Checkpoints:
    """This run's checkpoints beside `out`; a checkpoint of a run with another config, input, stages or labels
    (they decide which rows selection sees) is refused."""
    fingerprint = {"dpsel_version": __version__, "method": method, "config": config.to_dict(),
                   "labels": review.sha256 if review is not None else None,
                   "stages": (stages or StagesConfig()).model_dump(mode="json"),
                   "inputs": {name: [f.sha256 for f in rows.data.files]
                              for name, rows in (("train", train_rows), ("meta", meta_rows))}}
    return checkpoint.Checkpoints.open(out, fingerprint, restart=restart)


def curate_from_config(config: "RunConfig", out=None, **options) -> CurationResult:
    """`curate` with a RunConfig's data, keep rule, selection settings and engine: the one spelling of that call
    (the CLI, the Python API, the flows' curate stage). `out` defaults to the config's; `options`: per_group,
    progress, restart."""
    return curate(config.data.train, config.data.meta, Path(out if out is not None else config.out),
                  method=config.curate.method, budget=config.curate.budget, threshold=config.curate.threshold,
                  config=config.select_config(), truth=config.data.truth, engine=config.engine,
                  ray=config.ray_options(), stages=config.stages, labels=config.data.labels, **options)
