"""Training on transformers' ``Trainer``: (optionally weighted) response-only NLL, checkpoints and resume,
gradient accumulation, epochs or steps, warmup + schedule, ``report_to``, multi-GPU under ``accelerate launch``
/ ``torchrun``.

Why ``Trainer`` and not TRL's ``SFTTrainer``: SFTTrainer is ``Trainer`` plus dataset preparation (chat
templating, packing, completion-only masks) that ``peft_train.encode`` already does with our own truncation
rules, and its loss has no per-row weights; what we need from the field's trainer — checkpoints, resume,
accumulation, schedulers, logging integrations, distributed data parallelism — is all ``Trainer``'s. So we
subclass ``Trainer`` and override three things only: ``compute_loss`` (Σ w_i ℓ_i / Σ w_i over the rows of the
optimizer step, ℓ_i the row's mean response-token NLL), ``get_batch_samples`` (to know Σ w over the
accumulated micro-batches and, under DDP, over every rank) and ``_get_train_sampler`` (length-grouped batches
whose order is a function of seed + epoch, so a resumed run sees exactly the batches an uninterrupted one
would). What Trainer lacks and stays ours, small and separate: the memory account (``_MemoryMeter``) and the
eval metrics (per-row eval loss, greedy exact match).

peft_train knows nothing of Parquet or dpsel: it takes conversations (lists of ``{role, content}``).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from peft_train.encode import (
    IGNORE_INDEX,
    EncodedExample,
    collate,
    encode_all,
    length_grouped_batches,
    per_example_nll,
)
from peft_train.models import resolve_device

LOSS_WINDOW = 10  # steps averaged into the reported final train loss (one step's loss is noisy)
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "trackio", "all")
# TrainConfig.optimizer -> TrainingArguments.optim
TRAINER_OPTIM = {"adamw": "adamw_torch", "paged_adamw": "paged_adamw_32bit"}


@dataclass
class TrainConfig:
    steps: int | None = 200  # optimizer steps; None: `epochs` passes over the rows instead
    epochs: float | None = None  # passes over the rows (used only when steps is None)
    lr: float = 1e-3
    batch_size: int = 8  # rows per micro-batch (per device under DDP)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 512
    seed: int = 0
    warmup: float = 0.05  # fraction of the optimizer steps spent warming the learning rate up linearly
    scheduler: str = "cosine"  # any name `transformers.get_scheduler` knows: cosine, linear, constant_with_warmup
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max global gradient norm; None turns clipping off
    device: str = "auto"
    optimizer: str = "auto"  # auto (paged AdamW for a 4-bit base on CUDA, else AdamW) | adamw | paged_adamw
    log_every: int = 10  # steps between plain log lines when no terminal is attached
    eval_every: int = 0  # steps between eval-loss measurements on `eval_messages`; 0 = only at the end
    eval_batch_size: int = 16
    max_new_tokens: int = 64  # greedy-generation budget for exact match at the end of training
    save_steps: int | None = None  # steps between checkpoints (with a checkpoint_dir); None: about 10 per run
    save_total_limit: int = 2  # checkpoints kept (the newest ones)
    report_to: str = "none"  # Trainer integrations: none | tensorboard | wandb | mlflow | trackio | all

    def __post_init__(self) -> None:
        if self.steps is None and self.epochs is None:
            raise ValueError("give steps or epochs")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be a positive number, got {self.epochs}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.save_steps is not None and self.save_steps < 1:
            raise ValueError(f"save_steps must be at least 1, got {self.save_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of steps in [0, 1), got {self.warmup}")
        if self.optimizer not in ("auto", "adamw", "paged_adamw"):
            raise ValueError(f"optimizer must be 'auto', 'adamw' or 'paged_adamw', got {self.optimizer!r}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")


@dataclass
class TrainResult:
    train_loss: float  # mean weighted loss over the last LOSS_WINDOW steps
    losses: list[float]  # the weighted loss of every step
    steps: int  # optimizer steps, counting those done before a resume
    seconds: float  # the training steps alone (encoding and the final evaluation not included)
    peak_memory_bytes: int
    memory_measure: str  # "cuda_max_allocated" or "tensor_accounting" (see _MemoryMeter)
    optimizer: str
    lr: float
    n_rows: int  # rows trained on (positive weight and at least one response token)
    n_skipped: int  # rows left out: weight 0 or no response token left after truncation
    n_truncated: int
    step_seconds: list[float] = field(default_factory=list)  # wall time of every step (loss.item() syncs the device)
    eval: dict | None = None
    eval_trace: list[dict] = field(default_factory=list)
    resumed_from_step: int = 0  # global step of the checkpoint this run resumed from (0: a fresh run)
    is_main_process: bool = True  # False on the other ranks of a multi-process (DDP) run

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- loss


def weighted_loss(
    per_row_nll: torch.Tensor, weights: torch.Tensor | None = None, total_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ w_i ℓ_i / Σ w_i over the batch; the plain mean when ``weights`` is None.

    ``total_weight`` replaces the denominator: Σ w over every micro-batch (and rank) of one optimizer step, so
    the micro-batches' losses add up to the step's weighted mean.

    Rows with w = 0 are masked out before the product, so even a non-finite ℓ_i of such a row cannot leak
    into the loss or its gradient; a batch whose weights sum to 0 gives a loss of 0 (and zero gradients).
    """
    if weights is None:
        return per_row_nll.mean()
    weights = weights.to(device=per_row_nll.device, dtype=per_row_nll.dtype)
    if weights.shape != per_row_nll.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} != per-row loss shape {tuple(per_row_nll.shape)}")
    active = weights > 0
    contributions = torch.where(active, per_row_nll, torch.zeros_like(per_row_nll)) * weights
    denominator = weights.sum() if total_weight is None else total_weight.to(weights)
    return contributions.sum() / denominator.clamp_min(torch.finfo(weights.dtype).tiny)


