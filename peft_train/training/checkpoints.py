"""Trainer checkpoints that are complete: a process killed while saving leaves a ``checkpoint-N`` folder without
``trainer_state.json`` (Trainer writes it last), which Trainer alone would take for the newest one."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

from transformers.trainer_utils import sort_checkpoints

from peft_train.training.config import TrainConfig

CHECKPOINTS_PER_RUN = 10  # save_steps=None: about this many checkpoints over a run


def is_complete(checkpoint: str | Path) -> bool:
    try:
        json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def _checkpoints(checkpoint_dir: str | Path | None) -> list[str]:
    if checkpoint_dir is None or not Path(checkpoint_dir).is_dir():
        return []
    return sort_checkpoints(str(checkpoint_dir))  # oldest first, by step


def last_checkpoint(checkpoint_dir: str | Path | None) -> str | None:
    """The newest complete ``checkpoint-N`` folder under ``checkpoint_dir`` (None when there is none)."""
    complete = [path for path in _checkpoints(checkpoint_dir) if is_complete(path)]
    return complete[-1] if complete else None


def discard_incomplete_checkpoints(checkpoint_dir: str | Path | None) -> list[str]:
    """Delete the checkpoint folders a kill left half-written."""
    removed = [path for path in _checkpoints(checkpoint_dir) if not is_complete(path)]
    for folder in removed:
        print(f"training: removing incomplete checkpoint {folder}", file=sys.stderr, flush=True)
        shutil.rmtree(folder)
    return removed


def save_steps(config: TrainConfig, n_rows: int) -> int:
    """``config.save_steps``, or about ``CHECKPOINTS_PER_RUN`` checkpoints over the run when it is None."""
    if config.save_steps is not None:
        return int(config.save_steps)
    batch = config.per_device_train_batch_size
    per_epoch = math.ceil(math.ceil(n_rows / batch) / config.gradient_accumulation_steps)
    total = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * per_epoch)
    return max(1, total // CHECKPOINTS_PER_RUN)
