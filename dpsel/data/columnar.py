"""The columnar path: per record batch, Arrow kernels decide which rows are certainly clean (the same rules as
`reference.py`), build their messages and hash their ids in bulk; every other row goes through `reference_row`,
which therefore defines every detail message and the id of every bad row."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpsel.data.arrays import numpy_bool, take_rows
from dpsel.data.reference import MAX_MESSAGE_CHARS, RowProblem, reference_row
from dpsel.data.schema import ID_COLUMN, MESSAGE_TYPE, Shape
from dpsel.data.normalize import ROLES, alpaca_canonical, chat_canonical, row_ids_alpaca, row_ids_chat, sha_ids


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


def _visible(text: pa.Array) -> np.ndarray:
    """Per value: has a character Python's strip() keeps (False for null)."""
    return numpy_bool(pc.match_substring_regex(text, _VISIBLE))


def _chars(text: pa.Array) -> np.ndarray:
    """Characters (code points, as Python's len) per value; 0 for null."""
    return pc.utf8_length(text).fill_null(0).to_numpy(zero_copy_only=False)


class NormalRows:
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

    def message_items(self, rows: np.ndarray) -> tuple[pa.Array, pa.Array, np.ndarray]:
        """(role, content, row offsets) of the clean `rows`' messages, flat and columnar (no Python objects)."""
        raise NotImplementedError


class _AlpacaNormalRows(NormalRows):
    shape = "alpaca"

    def __init__(self, batch):
        super().__init__(batch)
        names = batch.schema.names
        self.instruction = _as_text(batch.column("instruction"))
        self.output = _as_text(batch.column("output"))
        extra = _as_text(batch.column("input")) if "input" in names else pa.nulls(self.n, pa.large_string())
        has_input = numpy_bool(pc.greater(pc.utf8_length(extra), 0))   # `input or None`: "" is no input
        joined = pc.binary_join_element_wise(self.instruction, extra, pa.scalar("\n\n", pa.large_string()))
        self.prompt = pc.if_else(pa.array(has_input), joined, self.instruction)
        self.clean = (_visible(self.instruction) & _visible(self.output)
                      & (_chars(self.prompt) <= MAX_MESSAGE_CHARS) & (_chars(self.output) <= MAX_MESSAGE_CHARS))

    def messages(self, rows):
        index = pa.array(rows, pa.int64())
        prompts, outputs = self.prompt.take(index).to_pylist(), self.output.take(index).to_pylist()
        return [[{"role": "user", "content": p}, {"role": "assistant", "content": o}]
                for p, o in zip(prompts, outputs)]

    def message_items(self, rows):
        index = pa.array(rows, pa.int64())
        both = pa.concat_arrays([self.prompt.take(index), self.output.take(index)])
        interleaved = np.stack([np.arange(len(rows)), len(rows) + np.arange(len(rows))], axis=1).ravel()
        roles = pa.DictionaryArray.from_arrays(pa.array(np.tile([0, 1], len(rows)), pa.int8()),
                                               pa.array(["user", "assistant"], pa.large_string()))
        return (roles.dictionary_decode(), both.take(pa.array(interleaved, pa.int64())),
                np.arange(0, 2 * len(rows) + 1, 2, dtype=np.int64))

    def ids(self, rows):
        prompt, output = take_rows(self.prompt, rows, self.n), take_rows(self.output, rows, self.n)
        canonical, slow = alpaca_canonical(prompt, output)
        ids = sha_ids(canonical)
        if slow.any():   # control characters JSON spells \u00XX: the per-row encoder
            where = pa.array(np.flatnonzero(slow), pa.int64())
            ids = pc.replace_with_mask(ids, pa.array(slow), pa.array(row_ids_alpaca(
                prompt.take(where).to_pylist(), output.take(where).to_pylist()), pa.string()))
        return ids

    def prompt_response_chars(self):
        return _chars(self.prompt), _chars(self.output)