# ----------------------------------------------------------------------------- memory


def _storage_bytes(tensors, seen: set[int]) -> int:
    total = 0
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _quant_state_tensors(module: torch.nn.Module):
    """The tensors a bitsandbytes 4-bit weight keeps beside its packed bytes (absmax, nested absmax, code)."""
    for param in module.parameters(recurse=True):
        state = getattr(param, "quant_state", None)
        while state is not None:
            yield from (state.absmax, getattr(state, "code", None), getattr(state, "offset", None))
            state = getattr(state, "state2", None)


def model_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a model's parameters, buffers and 4-bit quantisation state (shared storages counted once)."""
    seen: set[int] = set()
    return (
        _storage_bytes(model.parameters(), seen)
        + _storage_bytes(model.buffers(), seen)
        + _storage_bytes(_quant_state_tensors(model), seen)
    )


def _grad_bytes(params: Sequence[torch.nn.Parameter]) -> int:
    # Trainer frees gradients between steps (zero_grad(set_to_none)); at its peak each trainable parameter has one
    return sum(p.numel() * p.element_size() for p in params)


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    tensors = (v for state in optimizer.state.values() for v in state.values())
    return _storage_bytes(tensors, set())


class _MemoryMeter:
    """Peak training memory. CUDA: the allocator's own peak. CPU has no allocator statistics that can be
    reset per run (the process RSS only ever grows and counts everything else in the process), so there we
    add up what training holds: weights (+ 4-bit state), gradients, optimizer state and the largest set of
    activations saved for backward in any step (seen through ``saved_tensors_hooks``)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.on_cuda = device.type == "cuda"
        self.max_activation_bytes = 0
        self._step_bytes = 0
        self._seen: set[int] = set()
        if self.on_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    @property
    def measure(self) -> str:
        return "cuda_max_allocated" if self.on_cuda else "tensor_accounting"

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._step_bytes += _storage_bytes((tensor,), self._seen)
        return tensor

    def saving_activations(self):
        """Context for one forward pass: counts the bytes autograd saves for backward (CPU only)."""
        self._step_bytes, self._seen = 0, set()
        if self.on_cuda:
            return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def end_step(self) -> None:
        self.max_activation_bytes = max(self.max_activation_bytes, self._step_bytes)
        self._seen = set()

    def peak(self, params, optimizer) -> int:
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return (
            model_memory_bytes(self.model)
            + _grad_bytes(params)
            + _optimizer_state_bytes(optimizer)
            + self.max_activation_bytes
        )


# ----------------------------------------------------------------------------- data


class _WeightedRows(Dataset):
    def __init__(self, examples: Sequence[EncodedExample], weights: Sequence[float]):
        self.examples, self.weights = examples, weights

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        return self.examples[index], self.weights[index]


def _collate_weighted(pad_token_id: int):
    def collate_rows(rows):
        batch = collate([example for example, _ in rows], pad_token_id)
        batch["weights"] = torch.tensor([weight for _, weight in rows], dtype=torch.float32)
        return batch

    return collate_rows


class _SeededLengthGroupedSampler(torch.utils.data.Sampler):
    """Row order of one epoch: ``length_grouped_batches`` shuffled with seed + epoch, flattened.

    A function of (seed, epoch) only, not of the global RNG, so that a run resumed mid-epoch skips into the
    very batches the uninterrupted run saw. Every batch but the epoch's last is full (the short one is put
    last), so the DataLoader's chunks of ``batch_size`` are exactly these batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        batches = length_grouped_batches(self.lengths, self.batch_size, seed=self.seed + self.epoch, shuffle=True)
        batches.sort(key=len, reverse=True)  # stable: the full batches keep their shuffled order, the short one last
        return iter([index for batch in batches for index in batch])


