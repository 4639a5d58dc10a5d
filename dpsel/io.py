"""Atomic writers and content hashes for run outputs and inputs.

Writers put a temp file in the target's own directory and `os.replace` it over the target, so a reader
(or a crashed run) never sees a half-written file. Local paths only: outputs are written by this machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

_HASH_CHUNK = 1 << 20


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Run `write(tmp_path)` on a temp file beside `path`, then move it into place (same filesystem)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_parquet_atomic(table_or_df: pa.Table | pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write an Arrow table or a DataFrame (its index dropped) to Parquet atomically."""
    table = (pa.Table.from_pandas(table_or_df, preserve_index=False)
             if isinstance(table_or_df, pd.DataFrame) else table_or_df)
    return _write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def write_parquet_parts_atomic(tables: Iterable[pa.Table], path: str | os.PathLike) -> Path:
    """Write `tables` (at least one; later ones cast to the first one's schema) as one Parquet file, a row
    group or more each, atomically: only one part is held at a time."""
    def write(tmp: str) -> None:
        writer, schema = None, None
        try:
            for table in tables:
                if writer is None:
                    writer, schema = pq.ParquetWriter(tmp, table.schema), table.schema
                elif not table.schema.equals(schema):
                    table = table.cast(schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise ValueError(f"no table to write to {path}")
    return _write_atomic(path, write)


def _json_default(value: Any) -> Any:
    """JSON for the non-JSON types run metadata tends to hold (numpy scalars/arrays, paths, sets)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` as indented UTF-8 JSON atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    return write_text_atomic(text, path)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 text atomically."""
    return _write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def file_sha256(path: str | os.PathLike, fs: fsspec.AbstractFileSystem | None = None) -> str:
    """Hex sha256 of a file's bytes; `path` may be a local path or any fsspec URL when `fs` is None."""
    if fs is None:
        fs, path = fsspec.core.url_to_fs(os.fspath(path))
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
