"""One normalised record batch: the rows as read plus each row's id, verdict and detail."""
from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpsel.data.columnar import NormalRows, messages_with_overrides
from dpsel.data.paths import ResolvedFile
from dpsel.data.reasons import REASON_CODES
from dpsel.data.reference import RowProblem
from dpsel.data.schema import Shape
from dpsel.errors import DpselInputError


class NormalizedBatch:
    """A record batch of one file, as read (`batch`), with each row's id and verdict as arrays (`id_array`,
    `codes`: 0 usable, 1 invalid, 2 duplicate; `detail_array`) and, built on first use, as lists (`ids`,
    `reasons`, `details`, `problems`, `messages`). `rows` is the batch in columnar normal form, `overrides`
    the messages of the rows the per-row reference built."""

    def __init__(self, file: ResolvedFile, shape: Shape, batch: pa.RecordBatch, start_row: int,
                 start_row_in_file: int, rows: NormalRows, id_array: pa.Array, row_problems: dict[int, RowProblem],
                 overrides: dict[int, list[dict]], first_seen: np.ndarray | None):
        self.file, self.shape, self.batch = file, shape, batch
        self.start_row, self.start_row_in_file = start_row, start_row_in_file
        self.id_array, self.row_problems = id_array, row_problems
        self.rows, self.overrides = rows, overrides
        n = batch.num_rows
        self.codes = np.zeros(n, np.int8)
        self.codes[list(row_problems)] = 1
        details = {k: p.detail for k, p in row_problems.items()}
        if first_seen is not None:
            duplicate = np.flatnonzero((self.codes == 0) & (first_seen >= 0))
            self.codes[duplicate] = 2
            details.update({k: f"same content as input row {first_seen[k]}" for k in duplicate.tolist()})
        self.usable = self.codes == 0
        self.duplicate_of = np.where(self.codes == 2, first_seen if first_seen is not None else -1, -1)
        self.detail_array = _sparse_strings(n, details)

    @property
    def num_rows(self) -> int:
        return self.batch.num_rows

    @functools.cached_property
    def ids(self) -> list[str]:
        return self.id_array.to_pylist()

    @functools.cached_property
    def reasons(self) -> list[str]:
        return REASON_CODES[self.codes].tolist()

    @functools.cached_property
    def details(self) -> list[str]:
        return self.detail_array.to_pylist()

    @functools.cached_property
    def problems(self) -> list[RowProblem | None]:
        return [self.row_problems.get(k) for k in range(self.num_rows)]

    @functools.cached_property
    def messages(self) -> list[list[dict]]:
        """Normalised messages of every row (invalid rows: as far as they could be read)."""
        return messages_with_overrides(self.rows, np.arange(self.num_rows), self.overrides)

    def first_error(self) -> DpselInputError | None:
        """The strict-mode error for the first invalid row, if any."""
        if not self.row_problems:
            return None
        offset = min(self.row_problems)
        return self.error_for(offset, self.row_problems[offset])

    def error_for(self, offset: int, problem: RowProblem) -> DpselInputError:
        """The strict-mode error for the row at `offset` in this batch."""
        row = self.start_row + offset
        return DpselInputError(f"{problem.detail} (input row {row}; row {self.start_row_in_file + offset} "
                               f"of this file)", file=self.file.url, column=problem.column, row=row)


def _sparse_strings(n: int, values: dict[int, str]) -> pa.Array:
    """A string array of n empty strings, with `values` at their positions."""
    empty = pa.array(np.full(n, "", dtype=object), pa.string()) if n else pa.array([], pa.string())
    if not values:
        return empty
    mask = np.zeros(n, dtype=bool)
    mask[list(values)] = True
    return pc.replace_with_mask(empty, pa.array(mask), pa.array([values[k] for k in sorted(values)], pa.string()))
