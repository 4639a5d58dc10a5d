"""The on-disk embedding store: per field, segments of (row id → vector), float16 by default, read by memory map.

A segment is two files written by one writer, chunk by chunk: `<name>.vec`, the vectors as raw little-endian
rows ([rows, dim] of the store's dtype, appended), and `<name>.keys`, an Arrow IPC stream of the row ids, one
record batch per chunk, written after that chunk's vectors are flushed. A segment's rows are the ids its key
stream holds, so a killed writer leaves every chunk it finished readable (a torn last batch is ignored) and a
re-run encodes only the rest. Writers never share a file: each opens its own segment (pid + random suffix),
so concurrent writers (processes, Ray workers) need no lock to write; `compact` (merging many small segments
into one) holds the field's `filelock`. Why this format and not SQLite blobs or Feather vectors:
benchmarks/results/embedding_store.md (bytes per row, write and read rows/s).

Reads never make the file pages resident in the process: a `Column` (a run's rows in its order, as (segment,
offset) pairs) reads chunks and gathers rows with `pread`, consecutive rows in one read, so a pass or a
sampler's scattered minibatches cost the page cache, not the process's RSS. (Gathering through the memory map
did: one scattered row faulted in a whole large folio, ~1 MB on the kernel measured, so a sampler run made the
entire store resident, +324 MB of RSS at 400k rows, even with the pages dropped every 64 MB of rows read.)
"""
from __future__ import annotations

import mmap
import os
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KEY_SCHEMA = pa.schema([("id", pa.string())])
DTYPES = ("float16", "float32")


class Segment:
    """One writer's (keys, vectors) pair, opened for reading: the ids it holds and a map of their vectors."""

    def __init__(self, keys_path: Path, dtype: np.dtype):
        self.keys_path, self.vec_path = keys_path, keys_path.with_suffix(".vec")
        self.keys, self.dim = _read_keys(keys_path)
        self.dtype = dtype
        self._file = None
        if self.dim and len(self.keys):
            self._file = open(self.vec_path, "rb")
            whole = np.frombuffer(mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ), dtype=dtype)
            self.vectors = whole[:len(self.keys) * self.dim].reshape(len(self.keys), self.dim)  # compact's reads

    def read(self, offsets: np.ndarray) -> np.ndarray:
        """[len(offsets), dim] vectors at these rows of the segment (any order, repeats allowed), read with
        pread, one read per run of consecutive rows; nothing is mapped."""
        offsets = np.asarray(offsets, dtype=np.int64)
        row_bytes = self.dim * self.dtype.itemsize
        order = np.argsort(offsets, kind="stable")
        ordered = offsets[order]
        starts = np.flatnonzero(np.diff(ordered, prepend=-2) != 1)   # a row not right after the one before
        lengths = np.diff(np.append(starts, len(ordered)))
        fd = self._file.fileno()
        data = b"".join([os.pread(fd, n * row_bytes, row * row_bytes)
                         for row, n in zip(ordered[starts].tolist(), lengths.tolist())])
        if len(data) != len(ordered) * row_bytes:
            raise OSError(f"short read from {self.vec_path}: {len(data)} of {len(ordered) * row_bytes} bytes")
        out = np.empty((len(offsets), self.dim), self.dtype)
        out[order] = np.frombuffer(data, self.dtype).reshape(-1, self.dim)
        return out


def _read_keys(path: Path) -> tuple[pa.ChunkedArray, int]:
    """(the ids of every whole batch in a key stream, the vectors' dim from its schema); a writer killed
    mid-batch leaves a torn tail, which is skipped (its vectors are beyond the last key: never read)."""
    batches, dim = [], 0
    try:
        with pa.OSFile(str(path), "rb") as source, pa.ipc.open_stream(source) as reader:
            dim = int(reader.schema.metadata[b"dim"])
            for batch in reader:
                batches.append(batch.column(0))
    except (pa.ArrowInvalid, OSError, KeyError, TypeError):
        pass
    return pa.chunked_array(batches, pa.string()), dim


class Writer:
    """Appends (ids, vectors) chunks to a fresh segment; every `append` is durable once it returns."""

    def __init__(self, folder: Path, dtype: np.dtype):
        self.path = folder / f"seg-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.dtype = dtype
        self._vec = self._sink = self._keys = None

    def _open(self, dim: int) -> None:
        """The files, at the first chunk (the key stream's schema names the dim)."""
        self._vec = open(self.path.with_suffix(".vec"), "ab")
        self._sink = pa.OSFile(str(self.path.with_suffix(".keys")), "wb")
        self._schema = KEY_SCHEMA.with_metadata({"dim": str(dim)})
        self._keys = pa.ipc.new_stream(self._sink, self._schema)

    def append(self, ids: list[str], vectors: np.ndarray) -> np.ndarray:
        """Store the chunk; returns the vectors as stored (rounded to the store's dtype), as later reads see them."""
        stored = np.ascontiguousarray(vectors, dtype=self.dtype).reshape(len(ids), -1)
        if self._vec is None:
            self._open(stored.shape[1])
        self._vec.write(stored.tobytes())
        self._vec.flush()                       # vectors first: a key is only ever written after its vector
        self._keys.write_batch(pa.record_batch([pa.array(ids, pa.string())], schema=self._schema))
        self._sink.flush()
        return stored

    def close(self) -> None:
        if self._vec is None:
            return
        self._keys.close()
        self._sink.close()
        self._vec.close()


