"""The row view curation works on: one input set's ids, drop reasons and files per row, which rows are usable
(valid and first occurrence of their content), and the row accounting of a finished selection.

Every input row ends up in exactly one bucket — kept, or dropped with a reason (`invalid`, `duplicate`, a
curation stage's reason, `low_weight`) — so `input_rows == kept_rows + dropped_rows` always holds.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpsel.curation.rules import SelectionRule
from dpsel.data import REASON_DUPLICATE, REASON_INVALID, REASON_LOW_WEIGHT, InstructionSet, read_instruction_set
from dpsel.data.conversations import Conversations
from dpsel.data.instruction_set import IdList
from dpsel.errors import DpselInputError

log = logging.getLogger(__name__)

@dataclass
class RunRows:
    """A run's rows and each row's verdict: the input, ids, reasons, file positions, whether it is usable, and
    what the stages added (not to be confused with the data layer's `NormalRows`, one batch in normal form, or
    the stages' `ConversationBatch`, the table their blocks read)."""
    data: InstructionSet
    ids: Sequence[str]          # `IdList` (Arrow) from the reader
    reasons: list[str]          # "" | invalid | duplicate (from the data layer) | a stage's reason
    details: list[str]
    files: list[str]
    file_rows: np.ndarray       # row number within its file
    usable: np.ndarray          # bool: valid, first occurrence, kept by every curation stage
    # set by `dpsel.curation.stages.apply_stages`: per row the id kept in a duplicate's place (else None),
    # per stage its statistics, the columns stages add (dpsel_pii), redacted messages (pii redact)
    dup_of: list | None = None
    stage_stats: list[dict] = field(default_factory=list)
    stage_columns: dict = field(default_factory=dict)
    redacted: object = None
    spilled: object = field(default=None, repr=False)   # the `dpsel.data.spill.Mapped` of a spilled table

    def conversations(self, mask: np.ndarray) -> list[list[dict]]:
        """Normalised messages of the rows where `mask` is true; redacted ones after `--pii redact`."""
        if self.redacted is None:
            return self.data.messages(mask)
        return self.redacted.filter(np.asarray(mask, bool)).to_pylist()

    def conversation_rows(self, mask: np.ndarray) -> Conversations:
        """`conversations`, in a mapped temporary file, read as Python lists of dicts only while a caller looks
        at a row (`dpsel.data.conversations`): what selection reads its pool through."""
        if self.redacted is None:
            return Conversations.spilled(self.data.message_array(mask))
        return Conversations.spilled(self.redacted.filter(np.asarray(mask, bool)))

    def spill_table(self) -> None:
        """The input table moved to a mapped temporary file (`dpsel.data.spill`) while a phase that does not read
        it runs (selection): read again when the outputs are written (`release_pages` after each part), its
        values unchanged."""
        from dpsel.data.spill import spill_or_hold
        self.spilled = spill_or_hold(self.data.table)
        if self.spilled is not None:
            self.data.table = self.spilled.table

    def release_pages(self) -> None:
        """Give back the pages of a spilled table that reads have touched (nothing to do for a held one)."""
        if self.spilled is not None:
            self.spilled.drop_pages()

    @property
    def n(self) -> int:
        return len(self.ids)

    def first_occurrence(self) -> np.ndarray:
        """For each row, the index of the first usable row with its id (-1 for invalid rows)."""
        first = np.where(self.usable, np.arange(self.n), self.data.duplicate_of)   # from the data layer's dedup
        return first.astype(np.int64)

    def group_values(self, column: str) -> np.ndarray | None:
        """A column's values as strings (missing -> "(none)"), or None when the input lacks it. Built from the
        column's distinct values: rows of one group share one string object (8 bytes a row, not a str each)."""
        if column not in self.data.original_columns:
            return None
        values = self.data.table.column(column).combine_chunks()
        if pa.types.is_dictionary(values.type):
            values = values.dictionary_decode()
        try:
            encoded = pc.dictionary_encode(values)
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):   # nested values (lists, structs): a string each
            return np.array([_group_name(v) for v in values.to_pylist()], dtype=object)
        names = np.array([_group_name(v) for v in encoded.dictionary.to_pylist()] + ["(none)"], dtype=object)
        missing = len(names) - 1   # null rows
        return names[np.asarray(encoded.indices.fill_null(missing).to_numpy(zero_copy_only=False), np.int64)]

    def previews(self) -> "Previews":
        """Short text per row for the report's examples: last user prompt -> response."""
        return Previews(self.data)


def _group_name(value) -> str:
    return "(none)" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


class Previews(Sequence):
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
        return preview_text(self.data.messages(row)[0])


