"""How peft_train's long loops report progress without knowing who listens.

A progress callback is any `progress(step, total, diag)` callable; `diag["phase"]` names the loop
("training", "eval_loss", "generate"). The training loop, `row_losses` and `greedy_answers` call it; a
`transformers.Trainer` reports through `ProgressCallback`, which turns the Trainer's step events into the same
calls. (dpsel's reporter is one such callable; peft_train does not import it.)
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

ProgressFn = Callable[[int, int, dict], None]


def report(progress: ProgressFn | None, step: int, total: int, phase: str, **diag: Any) -> None:
    """Call `progress` if one was given, with the phase in `diag`."""
    if progress is not None:
        progress(step, total, {"phase": phase, **diag})


def trainer_callback(progress: ProgressFn):
    """A `transformers.TrainerCallback` feeding `progress` with the Trainer's steps ("training" phase) and
    logged loss/learning rate."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self) -> None:
            self.latest: dict[str, float] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.latest = {k: float(v) for k, v in (logs or {}).items()
                           if k in ("loss", "learning_rate") and isinstance(v, (int, float))}

        def on_step_end(self, args, state, control, **kwargs):
            report(progress, state.global_step, state.max_steps, "training", **self.latest)

    return ProgressCallback()
