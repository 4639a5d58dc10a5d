"""The training loop: (optionally weighted) response-only NLL, AdamW, warmup + schedule, progress, eval.

Why accelerate rather than ``transformers.Trainer``: the loop needs per-row weights carried next to each
row, our own length-grouped batches, a per-row loss (``per_example_nll``) reduced by ``weighted_loss``, an
optimizer picked by device and quantisation (paged AdamW only for a 4-bit base on CUDA), and a memory
measurement around the steps. With ``Trainer`` every one of those is an override (``compute_loss``,
``get_train_dataloader``, ``create_optimizer``, callbacks) of a class that also writes checkpoints and
reports we do not want. accelerate's ``Accelerator`` keeps the loop a plain, readable PyTorch loop and
still gives device placement, mixed precision and data-parallel sharding of the batches when the same
code runs under ``accelerate launch`` / ``torchrun``.

peft_train knows nothing of Parquet or dpsel: it takes conversations (lists of ``{role, content}``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from peft_train.encode import (
    IGNORE_INDEX,
    EncodedExample,
    collate,
    encode_all,
    length_grouped_batches,
    per_example_nll,
)
from peft_train.models import resolve_device
from peft_train.progress import ProgressFn, report

LOSS_WINDOW = 10  # steps averaged into the reported final train loss (one step's loss is noisy)


@dataclass
class TrainConfig:
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    warmup: float = 0.05  # fraction of `steps` spent warming the learning rate up linearly
    scheduler: str = "cosine"  # any name `transformers.get_scheduler` knows: cosine, linear, constant_with_warmup
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max global gradient norm; None turns clipping off
    device: str = "auto"
    optimizer: str = "auto"  # auto (paged AdamW for a 4-bit base on CUDA, else AdamW) | adamw | paged_adamw
    log_every: int = 10  # steps between plain log lines when no terminal is attached
    eval_every: int = 0  # steps between eval-loss measurements on `eval_messages`; 0 = only at the end
    eval_batch_size: int = 16
    max_new_tokens: int = 64  # greedy-generation budget for exact match at the end of training

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of steps in [0, 1), got {self.warmup}")
        if self.optimizer not in ("auto", "adamw", "paged_adamw"):
            raise ValueError(f"optimizer must be 'auto', 'adamw' or 'paged_adamw', got {self.optimizer!r}")


@dataclass
class TrainResult:
    train_loss: float  # mean weighted loss over the last LOSS_WINDOW steps
    losses: list[float]  # the weighted loss of every step
    steps: int
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

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- loss


def weighted_loss(per_row_nll: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ w_i ℓ_i / Σ w_i over the batch; the plain mean when ``weights`` is None.

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
    return contributions.sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)


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
    return _storage_bytes((p.grad for p in params if p.grad is not None), set())


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


def _step_batches(lengths: Sequence[int], batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Enough length-grouped batches for `steps` steps: a fresh shuffle (seed + epoch) every epoch."""
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < steps:
        batches.extend(length_grouped_batches(lengths, batch_size, seed=seed + epoch, shuffle=True))
        epoch += 1
    return batches[:steps]


def _pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


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


def build_optimizer(name: str, params, config: TrainConfig) -> torch.optim.Optimizer:
    if name == "paged_adamw":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


# ----------------------------------------------------------------------------- progress


class _Progress:
    """tqdm on a terminal, a plain log line every `log_every` steps otherwise (CI, schedulers, files)."""

    def __init__(self, total: int, enabled, log_every: int):
        # `enabled` may be a progress callback (peft_train.progress): then it alone is told, and draws nothing here
        self.callback = enabled if callable(enabled) else None
        self.total, self.enabled, self.log_every = total, bool(enabled) and self.callback is None, max(1, log_every)
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="training", unit="step")

    def update(self, step: int, loss: float, lr: float) -> None:
        report(self.callback, step, self.total, "training", loss=loss, lr=lr)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif self.enabled and (step % self.log_every == 0 or step == self.total):
            # printed, not logged: a CLI run without logging configured must still show progress
            print(f"training: step {step}/{self.total} loss {loss:.4f} lr {lr:.3g}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- train


def _seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)  # python, numpy, torch (and every CUDA device)


def _make_accelerator(device: torch.device):
    from accelerate import Accelerator

    # device_placement=False: the model stays where the caller (or a 4-bit device_map) put it; batches move.
    return Accelerator(cpu=device.type == "cpu", device_placement=False)


