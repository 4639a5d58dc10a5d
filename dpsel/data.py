"""Read, check and normalise instruction sets (Parquet: a file, a folder of shards or a glob; any fsspec URL).

Every input row is normalised to chat `messages` (Alpaca rows through `normalize.alpaca_to_messages`),
gets a `dpsel_id` (`normalize.row_id`, or the row's own non-null `dpsel_id` where the column exists) and
ends with a reason: "" (usable), "invalid" or "duplicate" (same id as an earlier usable row; the first
occurrence is kept, invalid takes precedence). Rows are numbered from 0, both over the whole input
(in file order, then row order) and within their file; error messages give both.

How (columnar): rows stay in Arrow from read to write. Per record batch, Arrow kernels decide which rows
are certainly clean (the same rules as the per-row reference below, e.g. blank = nothing but Python's
`str.isspace` characters), build their canonical JSON and hash it (`normalize.sha_ids`: byte-identical to
`row_id`); only the other rows (invalid ones, in practice) go through the per-row reference
(`reference_row`), which therefore defines every detail message. Duplicates are found with `SeenIds`, an
exact index of ~18 bytes per id. `validate_paths` and `iter_batches` stream (memory: one batch plus that
index); `read_instruction_set` holds the set as one Arrow table plus row-aligned arrays. pyarrow suffices:
Polars/DuckDB would only help with the per-row sha256, which neither beat by enough to add a dependency
(measured: DuckDB's sha256 ~0.85 µs/row, Python's hashlib loop ~1 µs/row, polars-hash ~0.4 µs/row).

Accepted shapes (decided per file from its schema; `messages` wins when both shapes' columns exist):
- alpaca: text columns `instruction`, `output`, optional `input` (null/empty input = none).
- chat: `messages`, a list of structs with text fields `role` (system/user/assistant) and `content`;
  extra struct fields are ignored, the last message must be the assistant's and a user message must exist.
Other columns are carried through untouched.

Decision table -- what each kind of bad input does ("error" = DpselInputError naming file, column and,
for row problems, the global input row and the row within its file):

| problem                                                           | curation read (*) | validate_paths |
| ----------------------------------------------------------------- | ----------------- | -------------- |
| missing file; folder or glob with no `.parquet` files              | error             | error          |
| unreadable / corrupt Parquet (footer or page data)                 | error             | error          |
| no recognised columns                                              | error             | error          |
| wrong column type (int `output`, `messages` not list<struct>, ...) | error             | error          |
| binary text column, or invalid UTF-8 bytes in any text column      | error             | error          |
| mixed shapes across shards (alpaca and chat)                       | error             | error          |
| shards whose other columns have incompatible types                 | error             | error          |
| input already has a column dpsel adds (`dpsel_messages`, ...)      | error             | error          |
| null or empty (whitespace-only) instruction / output               | invalid           | error          |
| chat row: null/empty messages, null message, unknown role, null    | invalid           | error          |
|   content, empty user/assistant content, last message not the      |                   |                |
|   assistant's, no user message                                     |                   |                |
| a message longer than MAX_MESSAGE_CHARS (100,000 characters)       | invalid           | error          |
| exact duplicate (same `dpsel_id` as an earlier usable row)         | duplicate         | counted        |

(*) `read_instruction_set` and `iter_batches`: "invalid"/"duplicate" rows stay in the output with
`dpsel_reason` set and `dpsel_detail` saying why (e.g. "empty output"), so curation accounts for them as
dropped.

Structural problems make the whole input unusable, so they always raise. Row-level problems are
accounted for as dropped rows during curation (with `dpsel_detail` saying why) but fail `validate`,
whose job is to say whether a set is clean.
"""
from __future__ import annotations

import functools
import math
import os
import posixpath
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dpsel.errors import DpselInputError
from dpsel.io import file_sha256
from dpsel.normalize import (ID_HEX_CHARS, ROLES, alpaca_canonical, alpaca_to_messages, chat_canonical, row_id,
                             row_ids_alpaca, row_ids_chat, sha_ids)

MAX_MESSAGE_CHARS = 100_000
"""A message longer than this (in characters) marks its row invalid: almost surely a scraping/concat bug."""

Shape = Literal["alpaca", "chat"]
REASON_INVALID, REASON_DUPLICATE = "invalid", "duplicate"
_REASON_CODES = np.array(["", REASON_INVALID, REASON_DUPLICATE], dtype=object)   # by NormalizedBatch.codes
ID_COLUMN = "dpsel_id"
ADDED_COLUMNS = ("dpsel_messages", "dpsel_reason", "dpsel_detail", "dpsel_file")
ALPACA_TEXT_COLUMNS = ("instruction", "output", "input")
_GLOB_CHARS = set("*?[")


# ----------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class ResolvedFile:
    """One Parquet file: the fsspec filesystem it lives on, its path there, and a printable URL."""
    fs: fsspec.AbstractFileSystem = field(repr=False, compare=False)
    path: str
    url: str

    def open(self):
        return self.fs.open(self.path, "rb")


def _resolved(fs: fsspec.AbstractFileSystem, path: str) -> ResolvedFile:
    url = path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
    return ResolvedFile(fs=fs, path=path, url=url)


