"""The whole input in memory: `InstructionSet` (one Arrow table plus row-aligned ids, reasons and details)."""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dpsel.data.columnar import message_array, messages_with_overrides, normal_rows
from dpsel.data.reasons import REASON_DUPLICATE, REASON_INVALID
from dpsel.data.schema import ID_COLUMN, MESSAGE_TYPE, Shape


class IdList(Sequence):
    """Row ids held as Arrow strings (about 25 bytes an id, not a ~75-byte Python string each), read as `str` by
    index or iteration; `pa.array(ids)` and `np.asarray(ids)` convert in one step (`__arrow_array__`,
    `__array__`), not an id at a time."""

    def __init__(self, values: pa.ChunkedArray | pa.Array):
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.values[index].to_pylist()
        return self.values[operator.index(index)].as_py()

    def __iter__(self):
        for start in range(0, len(self.values), 65536):
            yield from self.values.slice(start, 65536).to_pylist()

    def __arrow_array__(self, type=None):
        values = self.values.combine_chunks() if isinstance(self.values, pa.ChunkedArray) else self.values
        return values if type is None else values.cast(type)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.values.to_numpy(zero_copy_only=False), dtype=dtype or object)

    def __eq__(self, other) -> bool:
        return list(self) == list(other) if isinstance(other, (list, IdList)) else NotImplemented


@dataclass(frozen=True)
class FileInfo:
    """One input file: its path or URL as printed in messages, footer row count, sha256 of its bytes."""
    path: str
    rows: int
    sha256: str

    @property
    def url(self) -> str:   # same name as on ResolvedFile, so callers can print either
        return self.path


@dataclass
class InstructionSet:
    """All input rows, in input order, columnar: `table` holds the original columns exactly as read (Arrow
    types kept); `ids`, `reasons`, `details`, `file_index` (into `files`) and `file_rows` (row within its
    file) are row-aligned with it. Messages are built from the table when asked for (`messages`).
    `frame` is a pandas view with the dpsel_* columns, built on first use (costly on big sets)."""
    table: pa.Table
    original_columns: list[str]
    shape: Shape
    files: list[FileInfo]
    ids: pa.ChunkedArray              # one chunk per batch read
    reasons: np.ndarray               # object: "" | "invalid" | "duplicate"
    details: pa.Array
    file_index: np.ndarray
    file_rows: np.ndarray
    duplicate_of: np.ndarray          # int64: for a duplicate, the input row it repeats; -1 otherwise
    overrides: dict[int, list[dict]] = field(default_factory=dict, repr=False)   # reference-path messages
    _frame: pd.DataFrame | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.table.num_rows

    def usable_mask(self) -> np.ndarray:
        return self.reasons == ""

    def id_list(self) -> list[str]:
        return self.ids.to_pylist()

    def file_paths(self) -> np.ndarray:
        """The file (path or URL) of every row, as an object array."""
        return np.array([f.path for f in self.files], dtype=object)[self.file_index]

    def messages(self, mask: Any = None, chunk_rows: int = 65536) -> list[list[dict]]:
        """Normalised messages of all rows, or of the rows where boolean `mask` is true."""
        out: list[list[dict]] = []
        for rows, wanted, local in self._chunks(mask, chunk_rows, False):
            out += messages_with_overrides(rows, wanted, local)
        return out

    def message_array(self, mask: Any = None, chunk_rows: int = 65536, everywhere: bool = False) -> pa.ChunkedArray:
        """`messages` as Arrow (`MESSAGE_TYPE`, one chunk per `chunk_rows`), built columnar: no Python object
        per message. With `everywhere`, one entry per row: an empty list where `mask` is false."""
        chunks = [message_array(rows, wanted, local, MESSAGE_TYPE, everywhere)
                  for rows, wanted, local in self._chunks(mask, chunk_rows, everywhere)]
        return pa.chunked_array(chunks, MESSAGE_TYPE)

    def _chunks(self, mask: Any, chunk_rows: int, everywhere: bool):
        """Per chunk of the wanted rows (of all rows, with `everywhere`): the chunk in normal form, the wanted
        positions in it, and the reference path's messages of its rows (bounded transient Arrow copies)."""
        selected = np.ones(len(self), bool) if mask is None else np.asarray(mask, dtype=bool)
        order = np.arange(len(self)) if everywhere else np.flatnonzero(selected)
        for begin in range(0, len(order), chunk_rows):
            part = order[begin:begin + chunk_rows]
            sub = self.table.slice(begin, len(part)) if everywhere else self.table.take(pa.array(part, pa.int64()))
            rows = normal_rows(sub, self.shape)
            local = {k: self.overrides[g] for k, g in enumerate(part.tolist()) if g in self.overrides}
            rows.clean[list(local)] = False
            yield rows, np.flatnonzero(selected[part]), local

    @property
    def frame(self) -> pd.DataFrame:
        """The original columns (pandas) plus dpsel_id, dpsel_messages, dpsel_reason, dpsel_detail, dpsel_file."""
        if self._frame is None:
            frame = self.table.to_pandas()
            for name, values in ((ID_COLUMN, self.id_list()), ("dpsel_messages", self.messages()),
                                 ("dpsel_reason", self.reasons.tolist()), ("dpsel_detail", self.details.to_pylist()),
                                 ("dpsel_file", self.file_paths().tolist())):
                frame[name] = pd.Series(values, index=frame.index, dtype=object)
            self._frame = frame
        return self._frame

    def usable(self) -> pd.DataFrame:
        """Rows with no drop reason (valid, first occurrence)."""
        return self.frame[self.usable_mask()]

    def counts(self) -> dict[str, int]:
        """Rows by reason: input_rows == usable + invalid + duplicate."""
        return {"input_rows": len(self), "usable": int((self.reasons == "").sum()),
                REASON_INVALID: int((self.reasons == REASON_INVALID).sum()),
                REASON_DUPLICATE: int((self.reasons == REASON_DUPLICATE).sum())}
