"""The curation stages (`dpsel.stages`) on a run's rows: after reading, before selection (curate) or scoring
(filter). Rows a stage drops get its reason in the row view, so selection never sees them and the row
accounting (`rows.count_rows`) covers them; duplicates get `dup_of`; `dpsel_pii` and redacted messages ride
along to the outputs. The near-dup index of the curated rows is saved in `scorer/` for `dpsel filter`.

Engines: the stages run in this process (the driver) for the local and the Ray engine alike, and on every
torchrun rank (they are deterministic, so every rank keeps the same rows).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from dpsel.curation.rows import RunRows, as_path_list
from dpsel.data import read_instruction_set
from dpsel.errors import DpselInputError
from dpsel.stages.decontaminate import EvalRows
from dpsel.stages.near_dup import ANSWER_RULE_SETTINGS, NearDup, NearDupIndex
from dpsel.stages.options import StagesConfig
from dpsel.stages.pii import COLUMN as PII_COLUMN
from dpsel.stages.pipeline import build_blocks, run_stages

log = logging.getLogger(__name__)

INDEX_FILE = "near_dup.npz"         # in scorer/: the curated rows' near-dup state
INDEX_META_FILE = "near_dup.json"   # the settings its band keys were built with
DUPLICATE_REASONS = ("duplicate", "near_duplicate", "semantic_duplicate")
_MESSAGES = "dpsel_messages"


def _messages(data, usable: np.ndarray) -> pa.ChunkedArray:
    """Normalised messages of the usable rows; other rows empty (the exact stage carries their verdict).
    Built columnar (`InstructionSet.message_array`): no Python object per message."""
    return data.message_array(usable, everywhere=True)


def conversation_table(rows: RunRows) -> pa.Table:
    """The rows as the stages read them: id, messages and the reader's reason."""
    return pa.table({"dpsel_id": pa.array(rows.ids, pa.string()), _MESSAGES: _messages(rows.data, rows.usable),
                     "dpsel_reason": pa.array(rows.reasons, pa.string())})


def eval_texts(paths: list[str]) -> EvalRows:
    """Every usable row of the decontamination sets: its id, its file's name and its user and assistant text."""
    parts = []
    for path in paths:
        data = read_instruction_set(as_path_list(path))
        usable = data.usable_mask()
        messages = _messages(data, usable).combine_chunks().filter(pa.array(usable))
        names = [str(f).rstrip("/").rsplit("/", 1)[-1] for f in data.file_paths()[usable]]
        parts.append(EvalRows.from_messages(np.asarray(data.id_list(), dtype=object)[usable], names, messages))
    return EvalRows.concat(parts)


def _resolve_chains(ids: list[str], reason: np.ndarray, dup_of: np.ndarray, dropped: dict | None = None) -> np.ndarray:
    """An exact duplicate of a row that a later stage dropped as a near/semantic duplicate points to the row
    kept in its place, not to the dropped one. `dropped` (id -> dup_of of such rows) carries them from batch to
    batch of a streamed run; this batch's are added to it."""
    dropped = {} if dropped is None else dropped
    dropped.update({ids[i]: dup_of[i] for i in np.flatnonzero(np.isin(reason, DUPLICATE_REASONS[1:])).tolist()})
    for i in np.flatnonzero(reason == "duplicate").tolist():
        seen = set()
        while dup_of[i] in dropped and dup_of[i] not in seen:
            seen.add(dup_of[i])
            dup_of[i] = dropped[dup_of[i]]
    return dup_of


def conversation_embeddings(rows: RunRows, spec: str) -> np.ndarray:
    """Per row, the normalised sum of its question and answer embeddings (zeros for unusable rows). They go
    through the per-row-id cache that bads' evidence reads, so a run embeds each row once."""
    from dpsel.models.embedder import EmbedderUnavailable, load_embedder
    from dpsel.select.semantic import row_embeddings
    try:
        embedder = load_embedder(spec)
    except EmbedderUnavailable as error:
        raise DpselInputError(f"--semantic-dup needs the sentence embedder: {error}") from None
    question, answer = row_embeddings(embedder, rows.conversations(rows.usable))
    both = question + answer
    both /= np.linalg.norm(both, axis=1, keepdims=True) + 1e-12
    vectors = np.zeros((rows.n, both.shape[1] if len(both) else 1), np.float32)
    vectors[rows.usable] = both
    return vectors


