"""Pool passes: one model pass over every row of the pool, run by the current executor.

A pass is a plain module-level function `fn(lm, rows) -> np.ndarray` (one value or one vector per row of an
`EncodedRows`), so it pickles by reference and an executor elsewhere (a Ray actor) can run the very same
function. Methods hand their own pass to `pool_pass`; an engine implements `Executor` and a run installs it
with `executing_on` — steps never import executors. The default executor runs the pass in this process.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:  # the LM stack (transformers) loads on the first pass, not when a run installs its executor
    from dpsel.models.lm import LM, EncodedRows

RowPass = Callable[["LM", "EncodedRows"], np.ndarray]


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
              rows: EncodedRows | None = None) -> np.ndarray:
    """`fn` over every row of `messages` on the current executor; in process, `rows` (the encoded `messages`,
    when the caller has them) saves encoding them again."""
    if rows is not None and runs_in_process():
        return fn(lm, rows)
    return _executor.get().run(fn, lm, messages, max_length)
