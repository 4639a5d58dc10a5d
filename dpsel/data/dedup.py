"""The exact-duplicate index: the first usable row of every `dpsel_id`, in ~18 bytes per id."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpsel.data.arrays import numpy_bool, take_rows, value_offsets
from dpsel.data.normalize import ID_HEX_CHARS


class SeenIds:
    """The first usable row of every id seen so far, exact, in ~18 bytes per id (ids are stored as the
    10 bytes their 20 hex chars spell, plus the row number; any other id spelling goes to a dict).

    Lookups and inserts are vectorised per batch: sorted arrays, `searchsorted`, and a merge per batch
    (a stable sort of two sorted runs, linear time)."""

    def __init__(self) -> None:
        self._hi = np.zeros(0, np.uint64)      # first 8 key bytes, big-endian: sorted
        self._lo = np.zeros(0, np.uint16)      # last 2 key bytes
        self._row = np.zeros(0, np.int64)
        self._other: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._hi) + len(self._other)

    def first_rows(self, ids: pa.Array | list[str], rows: np.ndarray, register: np.ndarray) -> np.ndarray:
        """For each id: the row it was first seen on (-1 if new). Ids with `register` set that are new are
        recorded with their row (the first of them if one repeats within the batch)."""
        ids_arr = pa.array(ids, pa.large_string()) if isinstance(ids, list) else ids.cast(pa.large_string())
        hexlike = numpy_bool(pc.match_substring_regex(ids_arr, f"^[0-9a-f]{{{ID_HEX_CHARS}}}$"))
        first = np.full(len(ids_arr), -1, np.int64)
        hex_idx = np.flatnonzero(hexlike)
        if len(hex_idx):
            first[hex_idx] = self._hex(take_rows(ids_arr, hex_idx, len(ids_arr)), rows[hex_idx], register[hex_idx])
        for k in np.flatnonzero(~hexlike).tolist():
            key = ids_arr[k].as_py()
            if key in self._other:
                first[k] = self._other[key]
            elif register[k]:
                self._other[key] = int(rows[k])
        return first

    def _hex(self, ids: pa.Array, rows: np.ndarray, register: np.ndarray) -> np.ndarray:
        offsets = value_offsets(ids)
        raw = bytes.fromhex(memoryview(ids.buffers()[2])[offsets[0]:offsets[-1]].tobytes().decode("ascii"))
        keys = np.frombuffer(raw, np.dtype([("hi", ">u8"), ("lo", ">u2")]))
        hi, lo = keys["hi"].astype(np.uint64), keys["lo"].astype(np.uint16)
        first = self._lookup(hi, lo)
        # new keys, first occurrence within the batch wins
        new = np.flatnonzero((first < 0) & register)
        if len(new):
            order = np.lexsort((new, lo[new], hi[new]))
            sorted_new = new[order]
            head = np.ones(len(sorted_new), bool)
            head[1:] = (hi[sorted_new][1:] != hi[sorted_new][:-1]) | (lo[sorted_new][1:] != lo[sorted_new][:-1])
            group = np.cumsum(head) - 1
            leader = sorted_new[head][group]          # first row of each key's group, for every member
            first[sorted_new[~head]] = rows[leader[~head]]
            self._insert(hi[sorted_new[head]], lo[sorted_new[head]], rows[sorted_new[head]])
        # rows not registered (invalid) but equal to a key registered earlier in this batch are not marked:
        # an invalid row is never a duplicate, callers only read `first` for usable rows
        return first

    def _lookup(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        first = np.full(len(hi), -1, np.int64)
        if not len(self._hi):
            return first
        order = np.argsort(hi, kind="stable")     # sorted needles: the binary searches walk memory in order
        left = np.empty(len(hi), np.int64)
        left[order] = np.searchsorted(self._hi, hi[order], "left")   # one binary search per id, not two
        inside = np.minimum(left, len(self._hi) - 1)
        found = self._hi[inside] == hi
        nxt = np.minimum(left + 1, len(self._hi) - 1)
        shared = found & (left + 1 < len(self._hi)) & (self._hi[nxt] == hi)   # 64-bit prefix shared: compare all
        single = np.flatnonzero(found & ~shared)
        hit = single[self._lo[left[single]] == lo[single]]
        first[hit] = self._row[left[hit]]
        for k in np.flatnonzero(shared):
            right = np.searchsorted(self._hi, hi[k], "right")
            match = np.flatnonzero(self._lo[left[k]:right] == lo[k])
            if len(match):
                first[k] = self._row[left[k] + match[0]]
        return first

    def _insert(self, hi, lo, rows) -> None:
        """Insert new keys (sorted by `hi`) keeping the arrays sorted; peak memory: old + new arrays."""
        at = np.searchsorted(self._hi, hi, "right")
        self._hi, self._lo, self._row = (np.insert(a, at, b) for a, b in ((self._hi, hi), (self._lo, lo),
                                                                          (self._row, rows)))
