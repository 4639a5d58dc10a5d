"""Language-model plumbing shared by the LM-based selection methods (bads, l2rw, loss, ifd, rds): the LM and
its θ, encoded rows, the NLL pass, and saving θ for a scorer or a Ray actor (the meta-fitted reference:
`dpsel.models.reference_fit`).

θ is what a method trains: all weights of the built-in tiny model, or a LoRA adapter on a frozen base
(optionally 4-bit) for anything larger — the same split `peft_train.adapters` uses for tuning.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dpsel.loading import load_model  # maps unloadable model sources to exit 2
from dpsel.models.forward import forward_rows
from peft_train.encode import collate, encode_all, per_example_nll
from peft_train.models import TINY_NAME, resolve_device
from peft_train.tokenizer import pad_token_id


# the `SelectConfig.extra` settings the model layer reads (`load_lm`)
LM_EXTRA_KEYS = ("quant", "theta", "lora_r")


class LMSettings(Protocol):
    """What the model layer reads from a run's settings (`dpsel.select.base.SelectConfig` has all of it)."""
    model: str
    device: str
    seed: int
    meta_batch_size: int
    extra: dict




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

    def subset(self, indices) -> "EncodedRows":
        """These rows at `indices`, in that order (a chunk of a pool pass)."""
        part = copy.copy(self)
        indices = np.asarray(indices, dtype=np.int64)
        part.examples = [self.examples[i] for i in indices]
        part.lengths, part.has_response = self.lengths[indices], self.has_response[indices]
        return part

    def digest(self) -> str:
        """sha256 of the rows' tokens and labels: what a checkpointed pass over them belongs to."""
        import hashlib
        digest = hashlib.sha256()
        for e in self.examples:
            digest.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
            digest.update(np.asarray(e.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()


def theta_digest(lm: "LM") -> str:
    """sha256 of θ's names and values: which model a checkpointed pass or fit belongs to."""
    import hashlib
    digest = hashlib.sha256()
    for name, p in sorted(lm.named_theta().items()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


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
