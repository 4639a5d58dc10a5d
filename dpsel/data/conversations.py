"""`Conversations`: a pool's messages held as one Arrow list array, read as Python lists of dicts on demand.

Selection reads its pool as a sequence of conversations (`list[dict]` per row). Built as Python objects up front,
a row costs about a kilobyte (a list, two dicts, their strings), a gigabyte at 1M rows for the whole run; held
in Arrow it costs its text plus offsets, and a row becomes Python objects only while a caller looks at it
(iteration converts a chunk of rows at a time). It is a read-only `Sequence`: len, indexing, slices (lists),
iteration; `+` with a list gives a list.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import pyarrow as pa

CHUNK_ROWS = 8192   # rows turned into Python objects at a time while iterating


class Conversations(Sequence):
    def __init__(self, array: pa.Array | pa.ChunkedArray):
        self.array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self.array.slice(start, max(0, stop - start)).to_pylist()
            return [self[i] for i in range(start, stop, step)]
        index = operator.index(index)   # numpy integers too
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"conversation {index} of {len(self)}")
        return self.array[index].as_py()

    def __iter__(self):
        for start in range(0, len(self), CHUNK_ROWS):
            yield from self.array.slice(start, CHUNK_ROWS).to_pylist()

    def __add__(self, other) -> list:
        return list(self) + list(other)

    def __radd__(self, other) -> list:
        return list(other) + list(self)

    def __repr__(self) -> str:
        return f"Conversations({len(self)} rows)"
