"""Pretraining a base on rows with Trainer: every parameter trained, for a number of steps or until a wall-clock
budget runs out (the bound on CPU; a GPU finishes the steps). A benchmark's stand-in for a pretrained LLM."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from transformers import TrainerCallback

from peft_train.training.config import TrainConfig
from peft_train.training.progress import ProgressFn
from peft_train.training.run import TrainResult, train


class TimeLimit(TrainerCallback):
    """Stops training after the first step that ends ``seconds`` after training began."""

    def __init__(self, seconds: float):
        self.seconds, self.deadline = seconds, float("inf")

    def on_train_begin(self, args, state, control, **kwargs):
        self.deadline = time.perf_counter() + self.seconds

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() >= self.deadline:
            control.should_training_stop = True


def pretrain(model, tokenizer, rows: Sequence[Sequence[Mapping]], config: TrainConfig, seconds: float | None = None,
             progress: bool | ProgressFn = False) -> TrainResult:
    """Train every parameter of ``model`` on the responses of ``rows`` for ``config.max_steps`` steps, stopped
    early when ``seconds`` of training have passed (the schedule still spans ``max_steps``). In place."""
    model.requires_grad_(True)
    callbacks = [TimeLimit(seconds)] if seconds is not None else []
    return train(model, tokenizer, rows, config=config, progress=progress, callbacks=callbacks)
