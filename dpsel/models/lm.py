"""Language-model plumbing shared by the LM-based selection methods (bads, l2rw, loss, ifd, rds): the LM and
its θ, encoded rows, the NLL pass, the meta-fitted reference, and saving θ for a scorer or a Ray actor.

θ is what a method trains: all weights of the built-in tiny model, or a LoRA adapter on a frozen base
(optionally 4-bit) for anything larger — the same split `peft_train.adapters` uses for tuning.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from dpsel.loading import load_model  # maps unloadable model sources to exit 2
from dpsel.models.forward import forward_rows
from peft_train.encode import collate, encode_all, per_example_nll
from peft_train.models import TINY_NAME, resolve_device
from peft_train.tokenizer import pad_token_id


class LMSettings(Protocol):
    """What the model layer reads from a run's settings (`dpsel.select.base.SelectConfig` has all of it)."""
    model: str
    device: str
    seed: int
    meta_batch_size: int
    extra: dict


Progress = Callable[[int, int, dict], None]  # (step, total_steps, diagnostics): a dpsel.select.base.ProgressFn


def seed_all(seed: int) -> None:
    """Seeded runs must be reproducible bit for bit on CPU: every RNG a method touches is seeded here."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@dataclass
class LM:
    """A model whose trainable parameters are θ, with its tokenizer and device."""
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    theta_kind: str  # "full" | "lora"
    model_name: str
    quant: str | None

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)  # the rule training pads with

    def theta(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_theta(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def theta_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_theta().items()}

    def load_theta(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.named_theta().items():
                p.copy_(state[n])


def build_lm(config: LMSettings, theta: str | None = None) -> LM:
    """Load the base and make θ trainable: the whole tiny model, else a LoRA adapter (r from config.extra)."""
    extra = config.extra
    quant = extra.get("quant")
    model, tokenizer = load_model(config.model, quant=quant, device=config.device)
    theta = theta or extra.get("theta") or ("full" if config.model == TINY_NAME and quant is None else "lora")
    from peft_train.adapters import build_adapter
    if theta == "full":
        model = build_adapter(model, "full")
    else:
        method = "qlora" if quant == "nf4" else "lora"
        model = build_adapter(model, method, r=int(extra.get("lora_r", 8)))
    device = resolve_device(config.device)
    return LM(model, tokenizer, device, theta, config.model, quant)


class EncodedRows:
    """Token ids of a list of rows, with batch assembly; rows without a response token are flagged."""

    def __init__(self, messages: list[list[dict]], tokenizer, max_length: int, pad_id: int):
        encoded = encode_all(messages, tokenizer, max_length)
        self.examples = encoded.examples
        self.lengths = np.array(encoded.lengths)
        self.pad_id = pad_id
        self.n_truncated = encoded.n_truncated
        self.has_response = np.array([any(l != -100 for l in e.labels[1:]) for e in self.examples])

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices, device: torch.device) -> dict[str, torch.Tensor]:
        batch = collate([self.examples[i] for i in indices], self.pad_id)
        return {k: v.to(device) for k, v in batch.items()}


def batch_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return per_example_nll(logits, batch["labels"])


def score_nll(lm: LM, rows: EncodedRows, batch_size: int = 64, indices=None) -> np.ndarray:
    """Mean response-token NLL of every row (or of `indices`, aligned with them): the batched scoring pass."""
    values = forward_rows(lm.model, lambda chunk: rows.batch(chunk, lm.device), rows.lengths,
                          lambda output, batch: per_example_nll(output.logits, batch["labels"]),
                          indices=indices, batch_size=batch_size)
    return values.reshape(-1)


def response_only_rows(messages: list[list[dict]]) -> list[list[dict]]:
    """The same responses with an empty prompt: the unconditional loss IFD divides by."""
    return [[{"role": "user", "content": " "}, m[-1]] for m in messages]


@dataclass
class ReferenceFit:
    state: dict[str, torch.Tensor]   # θ at the best held-out loss
    best_step: int
    best_heldout: float
    steps: int
    seconds: float
    trace: list[tuple[int, float]]


def split_meta(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices of the meta rows: a seeded held-out slice for early stopping."""
    order = np.random.default_rng(seed).permutation(n)
    n_held = max(1, int(round(n * fraction))) if n >= 4 else 0
    return np.sort(order[n_held:]), np.sort(order[:n_held])


# Several methods in one process (the benchmark, curate-then-compare) fit the same reference: the fit is a
# pure function of (model, seed, meta tokens, fit settings, starting θ), so it is reused rather than redone.
_REFERENCE_CACHE: dict[tuple, ReferenceFit] = {}
_REFERENCE_CACHE_SIZE = 4


