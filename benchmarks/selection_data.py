"""Selection benchmark, data: one seed's rows (synth or the real-text set, deduplicated as `dpsel curate` does),
the sized model, and the pretrained tiny base (cached under benchmarks/cache/, keyed by its settings)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


def load_rows(path: Path):
    from dpsel.data import alpaca_to_messages
    table = pd.read_parquet(path)
    system = table.system if "system" in table else [None] * len(table)
    return [alpaca_to_messages(r.instruction, r.output, r.input, s) for r, s in zip(table.itertuples(), system)], table


def make_data(args, workdir: Path):
    """One seed's rows: synth (with or without its task column) or the docstring real-text set (no task column)."""
    from dpsel.data import row_id
    if args.dataset.startswith("realtext"):
        from realtext import write as docstring_set
        from realtext_chat import write as chat_set
        write = chat_set if args.dataset == "realtext-chat" else docstring_set
        paths = write(workdir, rows=args.rows, noise=args.noise, meta_rows=args.meta_rows, test_rows=args.test_rows,
                      seed=args.seed)
    else:
        from dpsel.synth import generate
        paths = generate(workdir, rows=args.rows, noise=args.noise, seed=args.seed, meta_rows=args.meta_rows,
                         test_rows=args.test_rows)
    train, train_table = load_rows(paths["train"])
    meta, _ = load_rows(paths["meta"])
    test, test_table = load_rows(paths["test"])
    truth = pd.read_parquet(paths["truth"])
    ids = [row_id(m) for m in train]
    first = ~pd.Series(ids).duplicated().to_numpy()  # dedup: first occurrence kept
    dup_kinds = truth.kind.to_numpy()[~first]
    has_tasks = args.dataset == "synth"
    data = {"train": [m for m, k in zip(train, first) if k], "meta": meta, "test": test,
            "tasks": train_table.task.to_numpy()[first] if has_tasks else None, "kinds": truth.kind.to_numpy()[first],
            "test_tasks": test_table.task.tolist() if has_tasks else None,
            "dedup": {"removed": int((~first).sum()), "removed_that_are_duplicates": int((dup_kinds == "duplicate").sum()),
                      "duplicates_planted": int((truth.kind == "duplicate").sum())}}
    return data


def build_sized_model(size: str, workdir: Path) -> str:
    """`tiny` as is; `base`: a random-init Llama of hidden 768 × 12 layers, MLP 3072 (~113M params) saved for 4-bit loading."""
    if size == "tiny":
        return "tiny"
    from peft_train.models import build_tiny_model, save_model
    from peft_train.tokenizer import ByteTokenizer
    sizes = {"base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          num_key_value_heads=12),
             "large": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                           num_key_value_heads=16)}
    model = build_tiny_model(seed=0, **sizes[size])
    params = sum(p.numel() for p in model.parameters())
    print(f"model {size}: {params / 1e6:.1f}M parameters", flush=True)
    path = workdir / f"model-{size}"
    save_model(model, ByteTokenizer(), path)
    return str(path)


def benchmark_prompts(workdir: Path) -> set[tuple[str, str]]:
    """(instruction, input) of every train/meta/test row, which the pretraining corpus must not contain."""
    prompts = set()
    for name in ("train", "meta", "test"):
        table = pd.read_parquet(workdir / f"{name}.parquet")
        prompts.update(zip(table.instruction, table.input))
    return prompts


def pretraining_rows(args, exclude: set[tuple[str, str]]) -> list:
    from dpsel.data import alpaca_to_messages
    from dpsel.synth import make_rows
    rows = make_rows(args.pretrain_rows, rng=args.pretrain_seed)
    kept = [r for r in rows if (r["instruction"], r["input"]) not in exclude]
    return [alpaca_to_messages(r["instruction"], r["output"], r["input"]) for r in kept]


def pretrain_settings(args, exclude: set[tuple[str, str]]) -> dict:
    import hashlib
    digest = hashlib.sha256("\n".join(sorted("\t".join(p) for p in exclude)).encode()).hexdigest()[:16]
    return {"rows": args.pretrain_rows, "seed": args.pretrain_seed, "steps": args.pretrain_steps,
            "seconds": args.pretrain_seconds, "lr": args.pretrain_lr, "batch_size": args.pretrain_batch_size,
            "max_length": args.max_length, "excluded_prompts": digest, "model": "tiny", "version": 2}


def pretrain_tiny(rows: list, settings: dict, device: str) -> tuple[object, dict]:
    """Full fine-tune of the random-init tiny model on `rows` with peft_train's `pretrain` (Trainer: AdamW,
    2% warmup then cosine over `steps`), stopped early when `seconds` run out (the bound on CPU; a GPU finishes)."""
    import math
    import torch
    from peft_train.models import build_tiny_model
    from peft_train.tokenizer import ByteTokenizer
    from peft_train.training import TrainConfig, pretrain
    torch.manual_seed(settings["seed"])
    tokenizer, model = ByteTokenizer(), build_tiny_model(seed=0)
    config = TrainConfig(max_steps=settings["steps"], learning_rate=settings["lr"], warmup_steps=0.02,
                         per_device_train_batch_size=settings["batch_size"], max_length=settings["max_length"],
                         seed=settings["seed"], use_cpu=device == "cpu", log_every=500)
    result = pretrain(model, tokenizer, rows, config, seconds=settings["seconds"], progress=True)
    info = {"steps_done": result.steps, "epochs": math.ceil(result.epochs), "seconds": result.seconds,
            "device": device, "final_loss": float(np.mean(result.losses[-100:])), "rows": result.n_rows}
    return model.cpu().eval(), info


def pretrained_base(args, synth_dir: Path) -> str:
    """The cached pretrained tiny base for these settings, pretrained now if absent; returns its directory."""
    import hashlib
    from peft_train.models import save_model
    from peft_train.tokenizer import ByteTokenizer
    exclude = benchmark_prompts(synth_dir)
    settings = pretrain_settings(args, exclude)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(args.cache) / f"pretrained-tiny-{key}"
    done = path / "pretrain.json"
    if done.is_file():
        args.pretrain_info = json.loads(done.read_text())
        print(f"pretrained base: reusing {path}", flush=True)
        return str(path)
    rows = pretraining_rows(args, exclude)
    print(f"pretraining the tiny base on {len(rows)} clean rows (seed {args.pretrain_seed})", flush=True)
    model, info = pretrain_tiny(rows, settings, args.pretrain_device)
    save_model(model, ByteTokenizer(), path)
    args.pretrain_info = {"settings": settings, **info}
    done.write_text(json.dumps(args.pretrain_info, indent=2) + "\n")
    print(f"pretrained base: {path} {info}", flush=True)
    return str(path)
