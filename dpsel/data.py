"""Read, check and normalise instruction sets (Parquet: a file, a folder of shards or a glob; any fsspec URL).

Every input row is normalised to chat `messages` (Alpaca rows through `normalize.alpaca_to_messages`),
gets a `dpsel_id` (`normalize.row_id`, or the row's own non-null `dpsel_id` where the column exists) and
ends with a reason: "" (usable), "invalid" or "duplicate" (same id as an earlier usable row; the first
occurrence is kept, invalid takes precedence). Rows are numbered from 0, both over the whole input
(in file order, then row order) and within their file; error messages give both.

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
from dpsel.normalize import ROLES, alpaca_to_messages, row_id

MAX_MESSAGE_CHARS = 100_000
"""A message longer than this (in characters) marks its row invalid: almost surely a scraping/concat bug."""

Shape = Literal["alpaca", "chat"]
REASON_INVALID, REASON_DUPLICATE = "invalid", "duplicate"
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


# ----------------------------------------------------------------------------- row normalisation
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


# ----------------------------------------------------------------------------- streaming
@dataclass
class NormalizedBatch:
    """A record batch of one file, as read (`batch`), with each row's normal form and verdict."""
    file: ResolvedFile
    shape: Shape
    batch: pa.RecordBatch
    start_row: int              # global index of the batch's first row
    start_row_in_file: int
    ids: list[str]
    messages: list[list[dict]]
    reasons: list[str]          # "" | "invalid" | "duplicate"
    details: list[str]
    problems: list[RowProblem | None]

    @property
    def num_rows(self) -> int:
        return self.batch.num_rows

    def error_for(self, offset: int, problem: RowProblem) -> DpselInputError:
        """The strict-mode error for the row at `offset` in this batch."""
        row = self.start_row + offset
        return DpselInputError(f"{problem.detail} (input row {row}; row {self.start_row_in_file + offset} "
                               f"of this file)", file=self.file.url, column=problem.column, row=row)


def _column_pylist(batch: pa.RecordBatch, column: str) -> list:
    return batch.column(column).to_pylist() if column in batch.schema.names else [None] * batch.num_rows


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


def _normalise(batch: pa.RecordBatch, shape: Shape) -> tuple[list[list[dict]], list[RowProblem | None]]:
    if shape == "alpaca":
        rows = zip(_column_pylist(batch, "instruction"), _column_pylist(batch, "output"),
                   _column_pylist(batch, "input"))
        pairs = [_alpaca_row(*row) for row in rows]
    else:
        pairs = [_chat_row(raw) for raw in batch.column("messages").to_pylist()]
    return [m for m, _ in pairs], [p for _, p in pairs]


def _row_ids(batch: pa.RecordBatch, messages: list[list[dict]]) -> list[str]:
    given = _column_pylist(batch, ID_COLUMN)
    return [existing if existing else row_id(m) for existing, m in zip(given, messages)]


def _read_batches(planned: _PlannedFile, batch_rows: int) -> Iterator[pa.RecordBatch]:
    url = planned.file.url
    with planned.file.open() as handle:
        parquet = _open_parquet(handle, url)
        try:
            yield from parquet.iter_batches(batch_size=batch_rows)
        except (pa.ArrowException, OSError) as exc:
            raise DpselInputError(f"corrupt Parquet data ({exc})", file=url) from exc


def iter_batches(paths, batch_rows: int = 8192, *, mark_duplicates: bool = True) -> Iterator[NormalizedBatch]:
    """Stream the input as normalised batches (one file's rows each; memory ~ one batch + the seen ids).

    Structural problems raise `DpselInputError` (all footers are checked before the first batch);
    row problems are returned as reason "invalid" with a detail; with `mark_duplicates`, rows whose id
    was already seen on a usable row get reason "duplicate"."""
    yield from _iter_planned(_plan(expand_paths(paths)), batch_rows, mark_duplicates)


def _iter_planned(planned: list[_PlannedFile], batch_rows: int, mark_duplicates: bool = True
                  ) -> Iterator[NormalizedBatch]:
    first_seen: dict[str, int] = {}
    start = 0
    for plan in planned:
        in_file = 0
        for batch in _read_batches(plan, batch_rows):
            _check_utf8(batch, plan.file, start, in_file)
            messages, problems = _normalise(batch, plan.shape)
            ids = _row_ids(batch, messages)
            reasons, details = [], []
            for offset, (rid, problem) in enumerate(zip(ids, problems)):
                reason, detail = "", ""
                if problem is not None:
                    reason, detail = REASON_INVALID, problem.detail
                elif mark_duplicates and rid in first_seen:
                    reason, detail = REASON_DUPLICATE, f"same content as input row {first_seen[rid]}"
                elif mark_duplicates:
                    first_seen[rid] = start + offset
                reasons.append(reason)
                details.append(detail)
            yield NormalizedBatch(plan.file, plan.shape, batch, start, in_file, ids, messages,
                                  reasons, details, problems)
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
    """All input rows, in input order. `frame` holds the original columns (pandas) plus dpsel_id,
    dpsel_messages, dpsel_reason, dpsel_detail, dpsel_file; `table` holds the original columns exactly
    as read (Arrow types kept), row-aligned with `frame`, for writing rows back out untouched."""
    frame: pd.DataFrame
    original_columns: list[str]
    shape: Shape
    files: list[FileInfo]
    table: pa.Table

    def __len__(self) -> int:
        return len(self.frame)

    def usable_mask(self) -> np.ndarray:
        return (self.frame["dpsel_reason"] == "").to_numpy()

    def usable(self) -> pd.DataFrame:
        """Rows with no drop reason (valid, first occurrence)."""
        return self.frame[self.usable_mask()]

    def messages(self, mask: Any = None) -> list[list[dict]]:
        """Normalised messages of all rows, or of the rows where boolean `mask` is true."""
        column = self.frame["dpsel_messages"]
        if mask is not None:
            column = column[np.asarray(mask, dtype=bool)]
        return column.tolist()

    def counts(self) -> dict[str, int]:
        """Rows by reason: input_rows == usable + invalid + duplicate."""
        by_reason = self.frame["dpsel_reason"].value_counts()
        return {"input_rows": len(self.frame), "usable": int(by_reason.get("", 0)),
                REASON_INVALID: int(by_reason.get(REASON_INVALID, 0)),
                REASON_DUPLICATE: int(by_reason.get(REASON_DUPLICATE, 0))}


