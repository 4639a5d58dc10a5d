"""Near-duplicates: MinHash-LSH, by two rules; a row is a near-duplicate when either pairs it with another.

- conversation rule: word 5-shingles of the normalised conversation, Jaccard >= `threshold` (0.8). Finds edits,
  reorderings and copies inside another template, but misses short rows whose question was reworded: two
  one-sentence questions and a 20-word answer share too few 5-shingles.
- answer rule (near-duplicates keyed on content): the answers' word sets (1-shingles: a one-word edit of an
  n-word answer leaves Jaccard (n-1)/(n+1), two edits (n-2)/(n+2)) reach Jaccard `ANSWER_THRESHOLD` (0.6: one
  edit passes from 4 words, two from 8) AND the questions ask about the same thing (`content_keys.shared_key`:
  they share a key, and one's keys are all among the other's; keys are code spans, identifiers, numbers,
  capitalised names and quoted phrases). Only answers whose question has a key take part, and of them only answers of
  `SHORT_ANSWER_WORDS` (8) words or more, or of `MIN_ANSWER_WORDS` (3) to 7 words with `CONTENT_WORDS` (2) words
  beyond scikit-learn's English stop words: "Yes." or "No, it is not." fits different questions about one
  function and never pairs, "Return a contiguous flattened array." does; one boilerplate answer to questions
  about different things never pairs either (no shared key).

How: each row's shingles (64-bit hashes, `base.shingle_hashes`) go to `rensa`'s Rust MinHash
(`digest_matrix_from_flat_token_hashes`; measured ~13 µs/row with the conversion to numpy, against ~280 µs/row
for `datasketch`'s `update_batch` on the same pre-hashed shingles). Kept per row and rule: 32-bit band keys and
a one-byte-per-permutation sketch (the low 8 bits of every MinHash value, "b-bit MinHash"); for the answer
rule also the question's `KEYS` smallest key hashes. Candidates share a band key in any band (conversation
rule), or a band key and a question key (answer rule: the band groups are split by key, so one answer shared
by many questions never hides a pair behind its group's first row); each row is paired with its group's first
row, and a pair is kept when its b-bit estimate of Jaccard reaches `verify_threshold` (this drops the
band-collision false positives that LSH alone keeps, while a pair at the threshold passes 98% of the time).
Clusters are the connected components of the kept pairs of both rules, and each cluster keeps its first row in
input order (previously curated rows, the `seen` index, come before every new row), so the keeper never depends
on anything but row order. A dropped row's detail names the rule, the estimate and the shared key of one of
its pairs (the one with its keeper where there is one).

Memory (state, per row): bands*4 + num_perm + answer bands*4 + answer perms + KEYS*4 + 20 (id; longer ids
widen it) = 384 bytes at the defaults (threshold 0.8, 128 permutations: 18 bands of 7 rows; answers 0.6, 64
permutations: 21 bands of 3 rows; 4 keys). Signatures are computed in chunks and never held whole; the index is
filled in place and compacted in place, so a run holds one copy of it plus the clustering's temporaries (per
row: sort order, labels and its pair, ~50 bytes; 8 bytes per candidate pair). Measured peak at 1M rows (before
the answer rule): see benchmarks/results/dedup.md.
"""
from __future__ import annotations

import array
import functools
import itertools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import rensa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dpsel.data.schema import ID_COLUMN
from dpsel.stages.base import (Block, ConversationBatch, Verdict, flat_hashes, map_blocks, role_of, role_text,
                               shingle_hashes, splitmix64, words_of)
from dpsel.stages.content_keys import KEYS, key_hashes, key_matrix, keys_of, shared_key
from dpsel.stages.near_dup_index import NearDupIndex, SpilledSketch
from dpsel.stop_words import english_stop_words

__all__ = ["NearDup", "NearDupIndex", "NearDupVerdicts", "SpilledSketch", "lsh_bands", "verify_threshold"]

