"""The demo's base model: the built-in tiny model briefly pretrained (every weight) on clean synthetic rows of
other task families than the demo's (benchmarks/tune.py's pretrain-then-adapt split), none of whose prompts
the demo's train, meta or test rows use, so the adapters tune a base that already writes answers to new
tasks. It is saved as a model folder (what `--model` takes) with `base.json` beside its weights; a run with
the same settings and the same demo data reuses it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from dpsel.io import write_json_atomic

SETTINGS_FILE = "base.json"
PRETRAIN_TASKS = ("add", "mul", "reverse", "sort", "upper", "count")


@dataclass(frozen=True)
class BaseSettings:
    """How the base is pretrained: `rows` clean `dpsel.synth.make_rows` rows of `tasks` drawn with `seed` (demo
    prompts left out), `steps` optimizer steps of full training (AdamW, 2% warmup then cosine)."""
    steps: int
    tasks: tuple[str, ...] = PRETRAIN_TASKS
    rows: int = 4000
    seed: int = 1
    lr: float = 3e-3
    batch_size: int = 16
    max_length: int = 128


def demo_prompts(data_dir: Path) -> set[tuple[str, str]]:
    """(instruction, input) of every train, meta and test row: the pretraining rows must use none of them."""
    prompts: set[tuple[str, str]] = set()
    for name in ("train", "meta", "test"):
        table = pd.read_parquet(data_dir / f"{name}.parquet", columns=["instruction", "input"])
        prompts.update(zip(table.instruction, table.input))
    return prompts


def pretraining_rows(settings: BaseSettings, exclude: set[tuple[str, str]]) -> list:
    from dpsel.data import alpaca_to_messages
    from dpsel.synth import make_rows

    drawn = make_rows(settings.rows, tasks=list(settings.tasks), rng=settings.seed)
    rows = [r for r in drawn if (r["instruction"], r["input"]) not in exclude]
    return [alpaca_to_messages(r["instruction"], r["output"], r["input"]) for r in rows]


def recipe(settings: BaseSettings, exclude: set[tuple[str, str]]) -> dict:
    """What the saved base is a function of; a cached base is reused only when this matches."""
    digest = hashlib.sha256("\n".join(sorted("\t".join(p) for p in exclude)).encode()).hexdigest()[:16]
    return {**asdict(settings), "tasks": list(settings.tasks), "model": "tiny", "excluded_prompts": digest,
            "version": 1}


def cached(folder: Path, wanted: dict) -> dict | None:
    """The saved base's settings file when it was pretrained with `wanted`, else None."""
    try:
        saved = json.loads((folder / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return saved if saved.get("recipe") == wanted else None


def pretrained_base(folder: Path, data_dir: Path, settings: BaseSettings, device: str = "auto",
                    progress=True) -> tuple[str, dict]:
    """The base under `folder`, pretrained now unless a base with these settings is there; returns (its path,
    its settings file's contents, with "reused")."""
    exclude = demo_prompts(data_dir)
    wanted = recipe(settings, exclude)
    saved = cached(folder, wanted)
    if saved is not None:
        return str(folder), {**saved, "reused": True}
    info = _pretrain(folder, pretraining_rows(settings, exclude), settings, device, progress)
    saved = {"recipe": wanted, **info}
    write_json_atomic(saved, folder / SETTINGS_FILE)  # written last: its presence means the weights are whole
    return str(folder), {**saved, "reused": False}


def _pretrain(folder: Path, rows: list, settings: BaseSettings, device: str, progress) -> dict:
    import torch

    from dpsel.progress import reporting
    from peft_train.models import build_tiny_model, resolve_device, save_model
    from peft_train.tokenizer import ByteTokenizer
    from peft_train.training import TrainConfig, pretrain

    torch.manual_seed(settings.seed)
    tokenizer, model = ByteTokenizer(), build_tiny_model(seed=0)
    config = TrainConfig(max_steps=settings.steps, learning_rate=settings.lr, warmup_steps=0.02,
                         per_device_train_batch_size=settings.batch_size, max_length=settings.max_length,
                         seed=settings.seed, use_cpu=resolve_device(device).type == "cpu")
    with reporting(progress, "pretrain base", default_phase="training") as reporter:
        result = pretrain(model, tokenizer, rows, config, progress=reporter or False)
    save_model(model.cpu().eval(), tokenizer, folder)
    return {"steps": result.steps, "rows": result.n_rows, "seconds": result.seconds,
            "first_loss": result.losses[0], "final_loss": result.train_loss}
