"""``train``: one fine-tuning run on transformers' ``Trainer`` (checkpoints and resume, gradient accumulation,
epochs or steps, warmup + schedule, ``report_to``, periodic eval, multi-GPU under ``accelerate launch`` /
``torchrun``), and its ``TrainResult``.

peft_train knows nothing of Parquet or dpsel: it takes conversations (lists of ``{role, content}``).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from transformers import PrinterCallback, TrainerCallback

from peft_train.encode import encode_all
from peft_train.memory import MemoryMeter
from peft_train.models import is_quantized_4bit
from peft_train.tokenizer import pad_token_id
from peft_train.training.checkpoints import discard_incomplete_checkpoints, last_checkpoint, save_steps
from peft_train.training.config import TRAINER_OPTIM, TrainConfig, choose_optimizer_name
from peft_train.training.data import WeightedRows, check_weights, collate_weighted, has_response, trainable_rows
from peft_train.training.evaluate import evaluate
from peft_train.training.progress import ProgressCallback, ProgressFn
from peft_train.training.trainer import WeightedTrainer

LOSS_WINDOW = 10  # steps averaged into the reported final train loss (one step's loss is noisy)


@dataclass
class TrainResult:
    train_loss: float  # mean weighted loss over the last LOSS_WINDOW steps
    losses: list[float]  # the weighted loss of every step
    steps: int  # optimizer steps, counting those done before a resume
    seconds: float  # the training steps alone (encoding and the final evaluation not included)
    peak_memory_bytes: int
    memory_measure: str  # "cuda_max_allocated" or "tensor_accounting" (see peft_train.memory)
    optimizer: str
    lr: float
    n_rows: int  # rows trained on (positive weight and at least one response token)
    n_skipped: int  # rows left out: weight 0 or no response token left after truncation
    n_truncated: int
    epochs: float = 0.0  # passes over the rows trained on
    step_seconds: list[float] = field(default_factory=list)  # wall time of every step (loss.item() syncs the device)
    eval: dict | None = None
    eval_trace: list[dict] = field(default_factory=list)  # Trainer's periodic eval logs (eval_strategy="steps")
    resumed_from_step: int = 0  # global step of the checkpoint this run resumed from (0: a fresh run)
    is_main_process: bool = True  # False on the other ranks of a multi-process (DDP) run

    def to_dict(self) -> dict:
        return asdict(self)


class _NoEvalAtLastStep(TrainerCallback):
    """``train`` evaluates after the last step itself (with exact match), so Trainer's periodic eval skips it."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_evaluate = False


def _eval_rows(eval_messages, tokenizer, config: TrainConfig) -> WeightedRows | None:
    """The periodic eval set: the rows with a response token left (Trainer's eval loss is then their mean)."""
    if not eval_messages or config.eval_strategy == "no":
        return None
    examples = [e for e in encode_all(eval_messages, tokenizer, config.max_length).examples if has_response(e)]
    return WeightedRows(examples, [1.0] * len(examples)) if examples else None


def _run_arguments(config: TrainConfig, output_dir: str, optimizer_name: str, save_every: int | None,
                   evaluating: bool) -> TrainConfig:
    """The caller's config with what this run decides: where it writes, the optimizer, saving and eval."""
    saving = {"save_strategy": "steps", "save_steps": save_every} if save_every else {"save_strategy": "no"}
    return replace(config, output_dir=output_dir, optim=TRAINER_OPTIM[optimizer_name], **saving,
                   **({} if evaluating else {"eval_strategy": "no"}))


def _step_losses(log_history: list[dict]) -> list[float]:
    return [float(entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]


def train(
    model,
    tokenizer,
    messages: Sequence[Sequence[Mapping]],
    weights: Sequence[float] | None = None,
    config: TrainConfig | None = None,
    eval_messages: Sequence[Sequence[Mapping]] | None = None,
    progress: bool | ProgressFn = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence | None = None,
) -> TrainResult:
    """Train the model's trainable parameters on the responses of ``messages`` with transformers' Trainer.

    Each optimizer step's loss is Σ w_i ℓ_i / Σ w_i over its rows (all micro-batches of an accumulation, all
    ranks), ℓ_i the row's mean response-token NLL; rows with weight 0 (and rows truncated down to no response
    token) are left out of the batches. With ``checkpoint_dir`` Trainer writes ``checkpoint-N`` folders there
    every ``save_steps`` steps; ``resume=True`` continues from the newest complete one (a fresh run when there is
    none). ``callbacks``: extra ``TrainerCallback`` objects. The model is trained in place and left in eval
    mode. With ``eval_messages`` the result carries ``evaluate``'s metrics.
    """
    config = config or TrainConfig()
    encoded = encode_all(messages, tokenizer, config.max_length)
    examples, example_weights, n_skipped = trainable_rows(encoded, check_weights(weights, len(messages)))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter (build an adapter first, or use method 'full')")
    optimizer_name = choose_optimizer_name(config, config.device, is_quantized_4bit(model))
    if resume and config.process_index == 0:  # one process deletes; every rank then picks the same complete one
        discard_incomplete_checkpoints(checkpoint_dir)
    resume_from = last_checkpoint(checkpoint_dir) if resume else None
    eval_rows = _eval_rows(eval_messages, tokenizer, config)

    meter = MemoryMeter(model, config.device)
    shown = ProgressCallback(progress, config.log_every)
    with tempfile.TemporaryDirectory(prefix="peft-train-") as scratch:
        save_every = save_steps(config, len(examples)) if checkpoint_dir is not None else None
        args = _run_arguments(config, str(checkpoint_dir or scratch), optimizer_name, save_every, eval_rows is not None)
        trainer = WeightedTrainer(
            model=model, args=args, train_dataset=WeightedRows(examples, example_weights), eval_dataset=eval_rows,
            data_collator=collate_weighted(pad_token_id(tokenizer)),
            callbacks=[shown, _NoEvalAtLastStep(), *(callbacks or [])], lengths=[len(e) for e in examples],
            meter=meter,
        )
        trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
        model.train()
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume_from)
        seconds = time.perf_counter() - started
    peak = meter.peak(params, trainer.optimizer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()

    history = trainer.state.log_history
    losses = _step_losses(history)
    if not losses:
        raise RuntimeError("training ran no step (the checkpoint is already at the last step?)")
    result = TrainResult(
        train_loss=float(sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:])),
        losses=losses,
        steps=int(trainer.state.global_step),
        seconds=seconds,
        peak_memory_bytes=int(peak),
        memory_measure=meter.measure,
        optimizer=optimizer_name,
        lr=config.learning_rate,
        n_rows=len(examples),
        n_skipped=n_skipped,
        n_truncated=encoded.n_truncated,
        epochs=float(trainer.state.epoch or 0.0),
        step_seconds=shown.step_seconds,
        eval_trace=[entry for entry in history if "eval_loss" in entry],
        resumed_from_step=int(Path(resume_from).name.split("-")[-1]) if resume_from else 0,
        is_main_process=trainer.is_world_process_zero(),
    )
    if eval_messages:
        result.eval = evaluate(
            model, tokenizer, eval_messages, max_new_tokens=config.max_new_tokens,
            batch_size=config.per_device_eval_batch_size, max_length=config.max_length,
        )
    return result
