"""Decontamination: drop pool rows that overlap evaluation texts (reason `contaminated`).

The rule of GPT-3 (and Tulu's decontamination): a row is contaminated if it shares any word 13-gram
with an evaluation text (words: `base.words_of`, lower-cased, punctuation ignored). 13-grams alone miss
short texts (a 9-word eval question inside a pool prompt, or a 9-word pool row copied from an eval
text), so texts shorter than `n` words are matched whole, at their own length L:
- an eval text of L words (min_words <= L < n) contaminates every pool row containing its L words in order;
- a pool row of L words (min_words <= L < n) is contaminated if its L words occur in order in an eval text;
- below `min_words` words (e.g. "yes"), only equality counts: the eval text equals the row's whole
  conversation or one of its user messages, so short answers such as "4" are not flagged by accident.
All comparisons are on 64-bit window hashes (`base.shingle_hashes`) in sorted numpy sets.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpsel.stages.base import Block, ConversationBatch, Verdict, flat_hashes, hash_strings, shingle_hashes, words_of

REASON = "contaminated"
CHUNK_ROWS = 16384


def _windows(words: pa.ListArray, n: int, min_len: int, max_len: int | None = None) -> np.ndarray:
    """Sorted unique hashes of the n-word windows of rows with min_len <= length (<= max_len)."""
    tokens, offsets = flat_hashes(words)
    hashes, row_offsets = shingle_hashes(tokens, offsets, n)
    lengths = np.diff(offsets)
    ok = (lengths >= min_len) & (lengths <= (max_len if max_len is not None else lengths.max(initial=0)))
    return np.unique(hashes[np.repeat(ok, np.diff(row_offsets))])


def _whole(words: pa.ListArray) -> np.ndarray:
    return hash_strings(pc.binary_join(words, " "))


def _member(hashes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """hashes in `table` (sorted, unique) by binary search: the pool side is never sorted."""
    if not len(table):
        return np.zeros(len(hashes), bool)
    return table[np.minimum(np.searchsorted(table, hashes), len(table) - 1)] == hashes


def _hits(hashes: np.ndarray, row_offsets: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Per row: does any of its window hashes occur in `table` (sorted)?"""
    found = _member(hashes, table)
    counts = np.diff(row_offsets)
    row = np.repeat(np.arange(len(counts)), counts)
    return np.bincount(row[found], minlength=len(counts)) > 0


class Decontaminate(Block):
    name = "decontaminate"

    def __init__(self, eval_texts: Sequence[str] | pa.Array, n: int = 13, min_words: int = 3):
        super().__init__()
        self.n, self.min_words = n, min_words
        words = words_of(pa.array(list(eval_texts) if not isinstance(eval_texts, pa.Array) else eval_texts,
                                  pa.string()))
        lengths = np.asarray(pc.list_value_length(words), np.int64)
        self.eval_rows = len(lengths)
        self.long_grams = _windows(words, n, n)                       # every n-gram of eval texts
        self.windows = {L: _windows(words, L, L) for L in range(min_words, n)}   # for short pool rows
        self.short = {L: _windows(words.filter(pa.array(lengths == L)), L, L) for L in range(min_words, n)
                      if (lengths == L).any()}                         # short eval texts, whole
        self.tiny = np.unique(_whole(words.filter(pa.array((lengths > 0) & (lengths < min_words)))))

    def decide(self, rows: ConversationBatch, **_) -> Verdict:
        verdict = Verdict.keep_all(len(rows))
        flagged = np.zeros(len(rows), bool)
        for start in range(0, len(rows), CHUNK_ROWS):
            part = slice(start, start + CHUNK_ROWS)
            flagged[part] = self._contaminated(rows.text.slice(start, CHUNK_ROWS),
                                               rows.messages.slice(start, CHUNK_ROWS))
        verdict.reason[flagged] = REASON
        return verdict

    def _contaminated(self, text: pa.Array, messages: pa.ListArray) -> np.ndarray:
        words = words_of(text)
        tokens, offsets = flat_hashes(words)
        lengths = np.diff(offsets)
        hashes, row_offsets = shingle_hashes(tokens, offsets, self.n)
        flagged = _hits(hashes, row_offsets, self.long_grams) & (lengths >= self.n)
        short = np.flatnonzero((lengths >= self.min_words) & (lengths < self.n))
        whole = hashes[row_offsets[short]]        # a short pool row is one window of its own length
        for L, table in self.windows.items():
            at = lengths[short] == L
            flagged[short[at]] |= _member(whole[at], table)
        for L, table in self.short.items():
            grams, gram_offsets = shingle_hashes(tokens, offsets, L)
            flagged |= (lengths >= L) & _hits(grams, gram_offsets, table)
        if len(self.tiny):
            flagged |= _member(_whole(words), self.tiny) | self._tiny_user_message(messages)
        return flagged

    def _tiny_user_message(self, messages: pa.ListArray) -> np.ndarray:
        flat = messages.flatten()
        offsets = np.asarray(messages.offsets, np.int64) - messages.offsets[0].as_py()
        user = np.asarray(pc.fill_null(pc.equal(pc.struct_field(flat, "role"), "user"), False), bool)
        equal = user & _member(_whole(words_of(pc.fill_null(pc.struct_field(flat, "content"), ""))), self.tiny)
        row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        return np.bincount(row[equal], minlength=len(offsets) - 1) > 0
