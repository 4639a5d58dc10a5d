"""The one way a curated table is finished, for the local, streamed and Ray writers alike: the kept rows as
`outputs.curated_table` builds them, plus what the stages decided (their columns such as `dpsel_pii`, and under
`--pii redact` the redacted conversations with every other text column masked)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from dpsel.curation.rows import RunRows
from dpsel.data.schema import MESSAGE_TYPE
from dpsel.outputs import curated_table, set_columns
from dpsel.stages.pii import redact_text_columns

CHUNK_ROWS = 65536   # input rows per part of a whole run's curated.parquet (a row group each)


def finish_curated(table: pa.Table, rows: RunRows, input_rows: np.ndarray) -> pa.Table:
    """`table` (curated rows that are the run's rows `input_rows`, in order) with the stages' verdicts added."""
    taken = pa.array(np.asarray(input_rows, np.int64), pa.int64())
    extra = {}
    if rows.redacted is not None:
        extra["messages"] = rows.redacted.take(taken).cast(MESSAGE_TYPE)
    extra.update({name: values.take(taken) for name, values in rows.stage_columns.items()})
    table = set_columns(table, extra)
    return redact_text_columns(table, skip=("dpsel_id",)) if rows.redacted is not None else table


def curated_rows_table(rows: RunRows, weights: np.ndarray, kept: np.ndarray, ids: pa.Array | None = None) -> pa.Table:
    """The finished curated table of `rows`' `kept` rows (a whole run, or one streamed batch). `ids`: `rows.ids`
    as Arrow, where a caller builds them once for several calls."""
    kept = np.asarray(kept, bool)
    messages = rows.data.message_array(kept) if rows.redacted is None else None   # redacted ones: finish_curated
    table = curated_table(rows.data.table, rows.ids if ids is None else ids, weights, kept, messages)
    return finish_curated(table, rows, np.flatnonzero(kept))


def curated_parts(rows: RunRows, weights: np.ndarray, kept: np.ndarray, chunk_rows: int | None = None):
    """`curated_rows_table` of every `chunk_rows` input rows in turn (at least one table, maybe empty), for
    `io.write_parquet_parts_atomic`: a whole run's write holds one chunk's copy of the kept rows, not a second
    copy of the curated pool (measured at 1M rows: see `docs/scaling.md`)."""
    kept, ids, chunk_rows = np.asarray(kept, bool), pa.array(rows.ids, pa.string()), chunk_rows or CHUNK_ROWS
    for start in range(0, max(rows.n, 1), chunk_rows):
        part = np.zeros(rows.n, bool)
        part[start:start + chunk_rows] = kept[start:start + chunk_rows]
        yield curated_rows_table(rows, weights, part, ids)
        rows.release_pages()   # a spilled input table: only this part's pages were resident
