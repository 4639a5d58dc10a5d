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
    (ARROW_DEFAULT_MEMORY_POOL unset), and hold glibc's mmap threshold (`fixed_mmap_threshold`); returns the
    pool's backend name.

    Why: the data path allocates and frees one batch's buffers per batch; under mimalloc (pyarrow's usual
    default) the freed pages stay resident, so peak RSS grows ~110 bytes per row more over a 1M-row curation
    read than under jemalloc, which returns them (benchmarks/results/pool.md)."""
    import os
    fixed_mmap_threshold()
    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        try:
            pa.set_memory_pool(pa.jemalloc_memory_pool())
            pa.jemalloc_set_decay_ms(0)   # freed pages go back at once, not after seconds
        except (NotImplementedError, pa.ArrowNotImplementedError):
            pass   # a pyarrow build without jemalloc: keep its default
    return pa.default_memory_pool().backend_name


MMAP_THRESHOLD = 8 * 1024 * 1024   # bytes: a per-step tensor below it reuses the heap, a pool-sized array above


def fixed_mmap_threshold() -> bool:
    """Hold glibc malloc's mmap threshold at 8 MiB (unless MALLOC_MMAP_THRESHOLD_ is set); True where set.

    Why: glibc raises the threshold (up to 32 MiB) each time a large mmapped block is freed, after which arrays of
    a pool's size come from the heap, and a freed heap stays resident behind any live block above it. Held
    fixed, every array of 8 MiB or more is its own mapping, returned when freed. Not lower: at 128 KiB every
    sampler step's tensors were fresh mappings, faulted in page by page (a 256x256 map's step 60% slower,
    near-dup 25% slower), for ~30 MB less at the 1M-row stages' peak (docs/results.md)."""
    import ctypes
    import ctypes.util
    import os
    import sys
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))   # M_MMAP_THRESHOLD; 1 on success
    except (OSError, AttributeError):   # not glibc (musl has no mallopt): its allocator's own policy stands
        return False