def _is_hidden(path: str, root: str) -> bool:
    """Spark/Hadoop markers (_SUCCESS) and temp files (.x.tmp) inside a shard folder are not data."""
    rel = path[len(root):].lstrip("/")
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _folder_files(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    found = fs.find(folder)
    return sorted(p for p in found if p.endswith(".parquet") and not _is_hidden(p, folder))


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[ResolvedFile]:
    """Paths/URLs -> the Parquet files they name: files as given, folders -> their sorted `*.parquet`
    (recursively, hidden/underscore entries skipped), globs -> sorted matches. Raises when nothing matches."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DpselInputError("no input paths given")
    files: list[ResolvedFile] = []
    for raw in paths:
        spec = os.fspath(raw)
        try:
            fs, path = fsspec.core.url_to_fs(spec)
        except (ValueError, ImportError) as exc:
            raise DpselInputError(f"cannot open this path or URL ({exc})", file=spec) from exc
        files.extend(_resolved(fs, p) for p in _expand_one(fs, path, spec))
    return files


def _expand_one(fs: fsspec.AbstractFileSystem, path: str, spec: str) -> list[str]:
    if _GLOB_CHARS & set(path):
        matches = []
        for match in sorted(fs.glob(path)):
            matches.extend(_folder_files(fs, match) if fs.isdir(match) else [match])
        if not matches:
            raise DpselInputError("no files match this pattern", file=spec)
        return matches
    if fs.isdir(path):
        inside = _folder_files(fs, path)
        if not inside:
            raise DpselInputError("folder contains no .parquet files", file=spec)
        return inside
    if not fs.exists(path):
        raise DpselInputError("file not found", file=spec)
    return [path]


# ----------------------------------------------------------------------------- schema checks
def _is_text(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return _is_text(dtype.value_type)
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)


def _is_binary(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return _is_binary(dtype.value_type)
    return (pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)
            or pa.types.is_fixed_size_binary(dtype) or pa.types.is_binary_view(dtype))


def _check_text_column(schema: pa.Schema, column: str, url: str) -> None:
    dtype = schema.field(column).type
    if _is_text(dtype) or pa.types.is_null(dtype):   # an all-null column is typed null: rows go invalid
        return
    if _is_binary(dtype):
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
        if not _is_text(names[name]):
            kind = "binary, not UTF-8 text" if _is_binary(names[name]) else f"type {names[name]}"
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


# ----------------------------------------------------------------------------- per-file plan
@dataclass(frozen=True)
class _PlannedFile:
    file: ResolvedFile
    schema: pa.Schema
    rows: int
    shape: Shape


def _open_parquet(handle, url: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(handle)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DpselInputError(f"not a readable Parquet file ({exc})", file=url) from exc


def _plan(files: list[ResolvedFile]) -> list[_PlannedFile]:
    """Read every footer first, so corrupt files, wrong types and mixed shapes fail before any row work."""
    planned = []
    for resolved in files:
        try:
            with resolved.open() as handle:
                parquet = _open_parquet(handle, resolved.url)
                schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
        except FileNotFoundError as exc:
            raise DpselInputError("file not found", file=resolved.url) from exc
        planned.append(_PlannedFile(resolved, schema, rows, detect_shape(schema, resolved.url)))
    shapes = {p.shape for p in planned}
    if len(shapes) > 1:
        first = planned[0]
        other = next(p for p in planned if p.shape != first.shape)
        raise DpselInputError(f"mixed shapes across shards: {first.file.url} is {first.shape}, "
                              f"this file is {other.shape}", file=other.file.url)
    _check_unifiable(planned)
    return planned


def _check_unifiable(planned: list[_PlannedFile]) -> None:
    """Shards must be concatenable (same column, compatible types); name the first shard that is not."""
    unified = planned[0].schema
    for plan in planned[1:]:
        try:
            unified = pa.unify_schemas([unified, plan.schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DpselInputError(f"column types do not match the earlier shards ({exc})",
                                  file=plan.file.url) from exc


# ----------------------------------------------------------------------------- row normalisation (reference)
# The per-row functions below are the reference semantics of a row's verdict, messages and id. The columnar
# path (next section) decides in bulk which rows are certainly clean and sends only the others here, so
# error messages and the ids of bad rows come from this one definition.
@dataclass(frozen=True)
class RowProblem:
    """Why a row is invalid, and the column to blame."""
    detail: str
    column: str


def _blank(text: str | None) -> bool:
    return text is None or not text.strip()


def _too_long(messages: list[dict], column_of: dict[str, str]) -> RowProblem | None:
    for index, message in enumerate(messages):
        content = message["content"]
        if content is not None and len(content) > MAX_MESSAGE_CHARS:
            return RowProblem(f"{message['role']} message {index} has {len(content)} chars "
                              f"(limit {MAX_MESSAGE_CHARS})", column_of.get(message["role"], "messages"))
    return None


def _alpaca_row(instruction, output, input_text) -> tuple[list[dict], RowProblem | None]:
    messages = alpaca_to_messages(instruction, output, input_text or None)
    if _blank(instruction):
        kind = "null" if instruction is None else "empty"
        return messages, RowProblem(f"{kind} instruction", "instruction")
    if _blank(output):
        kind = "null" if output is None else "empty"
        return messages, RowProblem(f"{kind} output", "output")
    return messages, _too_long(messages, {"user": "instruction", "assistant": "output"})


def _chat_problem(raw: list[dict | None]) -> RowProblem | None:
    def bad(detail: str) -> RowProblem:
        return RowProblem(detail, "messages")
    if not raw:
        return bad("no messages")
    for index, message in enumerate(raw):
        if message is None:
            return bad(f"message {index} is null")
        if message.get("role") not in ROLES:
            return bad(f"message {index} has role {message.get('role')!r}; expected one of {list(ROLES)}")
        if message.get("content") is None:
            return bad(f"message {index} ({message['role']}) has null content")
        if message["role"] != "system" and _blank(message["content"]):
            return bad(f"message {index} ({message['role']}) is empty"
                       + (" (empty output)" if index == len(raw) - 1 else ""))
    if raw[-1]["role"] != "assistant":
        return bad(f"last message is from {raw[-1]['role']!r}, not the assistant")
    if not any(m["role"] == "user" for m in raw):
        return bad("no user message")
    return None


def _chat_row(raw: list[dict | None] | None) -> tuple[list[dict], RowProblem | None]:
    if raw is None:
        return [], RowProblem("messages is null", "messages")
    messages = [{"role": m.get("role"), "content": m.get("content")} for m in raw if m is not None]
    problem = _chat_problem(raw)
    return messages, problem or _too_long(messages, {})


def reference_row(shape: Shape, row: dict) -> tuple[list[dict], RowProblem | None, str]:
    """One row (as `to_pylist` gives it) -> messages, problem, id, the slow way: the oracle of the fast path."""
    if shape == "alpaca":
        messages, problem = _alpaca_row(row.get("instruction"), row.get("output"), row.get("input"))
    else:
        messages, problem = _chat_row(row.get("messages"))
    return messages, problem, row.get(ID_COLUMN) or row_id(messages)


# ----------------------------------------------------------------------------- row normalisation (columnar)
# Python's str.strip() whitespace (str.isspace), spelled for RE2: a text is blank iff it has no other char.
_PY_SPACE = "".join(f"\\x{{{c:x}}}" for c in range(0x3001) if chr(c).isspace())
_VISIBLE = f"[^{_PY_SPACE}]"


def _as_text(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Any accepted text column (string, large/view, dictionary, all-null) as one large_string array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column.cast(pa.large_string())


def _take(values: pa.Array, rows: np.ndarray, n: int) -> pa.Array:
    return values if len(rows) == n else values.take(pa.array(rows, pa.int64()))


def _numpy_bool(values: pa.Array) -> np.ndarray:
    return values.fill_null(False).to_numpy(zero_copy_only=False)


def _visible(text: pa.Array) -> np.ndarray:
    """Per value: has a character Python's strip() keeps (False for null)."""
    return _numpy_bool(pc.match_substring_regex(text, _VISIBLE))


def _chars(text: pa.Array) -> np.ndarray:
    """Characters (code points, as Python's len) per value; 0 for null."""
    return pc.utf8_length(text).fill_null(0).to_numpy(zero_copy_only=False)


class _Rows:
    """One record batch's rows in normal form, columnar: `clean` marks rows the fast path proved valid;
    the rest go through the reference functions (few, in real data)."""
    shape: Shape

    def __init__(self, batch: pa.RecordBatch | pa.Table):
        self.n = batch.num_rows
        self.clean = np.zeros(self.n, dtype=bool)

    def messages(self, rows: np.ndarray) -> list[list[dict]]:
        raise NotImplementedError

    def ids(self, rows: np.ndarray) -> pa.Array:
        """`dpsel_id` of the clean `rows` (sorted positions), as a string array."""
        raise NotImplementedError

    def prompt_response_chars(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class _AlpacaRows(_Rows):
    shape = "alpaca"

    def __init__(self, batch):
        super().__init__(batch)
        names = batch.schema.names
        self.instruction = _as_text(batch.column("instruction"))
        self.output = _as_text(batch.column("output"))
        extra = _as_text(batch.column("input")) if "input" in names else pa.nulls(self.n, pa.large_string())
        has_input = _numpy_bool(pc.greater(pc.utf8_length(extra), 0))   # `input or None`: "" is no input
        joined = pc.binary_join_element_wise(self.instruction, extra, pa.scalar("\n\n", pa.large_string()))
        self.prompt = pc.if_else(pa.array(has_input), joined, self.instruction)
        self.clean = (_visible(self.instruction) & _visible(self.output)
                      & (_chars(self.prompt) <= MAX_MESSAGE_CHARS) & (_chars(self.output) <= MAX_MESSAGE_CHARS))

    def messages(self, rows):
        index = pa.array(rows, pa.int64())
        prompts, outputs = self.prompt.take(index).to_pylist(), self.output.take(index).to_pylist()
        return [[{"role": "user", "content": p}, {"role": "assistant", "content": o}]
                for p, o in zip(prompts, outputs)]

    def ids(self, rows):
        prompt, output = _take(self.prompt, rows, self.n), _take(self.output, rows, self.n)
        canonical, slow = alpaca_canonical(prompt, output)
        ids = sha_ids(canonical)
        if slow.any():   # control characters JSON spells \u00XX: the per-row encoder
            where = pa.array(np.flatnonzero(slow), pa.int64())
            ids = pc.replace_with_mask(ids, pa.array(slow), pa.array(row_ids_alpaca(
                prompt.take(where).to_pylist(), output.take(where).to_pylist()), pa.string()))
        return ids

    def prompt_response_chars(self):
        return _chars(self.prompt), _chars(self.output)


class _ChatRows(_Rows):
    shape = "chat"

    def __init__(self, batch):
        super().__init__(batch)
        lists = batch.column("messages")
        if isinstance(lists, pa.ChunkedArray):
            lists = lists.combine_chunks()
        if not pa.types.is_large_list(lists.type):
            lists = lists.cast(pa.large_list(lists.type.value_type))    # list and list_view alike
        self.lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
        items = lists.flatten()                    # skips null lists, honours slicing
        fields = dict(zip([f.name for f in items.type], items.flatten()))   # parent nulls merged in
        self.role, self.content = _as_text(fields["role"]), _as_text(fields["content"])
        parent = np.repeat(np.arange(self.n), self.lengths)
        role = self.role.to_numpy(zero_copy_only=False)
        known = _numpy_bool(pc.is_in(self.role, value_set=pa.array(ROLES, pa.large_string())))
        self.chars = _chars(self.content)
        bad_item = (~known | ~_numpy_bool(pc.is_valid(self.content)) | (self.chars > MAX_MESSAGE_CHARS)
                    | ((role != "system") & ~_visible(self.content)))
        bad_rows = np.bincount(parent, weights=bad_item, minlength=self.n) > 0
        has_user = np.bincount(parent, weights=role == "user", minlength=self.n) > 0
        last = np.maximum(self.starts[1:] - 1, 0)
        last_is_assistant = (self.lengths > 0) & (role[last] == "assistant" if len(role) else False)
        self.clean = (_numpy_bool(pc.is_valid(lists)) & (self.lengths > 0) & ~bad_rows & has_user
                      & last_is_assistant)
        self.parent = parent

    def _items(self, rows):
        """Flat item positions of `rows` and their per-row offsets."""
        counts = self.lengths[rows]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        positions = (np.repeat(self.starts[rows] - offsets[:-1], counts) + np.arange(offsets[-1])
                     if len(rows) else np.zeros(0, np.int64))
        return pa.array(positions, pa.int64()), offsets.tolist()

    def messages(self, rows):
        index, offsets = self._items(rows)
        roles, contents = self.role.take(index).to_pylist(), self.content.take(index).to_pylist()
        items = [{"role": r, "content": c} for r, c in zip(roles, contents)]
        return [items[start:end] for start, end in zip(offsets[:-1], offsets[1:])]

    def ids(self, rows):
        index, offsets = self._items(rows)
        role, content = self.role.take(index), self.content.take(index)
        canonical, slow = chat_canonical(role, content, np.asarray(offsets))
        ids = sha_ids(canonical)
        if slow.any():   # control characters JSON spells \u00XX: the per-row encoder
            redone = [row_ids_chat(role[offsets[k]:offsets[k + 1]].to_pylist(),
                                   content[offsets[k]:offsets[k + 1]].to_pylist(),
                                   [0, offsets[k + 1] - offsets[k]])[0] for k in np.flatnonzero(slow).tolist()]
            ids = pc.replace_with_mask(ids, pa.array(slow), pa.array(redone, pa.string()))
        return ids

    def prompt_response_chars(self):
        total = np.bincount(self.parent, weights=self.chars, minlength=self.n).astype(np.int64)
        response = np.where(self.lengths > 0, self.chars[np.maximum(self.starts[1:] - 1, 0)]
                            if len(self.chars) else 0, 0)
        return total - response, response


def _normal_rows(batch, shape: Shape) -> _Rows:
    return _AlpacaRows(batch) if shape == "alpaca" else _ChatRows(batch)


# ----------------------------------------------------------------------------- dedup
class SeenIds:
    """The first usable row of every id seen so far, exact, in ~18 bytes per id (ids are stored as the
    10 bytes their 20 hex chars spell, plus the row number; any other id spelling goes to a dict).

    Lookups and inserts are vectorised per batch: sorted arrays, `searchsorted`, and a merge per batch
    (a stable sort of two sorted runs, linear time)."""

    def __init__(self) -> None:
        self._hi = np.zeros(0, np.uint64)      # first 8 key bytes, big-endian: sorted
        self._lo = np.zeros(0, np.uint16)      # last 2 key bytes
        self._row = np.zeros(0, np.int64)
        self._other: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._hi) + len(self._other)

    def first_rows(self, ids: pa.Array | list[str], rows: np.ndarray, register: np.ndarray) -> np.ndarray:
        """For each id: the row it was first seen on (-1 if new). Ids with `register` set that are new are
        recorded with their row (the first of them if one repeats within the batch)."""
        ids_arr = pa.array(ids, pa.large_string()) if isinstance(ids, list) else ids.cast(pa.large_string())
        hexlike = _numpy_bool(pc.match_substring_regex(ids_arr, f"^[0-9a-f]{{{ID_HEX_CHARS}}}$"))
        first = np.full(len(ids_arr), -1, np.int64)
        hex_idx = np.flatnonzero(hexlike)
        if len(hex_idx):
            first[hex_idx] = self._hex(_take(ids_arr, hex_idx, len(ids_arr)), rows[hex_idx], register[hex_idx])
        for k in np.flatnonzero(~hexlike).tolist():
            key = ids_arr[k].as_py()
            if key in self._other:
                first[k] = self._other[key]
            elif register[k]:
                self._other[key] = int(rows[k])
        return first

    def _hex(self, ids: pa.Array, rows: np.ndarray, register: np.ndarray) -> np.ndarray:
        offsets = np.frombuffer(ids.buffers()[1], np.int64)[ids.offset:ids.offset + len(ids) + 1]
        raw = bytes.fromhex(memoryview(ids.buffers()[2])[offsets[0]:offsets[-1]].tobytes().decode("ascii"))
        keys = np.frombuffer(raw, np.dtype([("hi", ">u8"), ("lo", ">u2")]))
        hi, lo = keys["hi"].astype(np.uint64), keys["lo"].astype(np.uint16)
        first = self._lookup(hi, lo)
        # new keys, first occurrence within the batch wins
        new = np.flatnonzero((first < 0) & register)
        if len(new):
            order = np.lexsort((new, lo[new], hi[new]))
            sorted_new = new[order]
            head = np.ones(len(sorted_new), bool)
            head[1:] = (hi[sorted_new][1:] != hi[sorted_new][:-1]) | (lo[sorted_new][1:] != lo[sorted_new][:-1])
            group = np.cumsum(head) - 1
            leader = sorted_new[head][group]          # first row of each key's group, for every member
            first[sorted_new[~head]] = rows[leader[~head]]
            self._insert(hi[sorted_new[head]], lo[sorted_new[head]], rows[sorted_new[head]])
        # rows not registered (invalid) but equal to a key registered earlier in this batch are not marked:
        # an invalid row is never a duplicate, callers only read `first` for usable rows
        return first

    def _lookup(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        first = np.full(len(hi), -1, np.int64)
        if not len(self._hi):
            return first
        left = np.searchsorted(self._hi, hi, "left")
        right = np.searchsorted(self._hi, hi, "right")
        single = np.flatnonzero(right - left == 1)
        hit = single[self._lo[left[single]] == lo[single]]
        first[hit] = self._row[left[hit]]
        for k in np.flatnonzero(right - left > 1):     # 64-bit prefix shared by several ids: compare all
            match = np.flatnonzero(self._lo[left[k]:right[k]] == lo[k])
            if len(match):
                first[k] = self._row[left[k] + match[0]]
        return first

    def _insert(self, hi, lo, rows) -> None:
        """Insert new keys (sorted by `hi`) keeping the arrays sorted; peak memory: old + new arrays."""
        at = np.searchsorted(self._hi, hi, "right")
        self._hi, self._lo, self._row = (np.insert(a, at, b) for a, b in ((self._hi, hi), (self._lo, lo),
                                                                          (self._row, rows)))


# ----------------------------------------------------------------------------- streaming
class NormalizedBatch:
    """A record batch of one file, as read (`batch`), with each row's id and verdict as arrays (`id_array`,
    `codes`: 0 usable, 1 invalid, 2 duplicate; `detail_array`) and, built on first use, as lists (`ids`,
    `reasons`, `details`, `problems`, `messages`)."""

    def __init__(self, file: ResolvedFile, shape: Shape, batch: pa.RecordBatch, start_row: int,
                 start_row_in_file: int, rows: _Rows, id_array: pa.Array, row_problems: dict[int, RowProblem],
                 overrides: dict[int, list[dict]], first_seen: np.ndarray | None):
        self.file, self.shape, self.batch = file, shape, batch
        self.start_row, self.start_row_in_file = start_row, start_row_in_file
        self.id_array, self.row_problems = id_array, row_problems
        self._rows, self._overrides = rows, overrides
        n = batch.num_rows
        self.codes = np.zeros(n, np.int8)
        self.codes[list(row_problems)] = 1
        details = {k: p.detail for k, p in row_problems.items()}
        if first_seen is not None:
            duplicate = np.flatnonzero((self.codes == 0) & (first_seen >= 0))
            self.codes[duplicate] = 2
            details.update({k: f"same content as input row {first_seen[k]}" for k in duplicate.tolist()})
        self.usable = self.codes == 0
        self.duplicate_of = np.where(self.codes == 2, first_seen if first_seen is not None else -1, -1)
        self.detail_array = _sparse_strings(n, details)

    @property
    def num_rows(self) -> int:
        return self.batch.num_rows

    @functools.cached_property
    def ids(self) -> list[str]:
        return self.id_array.to_pylist()

    @functools.cached_property
    def reasons(self) -> list[str]:
        return _REASON_CODES[self.codes].tolist()

    @functools.cached_property
    def details(self) -> list[str]:
        return self.detail_array.to_pylist()

    @functools.cached_property
    def problems(self) -> list[RowProblem | None]:
        return [self.row_problems.get(k) for k in range(self.num_rows)]

    @functools.cached_property
    def messages(self) -> list[list[dict]]:
        """Normalised messages of every row (invalid rows: as far as they could be read)."""
        return _messages_with_overrides(self._rows, np.arange(self.num_rows), self._overrides)

    def usable_messages(self) -> list[list[dict]]:
        """Messages of the usable rows only (valid, first occurrence), without building the others."""
        return _messages_with_overrides(self._rows, np.flatnonzero(self.usable), self._overrides)

    def first_error(self) -> DpselInputError | None:
        """The strict-mode error for the first invalid row, if any."""
        if not self.row_problems:
            return None
        offset = min(self.row_problems)
        return self.error_for(offset, self.row_problems[offset])

    def error_for(self, offset: int, problem: RowProblem) -> DpselInputError:
        """The strict-mode error for the row at `offset` in this batch."""
        row = self.start_row + offset
        return DpselInputError(f"{problem.detail} (input row {row}; row {self.start_row_in_file + offset} "
                               f"of this file)", file=self.file.url, column=problem.column, row=row)


def _sparse_strings(n: int, values: dict[int, str]) -> pa.Array:
    """A string array of n empty strings, with `values` at their positions."""
    empty = pa.array(np.full(n, "", dtype=object), pa.string()) if n else pa.array([], pa.string())
    if not values:
        return empty
    mask = np.zeros(n, dtype=bool)
    mask[list(values)] = True
    return pc.replace_with_mask(empty, pa.array(mask), pa.array([values[k] for k in sorted(values)], pa.string()))


def _messages_with_overrides(rows: _Rows, wanted: np.ndarray, overrides: dict[int, list[dict]]
                             ) -> list[list[dict]]:
    fast = wanted[rows.clean[wanted]]
    built = dict(zip(fast.tolist(), rows.messages(fast)))
    return [built[k] if k in built else overrides[k] for k in wanted.tolist()]


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


def _verdicts(batch: pa.RecordBatch, rows: _Rows
              ) -> tuple[pa.Array, dict[int, RowProblem], dict[int, list[dict]]]:
    """Ids and problems of every row: clean rows in bulk, the others through `reference_row`."""
    n = batch.num_rows
    ids = pa.nulls(n, pa.string())
    has_given = np.zeros(n, dtype=bool)
    if ID_COLUMN in batch.schema.names:    # the input's own non-empty ids win
        given = _as_text(batch.column(ID_COLUMN))
        has_given = _numpy_bool(pc.greater(pc.binary_length(given), 0))
        ids = given.cast(pa.string())
    problems: dict[int, RowProblem] = {}
    overrides: dict[int, list[dict]] = {}
    slow = np.flatnonzero(~rows.clean)
    slow_ids = []
    for k in slow.tolist():
        overrides[k], problem, rid = reference_row(rows.shape, batch.slice(k, 1).to_pylist()[0])
        slow_ids.append(rid)
        if problem is not None:
            problems[k] = problem
    to_hash = rows.clean & ~has_given
    if to_hash.any():
        ids = pc.replace_with_mask(ids, pa.array(to_hash), rows.ids(np.flatnonzero(to_hash)))
    if len(slow):
        ids = pc.replace_with_mask(ids, pa.array(~rows.clean), pa.array(slow_ids, pa.string()))
    return ids, problems, overrides


def rows_to_score(batch: pa.RecordBatch | pa.Table, shape: Shape) -> tuple[list[str], np.ndarray, list[list[dict]]]:
    """(id of every row, valid mask, messages of the valid rows) of one batch, exactly as the reader computes
    them — for engines whose workers read rows themselves (the Ray actors); duplicates are not marked here."""
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else pa.RecordBatch.from_pylist([], batch.schema)
    rows = _normal_rows(batch, shape)
    ids, problems, overrides = _verdicts(batch, rows)
    valid = np.ones(batch.num_rows, dtype=bool)
    valid[list(problems)] = False
    return ids.to_pylist(), valid, _messages_with_overrides(rows, np.flatnonzero(valid), overrides)


def _read_batches(planned: _PlannedFile, batch_rows: int) -> Iterator[pa.RecordBatch]:
    url = planned.file.url
    with planned.file.open() as handle:
        parquet = _open_parquet(handle, url)
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
    yield from _iter_planned(_plan(expand_paths(paths)), batch_rows, mark_duplicates)


def _iter_planned(planned: list[_PlannedFile], batch_rows: int, mark_duplicates: bool = True
                  ) -> Iterator[NormalizedBatch]:
    seen = SeenIds()
    start = 0
    for plan in planned:
        in_file = 0
        for batch in _read_batches(plan, batch_rows):
            _check_utf8(batch, plan.file, start, in_file)
            rows = _normal_rows(batch, plan.shape)
            ids, problems, overrides = _verdicts(batch, rows)
            first_seen = None
            if mark_duplicates:
                valid = np.ones(batch.num_rows, dtype=bool)
                valid[list(problems)] = False
                first_seen = seen.first_rows(ids, start + np.arange(batch.num_rows), valid)
            yield NormalizedBatch(plan.file, plan.shape, batch, start, in_file, rows, ids, problems, overrides,
                                  first_seen)
            start += batch.num_rows
            in_file += batch.num_rows


# ----------------------------------------------------------------------------- whole-set reader
@dataclass(frozen=True)
class FileInfo:
    """One input file: its path or URL as printed in messages, footer row count, sha256 of its bytes."""
    path: str
    rows: int
    sha256: str

    @property
    def url(self) -> str:   # same name as on ResolvedFile, so callers can print either
        return self.path


@dataclass
class InstructionSet:
    """All input rows, in input order, columnar: `table` holds the original columns exactly as read (Arrow
    types kept); `ids`, `reasons`, `details`, `file_index` (into `files`) and `file_rows` (row within its
    file) are row-aligned with it. Messages are built from the table when asked for (`messages`).
    `frame` is a pandas view with the dpsel_* columns, built on first use (costly on big sets)."""
    table: pa.Table
    original_columns: list[str]
    shape: Shape
    files: list[FileInfo]
    ids: pa.Array
    reasons: np.ndarray               # object: "" | "invalid" | "duplicate"
    details: pa.Array
    file_index: np.ndarray
    file_rows: np.ndarray
    duplicate_of: np.ndarray          # int64: for a duplicate, the input row it repeats; -1 otherwise
    overrides: dict[int, list[dict]] = field(default_factory=dict, repr=False)   # reference-path messages
    _frame: pd.DataFrame | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.table.num_rows

    def usable_mask(self) -> np.ndarray:
        return self.reasons == ""

    def id_list(self) -> list[str]:
        return self.ids.to_pylist()

    def file_paths(self) -> np.ndarray:
        """The file (path or URL) of every row, as an object array."""
        return np.array([f.path for f in self.files], dtype=object)[self.file_index]

    def messages(self, mask: Any = None, chunk_rows: int = 65536) -> list[list[dict]]:
        """Normalised messages of all rows, or of the rows where boolean `mask` is true."""
        wanted = np.arange(len(self)) if mask is None else np.flatnonzero(np.asarray(mask, dtype=bool))
        out: list[list[dict]] = []
        for begin in range(0, len(wanted), chunk_rows):   # bounded transient Arrow copies
            part = wanted[begin:begin + chunk_rows]
            sub = self.table.take(pa.array(part, pa.int64()))
            rows = _normal_rows(sub, self.shape)
            local = {k: self.overrides[g] for k, g in enumerate(part.tolist()) if g in self.overrides}
            rows.clean[list(local)] = False
            out += _messages_with_overrides(rows, np.arange(len(part)), local)
        return out

    @property
    def frame(self) -> pd.DataFrame:
        """The original columns (pandas) plus dpsel_id, dpsel_messages, dpsel_reason, dpsel_detail, dpsel_file."""
        if self._frame is None:
            frame = self.table.to_pandas()
            for name, values in ((ID_COLUMN, self.id_list()), ("dpsel_messages", self.messages()),
                                 ("dpsel_reason", self.reasons.tolist()), ("dpsel_detail", self.details.to_pylist()),
                                 ("dpsel_file", self.file_paths().tolist())):
                frame[name] = pd.Series(values, index=frame.index, dtype=object)
            self._frame = frame
        return self._frame

    def usable(self) -> pd.DataFrame:
        """Rows with no drop reason (valid, first occurrence)."""
        return self.frame[self.usable_mask()]

    def counts(self) -> dict[str, int]:
        """Rows by reason: input_rows == usable + invalid + duplicate."""
        return {"input_rows": len(self), "usable": int((self.reasons == "").sum()),
                REASON_INVALID: int((self.reasons == REASON_INVALID).sum()),
                REASON_DUPLICATE: int((self.reasons == REASON_DUPLICATE).sum())}


def _concat(tables: list[pa.Table], urls: list[str]) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DpselInputError(f"shards have incompatible column types ({exc})", file=", ".join(urls)) from exc




def read_instruction_set(paths, batch_rows: int = 65536) -> InstructionSet:
    """Read the whole input into an `InstructionSet` (see the module docstring for what raises)."""
    planned = _plan(expand_paths(paths))
    tables = [p.schema.empty_table() for p in planned]   # keeps columns of files with no rows
    ids, codes, details, file_index, file_rows, duplicate_of = [], [], [], [], [], []
    overrides: dict[int, list[dict]] = {}
    file_of = {p.file.url: i for i, p in enumerate(planned)}
    for nb in _iter_planned(planned, batch_rows):
        tables.append(pa.Table.from_batches([nb.batch]))
        ids.append(nb.id_array)
        codes.append(nb.codes)
        details.append(nb.detail_array)
        file_index.append(np.full(nb.num_rows, file_of[nb.file.url], np.int32))
        file_rows.append(nb.start_row_in_file + np.arange(nb.num_rows, dtype=np.int64))
        duplicate_of.append(nb.duplicate_of)
        overrides.update({nb.start_row + k: m for k, m in nb._overrides.items()})
    table = _concat(tables, [p.file.url for p in planned])
    files = [FileInfo(p.file.url, p.rows, file_sha256(p.file.path, p.file.fs)) for p in planned]

    def joined(parts, empty):
        return np.concatenate(parts) if parts else empty
    return InstructionSet(
        table, list(table.column_names), planned[0].shape, files,
        ids=pa.concat_arrays(ids) if ids else pa.array([], pa.string()),
        reasons=_REASON_CODES[joined(codes, np.zeros(0, np.int8))],
        details=pa.concat_arrays(details) if details else pa.array([], pa.string()),
        file_index=joined(file_index, np.zeros(0, np.int32)), file_rows=joined(file_rows, np.zeros(0, np.int64)),
        duplicate_of=joined(duplicate_of, np.zeros(0, np.int64)), overrides=overrides)


# ----------------------------------------------------------------------------- validation summary
PERCENTILES = (50, 90, 99)
GROUP_COLUMNS = ("task", "source")


def _length_stats(counts: Counter[int]) -> dict[str, int]:
    """p50/p90/p99/max of a multiset of lengths given as value -> count, exactly as `np.percentile`
    (linear interpolation) on the expanded values would give them, in memory flat in the number of rows."""
    if not counts:
        return {f"p{q}": 0 for q in PERCENTILES} | {"max": 0}
    values = np.array(sorted(counts))
    ends = np.cumsum([counts[v] for v in values])           # sorted position k lies in the first run with end > k
    n = int(ends[-1])

    def at(position: int) -> float:
        return float(values[np.searchsorted(ends, position, side="right")])
    stats = {}
    for q in PERCENTILES:
        virtual = (n - 1) * (q / 100)
        below = math.floor(virtual)
        t = virtual - below
        a, b = at(below), at(min(below + 1, n - 1))
        # numpy's _lerp, including its switch to the upper end for t >= 0.5
        stats[f"p{q}"] = int(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)
    return stats | {"max": int(values[-1])}


def _empty_count(column: pa.ChunkedArray | pa.Array) -> int:
    """Empty strings / empty lists (nulls are counted separately); 0 for other types."""
    dtype = column.type
    if pa.types.is_dictionary(dtype):
        column = column.cast(dtype.value_type)
        dtype = dtype.value_type
    if _is_text(dtype) or _is_binary(dtype):
        return int(pc.sum(pc.equal(pc.binary_length(column), 0)).as_py() or 0)
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return int(pc.sum(pc.equal(pc.list_value_length(column), 0)).as_py() or 0)
    return 0


def _group_counts(column: pa.Array) -> Counter[str]:
    """Rows per value, keyed by `str(value)` (None for nulls), counted by Arrow."""
    counted: Counter[str] = Counter()
    try:
        pairs = pc.value_counts(column)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):   # e.g. nested types: count in Python
        counted.update(str(v) for v in column.to_pylist())
        return counted
    for value, count in zip(pairs.field("values").to_pylist(), pairs.field("counts").to_pylist()):
        counted[str(value)] += count
    return counted


def _value_counts(values: np.ndarray) -> Counter[int]:
    distinct, counts = np.unique(values, return_counts=True)
    return Counter(dict(zip(distinct.tolist(), counts.tolist())))


@dataclass
class ValidationSummary:
    rows: int
    shape: Shape
    files: list[tuple[str, int]]                       # (url, rows)
    null_counts: dict[str, int]
    empty_counts: dict[str, int]
    prompt_chars: dict[str, int]                       # p50/p90/p99/max over rows
    response_chars: dict[str, int]
    duplicates: int
    groups: dict[str, dict[str, int]]                  # task/source column -> value -> rows
    skipped: list[str] = field(default_factory=list)   # known non-instruction files in a folder (truth, scores)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def render(self) -> str:
        lines = [f"rows: {self.rows}", f"shape: {self.shape}", f"files: {len(self.files)}"]
        lines += [f"  {url}: {rows} rows" for url, rows in self.files]
        lines += [f"  skipped {what}" for what in self.skipped]
        lines.append("columns (nulls / empty):")
        lines += [f"  {c}: {self.null_counts[c]} / {self.empty_counts[c]}" for c in self.null_counts]
        for name, stats in (("prompt chars", self.prompt_chars), ("response chars", self.response_chars)):
            lines.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
        lines.append(f"duplicates: {self.duplicates}")
        for column, counts in self.groups.items():
            lines.append(f"{column}s: {len(counts)}")
            lines += [f"  {value}: {n}" for value, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        return "\n".join(lines)


# Files dpsel itself writes beside instruction sets that are not instruction sets: synth's truth, a run's
# scores. Inside a folder given to `validate` they are skipped (and listed); any other file is checked.
KNOWN_NON_INSTRUCTION_FILES = {"truth.parquet": "synth truth", "scores.parquet": "curation scores"}


def skip_known_outputs(files: list[ResolvedFile], paths) -> tuple[list[ResolvedFile], list[str]]:
    """(files to check, skipped ones): a known non-instruction file is skipped only when a folder or glob
    brought it in; named explicitly, it is checked (and fails, naming it)."""
    specs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    named = {_comparable(os.fspath(spec)) for spec in specs}
    keep, skipped = [], []
    for file in files:
        known = KNOWN_NON_INSTRUCTION_FILES.get(posixpath.basename(file.path))
        if known and _comparable(file.url) not in named:
            skipped.append(f"{file.url} ({known}, not an instruction set)")
        else:
            keep.append(file)
    if not keep:
        raise DpselInputError("no instruction-set files here, only " + "; ".join(skipped), file=str(specs[0]))
    return keep, skipped


def _comparable(spec: str) -> str:
    return spec if "://" in spec else os.path.abspath(spec)


def validate_paths(paths, batch_rows: int = 65536) -> ValidationSummary:
    """Strictly check an instruction set (raises `DpselInputError` on the first bad row) and summarise it.
    Streams: memory is one batch plus ~18 bytes per distinct row (the duplicate check)."""
    checked, skipped = skip_known_outputs(expand_paths(paths), paths)
    planned = _plan(checked)
    rows, duplicates = 0, 0
    nulls: Counter[str] = Counter()
    empties: Counter[str] = Counter()
    groups: dict[str, Counter[str]] = {}
    prompt_lengths: Counter[int] = Counter()
    response_lengths: Counter[int] = Counter()
    for name in dict.fromkeys(n for p in planned for n in p.schema.names):
        nulls[name] += 0    # list every column, even one only in a shard with no rows
    for nb in _iter_planned(planned, batch_rows):
        error = nb.first_error()
        if error is not None:
            raise error
        for name in nb.batch.schema.names:
            nulls[name] += nb.batch.column(name).null_count
            empties[name] += _empty_count(nb.batch.column(name))
        for name in GROUP_COLUMNS:
            if name in nb.batch.schema.names:
                groups.setdefault(name, Counter()).update(_group_counts(nb.batch.column(name)))
        prompt, response = nb._rows.prompt_response_chars()
        prompt_lengths.update(_value_counts(prompt))
        response_lengths.update(_value_counts(response))
        duplicates += int((nb.codes == 2).sum())
        rows += nb.num_rows
    files = [(p.file.url, p.rows) for p in planned]
    return ValidationSummary(rows, planned[0].shape, files, dict(nulls),
                             {c: empties[c] for c in nulls}, _length_stats(prompt_lengths),
                             _length_stats(response_lengths), duplicates,
                             {c: dict(v) for c, v in groups.items()}, skipped)
