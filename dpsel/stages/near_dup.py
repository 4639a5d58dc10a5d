"""Near-duplicates: MinHash-LSH over word shingles of the normalised conversation.

How: each row's word 5-shingles (64-bit hashes, `base.shingle_hashes`) go to `rensa`'s Rust MinHash
(`digest_matrix_from_flat_token_hashes`; measured ~13 µs/row with the conversion to numpy, against
~280 µs/row for `datasketch`'s `update_batch` on the same pre-hashed shingles). Only two things per row
are kept: `bands` 32-bit band keys and a `num_perm`-byte sketch (the low 8 bits of every MinHash value,
"b-bit MinHash"). Rows sharing a band key in any band are candidates (a star from the band group's first
row); a candidate pair is kept when its b-bit estimate of Jaccard reaches `verify_threshold` (this drops
the band-collision false positives that LSH alone keeps, while a pair at the threshold passes 98% of the
time); clusters are the connected components of the kept pairs, and each cluster keeps its first row in
input order (previously curated rows, the `seen` index, come before every new row), so the keeper never
depends on anything but row order.

Memory (state, per row): bands*4 + num_perm + 20 (id; longer ids widen it) bytes = 220 bytes at the
defaults (threshold 0.8, 128 permutations: 18 bands of 7 rows). Signatures are computed in chunks and
never held whole; the index is filled in place and compacted in place, so a run holds one copy of it
plus the clustering's temporaries (per row: sort order and labels, ~30 bytes; 8 bytes per candidate
pair). Measured peak at 1M rows: see benchmarks/results/dedup.md.
"""
from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import rensa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dpsel.data.schema import ID_COLUMN
from dpsel.stages.base import (Block, ConversationBatch, Verdict, flat_hashes, map_blocks, shingle_hashes, splitmix64,
                               words_of)

REASON = "near_duplicate"
SEED = 20250101
CHUNK_ROWS = 2048     # rensa's digests come back as Python lists: ~40 bytes a value while converted
ID_BYTES = 20
RECALL_AT_THRESHOLD = 0.98   # of a pair at exactly the threshold: by the bands, and again by the check
CHANCE = 1 / 256             # two unrelated 8-bit sketch values agree this often


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


@dataclass
class NearDupIndex:
    """The kept state of curated rows: ids (`S20`), band keys (rows × bands, uint32), sketches (rows ×
    num_perm, uint8). Saved as one .npz so `dpsel filter` can drop near-duplicates of curated rows."""
    ids: np.ndarray
    bands: np.ndarray
    sketch: np.ndarray

    @classmethod
    def empty(cls, bands: int, num_perm: int) -> NearDupIndex:
        return cls(np.zeros(0, f"S{ID_BYTES}"), np.zeros((0, bands), np.uint32), np.zeros((0, num_perm), np.uint8))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.bands.nbytes + self.sketch.nbytes

    def compact(self, rows: np.ndarray, chunk: int = 65536) -> None:
        """Keep only `rows` (ascending), moved down in place chunk by chunk: no second copy of the index
        (row k goes to a position <= k, and positions written never hold rows still to be read)."""
        for name in ("ids", "bands", "sketch"):
            array = getattr(self, name)
            for start in range(0, len(rows), chunk):
                part = rows[start:start + chunk]
                array[start:start + len(part)] = array[part]
            setattr(self, name, array[:len(rows)])

    def save(self, path) -> None:
        np.savez(path, ids=self.ids, bands=self.bands, sketch=self.sketch)

    @classmethod
    def load(cls, path) -> NearDupIndex:
        with np.load(path) as f:
            return cls(f["ids"], f["bands"], f["sketch"])


