"""Structural checks, before any row is read: each file's columns and types decide its shape (alpaca or chat),
and all footers are read first so corrupt files, wrong types and mixed shapes fail early."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from dpsel.data.paths import ResolvedFile
from dpsel.errors import DpselInputError

Shape = Literal["alpaca", "chat"]
ID_COLUMN = "dpsel_id"
ADDED_COLUMNS = ("dpsel_messages", "dpsel_reason", "dpsel_detail", "dpsel_file")
ALPACA_TEXT_COLUMNS = ("instruction", "output", "input")
# normalised conversations as dpsel writes them (curated.parquet's `messages`, the stages' input)
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def is_text(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return is_text(dtype.value_type)
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)


def is_binary(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return is_binary(dtype.value_type)
    return (pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)
            or pa.types.is_fixed_size_binary(dtype) or pa.types.is_binary_view(dtype))


def _check_text_column(schema: pa.Schema, column: str, url: str) -> None:
    dtype = schema.field(column).type
    if is_text(dtype) or pa.types.is_null(dtype):   # an all-null column is typed null: rows go invalid
        return
    if is_binary(dtype):
        raise DpselInputError(f"is binary ({dtype}), not UTF-8 text; decode it to strings first",
                              file=url, column=column)
    raise DpselInputError(f"has type {dtype}; expected string", file=url, column=column)


def _check_messages_column(schema: pa.Schema, url: str) -> None:
    dtype = schema.field("messages").type
    expected = "expected list<struct<role: string, content: string>>"
    if not (pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_list_view(dtype)):
        raise DpselInputError(f"has type {dtype}; {expected}", file=url, column="messages")
    item = dtype.value_type
    if not pa.types.is_struct(item):
        raise DpselInputError(f"items have type {item}; {expected}", file=url, column="messages")
    names = {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
    for name in ("role", "content"):
        if name not in names:
            raise DpselInputError(f"items lack the field '{name}'; {expected}", file=url, column="messages")
        if not is_text(names[name]):
            kind = "binary, not UTF-8 text" if is_binary(names[name]) else f"type {names[name]}"
            raise DpselInputError(f"field '{name}' is {kind}; {expected}", file=url, column="messages")


def detect_shape(schema: pa.Schema, url: str) -> Shape:
    """Which accepted shape a file's schema has; raises on unrecognised columns or wrong types."""
    names = set(schema.names)
    reserved = sorted(names & set(ADDED_COLUMNS))
    if reserved:
        raise DpselInputError(f"input already has column(s) {reserved}, which dpsel adds itself; "
                              "rename or drop them", file=url, column=reserved[0])
    if ID_COLUMN in names:
        _check_text_column(schema, ID_COLUMN, url)
    if "messages" in names:
        _check_messages_column(schema, url)
        return "chat"
    if {"instruction", "output"} <= names:
        for column in ALPACA_TEXT_COLUMNS:
            if column in names:
                _check_text_column(schema, column, url)
        return "alpaca"
    raise DpselInputError(
        f"no recognised columns: expected `instruction` + `output` (Alpaca) or `messages` (chat); "
        f"found {sorted(names)}", file=url)


@dataclass(frozen=True)
class PlannedFile:
    file: ResolvedFile
    schema: pa.Schema
    rows: int
    shape: Shape


def open_parquet(handle, url: str) -> pq.ParquetFile:
    try:
        # stream column chunks through a 1 MiB buffer: memory flat in the file's size
        return pq.ParquetFile(handle, buffer_size=1 << 20, pre_buffer=False)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DpselInputError(f"not a readable Parquet file ({exc})", file=url) from exc


def plan_files(files: list[ResolvedFile]) -> list[PlannedFile]:
    """Read every footer first, so corrupt files, wrong types and mixed shapes fail before any row work."""
    planned = []
    for resolved in files:
        try:
            with resolved.open() as handle:
                parquet = open_parquet(handle, resolved.url)
                schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
        except FileNotFoundError as exc:
            raise DpselInputError("file not found", file=resolved.url) from exc
        planned.append(PlannedFile(resolved, schema, rows, detect_shape(schema, resolved.url)))
    shapes = {p.shape for p in planned}
    if len(shapes) > 1:
        first = planned[0]
        other = next(p for p in planned if p.shape != first.shape)
        raise DpselInputError(f"mixed shapes across shards: {first.file.url} is {first.shape}, "
                              f"this file is {other.shape}", file=other.file.url)
    _check_unifiable(planned)
    return planned


def _check_unifiable(planned: list[PlannedFile]) -> None:
    """Shards must be concatenable (same column, compatible types); name the first shard that is not."""
    unified = planned[0].schema
    for plan in planned[1:]:
        try:
            unified = pa.unify_schemas([unified, plan.schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DpselInputError(f"column types do not match the earlier shards ({exc})",
                                  file=plan.file.url) from exc
