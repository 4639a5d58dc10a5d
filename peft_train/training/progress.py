"""How peft_train's long loops report progress without knowing who listens.

A progress callback is any ``progress(step, total, diag)`` callable; ``diag["phase"]`` names the loop
("training", "eval_loss", "generate"). ``row_losses`` and ``greedy_answers`` call it through ``report``; training
reports through ``ProgressCallback``, a ``TrainerCallback``. (dpsel's reporter is one such callable; peft_train
does not import it.)
"""

from __future__ import annotations

import sys
import time
from typing import Any

from transformers import TrainerCallback

from peft_train.types import ProgressFn


def report(progress: ProgressFn | None, step: int, total: int, phase: str, **diag: Any) -> None:
    """Call ``progress`` if one was given, with the phase in ``diag``."""
    if progress is not None:
        progress(step, total, {"phase": phase, **diag})


class ProgressCallback(TrainerCallback):
    """Trainer's steps as progress, on the main process only, and every step's wall time in ``step_seconds``.

    ``progress``: a callable gets every logged step ("training" phase, with ``loss`` and ``lr``) and nothing is
    drawn here; True draws tqdm on a terminal and prints a plain line every ``log_every`` steps otherwise (CI,
    schedulers, files); False reports nothing.
    """

    def __init__(self, progress: bool | ProgressFn = True, log_every: int = 10):
        self.progress, self.log_every = progress, max(1, log_every)
        self.callback: ProgressFn | None = None
        self.lines = False
        self.bar = None
        self.step_seconds: list[float] = []
        self._started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        enabled = self.progress if state.is_world_process_zero else False  # one line per step, not per rank
        self.callback = enabled if callable(enabled) else None
        self.lines = bool(enabled) and self.callback is None
        if self.lines and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step")

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._started)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._show(state.global_step, state.max_steps, float(logs["loss"]), float(logs.get("learning_rate", 0.0)))

    def _show(self, step: int, total: int, loss: float, lr: float) -> None:
        report(self.callback, step, total, "training", loss=loss, lr=lr)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif self.lines and (step % self.log_every == 0 or step == total):
            # printed, not logged: a CLI run without logging configured must still show progress
            print(f"training: step {step}/{total} loss {loss:.4f} lr {lr:.3g}", file=sys.stderr, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