class Column:
    """A run's rows of one field, in the run's order, read from the store's segments without holding them."""

    def __init__(self, segments: list[Segment], segment_of: np.ndarray, offset: np.ndarray, dim: int):
        self.segments, self.segment_of, self.offset, self.dim = segments, segment_of, offset, dim

    def __len__(self) -> int:
        return len(self.offset)

    def rows(self, idx) -> np.ndarray:
        """[len(idx), dim] float32 of the rows `idx` (any order, repeats allowed)."""
        idx = np.asarray(idx, dtype=np.int64)
        if len(self.segments) == 1:   # the usual case (one writer, or compacted)
            return self.segments[0].read(self.offset[idx]).astype(np.float32)
        out = np.empty((len(idx), self.dim), np.float32)
        segment_of, offset = self.segment_of[idx], self.offset[idx]
        for s in np.unique(segment_of):
            mine = segment_of == s
            out[mine] = self.segments[s].read(offset[mine])
        return out

    def chunks(self, size: int = 65536):
        """(start, [rows, dim] float32) over the whole column, `size` rows at a time."""
        for start in range(0, len(self), size):
            yield start, self.rows(np.arange(start, min(start + size, len(self))))

    def to_array(self) -> np.ndarray:
        return self.rows(np.arange(len(self)))


class InMemory:
    """An array with a `Column`'s reads (meta rows, tests, callers that hold their embeddings already)."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array, np.float32)
        self.dim = self.array.shape[1] if self.array.ndim == 2 else 0

    def __len__(self) -> int:
        return len(self.array)

    def rows(self, idx) -> np.ndarray:
        return self.array[np.asarray(idx, dtype=np.int64)]

    def chunks(self, size: int = 65536):
        for start in range(0, len(self), size):
            yield start, self.array[start:start + size]

    def to_array(self) -> np.ndarray:
        return self.array


def as_column(x) -> Column | InMemory:
    """A `Column` as it is; an array wrapped so that it reads the same way."""
    return x if isinstance(x, (Column, InMemory)) else InMemory(x)


class EmbeddingStore:
    """The segments of one (embedder, field) folder: look rows up by id, append new ones, compact."""

    def __init__(self, folder: Path, dtype: str = "float16"):
        if dtype not in DTYPES:
            raise ValueError(f"embedding store dtype {dtype!r} is not one of {DTYPES}")
        self.folder, self.dtype = Path(folder), np.dtype(dtype)
        self.folder.mkdir(parents=True, exist_ok=True)

    def segments(self) -> list[Segment]:
        return [s for s in (Segment(p, self.dtype) for p in sorted(self.folder.glob("seg-*.keys"))) if s.dim]

    def writer(self) -> Writer:
        return Writer(self.folder, self.dtype)

    def locate(self, ids: list[str], segments: list[Segment]) -> tuple[np.ndarray, np.ndarray]:
        """(segment index, row in it) per id; -1 where no segment holds it (the first segment that does wins)."""
        wanted = pa.array(ids, pa.string())
        segment_of = np.full(len(ids), -1, np.int32)
        offset = np.zeros(len(ids), np.int64)
        for s, segment in enumerate(segments):
            missing = np.flatnonzero(segment_of < 0)
            if not len(missing):
                break
            found = pc.index_in(wanted.take(pa.array(missing)), value_set=segment.keys.combine_chunks())
            hit = found.is_valid().to_numpy(zero_copy_only=False)
            segment_of[missing[hit]] = s
            offset[missing[hit]] = found.drop_null().to_numpy()
        return segment_of, offset

    def compact(self, min_segments: int = 16) -> bool:
        """Merge every segment into one when there are at least `min_segments` (each writer's session adds
        one). Holds the field's lock, so two compactions never race; readers that opened the old segments keep
        reading them (an unlinked file stays mapped). True when it merged."""
        from filelock import FileLock
        with FileLock(str(self.folder / "compact.lock")):
            segments = self.segments()
            if len(segments) < min_segments:
                return False
            writer = self.writer()
            seen: set[str] = set()
            for segment in segments:
                keys = segment.keys.combine_chunks()
                fresh = []
                for i, key in enumerate(keys.to_pylist()):
                    if key not in seen:
                        seen.add(key)
                        fresh.append(i)
                for start in range(0, len(fresh), 65536):
                    part = fresh[start:start + 65536]
                    writer.append(keys.take(pa.array(part, pa.int64())).to_pylist(), segment.vectors[part])
            writer.close()
            for segment in segments:
                segment.keys_path.unlink()
                segment.vec_path.unlink(missing_ok=True)
            return True
