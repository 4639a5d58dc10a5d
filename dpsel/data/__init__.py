"""Read, check and normalise instruction sets (Parquet: a file, a folder of shards or a glob; any fsspec URL).

Every input row is normalised to chat `messages` (Alpaca rows through `normalize.alpaca_to_messages`),
gets a `dpsel_id` (`normalize.row_id`, or the row's own non-null `dpsel_id` where the column exists) and
ends with a reason: "" (usable), "invalid" or "duplicate" (same id as an earlier usable row; the first
occurrence is kept, invalid takes precedence). Rows are numbered from 0, both over the whole input
(in file order, then row order) and within their file; error messages give both.

How (columnar): rows stay in Arrow from read to write. Per record batch, Arrow kernels (`columnar.py`) decide
which rows are certainly clean (the same rules as the per-row reference, e.g. blank = nothing but Python's
`str.isspace` characters), build their canonical JSON and hash it (`normalize.sha_ids`: byte-identical to
`row_id`); only the other rows (invalid ones, in practice) go through the per-row reference
(`reference.reference_row`), which therefore defines every detail message. Duplicates are found with `SeenIds`, an
exact index of ~18 bytes per id. `validate_paths` and `iter_batches` stream (memory: one batch plus that
index); `read_instruction_set` holds the set as one Arrow table plus row-aligned arrays. pyarrow suffices:
Polars/DuckDB would only help with the per-row sha256, which neither beat by enough to add a dependency
(measured: DuckDB's sha256 ~0.85 µs/row, Python's hashlib loop ~1 µs/row, polars-hash ~0.4 µs/row; again
for issue 20, same process, 1M canonical texts of ~160 bytes, one thread: DuckDB 2.0.1 1.31 s, the hashlib
loop over the Arrow buffer 1.55 s -- not worth a 69 MB install). Messages for the stages and curated.parquet
are built the same columnar way (`InstructionSet.message_array`). The command line (and the demo) make
jemalloc Arrow's memory pool (`arrays.lean_memory_pool`) so per-batch buffers do not stay resident; importing
the library leaves the process's pool alone.

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

from dpsel.data.batch import NormalizedBatch
from dpsel.data.columnar import rows_to_score, rows_to_score_and_write
from dpsel.data.dedup import SeenIds
from dpsel.data.instruction_set import FileInfo, InstructionSet
from dpsel.data.normalize import alpaca_to_messages, row_id
from dpsel.data.paths import ResolvedFile, expand_paths
from dpsel.data.reader import iter_batches, read_instruction_set
from dpsel.data.reasons import GROUP_COLUMNS, REASON_DUPLICATE, REASON_INVALID, REASON_LOW_WEIGHT
from dpsel.data.reference import MAX_MESSAGE_CHARS, RowProblem, reference_row
from dpsel.data.schema import Shape
from dpsel.data.stats import ValidationSummary
from dpsel.data.validate import validate_paths

__all__ = [
    "GROUP_COLUMNS", "MAX_MESSAGE_CHARS", "REASON_DUPLICATE", "REASON_INVALID", "REASON_LOW_WEIGHT",
    "FileInfo", "InstructionSet", "NormalizedBatch", "ResolvedFile", "RowProblem", "SeenIds", "Shape",
    "ValidationSummary", "alpaca_to_messages", "expand_paths", "iter_batches", "read_instruction_set",
    "reference_row", "row_id", "rows_to_score", "rows_to_score_and_write", "validate_paths",
]
