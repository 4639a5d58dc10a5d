"""Reading an input: `iter_batches` streams it as normalised batches (memory: one batch plus the duplicate
index), `read_instruction_set` holds it whole as one Arrow table plus row-aligned arrays."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from dpsel.data.batch import NormalizedBatch
from dpsel.data.columnar import normal_rows, verdicts
from dpsel.data.dedup import SeenIds
from dpsel.data.instruction_set import FileInfo, InstructionSet
from dpsel.data.paths import ResolvedFile, expand_paths
from dpsel.data.reasons import REASON_CODES
from dpsel.data.schema import PlannedFile, open_parquet, plan_files
from dpsel.errors import DpselInputError
from dpsel.io import file_sha256


def _check_utf8(batch: pa.RecordBatch, file: ResolvedFile, start_row: int, start_in_file: int) -> None:
    """Parquet readers do not check UTF-8; find the first undecodable value so the error can name it."""
    try:
        batch.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    for column in batch.schema.names:
        for offset, value in enumerate(batch.column(column)):
            try:
                value.as_py()
            except UnicodeDecodeError as exc:
                raise DpselInputError(
                    f"invalid UTF-8 in text ({exc.reason}) (input row {start_row + offset}; "
                    f"row {start_in_file + offset} of this file)",
                    file=file.url, column=column, row=start_row + offset) from exc
    raise DpselInputError("column data failed Arrow validation", file=file.url)


def _read_batches(planned: PlannedFile, batch_rows: int) -> Iterator[pa.RecordBatch]:
    url = planned.file.url
    with planned.file.open() as handle:
        parquet = open_parquet(handle, url)
        try:
            yield from parquet.iter_batches(batch_size=batch_rows)
        except (pa.ArrowException, OSError) as exc:
            raise DpselInputError(f"corrupt Parquet data ({exc})", file=url) from exc


def iter_batches(paths, batch_rows: int = 8192, *, mark_duplicates: bool = True) -> Iterator[NormalizedBatch]:
    """Stream the input as normalised batches (one file's rows each; memory ~ one batch + ~18 bytes per
    distinct id seen).

    Structural problems raise `DpselInputError` (all footers are checked before the first batch);
    row problems are returned as reason "invalid" with a detail; with `mark_duplicates`, rows whose id
    was already seen on a usable row get reason "duplicate"."""
    yield from iter_planned(plan_files(expand_paths(paths)), batch_rows, mark_duplicates)


def iter_planned(planned: list[PlannedFile], batch_rows: int, mark_duplicates: bool = True
                  ) -> Iterator[NormalizedBatch]:
    seen = SeenIds()
    start = 0
    for plan in planned:
        in_file = 0
        for batch in _read_batches(plan, batch_rows):
            _check_utf8(batch, plan.file, start, in_file)
            rows = normal_rows(batch, plan.shape)
            ids, problems, overrides = verdicts(batch, rows)
            first_seen = None
            if mark_duplicates:
                valid = np.ones(batch.num_rows, dtype=bool)
                valid[list(problems)] = False
                first_seen = seen.first_rows(ids, start + np.arange(batch.num_rows), valid)
            yield NormalizedBatch(plan.file, plan.shape, batch, start, in_file, rows, ids, problems, overrides,
                                  first_seen)
            start += batch.num_rows
            in_file += batch.num_rows


def _concat(tables: list[pa.Table], urls: list[str]) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DpselInputError(f"shards have incompatible column types ({exc})", file=", ".join(urls)) from exc


def read_instruction_set(paths, batch_rows: int = 65536) -> InstructionSet:
    """Read the whole input into an `InstructionSet` (see the `dpsel.data` docstring for what raises)."""
    planned = plan_files(expand_paths(paths))
    tables = [p.schema.empty_table() for p in planned]   # keeps columns of files with no rows
    ids, codes, details, file_index, file_rows, duplicate_of = [], [], [], [], [], []
    overrides: dict[int, list[dict]] = {}
    file_of = {p.file.url: i for i, p in enumerate(planned)}
    for nb in iter_planned(planned, batch_rows):
        tables.append(pa.Table.from_batches([nb.batch]))
        ids.append(nb.id_array)
        codes.append(nb.codes)
        details.append(nb.detail_array)
        file_index.append(np.full(nb.num_rows, file_of[nb.file.url], np.int32))
        file_rows.append(nb.start_row_in_file + np.arange(nb.num_rows, dtype=np.int64))
        duplicate_of.append(nb.duplicate_of)
        overrides.update({nb.start_row + k: m for k, m in nb.overrides.items()})
    table = _concat(tables, [p.file.url for p in planned])
    files = [FileInfo(p.file.url, p.rows, file_sha256(p.file.path, p.file.fs)) for p in planned]

    def joined(parts, empty):
        return np.concatenate(parts) if parts else empty
    return InstructionSet(
        table, list(table.column_names), planned[0].shape, files,
        ids=pa.chunked_array(ids, pa.string()),   # chunks as read: no second copy of every id
        reasons=REASON_CODES[joined(codes, np.zeros(0, np.int8))],
        details=pa.concat_arrays(details) if details else pa.array([], pa.string()),
        file_index=joined(file_index, np.zeros(0, np.int32)), file_rows=joined(file_rows, np.zeros(0, np.int64)),
        duplicate_of=joined(duplicate_of, np.zeros(0, np.int64)), overrides=overrides)
