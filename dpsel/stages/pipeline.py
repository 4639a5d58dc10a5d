"""Run the curation stages in the contract's fixed order on one table and account for every row.

Order: exact (invalid rows, exact duplicates) -> near-duplicates -> semantic duplicates ->
decontamination -> heuristic filters -> PII. Each stage sees only the rows every earlier stage kept, so
a row's reason is that of the first stage that dropped it, and `input_rows == kept + Σ dropped` holds by
construction (checked). Columns a stage adds (`dpsel_pii`) are null for rows dropped before it ran;
columns it replaces (redacted messages) keep their input values there.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from dpsel.stages.base import Block, ConversationBatch, StageStats
from dpsel.stages.decontaminate import Decontaminate, EvalRows
from dpsel.stages.exact import Exact
from dpsel.stages.filters import FilterRules, Filters
from dpsel.stages.near_dup import NearDup, NearDupIndex
from dpsel.stages.options import StagesConfig
from dpsel.stages.pii import Pii
from dpsel.stages.semantic_dup import SemanticDup

ORDER = ("exact", "near_dup", "semantic_dup", "decontaminate", "filters", "pii")


def build_blocks(config: StagesConfig, eval_texts: EvalRows | Sequence[str] = (),
                 seen: NearDupIndex | None = None) -> list[Block]:
    """The blocks `config` turns on, in `ORDER`."""
    blocks: list[Block] = [Exact()]
    if config.near_dup:
        blocks.append(NearDup(config.near_dup_threshold, seen=seen))
    if config.semantic_dup is not None:
        blocks.append(SemanticDup(config.semantic_dup))
    if len(eval_texts):
        blocks.append(Decontaminate(eval_texts))
    rules = FilterRules.from_spec(config.filters)
    if rules is not None:
        blocks.append(Filters(rules))
    blocks.append(Pii(config.pii))
    return blocks


@dataclass
class Outcome:
    """Per input row: `reason` ("" kept), `dup_of` (None unless a duplicate), `detail` (the dropping stage's
    words, None if it gave none); `columns` (full length) the stages added or replaced; `stats` per stage in order."""
    reason: np.ndarray
    dup_of: np.ndarray
    detail: np.ndarray
    columns: dict[str, pa.Array] = field(default_factory=dict)
    stats: list[StageStats] = field(default_factory=list)

    @property
    def input_rows(self) -> int:
        return len(self.reason)

    @property
    def kept(self) -> int:
        return int((self.reason == "").sum())

    @property
    def counts(self) -> dict[str, int]:
        """Dropped rows per reason."""
        return dict(sorted(Counter(self.reason[self.reason != ""].tolist()).items()))


def _check_order(blocks: Sequence[Block]) -> None:
    positions = [ORDER.index(b.name) for b in blocks]
    if positions != sorted(positions):
        raise ValueError(f"stages must run in the order {ORDER}; got {[b.name for b in blocks]}")


def _spread(held: pa.Table, n: int, name: str, alive: np.ndarray, values: pa.Array) -> pa.Array:
    """A column of the stage's `values` (for the `alive` rows) over all `n` rows: the input's values where
    `held` has the column (the input's columns a block overwrites), else null."""
    if name in held.column_names:
        base = held.column(name).combine_chunks()
        index = np.arange(n)
        index[alive] = n + np.arange(len(alive))
        return pa.concat_arrays([base, values.cast(base.type)]).take(pa.array(index))
    index = np.zeros(n, np.int64)
    index[alive] = np.arange(len(alive))
    missing = np.ones(n, bool)
    missing[alive] = False
    return values.take(pa.array(index, mask=missing))


def run_stages(table: pa.Table, blocks: Sequence[Block], embeddings: np.ndarray | None = None) -> Outcome:
    """Every block on the rows the earlier ones kept; the per-row outcome and per-stage statistics."""
    _check_order(blocks)
    n = table.num_rows
    outcome = Outcome(np.full(n, "", dtype=object), np.full(n, None, dtype=object), np.full(n, None, dtype=object))
    alive = np.arange(n)
    held = table.select([c for c in table.column_names if any(c in b.overwrites for b in blocks)])
    current = table   # the rows still in play, filtered block by block: the input's other columns are not held
    del table
    for block in blocks:
        rows = ConversationBatch(current)
        inputs = {"embeddings": embeddings[alive]} if embeddings is not None else {}
        verdict = block(rows, **inputs)
        for name, values in verdict.columns.items():
            outcome.columns[name] = _spread(held, n, name, alive, values)
        dropped = verdict.dropped
        outcome.reason[alive[dropped]] = verdict.reason[dropped]
        outcome.dup_of[alive[dropped]] = verdict.dup_of[dropped]
        if verdict.detail is not None:
            outcome.detail[alive[dropped]] = verdict.detail[dropped]
        alive = alive[~dropped]
        outcome.stats.append(block.stats)
        del rows, inputs   # freed before the next block's rows are taken, not after
        if dropped.any():
            current = current.filter(pa.array(~dropped))
        del verdict
    if outcome.input_rows != outcome.kept + sum(outcome.counts.values()):
        raise AssertionError("stage accounting: input rows != kept + dropped")
    return outcome