def _reference_key(lm: LM, meta: EncodedRows, config: LMSettings) -> tuple:
    import hashlib
    digest = hashlib.sha256()
    for e in meta.examples:
        digest.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(e.labels, dtype=np.int64).tobytes())
    for name, p in sorted(lm.named_theta().items()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())
    ref_extra = tuple(sorted((k, str(v)) for k, v in config.extra.items() if k.startswith("ref_")))
    return (lm.model_name, lm.theta_kind, config.seed, config.meta_batch_size, ref_extra, digest.hexdigest())


def fit_reference(lm: LM, meta: EncodedRows, config: LMSettings, progress: Progress | None = None,
                  label: str = "reference") -> ReferenceFit:
    """Fit θ on the meta rows alone with AdamW, early-stopped on a held-out slice of meta; θ left at the best."""
    key = _reference_key(lm, meta, config)
    if key in _REFERENCE_CACHE:
        cached = _REFERENCE_CACHE[key]
        lm.load_theta(cached.state)
        lm.model.eval()
        return cached
    fit = _fit_reference(lm, meta, config, progress, label)
    if len(_REFERENCE_CACHE) >= _REFERENCE_CACHE_SIZE:
        _REFERENCE_CACHE.pop(next(iter(_REFERENCE_CACHE)))
    _REFERENCE_CACHE[key] = fit
    return fit


def _fit_reference(lm: LM, meta: EncodedRows, config: LMSettings, progress: Progress | None,
                   label: str) -> ReferenceFit:
    extra = config.extra
    max_steps = int(extra.get("ref_steps", 400))
    eval_every = int(extra.get("ref_eval_every", 25))
    patience = int(extra.get("ref_patience", 4))
    batch_size = int(extra.get("ref_batch_size", 16))
    fit_idx, held_idx = split_meta(len(meta), float(extra.get("ref_heldout", 0.2)), config.seed)
    if len(held_idx) == 0:
        held_idx = fit_idx
    optimizer = torch.optim.AdamW(lm.theta(), lr=float(extra.get("ref_lr", 3e-3)), weight_decay=0.0)
    rng = np.random.default_rng(config.seed + 17)
    best = (math.inf, 0, lm.theta_state())
    trace, bad_evals, started = [], 0, time.perf_counter()
    lm.model.train()
    step = 0
    for step in range(1, max_steps + 1):
        batch_idx = rng.choice(fit_idx, size=min(batch_size, len(fit_idx)), replace=False)
        loss = batch_nll(lm.model, meta.batch(batch_idx, lm.device)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.theta(), 1.0)
        optimizer.step()
        if step % eval_every == 0 or step == max_steps:
            held = float(score_nll(lm, meta, indices=held_idx).mean())
            trace.append((step, held))
            if progress:
                progress(step, max_steps, {"phase": label, "heldout_loss": held})
            if held < best[0] - 1e-4:
                best, bad_evals = (held, step, lm.theta_state()), 0
            else:
                bad_evals += 1
                if bad_evals >= patience:
                    break
    lm.load_theta(best[2])
    lm.model.eval()
    return ReferenceFit(best[2], best[1], best[0], step, time.perf_counter() - started, trace)


def save_theta(lm: LM, directory: Path) -> dict:
    """Save θ small: the whole tiny model (a few MB) or only the adapter; returns how to load it back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if lm.theta_kind == "full":
        from peft_train.models import save_model
        save_model(lm.model, lm.tokenizer, directory)
    else:
        lm.model.save_pretrained(directory)
    return {"theta_kind": lm.theta_kind, "model": lm.model_name, "quant": lm.quant}


def load_theta(directory: Path, info: dict, device: str = "auto") -> LM:
    """Inverse of `save_theta`: the reference model ready to score rows (eval mode, no grad needed)."""
    directory = Path(directory)
    if info["theta_kind"] == "full":
        model, tokenizer = load_model(str(directory), device=device)
    else:
        from peft_train.adapters import load_adapter
        base, tokenizer = load_model(info["model"], quant=info.get("quant"), device=device)
        model = load_adapter(base, directory)
    return LM(model.eval(), tokenizer, resolve_device(device), info["theta_kind"], info["model"], info.get("quant"))


def clone_lm(lm: LM) -> LM:
    return LM(copy.deepcopy(lm.model), lm.tokenizer, lm.device, lm.theta_kind, lm.model_name, lm.quant)
