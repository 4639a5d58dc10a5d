"""Small Arrow -> numpy helpers the package's columnar code shares."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def take_rows(values: pa.Array, rows: np.ndarray, n: int) -> pa.Array:
    return values if len(rows) == n else values.take(pa.array(rows, pa.int64()))


def numpy_bool(values: pa.Array) -> np.ndarray:
    return values.fill_null(False).to_numpy(zero_copy_only=False)