def _check_weights(weights: Sequence[float] | None, n_rows: int) -> list[float]:
    if weights is None:
        return [1.0] * n_rows
    values = [float(w) for w in weights]
    if len(values) != n_rows:
        raise ValueError(f"got {len(values)} weights for {n_rows} conversations")
    for index, value in enumerate(values):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weight of row {index} is {value}; weights must be finite and >= 0")
    return values


def _has_response(example: EncodedExample) -> bool:
    # per_example_nll shifts by one: a label at position 0 is never predicted.
    return any(label != IGNORE_INDEX for label in example.labels[1:])


def _pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def _prepare_examples(encoded, weights: list[float]) -> tuple[list[EncodedExample], list[float], int]:
    keep = [i for i, ex in enumerate(encoded.examples) if weights[i] > 0 and _has_response(ex)]
    if not keep:
        raise ValueError("no row to train on: every row has weight 0 or no response token left after truncation")
    return [encoded.examples[i] for i in keep], [weights[i] for i in keep], len(encoded.examples) - len(keep)


# ----------------------------------------------------------------------------- optimizer


def is_quantized_4bit(model: torch.nn.Module) -> bool:
    if getattr(model, "is_loaded_in_4bit", False):
        return True
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes, no 4-bit layers
        return False
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def choose_optimizer_name(config: TrainConfig, device: torch.device, quantized_4bit: bool) -> str:
    """QLoRA's paged AdamW (optimizer state in CUDA unified memory, paged out under pressure) needs CUDA;
    elsewhere, and for 16-bit bases whose state is small next to the weights, plain AdamW."""
    if config.optimizer != "auto":
        if config.optimizer == "paged_adamw" and device.type != "cuda":
            raise ValueError("paged AdamW needs a CUDA device; use optimizer='adamw' on CPU")
        return config.optimizer
    return "paged_adamw" if device.type == "cuda" and quantized_4bit else "adamw"


