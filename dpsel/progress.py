"""Progress reporting for long work: a rich bar on a terminal, plain log lines otherwise (CI, schedulers)."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

from dpsel.select.base import ProgressFn


def _format_diag(diag: dict) -> str:
    shown = [f"{k}={v:.3g}" for k, v in diag.items() if isinstance(v, (int, float)) and k != "step"]
    return " ".join(shown[:4])


@contextlib.contextmanager
def progress_reporter(description: str, *, stream=None, log_every_s: float = 10.0) -> Iterator[ProgressFn]:
    """Yields a `progress(step, total, diag)` callback; draws a bar on a TTY, logs a line every `log_every_s` otherwise."""
    stream = stream or sys.stderr
    if stream.isatty():
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeRemainingColumn(), TextColumn("{task.fields[diag]}"), transient=False) as bar:
            task = bar.add_task(description, total=None, diag="")

            def update(step: int, total: int, diag: dict) -> None:
                bar.update(task, completed=step, total=total, diag=_format_diag(diag or {}))
            yield update
        return

    last = [0.0]

    def log_line(step: int, total: int, diag: dict) -> None:
        now = time.monotonic()
        if step >= total or now - last[0] >= log_every_s:
            last[0] = now
            print(f"{description}: {step}/{total} {_format_diag(diag or {})}".rstrip(), file=stream, flush=True)
    yield log_line