def preview_text(messages: list[dict] | None) -> str:
    """A row's preview: last user prompt -> response, both cut short."""
    user = next((m["content"] for m in reversed(messages or []) if m.get("role") == "user"), "") or ""
    answer = (messages[-1].get("content") if messages else "") or ""
    return f"{user.strip()[:70]} → {answer.strip()[:50]}"


def read_rows(paths) -> RunRows:
    return rows_from(read_instruction_set(as_path_list(paths)))


def rows_from(data: InstructionSet) -> RunRows:
    """The row view curation works on, from a columnar instruction set (no pandas frame is built)."""
    return RunRows(data=data, ids=IdList(data.ids), reasons=data.reasons.tolist(), details=data.details.to_pylist(),
                files=data.file_paths().tolist(), file_rows=data.file_rows, usable=data.usable_mask())


def as_path_list(paths) -> list[str]:
    if isinstance(paths, (str, Path)):
        return [str(paths)]
    return [str(p) for p in paths]


def drop_meta_duplicates(rows: RunRows) -> dict:
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


def require_all_usable(rows: RunRows, what: str) -> None:
    """The meta set is trusted: a bad or repeated row there is the user's error, not something to drop."""
    for i, reason in enumerate(rows.reasons):
        if reason:
            raise DpselInputError(f"{what} set row is {reason} ({rows.details[i]}); the {what} set must be clean "
                                  f"(row {rows.file_rows[i]} of this file)", file=rows.files[i], row=i)
    if rows.n == 0:
        raise DpselInputError(f"the {what} set has no rows", file=", ".join(f.path for f in rows.data.files))


def check_weights(weights: np.ndarray, stds: np.ndarray, source: str) -> None:
    if not (np.all(np.isfinite(weights)) and np.all((weights >= 0) & (weights <= 1))):
        raise RuntimeError(f"{source} returned weights outside [0, 1]")
    if not (np.all(np.isfinite(stds)) and np.all(stds >= 0)):
        raise RuntimeError(f"{source} returned negative or non-finite weight std")


def spread_scores(rows: RunRows, usable_mean: np.ndarray, usable_std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the usable rows -> every input row: invalid 0 (std 0), duplicates their first occurrence's."""
    mean, std = np.zeros(rows.n), np.zeros(rows.n)
    mean[rows.usable], std[rows.usable] = usable_mean, usable_std
    first = rows.first_occurrence()
    dup = np.array([r == REASON_DUPLICATE for r in rows.reasons], dtype=bool) & (first >= 0)
    mean[dup], std[dup] = mean[first[dup]], std[first[dup]]
    return mean, std


def final_reasons(rows: RunRows, keep: np.ndarray, weights: np.ndarray,
                  rule: SelectionRule, cutoff: float | None) -> tuple[list[str], list[str]]:
    """Drop reason and detail per row: the data layer's (invalid/duplicate) first, then low_weight."""
    return final_reasons_of(rows.reasons, rows.details, keep, weights, rule, cutoff)


def final_reasons_of(given: list[str], given_details: list[str], keep: np.ndarray, weights: np.ndarray,
                     rule: SelectionRule, cutoff: float | None) -> tuple[list[str], list[str]]:
    """`final_reasons` of rows whose reasons and details before selection are `given`, `given_details`."""
    reasons, details = [], []
    for i in range(len(given)):
        if given[i]:
            reasons.append(given[i])
            details.append(given_details[i])
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


def count_rows(reasons: list[str], usable: np.ndarray, stage_stats: list[dict] = ()) -> dict:
    """Rows by bucket; with the stages' statistics, also dropped rows per stage (`low_weight` is selection's)."""
    return counts_of(Counter(reasons), int(usable.sum()), stage_stats)


def counts_of(tally: Counter, usable_rows: int, stage_stats: list[dict] = ()) -> dict:
    """`count_rows` from the number of rows per final reason ("" = kept), e.g. summed batch by batch."""
    by_reason = {REASON_INVALID: 0, REASON_DUPLICATE: 0, REASON_LOW_WEIGHT: 0}
    for reason, n in tally.items():
        if reason:
            by_reason[reason] = by_reason.get(reason, 0) + n
    kept = tally.get("", 0)
    dropped = sum(by_reason.values())
    input_rows = sum(tally.values())
    assert kept + dropped == input_rows
    counts = {"input_rows": input_rows, "usable_rows": usable_rows, "kept_rows": kept,
              "dropped_rows": dropped, "dropped_by_reason": by_reason}
    if stage_stats:
        counts["dropped_by_stage"] = {**{s["stage"]: s["dropped"] for s in stage_stats},
                                      "selection": by_reason[REASON_LOW_WEIGHT]}
        # counts are facts that two engines or two runs must agree on: each stage's seconds go to `timings`
        counts["stages"] = [{k: v for k, v in s.items() if k != "seconds"} for s in stage_stats]
        assert sum(counts["dropped_by_stage"].values()) == dropped, "stage accounting"
    return counts