def _prepare_examples(encoded, weights: list[float]) -> tuple[list[EncodedExample], list[float], int]:
    keep = [i for i, ex in enumerate(encoded.examples) if weights[i] > 0 and _has_response(ex)]
    if not keep:
        raise ValueError("no row to train on: every row has weight 0 or no response token left after truncation")
    return [encoded.examples[i] for i in keep], [weights[i] for i in keep], len(encoded.examples) - len(keep)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def train(
    model: torch.nn.Module,
    tokenizer,
    messages: Sequence[Sequence[Mapping]],
    weights: Sequence[float] | None = None,
    config: TrainConfig | None = None,
    eval_messages: Sequence[Sequence[Mapping]] | None = None,
    progress: bool | ProgressFn = True,
) -> TrainResult:
    """Train the model's trainable parameters on the responses of ``messages``.

    Each step's loss is ``weighted_loss`` of the rows' mean response-token NLL; rows with weight 0 (and rows
    truncated down to no response token) are left out of the batches. The model is trained in place and
    left in eval mode. With ``eval_messages`` the result carries ``evaluate``'s metrics.
    """
    config = config or TrainConfig()
    device = resolve_device(config.device)
    _seed_everything(config.seed)
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
    optimizer = build_optimizer(optimizer_name, params, config)

    from transformers import get_scheduler

    scheduler = get_scheduler(
        config.scheduler, optimizer, num_warmup_steps=int(config.warmup * config.steps), num_training_steps=config.steps
    )
    batches = _step_batches([len(e) for e in examples], config.batch_size, config.steps, config.seed)
    loader = DataLoader(
        _WeightedRows(examples, example_weights), batch_sampler=batches, collate_fn=_collate_weighted(_pad_token_id(tokenizer))
    )
    accelerator = _make_accelerator(device)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    meter = _MemoryMeter(model, device)
    bar = _Progress(config.steps, progress, config.log_every)
    losses: list[float] = []
    eval_trace: list[dict] = []
    step_seconds: list[float] = []
    model.train()
    started = last = time.perf_counter()
    for step, batch in enumerate(loader, start=1):
        with meter.saving_activations():
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
            ).logits
            loss = weighted_loss(per_example_nll(logits, batch["labels"]), batch["weights"])
        meter.end_step()
        accelerator.backward(loss)
        if config.grad_clip is not None:
            accelerator.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=False)  # keep grads allocated so the memory account sees them
        losses.append(loss.item())
        step_seconds.append(time.perf_counter() - last)
        bar.update(step, losses[-1], scheduler.get_last_lr()[0])
        if eval_messages and config.eval_every and step % config.eval_every == 0 and step < config.steps:
            eval_trace.append({"step": step, **_eval_loss_only(model, tokenizer, eval_messages, config)})
            model.train()
        last = time.perf_counter()
    seconds = time.perf_counter() - started
    bar.close()
    peak = meter.peak(params, optimizer)
    model = accelerator.unwrap_model(model)
    model.eval()

    result = TrainResult(
        train_loss=float(sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:])),
        losses=losses,
        steps=len(losses),
        seconds=seconds,
        peak_memory_bytes=int(peak),
        memory_measure=meter.measure,
        optimizer=optimizer_name,
        lr=config.lr,
        n_rows=len(examples),
        n_skipped=n_skipped,
        n_truncated=encoded.n_truncated,
        step_seconds=step_seconds,
        eval_trace=eval_trace,
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
def row_losses(model, tokenizer, messages, max_length: int = 512, batch_size: int = 16,
               progress: ProgressFn | None = None) -> list[float | None]:
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
        report(progress, sum(v is not None for v in losses), len(losses), "eval_loss")
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
    max_length: int = 512, progress: ProgressFn | None = None,
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
        report(progress, min(start + batch_size, len(order)), len(order), "generate")
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
    progress: ProgressFn | None = None,
) -> dict:
    """``eval_loss`` (mean over rows of the response's mean token NLL) and ``eval_exact_match`` (greedy answer
    equal to the reference after stripping surrounding whitespace); with ``tasks`` (one label per row) the
    same under ``per_task``."""
    if not messages:
        raise ValueError("evaluate needs at least one conversation")
    if tasks is not None and len(tasks) != len(messages):
        raise ValueError(f"got {len(tasks)} task labels for {len(messages)} conversations")
    losses = row_losses(model, tokenizer, messages, max_length, batch_size, progress)
    matches = None
    if exact_match:
        prompts, references = zip(*(_prompt_and_reference(m) for m in messages))
        answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size, max_length, progress)
        matches = [a.strip() == r.strip() for a, r in zip(answers, references)]
    result = _summary(losses, matches, range(len(messages)))
    if tasks is not None:
        groups: dict[str, list[int]] = {}
        for index, task in enumerate(tasks):
            groups.setdefault(str(task), []).append(index)
        result["per_task"] = {task: _summary(losses, matches, rows) for task, rows in sorted(groups.items())}
    return result
