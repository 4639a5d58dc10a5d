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


def lean_memory_pool() -> str:
    """Make jemalloc Arrow's default memory pool where pyarrow has it and the user chose none
    (ARROW_DEFAULT_MEMORY_POOL unset); returns the pool's backend name.

    Why: the data path allocates and frees one batch's buffers per batch; under mimalloc (pyarrow's usual
    default) the freed pages stay resident, so peak RSS grows ~110 bytes per row more over a 1M-row curation
    read than under jemalloc, which returns them (benchmarks/results/pool.md)."""
    import os
    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        try:
            pa.set_memory_pool(pa.jemalloc_memory_pool())
            pa.jemalloc_set_decay_ms(0)   # freed pages go back at once, not after seconds
        except (NotImplementedError, pa.ArrowNotImplementedError):
            pass   # a pyarrow build without jemalloc: keep its default
    return pa.default_memory_pool().backend_name