class _ChatNormalRows(NormalRows):
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
        known = numpy_bool(pc.is_in(self.role, value_set=pa.array(ROLES, pa.large_string())))
        self.chars = _chars(self.content)
        bad_item = (~known | ~numpy_bool(pc.is_valid(self.content)) | (self.chars > MAX_MESSAGE_CHARS)
                    | ((role != "system") & ~_visible(self.content)))
        bad_rows = np.bincount(parent, weights=bad_item, minlength=self.n) > 0
        has_user = np.bincount(parent, weights=role == "user", minlength=self.n) > 0
        last = np.maximum(self.starts[1:] - 1, 0)
        last_is_assistant = (self.lengths > 0) & (role[last] == "assistant" if len(role) else False)
        self.clean = (numpy_bool(pc.is_valid(lists)) & (self.lengths > 0) & ~bad_rows & has_user
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

    def message_items(self, rows):
        index, offsets = self._items(rows)
        return self.role.take(index), self.content.take(index), np.asarray(offsets, np.int64)

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


def normal_rows(batch, shape: Shape) -> NormalRows:
    return _AlpacaNormalRows(batch) if shape == "alpaca" else _ChatNormalRows(batch)


def messages_with_overrides(rows: NormalRows, wanted: np.ndarray, overrides: dict[int, list[dict]]
                             ) -> list[list[dict]]:
    fast = wanted[rows.clean[wanted]]
    built = dict(zip(fast.tolist(), rows.messages(fast)))
    return [built[k] if k in built else overrides[k] for k in wanted.tolist()]


def message_array(rows: NormalRows, wanted: np.ndarray, overrides: dict[int, list[dict]], message_type: pa.DataType,
                  everywhere: bool = False) -> pa.Array:
    """`messages_with_overrides` as one Arrow list array of `message_type`, built columnar: the clean rows from
    `NormalRows.message_items`, only the override rows through Python. With `everywhere`, the array has one entry
    per row of the batch: the conversation of the `wanted` rows, an empty list elsewhere."""
    item_type = message_type.value_type
    fast = wanted[rows.clean[wanted]]
    role, content, offsets = rows.message_items(fast)
    built = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.StructArray.from_arrays(
        [role.cast(item_type.field("role").type), content.cast(item_type.field("content").type)],
        fields=list(item_type)))
    slow = wanted[~rows.clean[wanted]]
    if len(slow):
        order = np.concatenate([fast, slow]).argsort(kind="stable")
        built = pa.concat_arrays([built, pa.array([overrides[k] for k in slow.tolist()], message_type)]
                                 ).take(pa.array(order, pa.int64()))
    if not everywhere:
        return built
    lengths = np.zeros(rows.n, np.int32)
    lengths[wanted] = np.diff(built.offsets.to_numpy())
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
                                    built.flatten())


def verdicts(batch: pa.RecordBatch, rows: NormalRows
              ) -> tuple[pa.Array, dict[int, RowProblem], dict[int, list[dict]]]:
    """Ids and problems of every row: clean rows in bulk, the others through `reference_row`."""
    n = batch.num_rows
    ids = pa.nulls(n, pa.string())
    has_given = np.zeros(n, dtype=bool)
    if ID_COLUMN in batch.schema.names:    # the input's own non-empty ids win
        given = _as_text(batch.column(ID_COLUMN))
        has_given = numpy_bool(pc.greater(pc.binary_length(given), 0))
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
    ids, valid, messages, _ = _scored_rows(batch, shape, None)
    return ids, valid, messages


def rows_to_score_and_write(batch: pa.RecordBatch | pa.Table, shape: Shape
                            ) -> tuple[list[str], np.ndarray, list[list[dict]], pa.Array]:
    """`rows_to_score` plus the valid rows' messages as one Arrow array (`MESSAGE_TYPE`, built columnar as
    `InstructionSet.message_array`): for actors that also write their rows' part of curated.parquet."""
    return _scored_rows(batch, shape, MESSAGE_TYPE)


def _scored_rows(batch, shape: Shape, message_type: pa.DataType | None):
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else pa.RecordBatch.from_pylist([], batch.schema)
    rows = normal_rows(batch, shape)
    ids, problems, overrides = verdicts(batch, rows)
    valid = np.ones(batch.num_rows, dtype=bool)
    valid[list(problems)] = False
    wanted = np.flatnonzero(valid)
    array = None if message_type is None else message_array(rows, wanted, overrides, message_type)
    return ids.to_pylist(), valid, messages_with_overrides(rows, wanted, overrides), array
