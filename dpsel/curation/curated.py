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


def finish_curated(table: pa.Table, rows: RunRows, input_rows: np.ndarray) -> pa.Table:
    """`table` (curated rows that are the run's rows `input_rows`, in order) with the stages' verdicts added."""
    taken = pa.array(np.asarray(input_rows, np.int64), pa.int64())
    extra = {}
    if rows.redacted is not None:
        extra["messages"] = rows.redacted.take(taken).cast(MESSAGE_TYPE)
    extra.update({name: values.take(taken) for name, values in rows.stage_columns.items()})
    table = set_columns(table, extra)
    return redact_text_columns(table, skip=("dpsel_id",)) if rows.redacted is not None else table


def curated_rows_table(rows: RunRows, weights: np.ndarray, kept: np.ndarray) -> pa.Table:
    """The finished curated table of `rows`' `kept` rows (a whole run, or one streamed batch)."""
    kept = np.asarray(kept, bool)
    messages = rows.data.message_array(kept) if rows.redacted is None else None   # redacted ones: finish_curated
    table = curated_table(rows.data.table, rows.ids, weights, kept, messages)
    return finish_curated(table, rows, np.flatnonzero(kept))