class SpilledSketch:
    """Sketches appended to a file in row order instead of held in memory (`filter` on a pool: 128 bytes a row
    that only the few rows in candidate pairs are ever read back for). Stands in for `NearDupIndex.sketch`:
    `index.sketch[at:at + n] = block` appends; `take(rows)` reads the given rows back."""

    READ_ROWS = 65536      # rows read back at a time (8 MB at 128 bytes a row)

    def __init__(self, path, width: int):
        self.path, self.width, self.rows = path, width, 0
        self._handle = open(path, "wb")

    def __len__(self) -> int:
        return self.rows

    def __setitem__(self, where: slice, values: np.ndarray) -> None:
        if where.start != self.rows:
            raise RuntimeError(f"spilled sketches are written in row order: row {where.start}, expected {self.rows}")
        self._handle.write(np.ascontiguousarray(values, np.uint8).tobytes())
        self.rows += len(values)

    def __getitem__(self, where: slice) -> SpilledSketch:
        if where != slice(None, self.rows):
            raise RuntimeError("a spilled sketch is read back with take(), not sliced")
        return self

    def take(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), width] uint8 of `rows` (ascending, unique), read a chunk of the file at a time."""
        self._handle.flush()
        out = np.empty((len(rows), self.width), np.uint8)
        with open(self.path, "rb") as handle:
            for start in range(0, self.rows, self.READ_ROWS):
                lo, hi = np.searchsorted(rows, [start, start + self.READ_ROWS])
                if lo == hi:
                    continue
                handle.seek(start * self.width)
                chunk = np.frombuffer(handle.read(min(self.READ_ROWS, self.rows - start) * self.width), np.uint8)
                out[lo:hi] = chunk.reshape(-1, self.width)[rows[lo:hi] - start]
        return out

    def close(self) -> None:
        self._handle.close()


def _band_keys(signature: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Hash each band's `rows` MinHash values into one 32-bit key (chance collisions are verified away)."""
    grouped = signature[:, :bands * rows].reshape(len(signature), bands, rows).astype(np.uint64)
    key = np.zeros(grouped.shape[:2], np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            key = splitmix64(key * np.uint64(0x100000001B3) + grouped[:, :, r])
    return (key >> np.uint64(32)).astype(np.uint32)


TEXT, BANDS, SKETCH, EMPTY = "text", "bands", "sketch", "empty"


def sign_block(block: pa.Table, *, ngram: int, num_perm: int, bands: int, band_rows: int) -> pa.Table:
    """One block of row texts -> per row its LSH band keys, its b-bit sketch and whether it has no words.
    A module-level function of one block, so an engine can run it anywhere (`base.map_blocks`)."""
    tokens, offsets = flat_hashes(words_of(block.column(TEXT).combine_chunks()))
    shingles, row_offsets = shingle_hashes(tokens, offsets, ngram)
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(shingles, row_offsets.astype(np.uint64),
                                                                 num_perm, SEED)
    signature = np.array(matrix.to_rows(), np.uint32).reshape(-1, num_perm)
    return pa.table({BANDS: _as_fixed_binary(_band_keys(signature, bands, band_rows)),
                     SKETCH: _as_fixed_binary((signature & 0xFF).astype(np.uint8)),
                     EMPTY: pa.array(np.diff(row_offsets) == 0)})


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


class NearDup(Block):
    name = "near_dup"

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seen: NearDupIndex | None = None):
        super().__init__()
        if not 0 < threshold <= 1:
            raise ValueError(f"near-dup threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        self.bands, self.band_rows = lsh_bands(threshold, num_perm)
        self.verify_at = verify_threshold(threshold, num_perm)
        # rows kept so far (the given seen index, then every batch's kept rows): later batches are
        # deduplicated against earlier ones, and `index.save` hands the state to a later run
        self.index = seen if seen is not None else NearDupIndex.empty(self.bands, num_perm)

    @property
    def bytes_per_row(self) -> int:
        return self.bands * 4 + self.num_perm + ID_BYTES

    def grown(self, index: NearDupIndex, rows: ConversationBatch, capacity: int = 0) -> NearDupIndex:
        """`index` with room for `capacity` more entries (their contents unset) and ids wide enough for `rows`'
        ids (ids are never cut); `index` itself when it already has both."""
        longest = pc.max(pc.binary_length(rows.table.column(ID_COLUMN))).as_py() or 0
        width = max(ID_BYTES, index.ids.dtype.itemsize, longest)
        if width == index.ids.dtype.itemsize and capacity == 0:
            return index
        size, n = len(index) + capacity, len(index)
        spilled = isinstance(index.sketch, SpilledSketch)     # appended to as rows are signed: nothing to copy
        out = NearDupIndex(np.empty(size, f"S{width}"), np.empty((size, self.bands), np.uint32),
                           index.sketch if spilled else np.empty((size, self.num_perm), np.uint8))
        out.ids[:n], out.bands[:n] = index.ids, index.bands
        if not spilled:
            out.sketch[:n] = index.sketch
        return out

    def sign_into(self, index: NearDupIndex, empty: np.ndarray, at: int, rows: ConversationBatch) -> int:
        """Fill entries `at`.. of `index` (allocated by `grown`) with `rows`' ids and signatures, block by
        block (no second copy of the new entries is ever held), and `empty[at:]` with whether a row has no
        words at all (such rows never match); returns the next free entry. The signatures are computed by the
        installed block map (`base.map_blocks`: this process, or Ray actors)."""
        index.ids[at:at + len(rows)] = [i.encode() for i in rows.ids.tolist()]
        sign = functools.partial(sign_block, ngram=self.ngram, num_perm=self.num_perm, bands=self.bands,
                                 band_rows=self.band_rows)
        start = at
        for block in map_blocks(sign, pa.table({TEXT: rows.text}), CHUNK_ROWS):
            n = block.num_rows
            index.bands[at:at + n] = _fixed_width(block.column(BANDS), np.uint32, self.bands)
            index.sketch[at:at + n] = _fixed_width(block.column(SKETCH), np.uint8, self.num_perm)
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

    def keepers(self, everything: NearDupIndex, empty: np.ndarray, seen: int) -> tuple[np.ndarray, np.ndarray]:
        """Per entry of `everything` (the `seen` earlier entries, then new rows), the entry kept in its place
        (itself when it is no duplicate). A new row already among the seen entries (`filter` on rows that were
        curated) is that row again, judged before: it never matches (so keeps its verdict); also returned, per new
        row, is whether it is such a row."""
        again = np.isin(everything.ids[seen:], everything.ids[:seen]) if seen else np.zeros(len(empty), bool)
        empty[seen:] |= again
        return self._keepers(everything, empty), again

    def decide(self, rows: ConversationBatch, **_) -> Verdict:
        seen = len(self.index)
        everything, empty = self.extended(rows)
        self.index = everything              # the old index is no longer referenced: freed
        keeper, again = self.keepers(everything, empty, seen)
        verdict, duplicate = verdict_of(everything, keeper[seen:], seen)
        # a row seen before is not added twice
        everything.compact(np.concatenate([np.arange(seen), seen + np.flatnonzero(~duplicate & ~again)]))
        return verdict

    def _keepers(self, index: NearDupIndex, skip: np.ndarray) -> np.ndarray:
        """Per row, the first row (input order) of its cluster."""
        n = len(index)
        pairs = self._candidates(index.bands, skip)
        pairs = pairs[self._similar(index.sketch, pairs)]
        graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        _, labels = connected_components(graph, directed=False)
        first = np.full(labels.max() + 1 if n else 0, n, np.int64)
        np.minimum.at(first, labels, np.arange(n))
        return first[labels]

    def _candidates(self, bands: np.ndarray, skip: np.ndarray) -> np.ndarray:
        """Unique (row, star centre) pairs: each row against the first row of every band group it is in."""
        n, live = len(bands), np.flatnonzero(~skip)
        unique = np.zeros(0, np.int64)
        if len(live) < 2:                    # no pair to form (an empty file, or every row skipped)
            return np.zeros((0, 2), np.int64)
        for band in range(bands.shape[1]):   # merged band by band: pairs repeat across bands
            order = live[np.argsort(bands[live, band], kind="stable")]
            values = bands[order, band]
            starts = np.concatenate([[True], values[1:] != values[:-1]])
            centre = order[np.flatnonzero(starts)[np.cumsum(starts) - 1]]
            unique = np.union1d(unique, order[~starts].astype(np.int64) * n + centre[~starts])
        return np.stack([unique // max(n, 1), unique % max(n, 1)], axis=1)

    def _similar(self, sketch: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """b-bit MinHash estimate of each pair's Jaccard >= `verify_at` (chance agreement removed)."""
        keep = np.zeros(len(pairs), bool)
        if isinstance(sketch, SpilledSketch):     # read back only the rows that are in a pair
            rows = np.unique(pairs)
            sketch, pairs = sketch.take(rows), np.searchsorted(rows, pairs)
        for start in range(0, len(pairs), 65536):
            a, b = pairs[start:start + 65536].T
            agree = (sketch[a] == sketch[b]).mean(axis=1)
            keep[start:start + 65536] = (agree - CHANCE) / (1 - CHANCE) >= self.verify_at - 1e-9
        return keep


def verdict_of(index: NearDupIndex, keeper: np.ndarray, first: int) -> tuple[Verdict, np.ndarray]:
    """The verdict of entries `first`.. of `index` given each one's keeper entry; and which are duplicates."""
    verdict = Verdict.keep_all(len(keeper))
    duplicate = keeper != np.arange(first, first + len(keeper))
    verdict.reason[duplicate] = REASON
    verdict.dup_of[duplicate] = [i.decode() for i in index.ids[keeper[duplicate]].tolist()]
    return verdict, duplicate


class NearDupVerdicts(Block):
    """The near-dup stage of a streamed run, whose clustering ran once over all rows beforehand (so each row's
    verdict is the one the whole input in one batch gets): hands out the verdicts of the rows it is given,
    in order, batch after batch. `index` holds the seen entries then the new rows; `keeper` their keepers."""
    name = NearDup.name

    def __init__(self, index: NearDupIndex, keeper: np.ndarray, seen: int, stats=None):
        super().__init__()
        self.index, self.keeper, self.at = index, keeper, seen
        if stats is not None:
            self.stats = stats

    def decide(self, rows: ConversationBatch, **_) -> Verdict:
        keeper = self.keeper[self.at:self.at + len(rows)]
        if len(keeper) != len(rows):
            raise RuntimeError("near-dup: more rows than were signed")
        verdict, _ = verdict_of(self.index, keeper, self.at)
        self.at += len(rows)
        return verdict
