"""The block protocol of the curation stages: a batch of rows in, a verdict per row out, statistics kept.

A block (datatrove-style) sees `ConversationBatch` (a pyarrow Table of normalised rows: `dpsel_id` and the chat
messages, `dpsel_messages` as the reader writes them or `messages`) and returns a `Verdict`: per row a
reason ("" = kept) and, for duplicates, `dup_of`, the `dpsel_id` of the row kept in its place. It may add
columns (`dpsel_pii`, redacted messages). `Block.__call__` times the work and keeps `StageStats`.

A row's text is its normalised conversation: the contents of its messages joined by newlines. Blocks that
compare words use `words_of` (lower-cased, punctuation to spaces, split on whitespace), 64-bit word hashes
(`hash_strings`) and n-word window hashes (`shingle_hashes`), per chunk of rows where memory matters.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpsel.data.arrays import value_offsets
from dpsel.data.schema import ID_COLUMN  # the one home of the id column's name

MESSAGE_COLUMNS = ("dpsel_messages", "messages")
_PUNCTUATION = r"[^\p{L}\p{N}\s]+"


def _combined(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()   # one chunk: no copy
    return column


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser over a uint64 array: spreads weak polynomial hashes over all 64 bits."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hash_strings(strings: pa.Array) -> np.ndarray:
    """A stable 64-bit hash of every value of a string array, vectorised over its bytes (no Python loop):
    a polynomial over the UTF-8 bytes summed per value, then `splitmix64`."""
    strings = pc.cast(strings, pa.large_string()) if len(strings) else pa.array([], pa.large_string())
    strings = pc.fill_null(strings, "")
    offsets = value_offsets(strings)
    data = np.frombuffer(strings.buffers()[2], np.uint8) if strings.buffers()[2] else np.zeros(0, np.uint8)
    data = data[offsets[0]:offsets[-1]].astype(np.uint64)
    offsets = offsets - offsets[0]
    lengths = np.diff(offsets)
    if not len(data):
        return splitmix64(lengths.astype(np.uint64))
    position = np.arange(len(data)) - np.repeat(offsets[:-1], lengths)
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(int(lengths.max()), np.uint64(0x100000001B3))).astype(np.uint64)
        terms = (data + np.uint64(1)) * powers[position]
        sums = np.zeros(len(lengths), np.uint64)
        nonempty = lengths > 0
        sums[nonempty] = np.add.reduceat(terms, offsets[:-1][nonempty])
        return splitmix64(sums + lengths.astype(np.uint64))


_BASE = 0x9E3779B97F4A7C15            # odd, so invertible modulo 2**64
_BASE_INVERSE = pow(_BASE, -1, 2**64)


def _powers(base: int, n: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.concatenate([[np.uint64(1)], np.cumprod(np.full(n, np.uint64(base)))]).astype(np.uint64)


def shingle_hashes(tokens: np.ndarray, offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the n-token windows of every row (flat token hashes, row offsets) -> (hashes, offsets).
    A row shorter than n tokens gives one window of all its tokens; a row without tokens gives none.
    A window's hash is sum(t[i+k] * B**k) mod 2**64 (order matters), read off prefix sums in O(tokens)
    whatever n is, so an L-token window hashes alike from any call; then `splitmix64`."""
    hashes, rows = window_hashes(tokens, offsets, (n,))[0]
    counts = np.bincount(rows, minlength=len(offsets) - 1)
    return hashes, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def window_hashes(tokens: np.ndarray, offsets: np.ndarray, sizes: Iterable[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per window size in `sizes`: the (hashes, row) of the windows `shingle_hashes` gives, sharing the prefix
    sums (one pass over the tokens for every size)."""
    lengths = np.diff(offsets)
    row = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(len(tokens)) - offsets[:-1][row]
    left = lengths[row] - position               # tokens from each position to its row's end
    with np.errstate(over="ignore"):
        prefix = np.concatenate([[np.uint64(0)], np.cumsum(tokens * _powers(_BASE, len(tokens))[:-1])])
        inverse = _powers(_BASE_INVERSE, len(tokens))
    found = []
    for n in sizes:
        start = np.flatnonzero((left >= n) | ((position == 0) & (left < n)))
        end = start + np.minimum(left[start], n)
        with np.errstate(over="ignore"):
            windows = (prefix[end] - prefix[start]) * inverse[start]
        found.append((splitmix64(windows.astype(np.uint64)), row[start]))
    return found


class ConversationBatch:
    """A batch of normalised rows and the views of it the blocks share (each built on first use)."""

    def __init__(self, table: pa.Table):
        self.table = table
        names = [c for c in MESSAGE_COLUMNS if c in table.column_names]
        if ID_COLUMN not in table.column_names or not names:
            raise ValueError(f"rows need `{ID_COLUMN}` and one of {MESSAGE_COLUMNS}; got {table.column_names}")
        self.message_column = names[0]

    def __len__(self) -> int:
        return self.table.num_rows

    @functools.cached_property
    def ids(self) -> np.ndarray:
        return np.asarray(self.table.column(ID_COLUMN).to_pylist(), dtype=object)

    @functools.cached_property
    def messages(self) -> pa.ListArray:
        return _combined(self.table.column(self.message_column))

    @functools.cached_property
    def text(self) -> pa.Array:
        """The normalised conversation: message contents joined by newlines (the per-row lists of
        contents are not kept: they would double the batch's text in memory)."""
        lists = self.messages
        flat = pc.fill_null(pc.struct_field(lists.flatten(), "content"), "")
        contents = pa.ListArray.from_arrays(pc.subtract(lists.offsets, lists.offsets[0]), flat)
        return pc.binary_join(contents, "\n")

    @functools.cached_property
    def words(self) -> pa.ListArray:
        return words_of(self.text)

    @functools.cached_property
    def question(self) -> pa.Array:
        return role_text(self.messages, "user")

    @functools.cached_property
    def answer(self) -> pa.Array:
        return role_text(self.messages, "assistant")


def role_of(messages: pa.ListArray, role: str) -> np.ndarray:
    """Per message of `messages` (flat): whether it is a `role` turn."""
    return np.asarray(pc.fill_null(pc.equal(pc.struct_field(messages.flatten(), "role"), role), False), bool)


def role_text(messages: pa.ListArray, role: str) -> pa.Array:
    """Per row, the contents of its `role` turns joined by newlines ("" where none)."""
    mine = role_of(messages, role)
    offsets = np.asarray(messages.offsets, np.int64)
    kept = np.concatenate([[0], np.cumsum(mine)])[offsets - offsets[0]]
    contents = pc.fill_null(pc.struct_field(messages.flatten(), "content"), "").filter(pa.array(mine))
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(kept, pa.int32()), contents), "\n")


def words_of(text: pa.Array) -> pa.ListArray:
    """Lower-cased words with punctuation treated as space (the normal form every word-based block uses)."""
    spaced = pc.replace_substring_regex(pc.utf8_lower(text), _PUNCTUATION, " ")
    lists = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(spaced))
    offsets = np.asarray(lists.offsets, np.int64)
    flat = lists.values.slice(offsets[0], offsets[-1] - offsets[0])
    nonempty = np.asarray(pc.greater(pc.binary_length(flat), 0), bool)   # "" splits into [""]
    kept = np.concatenate([[0], np.cumsum(nonempty)])[offsets - offsets[0]]
    return pa.ListArray.from_arrays(pa.array(kept, pa.int32()), flat.filter(pa.array(nonempty)))


