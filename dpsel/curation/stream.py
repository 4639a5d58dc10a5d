"""`filter` streamed (the local engine): the input read, staged, scored and written a batch at a time, so memory
stays flat in the number of rows except for small per-row state.

Passes over the input (each `dpsel.data.iter_batches`-style, a batch of `BATCH_ROWS` rows at a time):
1. near-duplicates (when the stage is on): every usable row's signature goes into one index (the stage's
   384 B/row state, 192 B of it sketches spilled to files), clustered once at the end, so each row gets the
   verdict it gets when the whole input is one batch (a cluster's keeper is its first row in input order,
   however far apart its rows are);
2. the stages (their verdicts, near-dup's from pass 1), the scorer and the writer, batch by batch:
   scores.parquet and curated.parquet grow a row group per batch (`pyarrow.parquet.ParquetWriter`) in the
   run's staging folder, published with the manifest last (`record.staged_run`, `record.finish_run`);
3. only for a `--budget` (top fraction: it needs every weight first): the rows of pass 2 went to pending files
   in the staging folder, rewritten with the selection once every weight is known.

Exact duplicates across batches and files are the data layer's (`SeenIds`, ~18 B/id). Per-row state kept to
the end: weight and std (16 B), usable and kept flags (2 B), a 4-byte code per group column, plus the
near-dup index in pass 1 (then its ids and each row's cluster: keeper and one pair, 45 B). The rows
near/semantic-dropped keep their id -> kept id in a dict (exact duplicates of them point past them, as in one batch). Output content is
the same as when the whole input is held (row order, columns, reasons, `dpsel_dup_of`, counts), but for one
case: decontamination's pool-side template count grows batch by batch (`dpsel.stages.decontaminate`), so an
n-gram only pool rows share is a template once its 21st row has been read, not before.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpsel.curation.curated import curated_rows_table
from dpsel.curation.examples import ExamplePicker
from dpsel.curation.record import CurationResult, Run, finish_run, staged_run
from dpsel.curation.rows import RunRows, as_path_list, check_weights, counts_of, final_reasons_of, preview_text, rows_from
from dpsel.curation.rules import SelectionRule, apply_rule, effective_thresholds
from dpsel.curation.stages import conversation_table, eval_texts, record_stages
from dpsel.data import GROUP_COLUMNS, REASON_DUPLICATE, FileInfo, expand_paths
from dpsel.data.reader import batch_set, input_schema, iter_planned
from dpsel.data.schema import PlannedFile, plan_files
from dpsel.io import file_sha256
from dpsel.outputs import CURATED_FILE, SCORES_FILE, scores_table, with_run_id
from dpsel.select.base import ProgressFn
from dpsel.stages.base import ConversationBatch
from dpsel.stages.near_dup import Clusters, NearDup, NearDupIndex, NearDupVerdicts
from dpsel.stages.options import StagesConfig
from dpsel.stages.pipeline import build_blocks

BATCH_ROWS = 32768        # rows read, staged, scored and written at a time
SCORE_CHUNK_ROWS = 8192   # rows tokenised and scored at a time: memory bounded by the chunk, not the input
_PENDING = ".pending-"    # staging-folder prefix of a budget run's rows before selection (never published)


@dataclass
class InputPlan:
    """An input as planned before any row is read: its files (footers checked, sha256), schema, row count."""
    paths: list[str]
    planned: list[PlannedFile]
    schema: pa.Schema
    files: list[FileInfo]

    @property
    def n(self) -> int:
        return sum(p.rows for p in self.planned)

    @property
    def shape(self):
        return self.planned[0].shape


def plan_input(inputs) -> InputPlan:
    planned = plan_files(expand_paths(as_path_list(inputs)))
    files = [FileInfo(p.file.url, p.rows, file_sha256(p.file.path, p.file.fs)) for p in planned]
    return InputPlan(as_path_list(inputs), planned, input_schema(planned), files)


def score_in_chunks(scorer, rows: RunRows, usable_idx: np.ndarray,
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


class PickedPreviews(Sequence):
    """The preview texts of the rows the report shows (`report.example_rows`), collected while streaming."""

    def __init__(self, n: int, texts: dict[int, str]):
        self.n, self.texts = n, texts

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> str:
        return self.texts[index]


@dataclass
class StreamedRows:
    """What the run's record needs of the rows once they are written (`record.finish_run`): per row the
    usable flag and group codes (not the rows), the stages' statistics, the report's previews."""
    n: int
    usable: np.ndarray
    groups: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)   # column -> (values, codes)
    stage_stats: list[dict] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)

    def group_values(self, column: str) -> np.ndarray | None:
        if column not in self.groups:
            return None
        values, codes = self.groups[column]
        return np.array(values + [None], dtype=object)[:-1][codes]

    def previews(self) -> PickedPreviews:
        return PickedPreviews(self.n, self.texts)


class _Groups:
    """Per group column, a code per row (values numbered as first seen)."""

    def __init__(self, columns: list[str]):
        self.numbers = {c: {} for c in columns}
        self.codes = {c: [] for c in columns}

    def add(self, rows: RunRows) -> None:
        for column, numbers in self.numbers.items():
            values = rows.group_values(column).tolist()
            self.codes[column].append(np.array([numbers.setdefault(v, len(numbers)) for v in values], np.int32))

    def done(self) -> dict[str, tuple[list[str], np.ndarray]]:
        return {c: (list(self.numbers[c]), np.concatenate(self.codes[c]) if self.codes[c] else np.zeros(0, np.int32))
                for c in self.numbers}


class _Writer:
    """A Parquet file written a row group at a time, every table cast to the first one's schema."""

    def __init__(self, path: Path, run_id: str | None):
        self.path, self.run_id, self.writer, self.schema = path, run_id, None, None

    def write(self, table: pa.Table) -> None:
        table = with_run_id(table, self.run_id)
        if self.writer is None:
            self.writer, self.schema = pq.ParquetWriter(self.path, table.schema), table.schema
        elif not table.schema.equals(self.schema):
            table = table.cast(self.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _sign_near_dups(plan: InputPlan, blocks: list, batch_rows: int, spill: Path) -> None:
    """Pass 1: every usable row's near-dup signature, clustered once; the near-dup block becomes the verdicts.
    Band keys and question keys are held (the clustering groups them); both sketches go to pending files in the
    staging folder `spill`, read back only for the rows in candidate pairs, and deleted with the index once the
    clustering is done."""
    position = next((k for k, b in enumerate(blocks) if isinstance(b, NearDup)), None)
    if position is None:
        return
    started, near = time.perf_counter(), blocks[position]
    seen = len(near.index)
    ids, clusters = _cluster_streamed(plan, near, near.index.spilled(spill, f"{_PENDING}near-dup-"), seen,
                                      batch_rows)
    near.stats.seconds += time.perf_counter() - started
    blocks[position] = NearDupVerdicts(ids, clusters, seen, stats=near.stats)


def _cluster_streamed(plan: InputPlan, near: NearDup, index: NearDupIndex, seen: int, batch_rows: int
                      ) -> tuple[np.ndarray, Clusters]:
    """(the ids, the clusters) of the seen entries and every usable row of the input, signed a batch at a time
    into `index`."""
    start_index, empty, at = index, np.zeros(seen + plan.n, bool), seen
    for nb in iter_planned(plan.planned, batch_rows):
        rows = rows_from(batch_set(nb, plan.planned, plan.files, plan.schema))
        alive = ConversationBatch(conversation_table(rows).filter(pa.array(rows.usable)))
        index = near.grown(index, alive, plan.n if index is start_index else 0)
        at = near.sign_into(index, empty, at, alive)
    signed = index.sliced(slice(None, at))
    clusters, _ = near.keepers(signed, empty[:at], seen)
    # the signatures are dropped: only the ids and each row's cluster stay
    return signed.ids, clusters


@dataclass
class _Totals:
    """Per-row state of the whole input (see the module docstring) and the running counts."""
    weights: np.ndarray
    stds: np.ndarray
    usable: np.ndarray
    keep: np.ndarray
    tally: Counter = field(default_factory=Counter)
    candidates: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # rows the report may show
    texts: dict[int, str] = field(default_factory=dict)
    examples: ExamplePicker = field(default_factory=ExamplePicker)   # the report's dropped rows, a few per reason
    score_s: float = 0.0

    def spread(self, rows: RunRows, start: int, mean: np.ndarray, std: np.ndarray) -> slice:
        """This batch's weights into the totals: usable rows their own, exact duplicates their first
        occurrence's (anywhere earlier in the input), other rows 0."""
        span = slice(start, start + rows.n)
        self.weights[span][rows.usable], self.stds[span][rows.usable] = mean, std
        self.usable[span] = rows.usable
        dup = np.array([r == REASON_DUPLICATE for r in rows.reasons], bool) & (rows.data.duplicate_of >= 0)
        first = rows.data.duplicate_of[dup]
        self.weights[span][dup], self.stds[span][dup] = self.weights[first], self.stds[first]
        return span

    def pick_previews(self, rows: RunRows, start: int) -> None:
        """Keep the preview texts of the rows the report will show, as if it saw every row at once."""
        from dpsel.report import example_rows
        merged = np.concatenate([self.candidates, start + np.flatnonzero(rows.usable)])
        highest, lowest = example_rows(self.weights[merged], np.ones(len(merged), bool))
        self.candidates = merged[np.unique(np.concatenate([highest, lowest]))]
        new = self.candidates[self.candidates >= start]
        mask = np.zeros(rows.n, bool)
        mask[new - start] = True
        shown = set(self.candidates.tolist())
        self.texts = {r: t for r, t in self.texts.items() if r in shown}
        self.texts.update(zip(new.tolist(), (preview_text(m) for m in rows.data.messages(mask))))


def _parts(rows: RunRows, weights: np.ndarray, stds: np.ndarray, keep: np.ndarray, reasons: list[str],
           details: list[str], curated_rows: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """A batch's part of scores.parquet (every row) and of curated.parquet (the `curated_rows`)."""
    curated = curated_rows_table(rows, weights, curated_rows)
    scores = scores_table(rows.ids, weights, stds, keep, reasons, details, rows.files, rows.file_rows, rows.dup_of)
    return scores, curated


def stream_filter(plan: InputPlan, scorer, options: StagesConfig, seen: NearDupIndex | None, rule: SelectionRule,
                  group_column: str, out: Path, progress: ProgressFn | None,
                  make_run: Callable[[StreamedRows, np.ndarray, np.ndarray, np.ndarray, dict], Run],
                  scorer_name: str = "the scorer", batch_rows: int | None = None) -> CurationResult:
    """Filter `plan`'s rows batch by batch (see the module docstring) and write the run into `out`.
    `make_run(rows, weights, stds, keep, timings)`: the run record, for `record.finish_run`."""
    started, batch_rows = time.perf_counter(), batch_rows or BATCH_ROWS
    blocks = build_blocks(options, eval_texts(options.decontaminate), seen=seen)
    n = plan.n
    columns = [c for c in dict.fromkeys([*GROUP_COLUMNS, group_column]) if c in plan.schema.names]
    groups, dropped, stats = _Groups(columns), {}, []
    with staged_run(out) as (stage, run_id):
        _sign_near_dups(plan, blocks, batch_rows, stage)
        totals = _Totals(np.zeros(n), np.zeros(n), np.zeros(n, bool), np.zeros(n, bool))
        final = rule.threshold is not None     # a threshold decides each row at once; a budget needs every weight
        names = (SCORES_FILE, CURATED_FILE) if final else (f"{_PENDING}{SCORES_FILE}", f"{_PENDING}{CURATED_FILE}")
        writers = [_Writer(stage / name, run_id if final else None) for name in names]
        try:
            for nb in iter_planned(plan.planned, batch_rows):
                rows = rows_from(batch_set(nb, plan.planned, plan.files, plan.schema))
                record_stages(rows, options, blocks, None, dropped)
                totals.examples.add(rows, nb.start_row)
                score_start = time.perf_counter()
                mean, std = score_in_chunks(scorer, rows, np.flatnonzero(rows.usable), None)
                totals.score_s += time.perf_counter() - score_start
                check_weights(mean, std, scorer_name)
                span = totals.spread(rows, nb.start_row, mean, std)
                groups.add(rows)
                totals.pick_previews(rows, nb.start_row)
                weights, stds = totals.weights[span], totals.stds[span]
                if final:
                    keep = apply_rule(rule, weights, rows.usable, rows.group_values(group_column))
                    totals.keep[span] = keep
                    reasons, details = final_reasons_of(rows.reasons, rows.details, keep, weights, rule, None)
                    totals.tally.update(reasons)
                else:
                    keep, reasons, details = np.zeros(rows.n, bool), rows.reasons, rows.details
                for writer, table in zip(writers, _parts(rows, weights, stds, keep, reasons, details,
                                                         keep if final else rows.usable)):
                    writer.write(table)
                stats = rows.stage_stats
                if progress is not None:
                    progress(nb.start_row + rows.n, n, {"rows": float(totals.usable[:span.stop].sum())})
        finally:
            for writer in writers:
                writer.close()
        summary = StreamedRows(n, totals.usable, groups.done(), stats, totals.texts)
        if not final:
            totals.keep = apply_rule(rule, totals.weights, totals.usable, summary.group_values(group_column))
        cutoff, group_cutoffs = effective_thresholds(totals.weights, totals.keep, summary.group_values(group_column))
        write_start = time.perf_counter()
        if not final:
            _select_pending(stage, run_id, totals, rule, cutoff)
        timings = {"read_s": write_start - started - totals.score_s, "score_s": totals.score_s,
                   "batch_rows": batch_rows}
        run = make_run(summary, totals.weights, totals.stds, totals.keep, timings)
        run.examples = totals.examples
        counts = counts_of(totals.tally, int(totals.usable.sum()), stats)
        return finish_run(stage, out, run, run_id, (cutoff, group_cutoffs, counts), write_start)


def _select_pending(stage: Path, run_id: str, totals: _Totals, rule: SelectionRule, cutoff: float | None) -> None:
    """Pass 3 of a budget run: the pending rows rewritten with the selection, a row group at a time."""
    scores, curated = _Writer(stage / SCORES_FILE, run_id), _Writer(stage / CURATED_FILE, run_id)
    kept_of_usable = totals.keep[totals.usable]
    try:
        at = 0
        for batch in pq.ParquetFile(stage / f"{_PENDING}{SCORES_FILE}").iter_batches():
            span = slice(at, at + batch.num_rows)
            keep, weights = totals.keep[span], totals.weights[span]
            reasons, details = final_reasons_of(batch.column("dpsel_reason").to_pylist(),
                                                batch.column("dpsel_detail").to_pylist(), keep, weights, rule, cutoff)
            totals.tally.update(reasons)
            table = pa.Table.from_batches([batch])
            for name, values in (("dpsel_kept", pa.array(keep)), ("dpsel_reason", pa.array(reasons, pa.string())),
                                 ("dpsel_detail", pa.array(details, pa.string()))):
                table = table.set_column(table.column_names.index(name), name, values)
            scores.write(table)
            at += batch.num_rows
        at = 0
        pending = pq.ParquetFile(stage / f"{_PENDING}{CURATED_FILE}")
        for group in range(pending.num_row_groups):
            table = pending.read_row_group(group)
            curated.write(table.filter(pa.array(kept_of_usable[at:at + table.num_rows])))
            at += table.num_rows
    finally:
        scores.close()
        curated.close()
    for name in (SCORES_FILE, CURATED_FILE):
        (stage / f"{_PENDING}{name}").unlink()
