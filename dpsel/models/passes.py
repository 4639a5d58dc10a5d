"""Pool passes: one model pass over every row of the pool, run by the current executor.

A pass is a plain module-level function `fn(lm, rows) -> np.ndarray` (one value or one vector per row of an
`EncodedRows`), so it pickles by reference and an executor elsewhere (a Ray actor) can run the very same
function. Methods hand their own pass to `pool_pass`; an engine implements `Executor` and a run installs it
with `executing_on` — steps never import executors. The default executor runs the pass in this process.

Resume by chunk: in process and inside a checkpointed run (`dpsel.resume.checkpoints.current_whole()`), a pass given a
`stage` runs over chunks of DPSEL_PASS_CHUNK_ROWS rows (default 4096; whole batches of the pass's length
order, so the values are bit-identical to one pass over all rows), saves the finished chunks' values by the
checkpoints' policy (`Checkpoints.after_step`: periodically, and at a stop signal) and a re-run skips them.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:  # the LM stack (transformers) loads on the first pass, not when a run installs its executor
    from dpsel.models.lm import LM, EncodedRows

RowPass = Callable[["LM", "EncodedRows"], np.ndarray]
# forward_rows' batch size, which every pass uses: chunks of whole batches batch (so pad) rows as one pass does
CHUNK_ALIGN = 64
DEFAULT_CHUNK_ROWS = 4096


class Executor(Protocol):
    """Runs `fn` over every row of `messages` (encoded to `max_length`), values in row order."""

    def run(self, fn: RowPass, lm: LM, messages: list, max_length: int) -> np.ndarray: ...


class InProcess:
    """The default executor: encode the rows here and call the pass."""

    def run(self, fn: RowPass, lm: LM, messages: list, max_length: int) -> np.ndarray:
        from dpsel.models.lm import EncodedRows
        return fn(lm, EncodedRows(messages, lm.tokenizer, max_length, lm.pad_id))


_executor: ContextVar[Executor] = ContextVar("dpsel_pool_executor", default=InProcess())


@contextmanager
def executing_on(executor: Executor) -> Iterator[None]:
    """Within the block, pool passes run on `executor` (a context variable, so method signatures stay as is)."""
    token = _executor.set(executor)
    try:
        yield
    finally:
        _executor.reset(token)


def runs_in_process() -> bool:
    """Whether pool passes run in this process now (no engine installed)."""
    return isinstance(_executor.get(), InProcess)


def pool_pass(fn: RowPass, lm: LM, messages: list, max_length: int,
              rows: EncodedRows | None = None, stage: str | None = None) -> np.ndarray:
    """`fn` over every row of `messages` on the current executor; in process, `rows` (the encoded `messages`,
    when the caller has them) saves encoding them again, and `stage` (a checkpoint stage name, unique in the
    run) makes the pass resumable by chunk in a checkpointed run."""
    if not runs_in_process():
        return _executor.get().run(fn, lm, messages, max_length)
    if rows is None:
        from dpsel.models.lm import EncodedRows
        rows = EncodedRows(messages, lm.tokenizer, max_length, lm.pad_id)
    from dpsel.resume.checkpoints import current_whole
    checkpoint, size = current_whole(), chunk_rows()
    if stage is None or checkpoint is None or len(rows) <= size:
        return fn(lm, rows)
    from dpsel.models.chunked_pass import chunked_pass
    return chunked_pass(fn, lm, rows, stage, checkpoint, size)


def chunk_rows() -> int:
    """Rows per chunk of a resumable pass: DPSEL_PASS_CHUNK_ROWS rounded up to whole batches."""
    rows = int(os.environ.get("DPSEL_PASS_CHUNK_ROWS", DEFAULT_CHUNK_ROWS))
    return max(1, -(-rows // CHUNK_ALIGN)) * CHUNK_ALIGN