REASON = "near_duplicate"
SEED = 20250101
CHUNK_ROWS = 2048     # rensa's digests come back as Python lists: ~40 bytes a value while converted
ID_BYTES = 20
RECALL_AT_THRESHOLD = 0.98   # of a pair at exactly the threshold: by the bands, and again by the check
CHANCE = 1 / 256             # two unrelated 8-bit sketch values agree this often
ANSWER_THRESHOLD = 0.6      # answer word-set Jaccard of the answer rule
ANSWER_NGRAM = 1             # word sets: answers are short, and a longer shingle loses n of them to one edit
ANSWER_PERM = 64             # the answer rule's evidence is two-sided (answer and key): a coarser sketch does
MIN_ANSWER_WORDS = 3         # shorter answers ("Yes.", "No way") are too generic to pair by
SHORT_ANSWER_WORDS = 8       # answers under 8 words take part only with CONTENT_WORDS words beyond stop words
CONTENT_WORDS = 2            # so "No, it is not." (to "Is `f` recursive?" and "Is `f` thread-safe?") never pairs
CONVERSATION, ANSWER_RULE = 0, 1
# what the answer rule's saved signatures depend on (a scorer's near_dup.json records it)
ANSWER_RULE_SETTINGS = {"threshold": ANSWER_THRESHOLD, "ngram": ANSWER_NGRAM, "num_perm": ANSWER_PERM,
                        "min_answer_words": MIN_ANSWER_WORDS, "short_answer_words": SHORT_ANSWER_WORDS,
                        "content_words": CONTENT_WORDS, "keys": KEYS, "key_rules": 2, "seed": SEED}


def verify_threshold(threshold: float, num_perm: int, recall: float = RECALL_AT_THRESHOLD) -> float:
    """The b-bit MinHash estimate a candidate pair must reach so that a pair at exactly `threshold` passes
    with probability `recall`, the bands' own target: checking against `threshold` itself would drop half of
    the pairs at it (the estimate's sd is ~0.035 at 0.8 with 128 permutations), and LSH plus its check would
    find ~49% of them. Together the two find ~96% of pairs at the threshold and half of those at ~0.73."""
    agree = threshold + CHANCE * (1 - threshold)
    sd = math.sqrt(agree * (1 - agree) / num_perm) / (1 - CHANCE)
    return threshold - statistics.NormalDist().inv_cdf(recall) * sd if threshold < 1 else 1.0