def flat_hashes(words: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.asarray(words.offsets, np.int64)
    flat = words.values.slice(offsets[0], offsets[-1] - offsets[0])
    return hash_strings(flat), offsets - offsets[0]


@dataclass
class Verdict:
    """What a block says of each row: `reason` ("" kept), `dup_of` (kept row's id, None if not a
    duplicate), `detail` (why, in words, for a dropped row: which rule, which partner, how much overlap; None
    lets the run say "<reason> of <dup_of>"), and columns it adds or replaces (name -> array, one value per row)."""
    reason: np.ndarray
    dup_of: np.ndarray
    columns: dict[str, pa.Array] = field(default_factory=dict)
    detail: np.ndarray | None = None

    @classmethod
    def keep_all(cls, n: int) -> Verdict:
        return cls(np.full(n, "", dtype=object), np.full(n, None, dtype=object),
                   detail=np.full(n, None, dtype=object))

    @property
    def dropped(self) -> np.ndarray:
        return self.reason != ""


@dataclass
class StageStats:
    name: str
    rows_in: int = 0
    dropped: int = 0
    seconds: float = 0.0
    by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, verdict: Verdict, seconds: float) -> None:
        self.rows_in += len(verdict.reason)
        self.dropped += int(verdict.dropped.sum())
        self.seconds += seconds
        reasons, counts = np.unique(verdict.reason[verdict.dropped].astype(str), return_counts=True)
        for reason, count in zip(reasons.tolist(), counts.tolist()):
            self.by_reason[reason] = self.by_reason.get(reason, 0) + count

    def as_dict(self) -> dict:
        return {"stage": self.name, "rows_in": self.rows_in, "dropped": self.dropped,
                "seconds": round(self.seconds, 4), "by_reason": dict(sorted(self.by_reason.items()))}


class Block:
    """One stage: subclasses set `name` and implement `decide(rows, **inputs) -> Verdict`; `overwrites` names the
    input columns its verdict may give new values (the pipeline keeps those of the rows it no longer sees)."""
    name = "block"
    overwrites: tuple[str, ...] = ()

    def __init__(self):
        self.stats = StageStats(self.name)

    def decide(self, rows: ConversationBatch, **inputs) -> Verdict:
        raise NotImplementedError

    def __call__(self, rows: ConversationBatch, **inputs) -> Verdict:
        started = time.perf_counter()
        verdict = self.decide(rows, **inputs)
        if len(verdict.reason) != len(rows):
            raise AssertionError(f"{self.name}: {len(verdict.reason)} verdicts for {len(rows)} rows")
        self.stats.add(verdict, time.perf_counter() - started)
        return verdict


# Where a block's per-row work runs (the near-dup signatures): `map_blocks(fn, table, rows)` gives `fn` of each
# `rows`-row slice of `table`, in order. This process by default; an engine installs its own (`mapping_blocks_on`,
# e.g. Ray actors) — blocks never import an engine, and `fn` is a module-level function (it pickles by reference).
BlockFn = Callable[[pa.Table], pa.Table]
BlockMap = Callable[[BlockFn, pa.Table, int], Iterable[pa.Table]]


def map_in_process(fn: BlockFn, table: pa.Table, rows: int) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, rows):
        yield fn(table.slice(start, rows))


_block_map: ContextVar[BlockMap] = ContextVar("dpsel_block_map", default=map_in_process)


@contextmanager
def mapping_blocks_on(block_map: BlockMap | None) -> Iterator[None]:
    """Within the block, `map_blocks` runs on `block_map` (None: this process)."""
    token = _block_map.set(block_map or map_in_process)
    try:
        yield
    finally:
        _block_map.reset(token)


def map_blocks(fn: BlockFn, table: pa.Table, rows: int) -> Iterable[pa.Table]:
    return _block_map.get()(fn, table, rows)
