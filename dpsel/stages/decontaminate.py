"""Decontamination: drop pool rows that overlap evaluation rows (reason `contaminated`).

What is compared: per row, its user text (the contents of its user messages, joined) and its assistant text.
A system turn is never an eval text and never evidence: a system prompt shared by the eval set and the pool
(the usual case) would otherwise match every row. Words: `base.words_of` (lower-cased, punctuation ignored);
n-grams never cross from one role's text to the other's.

The rule (OLMo/Tulu-style overlap, on 64-bit window hashes in sorted numpy tables):
- a long eval text (>= `n` = 13 words, user or assistant) contaminates a pool row holding at least
  `threshold` = `THRESHOLD` (0.5) of the eval text's distinct 13-grams, found in the row's user or assistant text,
  when the two questions ask about the same thing: they share a key and one's keys are all among the other's
  (`content_keys.shared_key`: code spans, identifiers, numbers, capitalised names, quoted phrases), or either
  names none, or the share is near-verbatim (>= `NEAR_VERBATIM` = 0.8).
  Two answers from one formulaic source ("Computes the bitwise OR of ..." vs "... XOR of ...") or one question
  template filled with another subject share half their 13-grams but name different things;
- a short eval question (user text of `min_words` <= L < `n` words) contaminates a pool row whose user or
  assistant text contains its L words in order; a tiny one (< `min_words` = 3 words, e.g. "yes") only a row
  whose user text equals it;
- a short eval answer (`min_words` <= L < `n` words) contaminates a pool row whose text contains its L words in
  order only when the questions share a key: a re-templated copy of a short-answer eval row ("Describe `f`" /
  "What is `f` for?", the same one-line answer) holds no 13-gram of it. Without a shared key a short answer
  is no evidence (an answer such as "the answer is 42" is shared by chance), nor is a tiny one ever;
- templates are no evidence: an n-gram (or a short/tiny text) found in more than
  max(`EVAL_DF_MIN` = 5, `EVAL_DF_SHARE` = 1% of) eval rows, or in more than `POOL_DF_MAX` = 20 pool rows, is
  a template (a shared instruction wrapper, a policy paragraph) and is left out of both the hits and the
  eval text's n-gram count. A copy of an eval row shares all of that row's n-grams, boilerplate a few; 20
  pool rows lets a benchmark question survive a handful of re-templated copies (exact and near-duplicates are
  dropped by the earlier stages) while boilerplate, which recurs in hundreds of rows, is cut.
The pool-side count is kept per eval n-gram (memory: the eval tables only) and accumulates over every batch
the block has seen, the current one included: `curate` decides on the whole pool's counts; a streamed
`filter` on the counts of the rows read so far, so a template is recognised once its 21st row has been read
(rows before that in the stream are judged as if it were not one yet).

A dropped row's detail names the eval row: `contaminated: 0.82 of the user 13-grams of eval row <dpsel_id>
(<file>)`; a short question `1.00 of the user text (9 words, in order) ...`, a tiny one `(2 words, equal)`.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpsel.stages.base import Block, ConversationBatch, Verdict, flat_hashes, window_hashes, words_of
from dpsel.stages.content_keys import key_matrix, shared_key

REASON = "contaminated"
CHUNK_ROWS = 16384
ROLES = ("user", "assistant")          # segment s of E rows: row s % E, role ROLES[s // E]
THRESHOLD = 0.5                        # share of an eval text's n-grams a pool row must hold
EVAL_DF_MIN, EVAL_DF_SHARE = 5, 0.01   # template: in more than max(5, 1% of) eval rows
POOL_DF_MAX = 20                       # template: in more than 20 pool rows seen
NEAR_VERBATIM = 0.8                    # a share this high needs no shared key


def role_texts(messages: pa.ListArray, role: str) -> pa.Array:
    """Per row, the contents of its `role` messages joined by newlines ("" where it has none)."""
    flat = messages.flatten()
    offsets = np.asarray(messages.offsets, np.int64)
    mine = np.asarray(pc.fill_null(pc.equal(pc.struct_field(flat, "role"), role), False), bool)
    kept = np.concatenate([[0], np.cumsum(mine)])[offsets - offsets[0]]
    contents = pc.fill_null(pc.struct_field(flat, "content"), "").filter(pa.array(mine))
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(kept, pa.int32()), contents), "\n")


@dataclass(frozen=True)
class EvalRows:
    """The eval rows the stage matches against: `ids` and `files` (for the detail) and per role its text."""
    ids: np.ndarray
    files: np.ndarray
    user: pa.Array
    assistant: pa.Array

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_messages(cls, ids: Sequence[str], files: Sequence[str], messages: pa.ListArray) -> EvalRows:
        return cls(np.asarray(ids, dtype=object), np.asarray(files, dtype=object),
                   *(role_texts(messages, role).cast(pa.string()) for role in ROLES))

    @classmethod
    def from_texts(cls, texts: Sequence[str] | pa.Array) -> EvalRows:
        """Plain eval texts, each taken as a question (user text); named `text <i>` in the detail."""
        user = pa.array(list(texts) if not isinstance(texts, pa.Array) else texts, pa.string())
        n = len(user)
        return cls(np.array([f"text {i}" for i in range(n)], dtype=object), np.full(n, "eval texts", dtype=object),
                   user, pa.array([""] * n, pa.string()))

    @classmethod
    def concat(cls, parts: Sequence[EvalRows]) -> EvalRows:
        parts = [*parts, cls.from_texts([])]
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate([p.files for p in parts]),
                   *(pa.concat_arrays([getattr(p, role) for p in parts]) for role in ROLES))

    def segments(self) -> pa.Array:
        return pa.concat_arrays([self.user, self.assistant])


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (a, b) pairs, sorted by a then b."""
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    new = np.ones(len(a), bool)
    new[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return a[new], b[new]


def _member(hashes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """hashes in `table` (sorted, unique) by binary search: the pool side is never sorted."""
    if not len(table):
        return np.zeros(len(hashes), bool)
    return table[np.minimum(np.searchsorted(table, hashes), len(table) - 1)] == hashes


@dataclass
class _Table:
    """Eval window hashes (sorted, unique) -> the eval segments holding them (CSR: `start`, `segs`), with the
    number of pool rows seen holding each (`pool_df`, grows batch by batch)."""
    hashes: np.ndarray
    start: np.ndarray
    segs: np.ndarray
    pool_df: np.ndarray

    @classmethod
    def build(cls, hashes: np.ndarray, segs: np.ndarray, seen: tuple[np.ndarray, np.ndarray], cut: int) -> _Table:
        """`hashes` of `segs`; `seen`: (hash, eval row) of every place they occur, for the eval-side cut."""
        seen_hashes, _ = _unique_pairs(*seen)
        found, counts = np.unique(seen_hashes, return_counts=True)
        keep = ~_member(hashes, found[counts > cut])
        hashes, segs = _unique_pairs(hashes[keep], segs[keep])
        unique, first = np.unique(hashes, return_index=True)
        return cls(unique, np.append(first, len(hashes)).astype(np.int64), segs, np.zeros(len(unique), np.int64))

    def find(self, hashes: np.ndarray) -> np.ndarray:
        """Index of each hash in the table, -1 if absent. Most pool windows are absent: a bitmap of the table's
        low hash bits rules them out before the binary search."""
        entries = np.full(len(hashes), -1, np.int64)
        maybe = np.flatnonzero(self.bitmap[(hashes & np.uint64(len(self.bitmap) - 1)).astype(np.int64)])
        if len(maybe) and len(self.hashes):
            at = np.minimum(np.searchsorted(self.hashes, hashes[maybe]), len(self.hashes) - 1)
            hit = self.hashes[at] == hashes[maybe]
            entries[maybe[hit]] = at[hit]
        return entries

    @functools.cached_property
    def bitmap(self) -> np.ndarray:
        bits = np.zeros(max(1024, 1 << int(8 * len(self.hashes)).bit_length()), bool)   # >= 8 slots per hash
        bits[(self.hashes & np.uint64(len(bits) - 1)).astype(np.int64)] = True
        return bits

    def expand(self, rows: np.ndarray, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pool row, entry) pairs -> (pool row, eval segment) pairs, one per segment holding the entry."""
        counts = self.start[entries + 1] - self.start[entries]
        skip = np.repeat(self.start[entries] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return np.repeat(rows, counts), self.segs[skip + np.arange(counts.sum())]

    def alive(self, limit: int) -> np.ndarray:
        return self.pool_df <= limit


class _Segments:
    """Texts cut into words (`lengths` per segment), and their window hashes for several sizes at once."""

    def __init__(self, texts: pa.Array):
        self.tokens, self.offsets = flat_hashes(words_of(texts))
        self.lengths = np.diff(self.offsets)

    def windows(self, n: int, sizes: Sequence[int] = ()) -> tuple[np.ndarray, dict]:
        """(the whole-text hash of each segment under n words, {size: (hash, segment) of the size-word windows
        of segments at least that long}) for n and `sizes`."""
        found, whole = {}, np.zeros(len(self.lengths), np.uint64)
        sizes = [n, *(int(L) for L in sizes)]
        for size, (hashes, segs) in zip(sizes, window_hashes(self.tokens, self.offsets, sizes)):
            ok = self.lengths[segs] >= size
            found[size] = hashes[ok], segs[ok]
            if size == n:              # a segment under n words has one window: all its words
                whole[segs[~ok]] = hashes[~ok]
        return whole, found


def _hits(table: _Table, hashes: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (pool row, table entry) pairs of the window `hashes` found in `table`."""
    entries = table.find(hashes)
    found = entries >= 0
    return _unique_pairs(rows[found], entries[found])


def _joined(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    empty = np.zeros(0, np.int64)
    return np.concatenate([p[0] for p in parts] or [empty]), np.concatenate([p[1] for p in parts] or [empty])


def _shares(row: np.ndarray, seg: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool row, eval segment) pairs, one per shared n-gram -> distinct pairs and the share of the
    segment's `live` n-grams the row holds."""
    key, count = np.unique(row * len(live) + seg, return_counts=True)
    seg = key % len(live)
    return key // len(live), seg, count / np.maximum(live[seg], 1)


class Decontaminate(Block):
    """Drop pool rows that overlap the eval rows (see the module docstring). `evals`: `EvalRows` or plain
    eval texts (each taken as a question)."""
    name = "decontaminate"

    def __init__(self, evals: EvalRows | Sequence[str] | pa.Array, n: int = 13, min_words: int = 3,
                 threshold: float = THRESHOLD, pool_df_max: int = POOL_DF_MAX):
        super().__init__()
        self.evals = evals if isinstance(evals, EvalRows) else EvalRows.from_texts(evals)
        if not 0 < threshold <= 1:
            raise ValueError(f"decontamination threshold must be in (0, 1]; got {threshold}")
        self.n, self.min_words, self.threshold, self.pool_df_max = n, min_words, threshold, pool_df_max
        rows = len(self.evals)
        self.eval_cut = max(EVAL_DF_MIN, int(EVAL_DF_SHARE * rows))
        segments = _Segments(self.evals.segments())
        seg_row = np.tile(np.arange(rows), len(ROLES))
        self.lengths = segments.lengths
        self.keys = key_matrix(self.evals.user)            # what each eval question is about
        user = np.arange(len(seg_row)) < rows
        short = (self.lengths >= min_words) & (self.lengths < n)
        whole, windows = segments.windows(n, np.unique(self.lengths[short]))
        grams, segs = windows.pop(n)
        self.long = _Table.build(grams, segs, (grams, seg_row[segs]), self.eval_cut)
        self.short = {L: self._short_table(whole, np.flatnonzero(short & (self.lengths == L)), windows[L], seg_row)
                      for L in windows}
        tiny = np.flatnonzero(user & (self.lengths > 0) & (self.lengths < min_words))
        self.tiny = _Table.build(whole[tiny], tiny, (whole[tiny], seg_row[tiny]), self.eval_cut)

    def _short_table(self, whole: np.ndarray, segs: np.ndarray, windows: tuple, seg_row: np.ndarray) -> _Table:
        """Short eval questions of one length; the eval-side cut counts the eval rows holding them anywhere."""
        hashes, at = windows
        inside = _member(hashes, np.unique(whole[segs]))
        return _Table.build(whole[segs], segs, (hashes[inside], seg_row[at[inside]]), self.eval_cut)

    def decide(self, rows: ConversationBatch, **_) -> Verdict:
        verdict = Verdict.keep_all(len(rows))
        tables = [self.long, *self.short.values(), self.tiny]
        chunks = [self._chunk_hits(rows.messages.slice(start, CHUNK_ROWS), start)
                  for start in range(0, len(rows), CHUNK_ROWS)]
        pairs = [_joined([chunk[k] for chunk in chunks]) for k in range(len(tables))]
        for table, (_, entries) in zip(tables, pairs):       # this batch's rows join the pool-side counts
            table.pool_df += np.bincount(entries, minlength=len(table.hashes))
        row, seg, share = self._best(tables, pairs, key_matrix(role_texts(rows.messages, "user")))
        verdict.reason[row] = REASON
        verdict.detail[row] = [self._detail(s, f) for s, f in zip(seg.tolist(), share.tolist())]
        return verdict

    def _chunk_hits(self, messages: pa.ListArray, first_row: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per table: the (pool row, entry) pairs of this chunk of rows."""
        rows = len(messages)
        segments = _Segments(pa.concat_arrays([role_texts(messages, role) for role in ROLES]))
        seg_row = np.tile(np.arange(first_row, first_row + rows), len(ROLES))
        whole, windows = segments.windows(self.n, self.short)
        found = [_hits(self.long, windows[self.n][0], seg_row[windows[self.n][1]])]
        found += [_hits(table, windows[L][0], seg_row[windows[L][1]]) for L, table in self.short.items()]
        tiny = np.flatnonzero((np.arange(len(seg_row)) < rows) & (segments.lengths > 0)
                              & (segments.lengths < self.min_words))
        return found + [_hits(self.tiny, whole[tiny], seg_row[tiny])]

    def _best(self, tables: list[_Table], pairs: list, pool_keys: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pool rows at or over the threshold, each with the eval segment it overlaps most and the share.
        Long texts: the share of their live n-grams the row holds; short and tiny texts: 1 (matched whole).
        `pool_keys`: the key matrix of the batch's questions, for the rules that ask for a shared key."""
        found = []
        for k, table in enumerate(tables):
            alive = table.alive(self.pool_df_max)
            row, entry = pairs[k]
            row, seg = table.expand(row[alive[entry]], entry[alive[entry]])
            if k == 0:
                live = np.bincount(table.segs[np.repeat(alive, np.diff(table.start))], minlength=len(self.lengths))
                found.append(_shares(row, seg, live))
            else:
                row, seg = _unique_pairs(row, seg)
                found.append((row, seg, np.ones(len(row))))
            found[-1] = self._same_subject(*found[-1], pool_keys, long=k == 0)
        row, seg, share = (np.concatenate(column) for column in zip(*found))
        over = share >= self.threshold
        row, seg, share = row[over], seg[over], share[over]
        order = np.lexsort((seg, -share, row))       # per row: the largest share, then the first eval segment
        first = order[np.concatenate([[True], row[order][1:] != row[order][:-1]])] if len(order) else order
        return row[first], seg[first], share[first]

    def _same_subject(self, row: np.ndarray, seg: np.ndarray, share: np.ndarray, pool_keys: np.ndarray, long: bool
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (pool row, eval segment, share) matches whose questions may ask about the same thing: a long
        text's match unless both questions name things and none is shared (or it is near-verbatim); a short
        answer's only with a shared key; a short or tiny question's always."""
        evals = len(self.evals)
        ours, theirs = pool_keys[row], self.keys[seg % evals]
        shared = shared_key(ours, theirs) != 0
        if long:
            ok = shared | (share >= NEAR_VERBATIM) | (ours[:, 0] == 0) | (theirs[:, 0] == 0)
        else:
            ok = shared | (seg < evals)
        return row[ok], seg[ok], share[ok]

    def _detail(self, seg: int, share: float) -> str:
        rows = len(self.evals)
        row, role, words = seg % rows, ROLES[seg // rows], int(self.lengths[seg])
        what = (f"{self.n}-grams" if words >= self.n else
                f"text ({words} word{'s' * (words != 1)}, {'in order' if words >= self.min_words else 'equal'})")
        return f"{REASON}: {share:.2f} of the {role} {what} of eval row {self.evals.ids[row]} ({self.evals.files[row]})"