def apply_stages(rows: RunRows, config: StagesConfig, embedder: str = "default",
                 seen: NearDupIndex | None = None) -> NearDupIndex | None:
    """Run the stages on `rows` and record their verdicts in it; returns the near-dup index of the kept rows
    (None without the near-dup stage). `embedder`: the semantic-dup stage's sentence embedder."""
    blocks = build_blocks(config, eval_texts(config.decontaminate), seen=seen)
    for block in blocks:
        if isinstance(block, NearDup):   # its sketches on disk while the stages run: ~190 MB fewer at 1M rows
            try:
                block.index = block.index.spilled()
            except OSError as error:   # a default, not an asked-for choice: held instead, and said
                log.warning("near-dup sketches could not go to TMPDIR (%s): held in memory", error)
    semantic = config.semantic_dup is not None and rows.usable.any()
    embeddings = conversation_embeddings(rows, embedder) if semantic else None
    record_stages(rows, config, blocks, embeddings)
    near_dup = next((b for b in blocks if isinstance(b, NearDup)), None)
    return near_dup.index if near_dup is not None else None


def record_stages(rows: RunRows, config: StagesConfig, blocks: list, embeddings: np.ndarray | None = None,
                  dropped: dict | None = None) -> None:
    """Run `blocks` (built once per run: their state and statistics carry over from batch to batch) on `rows`
    and record their verdicts in it. `dropped`: see `_resolve_chains`."""
    outcome = run_stages(conversation_table(rows), blocks, embeddings)
    dropped_rows = np.flatnonzero((outcome.reason != "") & ~np.isin(outcome.reason, ("invalid", "duplicate")))
    dup_of = _resolve_chains(rows.ids, outcome.reason, outcome.dup_of, dropped)
    for i in dropped_rows.tolist():
        rows.reasons[i] = outcome.reason[i]
        rows.details[i] = outcome.detail[i] or (f"{outcome.reason[i]} of {dup_of[i]}" if dup_of[i] is not None
                                                else outcome.reason[i])
    rows.usable = rows.usable & (outcome.reason == "")
    rows.dup_of = dup_of.tolist()
    rows.stage_stats = [stats.as_dict() for stats in outcome.stats]
    rows.stage_columns = {name: outcome.columns[name] for name in (PII_COLUMN,) if name in outcome.columns}
    if config.pii == "redact" and _MESSAGES in outcome.columns:
        rows.redacted = outcome.columns[_MESSAGES]


class SpilledIndex:
    """A near-dup index written to a temporary .npz (under TMPDIR) until the run's scorer/ takes it (`save`): its
    ~400 bytes a row are not held through selection. The file goes when this object does, if not saved."""

    def __init__(self, index: NearDupIndex):
        import tempfile
        import weakref
        handle, name = tempfile.mkstemp(prefix="dpsel-near-dup-", suffix=".npz")
        os.close(handle)
        self.path, self.rows = Path(name), len(index)
        weakref.finalize(self, self.path.unlink, missing_ok=True)
        index.save(self.path)

    def __len__(self) -> int:
        return self.rows

    def save(self, path: Path) -> None:
        import shutil
        shutil.move(self.path, path)


def save_index(scorer_dir: Path, index: NearDupIndex | SpilledIndex | None, config: StagesConfig) -> None:
    if index is None or not scorer_dir.is_dir():
        return
    index.save(scorer_dir / INDEX_FILE)
    (scorer_dir / INDEX_META_FILE).write_text(json.dumps({"threshold": config.near_dup_threshold, "rows": len(index),
                                                          "answer_rule": ANSWER_RULE_SETTINGS}) + "\n")


def load_index(scorer_dir: Path, config: StagesConfig) -> NearDupIndex | None:
    """The curated rows' near-dup index, for a filter run with the near-dup stage on; None if the scorer
    has none (a run made without near-dup, or before stages existed). One saved before the answer rule loads:
    its rows pair with new rows by the conversation rule only (logged); one whose signatures do not fit this
    version's exits 2 naming the file."""
    path = scorer_dir / INDEX_FILE
    if not config.near_dup or not path.exists():
        return None
    meta = json.loads((scorer_dir / INDEX_META_FILE).read_text())
    built = meta.get("threshold")
    if built != config.near_dup_threshold:
        raise DpselInputError(f"the scorer's near-dup index was built at --near-dup-threshold {built}; give that "
                              f"value (not {config.near_dup_threshold}) or --no-near-dup",
                              file=str(scorer_dir / INDEX_META_FILE))
    if meta.get("answer_rule", ANSWER_RULE_SETTINGS) != ANSWER_RULE_SETTINGS:
        raise DpselInputError(f"the scorer's near-dup index has answer-rule signatures {meta['answer_rule']}, this "
                              f"version makes {ANSWER_RULE_SETTINGS}: re-run the curation or give --no-near-dup",
                              file=str(scorer_dir / INDEX_META_FILE))
    try:
        index = NearDupIndex.load(path).fitted(NearDup(config.near_dup_threshold).widths)
    except (ValueError, KeyError, OSError) as error:
        raise DpselInputError(f"the scorer's near-dup index cannot be read ({error}); re-run the curation or give "
                              f"--no-near-dup", file=str(path)) from None
    if index.answer_missing:
        log.warning("%s was saved before near-duplicates keyed on content: its %d rows pair with new rows by "
                    "the whole conversation only", path, len(index))
    return index
