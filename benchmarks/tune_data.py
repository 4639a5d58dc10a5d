"""Tuning benchmark, data: the configurations compared (specs, lr grids), the adaptation splits, and the
pretrained tiny base every method adapts (cached under benchmarks/cache/ by its recipe)."""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpsel.data import alpaca_to_messages
from dpsel.synth import TASK_FAMILIES, WORDS, make_rows
from peft_train.models import TINY_CONFIG, build_tiny_model, save_model
from peft_train.tokenizer import ByteTokenizer
from peft_train.training import TrainConfig, train

PRETRAIN_TASKS = ["add", "mul", "reverse", "sort", "upper", "count"]
ADAPT_TASKS = [t for t in TASK_FAMILIES if t not in PRETRAIN_TASKS]  # compare, next, convert, digits
BATCH_SIZE = 16
MAX_LENGTH = 128
PRETRAIN_LR = 3e-3


@dataclass(frozen=True)
class Spec:
    """One benchmarked configuration: a peft_train method and its hyper-parameters."""
    label: str
    method: str
    r: int = 8
    structure_kwargs: dict = field(default_factory=dict)
    lr_family: str = "lora"
    twin: str | None = None  # the 16-bit spec whose best lr a 4-bit spec reuses

    def __hash__(self) -> int:
        return hash(self.label)


SPECS = [
    Spec("lora-r8", "lora", r=8),
    Spec("lora-r1", "lora", r=1),
    Spec("surm-circulant", "surm-circulant", lr_family="surm"),
    Spec("surm-toeplitz", "surm-toeplitz", lr_family="surm"),
    Spec("surm-kronecker", "surm-kronecker", lr_family="surm"),
    Spec("surm-ldr-r1", "surm-ldr", r=1, lr_family="surm"),  # rank 1: 2n parameters, the circulant's budget
    Spec("c3a", "c3a", lr_family="c3a"),
    Spec("lokr", "lokr", lr_family="lokr"),
    Spec("full", "full", lr_family="full"),
    Spec("qlora-r8", "qlora", r=8, twin="lora-r8"),
    Spec("qsurm-circulant", "qsurm-circulant", twin="surm-circulant"),
    Spec("qsurm-toeplitz", "qsurm-toeplitz", twin="surm-toeplitz"),
    Spec("qsurm-kronecker", "qsurm-kronecker", twin="surm-kronecker"),
    Spec("qsurm-ldr-r1", "qsurm-ldr", r=1, twin="surm-ldr-r1"),
]
LR_GRID = {
    "lora": [3e-3, 1e-2, 3e-2],
    "surm": [3e-3, 1e-2, 3e-2],
    "c3a": [3e-2, 1e-1, 3e-1],
    "lokr": [3e-3, 1e-2, 3e-2],
    "full": [3e-4, 1e-3, 3e-3],
}
QUICK_LR = {"lora": 3e-3, "surm": 1e-2, "c3a": 1e-1, "lokr": 1e-2, "full": 1e-3}
# Extra seeds go to the configurations the claims are about.
MAIN = ["lora-r8", "lora-r1", "c3a", "lokr", "qlora-r8"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- data


def generic_text_rows(n: int, seed: int) -> list[list[dict]]:
    """Plain word sequences (continue a list of words) so the base also learns ordinary text."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        cut = rng.randint(2, len(words) - 2)
        rows.append([{"role": "user", "content": "Continue: " + " ".join(words[:cut])},
                     {"role": "assistant", "content": " ".join(words[cut:])}])
    return rows


def _messages(rows: list[dict]) -> list[list[dict]]:
    return [alpaca_to_messages(r["instruction"], r["output"], r["input"]) for r in rows]


@dataclass
class AdaptData:
    train: list[list[dict]]
    val: list[list[dict]]
    test: list[list[dict]]
    test_tasks: list[str]


def adaptation_data(n_train: int, n_val: int, n_test: int, seed: int = 1) -> AdaptData:
    rows = make_rows(n_train + n_val + n_test, tasks=ADAPT_TASKS, rng=seed)  # prompts distinct across splits
    train_rows, val_rows, test_rows = rows[:n_train], rows[n_train:n_train + n_val], rows[n_train + n_val:]
    return AdaptData(_messages(train_rows), _messages(val_rows), _messages(test_rows), [r["task"] for r in test_rows])


# ----------------------------------------------------------------------------- pretrained base


def _probe_step_seconds(messages, threads_note: str) -> float:
    model = build_tiny_model(seed=0)
    config = TrainConfig(max_steps=8, learning_rate=PRETRAIN_LR, per_device_train_batch_size=BATCH_SIZE,
                         max_length=MAX_LENGTH, use_cpu=True)
    result = train(model, ByteTokenizer(), messages[:400], config=config, progress=False)
    seconds = result.seconds / result.steps
    log(f"pretraining probe: {seconds * 1000:.0f} ms/step ({threads_note})")
    return seconds


def pretrained_base(cache: Path, seconds: float, device: str) -> tuple[Path, dict]:
    """The tiny model fully trained on PRETRAIN_TASKS + generic text for about `seconds`; cached by its recipe."""
    recipe = {"tasks": PRETRAIN_TASKS, "rows": 4000, "text_rows": 1000, "seconds": seconds, "lr": PRETRAIN_LR,
              "batch_size": BATCH_SIZE, "config": TINY_CONFIG, "version": 1}
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache / f"base-{key}"
    info_file = folder / "pretrain.json"
    if info_file.exists():
        log(f"reusing the pretrained base {folder}")
        return folder, json.loads(info_file.read_text())
    messages = _messages(make_rows(recipe["rows"], tasks=PRETRAIN_TASKS, rng=0)) + generic_text_rows(1000, seed=0)
    steps = max(20, int(seconds / _probe_step_seconds(messages, f"{torch.get_num_threads()} thread(s)")))
    log(f"pretraining the base for {steps} steps (~{seconds:.0f} s)")
    model = build_tiny_model(seed=0)
    config = TrainConfig(max_steps=steps, learning_rate=PRETRAIN_LR, per_device_train_batch_size=BATCH_SIZE,
                         max_length=MAX_LENGTH, use_cpu=device == "cpu")
    result = train(model, ByteTokenizer(), messages, config=config, progress=False)
    save_model(model.cpu(), ByteTokenizer(), folder)
    info = {"recipe": recipe, "steps": steps, "seconds": result.seconds, "final_loss": result.train_loss,
            "first_loss": result.losses[0]}
    info_file.write_text(json.dumps(info, indent=2))
    log(f"base: loss {result.losses[0]:.3f} -> {result.train_loss:.3f} in {result.seconds:.0f} s")
    return folder, info



# ----------------------------------------------------------------------------- 100M timing mode


LLAMA_100M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024)


def long_rows(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(70)]
        rows.append([{"role": "user", "content": "Reverse the word order: " + " ".join(words)},
                     {"role": "assistant", "content": " ".join(reversed(words))}])
    return rows