# ----------------------------------------------------------------------------- progress and callbacks


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class _Progress:
    """tqdm on a terminal, a plain log line every `log_every` steps otherwise (CI, schedulers, files)."""

    def __init__(self, total: int, enabled: bool, log_every: int, done: int = 0):
        self.total, self.enabled, self.log_every = total, enabled, max(1, log_every)
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc="training", unit="step")

    def update(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif self.enabled and (step % self.log_every == 0 or step == self.total):
            # printed, not logged: a CLI run without logging configured must still show progress
            print(f"training: step {step}/{self.total} loss {loss:.4f} lr {lr:.3g}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _callbacks(config: TrainConfig, progress: bool, tokenizer, eval_messages, step_seconds: list[float]) -> list:
    """Progress lines, per-step wall time and the periodic eval loss, as Trainer callbacks."""
    base = _trainer_callback_base()

    class Callbacks(base):
        bar: _Progress | None = None
        last = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            enabled = progress and state.is_world_process_zero  # one progress line per step, not one per rank
            self.bar = _Progress(state.max_steps, enabled, config.log_every, done=state.global_step)

        def on_step_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step_seconds.append(time.perf_counter() - self.last)
            step = state.global_step
            if eval_messages and config.eval_every and step % config.eval_every == 0 and step < state.max_steps:
                # in the log history, so the trace survives a checkpoint and resume
                state.log_history.append({"step": step, **_eval_loss_only(model, tokenizer, eval_messages, config)})
                model.train()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and self.bar is not None:
                self.bar.update(state.global_step, float(logs["loss"]), float(logs.get("learning_rate", 0.0)))

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return [Callbacks()]


# ----------------------------------------------------------------------------- the Trainer


def _weighted_trainer_class():
    from transformers import Trainer

    class WeightedTrainer(Trainer):
        """``Trainer`` with the per-row weighted response-only loss and a seed+epoch length-grouped order."""

        loss_is_scaled_for_ga = True  # compute_loss divides by Σ w of the whole optimizer step

        def __init__(self, *args, lengths: Sequence[int], meter: _MemoryMeter, **kwargs):
            super().__init__(*args, **kwargs)
            self.lengths, self.meter = lengths, meter
            self.step_weight: torch.Tensor | None = None

        def _get_train_sampler(self, train_dataset=None):
            return _SeededLengthGroupedSampler(self.lengths, self.args.per_device_train_batch_size, self.args.seed)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, n_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            total = sum((b["weights"].sum() for b in batches), torch.zeros(()))
            total = total.to(self.args.device)
            if self.accelerator.num_processes > 1:  # DDP averages gradients over ranks: use the global Σ w
                total = self.accelerator.reduce(total, reduction="sum")
            self.step_weight = total
            return batches, n_items

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weights, labels = inputs.pop("weights"), inputs.pop("labels")
            with self.meter.saving_activations():
                outputs = model(**inputs, use_cache=False)
                per_row = per_example_nll(outputs.logits, labels)
                if model.training and self.step_weight is not None:
                    # × ranks: DDP's gradient mean over ranks then gives Σ_all w ℓ / Σ_all w
                    loss = weighted_loss(per_row, weights, self.step_weight) * self.accelerator.num_processes
                else:
                    loss = weighted_loss(per_row, weights)
            self.meter.end_step()
            return (loss, outputs) if return_outputs else loss

    return WeightedTrainer


def _training_arguments(config: TrainConfig, device: torch.device, optimizer_name: str, output_dir: str,
                        save: bool):
    from transformers import TrainingArguments

    saving = {"save_strategy": "steps", "save_steps": config.save_steps or 1,
              "save_total_limit": config.save_total_limit} if save else {"save_strategy": "no"}
    length = {"max_steps": config.steps} if config.steps is not None else {"num_train_epochs": config.epochs}
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup,  # a float in [0, 1): a fraction of the optimizer steps
        lr_scheduler_type=config.scheduler,
        max_grad_norm=config.grad_clip if config.grad_clip is not None else 0.0,
        optim=TRAINER_OPTIM[optimizer_name],
        seed=config.seed,
        use_cpu=device.type == "cpu",
        report_to=config.report_to,
        logging_strategy="steps",
        logging_steps=1,  # every step's loss goes into the log history (and so into checkpoints)
        disable_tqdm=True,  # our own progress: tqdm on a terminal, plain lines otherwise
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        dataloader_pin_memory=device.type == "cuda",
        **length,
        **saving,
    )


def _default_save_steps(config: TrainConfig, n_rows: int) -> int:
    if config.save_steps is not None:
        return config.save_steps
    per_epoch = math.ceil(math.ceil(n_rows / config.batch_size) / config.grad_accum)
    total = config.steps if config.steps is not None else math.ceil(config.epochs * per_epoch)
    return max(1, total // 10)


def _is_complete(checkpoint: Path) -> bool:
    # Trainer writes trainer_state.json last (after weights, optimizer, scheduler and RNG states)
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def _checkpoints(checkpoint_dir: str | Path | None) -> list[Path]:
    if checkpoint_dir is None or not Path(checkpoint_dir).is_dir():
        return []
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = [p for p in Path(checkpoint_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()]
    return sorted((p for p in found if p.name.rsplit("-", 1)[-1].isdigit()), key=lambda p: int(p.name.rsplit("-", 1)[-1]))


def last_checkpoint(checkpoint_dir: str | Path | None) -> str | None:
    """The newest complete ``checkpoint-N`` folder under ``checkpoint_dir`` (None when there is none).

    A process killed while saving leaves a folder without ``trainer_state.json``; that one is not complete.
    """
    complete = [p for p in _checkpoints(checkpoint_dir) if _is_complete(p)]
    return str(complete[-1]) if complete else None


def launched_rank() -> int:
    """This process's global rank under torchrun / accelerate launch (0 when run as a single process)."""
    import os

    return int(os.environ.get("RANK", "0"))


def discard_incomplete_checkpoints(checkpoint_dir: str | Path | None) -> list[str]:
    """Delete checkpoint folders a kill left half-written (Trainer would take the newest folder for the latest)."""
    import shutil

    removed = [p for p in _checkpoints(checkpoint_dir) if not _is_complete(p)]
    for folder in removed:
        print(f"training: removing incomplete checkpoint {folder}", file=sys.stderr, flush=True)
        shutil.rmtree(folder)
    return [str(p) for p in removed]


def _step_losses(log_history: list[dict]) -> list[float]:
    return [float(entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def train(
    model: torch.nn.Module,
    tokenizer,
    messages: Sequence[Sequence[Mapping]],
    weights: Sequence[float] | None = None,
    config: TrainConfig | None = None,
    eval_messages: Sequence[Sequence[Mapping]] | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence | None = None,
) -> TrainResult:
    """Train the model's trainable parameters on the responses of ``messages`` with transformers' Trainer.

    Each optimizer step's loss is Σ w_i ℓ_i / Σ w_i over its rows (all micro-batches of an accumulation, all
    ranks), ℓ_i the row's mean response-token NLL; rows with weight 0 (and rows truncated down to no response
    token) are left out of the batches. With ``checkpoint_dir`` Trainer writes ``checkpoint-N`` folders there
    every ``config.save_steps`` steps; ``resume=True`` continues from the newest one (a fresh run when there is
    none). ``callbacks``: extra ``TrainerCallback`` objects. The model is trained in place and left in eval
    mode. With ``eval_messages`` the result carries ``evaluate``'s metrics.
    """
    config = config or TrainConfig()
    device = resolve_device(config.device)
    from transformers import PrinterCallback, set_seed

    set_seed(config.seed)  # python, numpy, torch (and every CUDA device)
    row_weights = _check_weights(weights, len(messages))
    encoded = encode_all(messages, tokenizer, config.max_length, progress=False)
    examples, example_weights, n_skipped = _prepare_examples(encoded, row_weights)

    quantized = is_quantized_4bit(model)
    if not quantized and _model_device(model) != device:
        model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter (build an adapter first, or use method 'full')")
    optimizer_name = choose_optimizer_name(config, device, quantized)
    config = replace(config, save_steps=_default_save_steps(config, len(examples)))  # the caller's stays as given
    if resume and launched_rank() == 0:  # one process deletes; every rank then picks the same complete one
        discard_incomplete_checkpoints(checkpoint_dir)
    resume_from = last_checkpoint(checkpoint_dir) if resume else None

    meter = _MemoryMeter(model, device)
    step_seconds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="peft-train-") as scratch:
        args = _training_arguments(config, device, optimizer_name, str(checkpoint_dir or scratch),
                                   save=checkpoint_dir is not None)
        trainer = _weighted_trainer_class()(
            model=model, args=args, train_dataset=_WeightedRows(examples, example_weights),
            data_collator=_collate_weighted(_pad_token_id(tokenizer)),
            callbacks=_callbacks(config, progress, tokenizer, eval_messages, step_seconds) + list(callbacks or []),
            lengths=[len(e) for e in examples], meter=meter,
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
        lr=config.lr,
        n_rows=len(examples),
        n_skipped=n_skipped,
        n_truncated=encoded.n_truncated,
        step_seconds=step_seconds,
        eval_trace=[entry for entry in history if "eval_loss" in entry],
        resumed_from_step=int(Path(resume_from).name.split("-")[-1]) if resume_from else 0,
        is_main_process=trainer.is_world_process_zero(),
    )
    if eval_messages:
        result.eval = evaluate(
            model, tokenizer, eval_messages, max_new_tokens=config.max_new_tokens,
            batch_size=config.eval_batch_size, max_length=config.max_length,
        )
    return result

# ----------------------------------------------------------------------------- evaluate


def _eval_loss_only(model, tokenizer, messages, config: TrainConfig) -> dict:
    per_row = row_losses(model, tokenizer, messages, config.max_length, config.eval_batch_size)
    finite = [v for v in per_row if v is not None]
    return {"eval_loss": sum(finite) / len(finite) if finite else float("nan")}


@torch.no_grad()
def row_losses(model, tokenizer, messages, max_length: int = 512, batch_size: int = 16) -> list[float | None]:
    """Mean response-token NLL of every conversation (None where truncation left no response token)."""
    was_training = model.training
    model.eval()
    encoded = encode_all(messages, tokenizer, max_length)
    device = _model_device(model)
    pad = _pad_token_id(tokenizer)
    losses: list[float | None] = [None] * len(encoded.examples)
    for batch_rows in length_grouped_batches(encoded.lengths, batch_size, seed=0, shuffle=False):
        batch = collate([encoded.examples[i] for i in batch_rows], pad)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
        ).logits
        for row, value in zip(batch_rows, per_example_nll(logits, batch["labels"]).tolist()):
            losses[row] = value if _has_response(encoded.examples[row]) else None
    model.train(was_training)
    return losses


def _prompt_and_reference(conversation: Sequence[Mapping]) -> tuple[list[Mapping], str]:
    if not conversation or conversation[-1].get("role") != "assistant":
        raise ValueError("each evaluation conversation must end with the assistant's reference answer")
    return list(conversation[:-1]), str(conversation[-1].get("content", ""))


def _prompt_ids(tokenizer, prompt: list[Mapping], max_prompt_tokens: int) -> list[int]:
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids[-max_prompt_tokens:]  # keep the end: the question and the assistant header


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
        mask[i, width - len(ids) :] = 1
    return input_ids, mask


@torch.no_grad()
def greedy_answers(
    model, tokenizer, prompts: Sequence[Sequence[Mapping]], max_new_tokens: int = 64, batch_size: int = 16,
    max_length: int = 512,
) -> list[str]:
    """Greedy completions of chat prompts (the assistant's next turn), decoded without special tokens."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    pad = _pad_token_id(tokenizer)
    max_prompt = max(1, max_length - max_new_tokens)
    ids = [_prompt_ids(tokenizer, list(p), max_prompt) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    answers: list[str] = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, mask = _left_padded([ids[i] for i in rows], pad)
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        )
        for row, tokens in zip(rows, generated[:, input_ids.shape[1] :].tolist()):
            answers[row] = tokenizer.decode(tokens, skip_special_tokens=True)
    model.train(was_training)
    return answers


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _summary(losses: list[float | None], matches: list[bool] | None, rows: Sequence[int]) -> dict:
    finite = [losses[i] for i in rows if losses[i] is not None]
    summary = {"eval_loss": _mean(finite), "rows": len(rows)}
    if matches is not None:
        summary["eval_exact_match"] = _mean([float(matches[i]) for i in rows])
    return summary


def evaluate(
    model,
    tokenizer,
    messages: Sequence[Sequence[Mapping]],
    max_new_tokens: int = 64,
    exact_match: bool = True,
    tasks: Sequence[str] | None = None,
    batch_size: int = 16,
    max_length: int = 512,
) -> dict:
    """``eval_loss`` (mean over rows of the response's mean token NLL) and ``eval_exact_match`` (greedy answer
    equal to the reference after stripping surrounding whitespace); with ``tasks`` (one label per row) the
    same under ``per_task``."""
    if not messages:
        raise ValueError("evaluate needs at least one conversation")
    if tasks is not None and len(tasks) != len(messages):
        raise ValueError(f"got {len(tasks)} task labels for {len(messages)} conversations")
    losses = row_losses(model, tokenizer, messages, max_length, batch_size)
    matches = None
    if exact_match:
        prompts, references = zip(*(_prompt_and_reference(m) for m in messages))
        answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size, max_length)
        matches = [a.strip() == r.strip() for a, r in zip(answers, references)]
    result = _summary(losses, matches, range(len(messages)))
    if tasks is not None:
        groups: dict[str, list[int]] = {}
        for index, task in enumerate(tasks):
            groups.setdefault(str(task), []).append(index)
        result["per_task"] = {task: _summary(losses, matches, rows) for task, rows in sorted(groups.items())}
    return result
