"""Small Arrow -> numpy helpers the package's columnar code shares."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def take_rows(values: pa.Array, rows: np.ndarray, n: int) -> pa.Array:
    return values if len(rows) == n else values.take(pa.array(rows, pa.int64()))


def numpy_bool(values: pa.Array) -> np.ndarray:
    return values.fill_null(False).to_numpy(zero_copy_only=False)


def value_offsets(values: pa.Array) -> np.ndarray:
    """A large string/binary array's int64 offsets, slicing honoured: value k is bytes [o[k], o[k+1]) of
    its data buffer (`buffers()[2]`)."""
    return np.frombuffer(values.buffers()[1], np.int64)[values.offset:values.offset + len(values) + 1]