def lsh_bands(threshold: float, num_perm: int, recall: float = RECALL_AT_THRESHOLD) -> tuple[int, int]:
    """(bands, rows per band): the longest band (fewest chance collisions) for which a pair at exactly
    `threshold` still becomes a candidate with probability >= `recall`."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def _band_keys(signature: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Hash each band's `rows` MinHash values into one 32-bit key (chance collisions are verified away)."""
    grouped = signature[:, :bands * rows].reshape(len(signature), bands, rows).astype(np.uint64)
    key = np.zeros(grouped.shape[:2], np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            key = splitmix64(key * np.uint64(0x100000001B3) + grouped[:, :, r])
    return (key >> np.uint64(32)).astype(np.uint32)


MESSAGES, EMPTY = "messages", "empty"
BANDS, SKETCH, ANSWER_BANDS, ANSWER_SKETCH, KEY_COLUMN = "bands", "sketch", "answer_bands", "answer_sketch", "keys"


def _word_hashes(messages: pa.ListArray) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(word hashes, row offsets) of every row's conversation and of its answer (the assistant turns' words),
    from one pass over the messages: a conversation's words are its messages' words in order (a newline joins
    them and punctuation never spans one), so each word is split and hashed once for both rules."""
    contents = pc.fill_null(pc.struct_field(messages.flatten(), "content"), "")
    tokens, token_offsets = flat_hashes(words_of(contents))
    rows = np.asarray(messages.offsets, np.int64)
    rows = rows - rows[0]
    counts, answer = np.diff(token_offsets), role_of(messages, "assistant")
    answer_offsets = np.concatenate([[0], np.cumsum(counts * answer)])[rows]
    return (tokens, token_offsets[rows]), (tokens[np.repeat(answer, counts)], answer_offsets)


def _minhash(tokens: np.ndarray, offsets: np.ndarray, ngram: int, num_perm: int, bands: int, band_rows: int):
    """(band keys, b-bit sketch) of the word `ngram`-shingles of every row (flat word hashes, row offsets)."""
    shingles, row_offsets = shingle_hashes(tokens, offsets, ngram)
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(shingles, row_offsets.astype(np.uint64),
                                                                 num_perm, SEED)
    # rensa gives Python lists: an array.array reads them ~25% faster than numpy does
    signature = np.frombuffer(array.array("I", itertools.chain.from_iterable(matrix.to_rows())),
                              np.uint32).reshape(-1, num_perm)
    return _band_keys(signature, bands, band_rows), (signature & 0xFF).astype(np.uint8)


@functools.cache
def _stop_word_hashes() -> np.ndarray:
    """Hashes of the English stop words (`dpsel.stop_words`: scikit-learn's list), sorted."""
    return np.unique(flat_hashes(words_of(pa.array([" ".join(sorted(english_stop_words()))])))[0])


def _specific_answer(tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per row (answer word hashes, row offsets): whether its answer may pair by the answer rule: at least
    `SHORT_ANSWER_WORDS` words, or `MIN_ANSWER_WORDS` or more of which `CONTENT_WORDS` are not stop words."""
    lengths = np.diff(offsets)
    specific = lengths >= SHORT_ANSWER_WORDS
    short = np.flatnonzero((lengths >= MIN_ANSWER_WORDS) & ~specific)     # only these need their words read
    if len(short):
        counts = lengths[short]
        at = np.repeat(offsets[short] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
        stop = _stop_word_hashes()
        words = tokens[at]
        content = stop[np.minimum(np.searchsorted(stop, words), len(stop) - 1)] != words
        running = np.concatenate([[0], np.cumsum(content)])
        ends = np.cumsum(counts)
        specific[short] = running[ends] - running[ends - counts] >= CONTENT_WORDS
    return specific


def _question_keys(messages: pa.ListArray, long_answer: np.ndarray) -> np.ndarray:
    """[rows, KEYS] question key hashes of the rows whose answer is long enough for the answer rule, else 0."""
    keys = np.zeros((len(messages), KEYS), np.uint32)
    at = np.flatnonzero(long_answer)
    keys[at] = key_matrix(role_text(messages, "user").take(pa.array(at)))
    return keys


def _answer_minhash(tokens: np.ndarray, offsets: np.ndarray, signed: np.ndarray, bands: int, band_rows: int):
    """The answer rule's (band keys, sketch) of the `signed` rows (those that take part in it), 0 for the others:
    most questions name nothing, and their answers are never compared."""
    counts = np.diff(offsets)
    band, sketch = _minhash(tokens[np.repeat(signed, counts)], np.concatenate([[0], np.cumsum(counts[signed])]),
                            ANSWER_NGRAM, ANSWER_PERM, bands, band_rows)
    out_band, out_sketch = np.zeros((len(counts), bands), np.uint32), np.zeros((len(counts), ANSWER_PERM), np.uint8)
    out_band[signed], out_sketch[signed] = band, sketch
    return out_band, out_sketch


def sign_block(block: pa.Table, *, ngram: int, num_perm: int, bands: int, band_rows: int, answer_bands: int,
               answer_band_rows: int) -> pa.Table:
    """One block of rows (their messages) -> per row both rules' band keys and sketches, its question's keys
    (none where its answer is too short for the answer rule) and whether it has no words. A module-level
    function of one block, so an engine can run it anywhere (`base.map_blocks`)."""
    messages = block.column(MESSAGES).combine_chunks()
    conversation, answer = _word_hashes(messages)
    band, sketch = _minhash(*conversation, ngram, num_perm, bands, band_rows)
    keys = _question_keys(messages, _specific_answer(*answer))
    answer_band, answer_sketch = _answer_minhash(*answer, keys.any(axis=1), answer_bands, answer_band_rows)
    return pa.table({BANDS: _as_fixed_binary(band), SKETCH: _as_fixed_binary(sketch),
                     ANSWER_BANDS: _as_fixed_binary(answer_band), ANSWER_SKETCH: _as_fixed_binary(answer_sketch),
                     KEY_COLUMN: _as_fixed_binary(keys), EMPTY: pa.array(np.diff(conversation[1]) == 0)})


def _as_fixed_binary(matrix: np.ndarray) -> pa.Array:
    """A [rows, k] array as one fixed-size binary value per row, sharing its bytes (Arrow-native, so it
    travels between processes without a per-row Python object)."""
    matrix = np.ascontiguousarray(matrix)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(matrix.shape[1] * matrix.itemsize), len(matrix),
                                                [None, pa.py_buffer(matrix)])


def _fixed_width(column: pa.ChunkedArray, dtype, width: int) -> np.ndarray:
    """A fixed-size binary column back to a [rows, width] array of `dtype` (no per-row Python)."""
    array = column.combine_chunks()
    if not len(array):
        return np.zeros((0, width), dtype)
    data = np.frombuffer(array.buffers()[1], dtype)
    return data[array.offset * width:(array.offset + len(array)) * width].reshape(len(array), width)


@dataclass
class Clusters:
    """Per index entry: `keeper` (the entry kept in its place; itself when no duplicate) and one of its pairs
    (`partner` entry, -1 if none; the `rule` that made it, its Jaccard estimate `score`, the shared `key` hash)."""
    keeper: np.ndarray
    partner: np.ndarray
    rule: np.ndarray
    score: np.ndarray
    key: np.ndarray


def _star_pairs(column: Callable[[int], np.ndarray], bands: int, rows: np.ndarray, n: int) -> np.ndarray:
    """Unique (row, star centre) pair codes (row * n + centre): per band, `column(band)` gives a key per entry
    (entries of ascending `rows`; one band at a time, so no entries × bands copy), and each entry is paired with
    the first entry of its group of equal keys."""
    codes = np.zeros(0, np.int64)
    for band in range(bands):
        keys = column(band)
        order = np.argsort(keys)                # unstable (faster): the centre is the group's smallest row
        values, members = keys[order], rows[order]
        starts = np.concatenate([[True], values[1:] != values[:-1]])
        centre = np.repeat(np.minimum.reduceat(members, np.flatnonzero(starts)), np.diff(
            np.append(np.flatnonzero(starts), len(starts))))
        other = members != centre
        codes = _merged(codes, np.unique(members[other].astype(np.int64) * n + centre[other]))
    return codes


def _merged(held: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The distinct codes of two sorted, distinct arrays. Pairs repeat across bands: merged band by band, what is
    held is the distinct pairs, not every band's codes before one final unique (measured on a 400k-row pool of
    near-copies: 21 bands of ~210k codes for 812k distinct pairs). A stable sort of two sorted runs is a merge."""
    both = np.concatenate([held, new])
    both.sort(kind="stable")
    return both[np.concatenate([[True], both[1:] != both[:-1]])] if len(both) else both


def _decoded(codes: np.ndarray, n: int) -> np.ndarray:
    return np.stack([codes // max(n, 1), codes % max(n, 1)], axis=1)


def _estimates(sketch, pairs: np.ndarray) -> np.ndarray:
    """b-bit MinHash estimate of each pair's Jaccard (chance agreement removed)."""
    out = np.zeros(len(pairs), np.float32)
    if isinstance(sketch, SpilledSketch):     # read back only the rows that are in a pair
        rows = np.unique(pairs)
        sketch, pairs = sketch.take(rows), np.searchsorted(rows, pairs)
    for start in range(0, len(pairs), 65536):
        a, b = pairs[start:start + 65536].T
        out[start:start + 65536] = ((sketch[a] == sketch[b]).mean(axis=1) - CHANCE) / (1 - CHANCE)
    return out


def _room(held, size: int, width: int, dtype) -> np.ndarray | SpilledSketch:
    """A signature field with room for `size` entries, `held`'s first; a spilled sketch is appended to: itself."""
    if isinstance(held, SpilledSketch):
        return held
    out = np.empty((size, width), dtype)
    out[:len(held)] = held
    return out


def _first_pairs(n: int, edges: np.ndarray, rule: np.ndarray, score: np.ndarray, key: np.ndarray,
                 keeper: np.ndarray) -> Clusters:
    """Per entry, one of its pairs: the one with its keeper if any, else by rule (conversation first), then score."""
    row, partner = np.concatenate([edges[:, 0], edges[:, 1]]), np.concatenate([edges[:, 1], edges[:, 0]])
    rule, score, key = np.tile(rule, 2), np.tile(score, 2), np.tile(key, 2)
    order = np.lexsort((partner, -score, rule, partner != keeper[row], row))
    first = order[np.unique(row[order], return_index=True)[1]]
    out = Clusters(keeper, np.full(n, -1, np.int64), np.full(n, -1, np.int8), np.zeros(n, np.float32),
                   np.zeros(n, np.uint32))
    out.partner[row[first]], out.rule[row[first]] = partner[first], rule[first]
    out.score[row[first]], out.key[row[first]] = score[first], key[first]
    return out


class NearDup(Block):
    name = "near_dup"

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seen: NearDupIndex | None = None):
        super().__init__()
        if not 0 < threshold <= 1:
            raise ValueError(f"near-dup threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        self.bands, self.band_rows = lsh_bands(threshold, num_perm)
        self.verify_at = verify_threshold(threshold, num_perm)
        self.answer_bands, self.answer_band_rows = lsh_bands(ANSWER_THRESHOLD, ANSWER_PERM)
        self.answer_verify_at = verify_threshold(ANSWER_THRESHOLD, ANSWER_PERM)
        # rows kept so far (the given seen index, then every batch's kept rows): later batches are
        # deduplicated against earlier ones, and `index.save` hands the state to a later run
        self.index = seen.fitted(self.widths) if seen is not None else NearDupIndex.empty(self.widths, ID_BYTES)

    @property
    def widths(self) -> dict[str, tuple[int, type]]:
        """Per signature field of the index: (values per row, dtype)."""
        return {"bands": (self.bands, np.uint32), "sketch": (self.num_perm, np.uint8),
                "answer_bands": (self.answer_bands, np.uint32), "answer_sketch": (ANSWER_PERM, np.uint8),
                "keys": (KEYS, np.uint32)}

    @property
    def bytes_per_row(self) -> int:
        return ID_BYTES + sum(width * np.dtype(dtype).itemsize for width, dtype in self.widths.values())

    def grown(self, index: NearDupIndex, rows: ConversationBatch, capacity: int = 0) -> NearDupIndex:
        """`index` with room for `capacity` more entries (their contents unset) and ids wide enough for `rows`'
        ids (ids are never cut); `index` itself when it already has both. Spilled sketches are appended to as
        rows are signed: nothing to copy."""
        longest = pc.max(pc.binary_length(rows.table.column(ID_COLUMN))).as_py() or 0
        width = max(ID_BYTES, index.ids.dtype.itemsize, longest)
        if width == index.ids.dtype.itemsize and capacity == 0:
            return index
        size, n = len(index) + capacity, len(index)
        out = NearDupIndex(np.empty(size, f"S{width}"), **{name: _room(getattr(index, name), size, width, dtype)
                                                          for name, (width, dtype) in self.widths.items()})
        out.ids[:n] = index.ids
        return out

    def sign_into(self, index: NearDupIndex, empty: np.ndarray, at: int, rows: ConversationBatch) -> int:
        """Fill entries `at`.. of `index` (allocated by `grown`) with `rows`' ids and signatures, block by
        block (no second copy of the new entries is ever held), and `empty[at:]` with whether a row has no
        words at all (such rows never match); returns the next free entry. The signatures are computed by the
        installed block map (`base.map_blocks`: this process, or Ray actors)."""
        ids = rows.table.column(ID_COLUMN).cast(pa.binary())   # bytes a block at a time, not a str per row
        sign = functools.partial(sign_block, ngram=self.ngram, num_perm=self.num_perm, bands=self.bands,
                                 band_rows=self.band_rows, answer_bands=self.answer_bands,
                                 answer_band_rows=self.answer_band_rows)
        start = at
        for block in map_blocks(sign, pa.table({MESSAGES: rows.messages}), CHUNK_ROWS):
            n = block.num_rows
            index.ids[at:at + n] = ids.slice(at - start, n).to_numpy(zero_copy_only=False)
            for name, (width, dtype) in self.widths.items():
                getattr(index, name)[at:at + n] = _fixed_width(block.column(name), dtype, width)
            empty[at:at + n] = block.column(EMPTY).to_numpy(zero_copy_only=False)
            at += n
        if at - start != len(rows):
            raise RuntimeError(f"near-dup signatures came back for {at - start} of {len(rows)} rows")
        return at

    def extended(self, rows: ConversationBatch) -> tuple[NearDupIndex, np.ndarray]:
        """The index with every row of `rows` appended, and per entry: no words at all."""
        out = self.grown(self.index, rows, len(rows))
        empty = np.zeros(len(out), bool)
        self.sign_into(out, empty, len(self.index), rows)
        return out, empty

    def keepers(self, everything: NearDupIndex, empty: np.ndarray, seen: int) -> tuple[Clusters, np.ndarray]:
        """The clusters of `everything` (the `seen` earlier entries, then new rows). A new row already among the
        seen entries (`filter` on rows that were curated) is that row again, judged before: it never matches (so
        keeps its verdict); also returned, per new row, is whether it is such a row."""
        again = np.isin(everything.ids[seen:], everything.ids[:seen]) if seen else np.zeros(len(empty), bool)
        empty[seen:] |= again
        return self._clusters(everything, empty), again

    def decide(self, rows: ConversationBatch, **_) -> Verdict:
        seen = len(self.index)
        everything, empty = self.extended(rows)
        self.index = everything              # the old index is no longer referenced: freed
        clusters, again = self.keepers(everything, empty, seen)
        verdict, duplicate = verdict_of(everything.ids, clusters, seen, rows)
        # a row seen before is not added twice
        everything.compact(np.concatenate([np.arange(seen), seen + np.flatnonzero(~duplicate & ~again)]))
        return verdict

    def _clusters(self, index: NearDupIndex, skip: np.ndarray) -> Clusters:
        """Per row, the first row (input order) of its cluster, and one of its pairs."""
        n = len(index)
        conversation, answer = self._conversation_pairs(index, skip), self._answer_pairs(index, skip)
        conversation_score = _estimates(index.sketch, conversation)
        answer_score = _estimates(index.answer_sketch, answer)
        answer_key = shared_key(index.keys[answer[:, 0]], index.keys[answer[:, 1]])
        keep = conversation_score >= self.verify_at - 1e-9
        kept_answer = (answer_score >= self.answer_verify_at - 1e-9) & (answer_key != 0)
        edges = np.concatenate([conversation[keep], answer[kept_answer]])
        rule = np.concatenate([np.full(keep.sum(), CONVERSATION, np.int8), np.full(kept_answer.sum(), ANSWER_RULE,
                                                                                     np.int8)])
        graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
        _, labels = connected_components(graph, directed=False)
        first = np.full(labels.max() + 1 if n else 0, n, np.int64)
        np.minimum.at(first, labels, np.arange(n))
        return _first_pairs(n, edges, rule, np.concatenate([conversation_score[keep], answer_score[kept_answer]]),
                            np.concatenate([np.zeros(keep.sum(), np.uint32), answer_key[kept_answer]]),
                            first[labels])

    def _conversation_pairs(self, index: NearDupIndex, skip: np.ndarray) -> np.ndarray:
        """(row, star centre) pairs: each row against the first row of every band group it is in."""
        n, live = len(index), np.flatnonzero(~skip)
        if len(live) < 2:                    # no pair to form (an empty file, or every row skipped)
            return np.zeros((0, 2), np.int64)
        return _decoded(_star_pairs(lambda band: index.bands[live, band], self.bands, live, n), n)

    def _answer_pairs(self, index: NearDupIndex, skip: np.ndarray) -> np.ndarray:
        """(row, star centre) pairs: each row against the first row of every (answer band, question key)
        group it is in; rows without keys (or skipped) take no part."""
        n = len(index)
        row, slot = np.nonzero((index.keys != 0) & ~skip[:, None])
        if len(np.unique(row)) < 2:
            return np.zeros((0, 2), np.int64)
        key = index.keys[row, slot].astype(np.uint64)

        def grouped(band: int) -> np.ndarray:     # the band's key and the question key as one 32-bit key (sorts
            # twice as fast as 64 bits; a chance collision only adds a candidate that the checks drop)
            both = (index.answer_bands[row, band].astype(np.uint64) << np.uint64(32)) | key
            return (splitmix64(both) >> np.uint64(32)).astype(np.uint32)
        return _decoded(_star_pairs(grouped, self.answer_bands, row, n), n)


def _details(ids: np.ndarray, clusters: Clusters, at: np.ndarray, rows: ConversationBatch, local: np.ndarray
             ) -> list[str]:
    """The detail of the duplicate entries `at` (rows `local` of `rows`): the rule, estimate, shared key of
    one of its pairs, and that pair's row where it is not the keeper."""
    by_answer = clusters.rule[at] == ANSWER_RULE
    named = {}
    if by_answer.any():
        keys, key_row = keys_of(rows.question.take(pa.array(local[by_answer])))
        entries = at[by_answer][key_row]
        hit = key_hashes(keys) == clusters.key[entries]
        named = dict(zip(entries[hit].tolist(), keys.filter(pa.array(hit)).to_pylist()))
    out = []
    for entry in at.tolist():
        keeper, partner = clusters.keeper[entry], clusters.partner[entry]
        which = "answer" if clusters.rule[entry] == ANSWER_RULE else "conversation"
        said = f"{which} Jaccard {clusters.score[entry]:.2f}"
        if partner != keeper:
            said += f" with {ids[partner].decode()}"
        if entry in named:
            said += f", same `{named[entry]}`"
        out.append(f"{REASON} of {ids[keeper].decode()} ({said})")
    return out


def verdict_of(ids: np.ndarray, clusters: Clusters, first: int, rows: ConversationBatch
               ) -> tuple[Verdict, np.ndarray]:
    """The verdict of `rows`, entries `first`.. of the index whose `ids` are given, and which are duplicates."""
    keeper = clusters.keeper[first:first + len(rows)]
    verdict = Verdict.keep_all(len(keeper))
    duplicate = keeper != np.arange(first, first + len(keeper))
    verdict.reason[duplicate] = REASON
    verdict.dup_of[duplicate] = [i.decode() for i in ids[keeper[duplicate]].tolist()]
    local = np.flatnonzero(duplicate)
    verdict.detail[duplicate] = _details(ids, clusters, first + local, rows, local)
    return verdict, duplicate


class NearDupVerdicts(Block):
    """The near-dup stage of a streamed run, whose clustering ran once over all rows beforehand (so each row's
    verdict is the one the whole input in one batch gets): hands out the verdicts of the rows it is given,
    in order, batch after batch. `ids` are the seen entries' then the new rows'; `clusters` theirs."""
    name = NearDup.name

    def __init__(self, ids: np.ndarray, clusters: Clusters, seen: int, stats=None):
        super().__init__()
        self.ids, self.clusters, self.at = ids, clusters, seen
        if stats is not None:
            self.stats = stats

    def decide(self, rows: ConversationBatch, **_) -> Verdict:
        if self.at + len(rows) > len(self.clusters.keeper):
            raise RuntimeError("near-dup: more rows than were signed")
        verdict, _ = verdict_of(self.ids, self.clusters, self.at, rows)
        self.at += len(rows)
        return verdict
