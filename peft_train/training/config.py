"""``TrainConfig``: transformers' ``TrainingArguments`` with peft_train's defaults, plus the few settings Trainer
has no field for (as TRL's ``SFTConfig`` extends it), and the choice of optimizer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "trackio", "all")
# TrainConfig.optimizer -> TrainingArguments.optim
TRAINER_OPTIM = {"adamw": "adamw_torch", "paged_adamw": "paged_adamw_32bit"}


@dataclass
class TrainConfig(TrainingArguments):
    """Every ``TrainingArguments`` field works as documented there. Length: ``max_steps`` optimizer steps (default
    200), or ``max_steps=-1`` and ``num_train_epochs`` passes. ``warmup_steps`` below 1 is a fraction of the
    steps. ``save_steps=None``: about ten checkpoints per run. ``train()`` sets ``output_dir``/``save_strategy``
    from its ``checkpoint_dir`` and ``optim`` from ``optimizer``; with ``eval_strategy="steps"`` it measures the
    eval loss of its ``eval_messages`` every ``eval_steps`` steps (not at the last step: it evaluates there
    itself)."""

    max_length: int = 512  # tokens per row (prompt truncated first)
    optimizer: str = "auto"  # auto (paged AdamW for a 4-bit base on CUDA, else AdamW) | adamw | paged_adamw
    log_every: int = 10  # steps between plain progress lines when no terminal is attached
    max_new_tokens: int = 64  # greedy-generation budget for exact match at the end of training

    # TrainingArguments' own fields with peft_train's defaults
    max_steps: int = 200
    learning_rate: float = 1e-3
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    warmup_steps: float = 0.05
    lr_scheduler_type: str = "cosine"
    seed: int = 0
    save_strategy: str = "no"  # train() saves when it is given a checkpoint_dir
    save_steps: float | None = None
    save_total_limit: int | None = 2
    report_to: str | list[str] | None = "none"
    logging_steps: float = 1  # every step's loss goes into the log history (and so into checkpoints)
    disable_tqdm: bool | None = True  # peft_train's progress callback draws instead
    remove_unused_columns: bool = False
    label_names: list[str] | None = field(default_factory=lambda: ["labels"])
    prediction_loss_only: bool = True  # periodic eval keeps the loss, never the logits

    def __post_init__(self) -> None:
        self._check()
        super().__post_init__()

    def _check(self) -> None:
        if self.max_steps == -1:
            epochs = self.num_train_epochs
            if not (epochs > 0 and math.isfinite(epochs)):
                raise ValueError(f"num_train_epochs must be a positive number, got {epochs}")
        elif self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (or -1 for num_train_epochs), got {self.max_steps}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.save_steps is not None and self.save_steps < 1:
            raise ValueError(f"save_steps must be at least 1, got {self.save_steps}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not (0 <= self.warmup_steps < 1 or float(self.warmup_steps).is_integer()):
            raise ValueError(f"warmup_steps is a fraction in [0, 1) or whole steps, got {self.warmup_steps}")
        if self.optimizer not in ("auto", *TRAINER_OPTIM):
            raise ValueError(f"optimizer must be 'auto', 'adamw' or 'paged_adamw', got {self.optimizer!r}")
        if isinstance(self.report_to, str) and self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")


def choose_optimizer_name(config: TrainConfig, device: torch.device, quantized_4bit: bool) -> str:
    """QLoRA's paged AdamW (optimizer state in CUDA unified memory, paged out under pressure) needs CUDA;
    elsewhere, and for 16-bit bases whose state is small next to the weights, plain AdamW."""
    if config.optimizer != "auto":
        if config.optimizer == "paged_adamw" and device.type != "cuda":
            raise ValueError("paged AdamW needs a CUDA device; use optimizer='adamw' on CPU")
        return config.optimizer
    return "paged_adamw" if device.type == "cuda" and quantized_4bit else "adamw"
