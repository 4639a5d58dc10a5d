"""Reading an input: `iter_batches` streams it as normalised batches (memory: one batch plus the duplicate
index), `read_instruction_set` holds it whole as one Arrow table plus row-aligned arrays."""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

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
    for plan, batch, start, in_file, rows, (ids, problems, overrides) in _prepared(planned, batch_rows):
        first_seen = None
        if mark_duplicates:
            valid = np.ones(batch.num_rows, dtype=bool)
            valid[list(problems)] = False
            first_seen = seen.first_rows(ids, start + np.arange(batch.num_rows), valid)
        yield NormalizedBatch(plan.file, plan.shape, batch, start, in_file, rows, ids, problems, overrides,
                              first_seen)


READ_AHEAD_ROWS = 65536   # rows read and prepared ahead of the batch the caller holds (bounded memory),
READ_AHEAD_BATCHES = 4    # and no more batches than this (small batches)
PREPARE_THREADS = 2  # batches prepared at once: the work is Arrow kernels and polars, mostly off the GIL


def _prepared(planned: list[PlannedFile], batch_rows: int) -> Iterator[tuple]:
    """(plan, batch, input row, row in file, normal rows, verdicts) per batch, in input order.

    One thread reads (Parquet decoding, in order); PREPARE_THREADS threads do each batch's own work (UTF-8
    check, normal rows, canonical text and ids), up to READ_AHEAD_ROWS rows and READ_AHEAD_BATCHES batches
    (at least one batch per thread) ahead of the caller, whose own work (the duplicate index, writing) overlaps
    theirs. Errors surface in input order: a batch's own when the caller reaches it, a read error after every
    batch read before it."""
    def batches():
        start = 0
        for plan in planned:
            in_file = 0
            for batch in _read_batches(plan, batch_rows):
                yield plan, batch, start, in_file
                start += batch.num_rows
                in_file += batch.num_rows

    def prepare(read: Future):
        item = read.result()
        if item is None:
            return None
        plan, batch, start, in_file = item
        _check_utf8(batch, plan.file, start, in_file)
        rows = normal_rows(batch, plan.shape)
        return plan, batch, start, in_file, rows, verdicts(batch, rows)

    source = batches()
    with ThreadPoolExecutor(1, "dpsel-read") as reader, ThreadPoolExecutor(PREPARE_THREADS, "dpsel-prep") as workers:
        def submit() -> Future:      # reads run one at a time, in submission order: batch k is the k-th read
            return workers.submit(prepare, reader.submit(next, source, None))

        ahead = max(PREPARE_THREADS, min(READ_AHEAD_BATCHES, READ_AHEAD_ROWS // max(batch_rows, 1)))
        pending = deque(submit() for _ in range(ahead))
        try:
            while (item := pending.popleft().result()) is not None:
                pending.append(submit())
                yield item
        finally:
            for future in pending:
                future.cancel()


def _concat(tables: list[pa.Table], urls: list[str]) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DpselInputError(f"shards have incompatible column types ({exc})", file=", ".join(urls)) from exc


def read_instruction_set(paths, batch_rows: int = 32768) -> InstructionSet:
    """Read the whole input into an `InstructionSet` (see the `dpsel.data` docstring for what raises)."""
    planned = plan_files(expand_paths(paths))
    files = [FileInfo(p.file.url, p.rows, file_sha256(p.file.path, p.file.fs)) for p in planned]
    parts = _Parts(planned)
    for nb in iter_planned(planned, batch_rows):
        parts.add(nb, pa.Table.from_batches([nb.batch]), nb.start_row)
    tables = [p.schema.empty_table() for p in planned]   # keeps columns of files with no rows
    return parts.build(_concat(tables + parts.tables, [p.file.url for p in planned]), files)


def batch_set(nb: NormalizedBatch, planned: list[PlannedFile], files: list[FileInfo],
              schema: pa.Schema) -> InstructionSet:
    """One batch of a streamed input as an `InstructionSet` of its own (rows numbered from 0 within it; its
    `duplicate_of` keeps the input's row numbers), its table conformed to the input's `schema`
    (`input_schema`), so every batch has the columns and types of the whole input read at once."""
    parts = _Parts(planned)
    parts.add(nb, conform(pa.Table.from_batches([nb.batch]), schema), 0)
    return parts.build(parts.tables[0], files)


def input_schema(planned: list[PlannedFile]) -> pa.Schema:
    """The schema `read_instruction_set`'s table has: the files' schemas unified as their tables concatenate."""
    return _concat([p.schema.empty_table() for p in planned], [p.file.url for p in planned]).schema


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns, in its order and types (missing columns null), and its metadata."""
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


class _Parts:
    """Row-aligned arrays of read batches, built into an `InstructionSet`."""

    def __init__(self, planned: list[PlannedFile]):
        self.planned, self.file_of = planned, {p.file.url: i for i, p in enumerate(planned)}
        self.tables, self.ids, self.codes, self.details = [], [], [], []
        self.file_index, self.file_rows, self.duplicate_of = [], [], []
        self.overrides: dict[int, list[dict]] = {}

    def add(self, nb: NormalizedBatch, table: pa.Table, start_row: int) -> None:
        self.tables.append(table)
        self.ids.append(nb.id_array)
        self.codes.append(nb.codes)
        self.details.append(nb.detail_array)
        self.file_index.append(np.full(nb.num_rows, self.file_of[nb.file.url], np.int32))
        self.file_rows.append(nb.start_row_in_file + np.arange(nb.num_rows, dtype=np.int64))
        self.duplicate_of.append(nb.duplicate_of)
        self.overrides.update({start_row + k: m for k, m in nb.overrides.items()})

    def build(self, table: pa.Table, files: list[FileInfo]) -> InstructionSet:
        def joined(parts, empty):
            return np.concatenate(parts) if parts else empty
        return InstructionSet(
            table, list(table.column_names), self.planned[0].shape, files,
            ids=pa.chunked_array(self.ids, pa.string()),   # chunks as read: no second copy of every id
            reasons=REASON_CODES[joined(self.codes, np.zeros(0, np.int8))],
            details=pa.concat_arrays(self.details) if self.details else pa.array([], pa.string()),
            file_index=joined(self.file_index, np.zeros(0, np.int32)),
            file_rows=joined(self.file_rows, np.zeros(0, np.int64)),
            duplicate_of=joined(self.duplicate_of, np.zeros(0, np.int64)), overrides=self.overrides)