def _concat(tables: list[pa.Table], urls: list[str]) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DpselInputError(f"shards have incompatible column types ({exc})", file=", ".join(urls)) from exc


def read_instruction_set(paths, batch_rows: int = 65536) -> InstructionSet:
    """Read the whole input into an `InstructionSet` (see the module docstring for what raises)."""
    planned = _plan(expand_paths(paths))
    tables = [p.schema.empty_table() for p in planned]   # keeps columns of files with no rows
    ids, messages, reasons, details, files_col = [], [], [], [], []
    for nb in _iter_planned(planned, batch_rows):
        tables.append(pa.Table.from_batches([nb.batch]))
        ids += nb.ids
        messages += nb.messages
        reasons += nb.reasons
        details += nb.details
        files_col += [nb.file.url] * nb.num_rows
    table = _concat(tables, [p.file.url for p in planned])
    frame = table.to_pandas()
    frame[ID_COLUMN] = pd.Series(ids, index=frame.index, dtype=object)
    frame["dpsel_messages"] = pd.Series(messages, index=frame.index, dtype=object)
    frame["dpsel_reason"] = pd.Series(reasons, index=frame.index, dtype=object)
    frame["dpsel_detail"] = pd.Series(details, index=frame.index, dtype=object)
    frame["dpsel_file"] = pd.Series(files_col, index=frame.index, dtype=object)
    files = [FileInfo(p.file.url, p.rows, file_sha256(p.file.path, p.file.fs)) for p in planned]
    return InstructionSet(frame, list(table.column_names), planned[0].shape, files, table)


# ----------------------------------------------------------------------------- validation summary
PERCENTILES = (50, 90, 99)
GROUP_COLUMNS = ("task", "source")


def _length_stats(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {f"p{q}": 0 for q in PERCENTILES} | {"max": 0}
    values = np.asarray(lengths)
    stats = {f"p{q}": int(np.percentile(values, q)) for q in PERCENTILES}
    return stats | {"max": int(values.max())}


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


def _prompt_response_chars(messages: list[dict]) -> tuple[int, int]:
    """Prompt = every message before the final (assistant) one; response = the final message."""
    return sum(len(m["content"]) for m in messages[:-1]), len(messages[-1]["content"])


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


def validate_paths(paths, batch_rows: int = 8192) -> ValidationSummary:
    """Strictly check an instruction set (raises `DpselInputError` on the first bad row) and summarise it."""
    checked, skipped = skip_known_outputs(expand_paths(paths), paths)
    planned = _plan(checked)
    rows, duplicates = 0, 0
    nulls: Counter[str] = Counter()
    empties: Counter[str] = Counter()
    groups: dict[str, Counter[str]] = {}
    prompt_lengths: list[int] = []
    response_lengths: list[int] = []
    for name in dict.fromkeys(n for p in planned for n in p.schema.names):
        nulls[name] += 0    # list every column, even one only in a shard with no rows
    for nb in _iter_planned(planned, batch_rows):
        for offset, problem in enumerate(nb.problems):
            if problem is not None:
                raise nb.error_for(offset, problem)
        for name in nb.batch.schema.names:
            nulls[name] += nb.batch.column(name).null_count
            empties[name] += _empty_count(nb.batch.column(name))
        for name in GROUP_COLUMNS:
            if name in nb.batch.schema.names:
                groups.setdefault(name, Counter()).update(str(v) for v in nb.batch.column(name).to_pylist())
        for messages in nb.messages:
            prompt, response = _prompt_response_chars(messages)
            prompt_lengths.append(prompt)
            response_lengths.append(response)
        duplicates += nb.reasons.count(REASON_DUPLICATE)
        rows += nb.num_rows
    files = [(p.file.url, p.rows) for p in planned]
    return ValidationSummary(rows, planned[0].shape, files, dict(nulls),
                             {c: empties[c] for c in nulls}, _length_stats(prompt_lengths),
                             _length_stats(response_lengths), duplicates,
                             {c: dict(v) for c, v in groups.items()}, skipped)
