"""`Conversations`: a pool's messages held as one Arrow list array, read as Python lists of dicts on demand.

Selection reads its pool as a sequence of conversations (`list[dict]` per row). Built as Python objects up front,
a row costs about a kilobyte (a list, two dicts, their strings), a gigabyte at 1M rows for the whole run; held
in Arrow it costs its text plus offsets, and a row becomes Python objects only while a caller looks at it
(iteration converts a chunk of rows at a time). It is a read-only `Sequence`: len, indexing, slices (lists),
iteration; `+` with a list gives a list. `Conversations.spilled` holds them in a mapped temporary file instead
(`dpsel.data.spill`), the pages a read touched given back after every chunk iterated and every few thousand rows
looked up: the pool's text then costs page cache, not RSS, through a whole selection run.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import pyarrow as pa

from dpsel.data.spill import Mapped, spill_or_hold

CHUNK_ROWS = 8192     # rows turned into Python objects at a time while iterating
LOOKUPS_HELD = 4096   # a spilled pool's rows looked up one by one before their pages are given back


class Conversations(Sequence):
    def __init__(self, array: pa.Array | pa.ChunkedArray, mapped: Mapped | None = None):
        if isinstance(array, pa.ChunkedArray):
            array = array.chunk(0) if array.num_chunks == 1 else array.combine_chunks()
        self.array, self._mapped, self._lookups = array, mapped, 0

    @classmethod
    def spilled(cls, array: pa.Array | pa.ChunkedArray) -> Conversations:
        """The same conversations, read from a mapped temporary file (see the module docstring)."""
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        mapped = spill_or_hold(pa.table({"messages": array}))
        return cls(array) if mapped is None else cls(mapped.table.column(0), mapped)

    def _read(self, rows: int = 1) -> None:
        """After a read: a spilled pool gives back the pages its reads touched, every chunk or `LOOKUPS_HELD` rows."""
        if self._mapped is None:
            return
        self._lookups += rows
        if self._lookups >= LOOKUPS_HELD:
            self._mapped.drop_pages()
            self._lookups = 0

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                out = self.array.slice(start, max(0, stop - start)).to_pylist()
                self._read(len(out))
                return out
            return [self[i] for i in range(start, stop, step)]
        index = operator.index(index)   # numpy integers too
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"conversation {index} of {len(self)}")
        self._read()
        return self.array[index].as_py()

    def __iter__(self):
        for start in range(0, len(self), CHUNK_ROWS):
            chunk = self.array.slice(start, CHUNK_ROWS).to_pylist()
            self._read(LOOKUPS_HELD)
            yield from chunk

    def __add__(self, other) -> list:
        return list(self) + list(other)

    def __radd__(self, other) -> list:
        return list(other) + list(self)

    def __repr__(self) -> str:
        return f"Conversations({len(self)} rows)"
